"""Pick the simulator's behaviour for one request from its model name (pure, no I/O).

Grammar::

    model  := name [":" params]
    params := key "=" value ("," key "=" value)*

``name`` is one of the behaviours below; any other name (``gpt-4o-mini``, ``llama3:8b``) is a
normal, well-behaved generation, so real model names just work. An unknown name may still carry
the common parameters (``gpt-4o-mini:rate=5,tokens=3``); if its suffix is not made of common
``key=value`` pairs, the whole string is taken as an opaque model name.

Common parameters (every behaviour):

====================  ==========================================================================
``rate=R``            tokens per second (``0``: as fast as possible). Default: the simulator's.
``tokens=N``          natural completion length; ``max_tokens`` below ``N`` truncates it.
``keepalive=K``       while waiting for the next event of a stream, send ``: keep-alive`` every K s.
``cached=N``          report ``N`` cached prompt tokens (capped at the prompt size).
====================  ==========================================================================

Behaviours (``after=N`` always counts *content* chunks, never role, reasoning or keep-alives):

- ``normal``: the default.
- ``slow-headers:delay=S``: wait S seconds before sending response headers (default 1).
- ``slow-first-token:delay=S[,keepalive=K]``: headers and the role chunk at once, the first content
  token at S seconds (default 1), keep-alive comments meanwhile if K is given.
- ``stall:after=N[,keepalive=K]``: N content chunks (default 0), then silence (or keep-alives)
  until the peer closes.
- ``steady:interval=S``: one content chunk every S seconds (same as ``rate=1/S``).
- ``error:status=C[,after=N][,code=X][,retry_after=S]``: an OpenAI-shaped error with HTTP status
  C (default 500). ``code`` sets the error's code (``context_length_exceeded``,
  ``content_policy_violation``, ...). A 429 carries ``retry-after: S`` (default 1;
  ``retry_after=none`` sends none). With ``after`` on a stream: N chunks, an in-band error event,
  end.
- ``tail:p=P,delay=S``: a slow tail: with probability P (0..1, drawn from the simulator's
  seeded generator, so a run is reproducible) the request behaves as
  ``slow-first-token:delay=S``, otherwise normally.
- ``drop:delay=S``: read the request, say nothing for S seconds (default 0), then close the
  connection (FIN) without any response: an upstream that hangs up on a request it has read.
- ``reset:after=N``: abort the TCP connection (RST) after N content chunks (0: before any byte).
- ``malformed:after=N``: after N chunks one ``data: {not json`` event, then carry on normally.
- ``truncate:after=N``: N content chunks, then the stream ends cleanly (the chunked body is
  terminated) without a finish chunk, usage or ``[DONE]`` (Responses: no terminal event): an
  upstream that cut the answer. No effect on non-streamed requests.
- ``slow-body:rate=B``: read the request body at B bytes/s (default 1000) before answering.
  Here ``rate`` is bytes per second of *request body*, not tokens per second.
- ``empty-deltas:count=N``: N chunks without content (``delta: {}``) before the first token.
- ``reasoning:tokens=R``: R reasoning tokens first (default 8); here ``tokens`` is the reasoning
  count. They count against ``max_tokens``, as OpenAI's reasoning tokens do.
- ``tool-call``: the content is a ``delta.tool_calls`` argument stream (chat completions only).

The same grammar is accepted in the ``x-sim-behaviour`` request header, which wins over the
model name (useful when a proxy rewrites model names, and for ``slow-body``, which must be known
before the body is read).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class BehaviourError(ValueError):
    """A model string names a behaviour but its parameters are wrong."""


class Name(enum.StrEnum):
    NORMAL = "normal"
    SLOW_HEADERS = "slow-headers"
    SLOW_FIRST_TOKEN = "slow-first-token"
    STALL = "stall"
    STEADY = "steady"
    ERROR = "error"
    RESET = "reset"
    MALFORMED = "malformed"
    TRUNCATE = "truncate"
    SLOW_BODY = "slow-body"
    EMPTY_DELTAS = "empty-deltas"
    REASONING = "reasoning"
    TOOL_CALL = "tool-call"
    DROP = "drop"
    TAIL = "tail"


@dataclass(frozen=True, slots=True)
class Behaviour:
    name: Name = Name.NORMAL
    rate: float | None = None  # tokens/s; None: the simulator's default
    tokens: int | None = None  # natural completion length; None: max_tokens or the default
    keepalive: float | None = None  # seconds between ": keep-alive" comments while waiting
    cached: int = 0
    delay: float = 0.0  # slow-headers, slow-first-token
    after: int | None = None  # stall, error, reset, malformed
    status: int = 500  # error
    body_rate: float | None = None  # slow-body, bytes/s
    empty_deltas: int = 0
    reasoning_tokens: int = 0
    code: str | None = None  # error: the error object's code
    retry_after: float | None = 1.0  # error 429: the retry-after header (None: not sent)
    p: float = 0.0  # tail: probability of the slow first token

    def describe(self) -> dict[str, object]:
        """The name and the parameters that differ from the defaults (for records and logs)."""
        out: dict[str, object] = {"name": self.name.value}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value != f.default:
                out[f.name] = value
        return out


NORMAL = Behaviour()

_COMMON = frozenset({"rate", "tokens", "keepalive", "cached"})
# Keys each behaviour accepts besides the common ones. slow-body and reasoning reuse "rate" and
# "tokens" with their own meaning, as the documented grammar spells them.
_KEYS: dict[Name, frozenset[str]] = {
    Name.NORMAL: frozenset(),
    Name.SLOW_HEADERS: frozenset({"delay"}),
    Name.SLOW_FIRST_TOKEN: frozenset({"delay"}),
    Name.STALL: frozenset({"after"}),
    Name.STEADY: frozenset({"interval"}),
    Name.ERROR: frozenset({"status", "after", "code", "retry_after"}),
    Name.RESET: frozenset({"after"}),
    Name.MALFORMED: frozenset({"after"}),
    Name.TRUNCATE: frozenset({"after"}),
    Name.SLOW_BODY: frozenset(),
    Name.EMPTY_DELTAS: frozenset({"count"}),
    Name.REASONING: frozenset(),
    Name.TOOL_CALL: frozenset(),
    Name.DROP: frozenset({"delay"}),
    Name.TAIL: frozenset({"p", "delay"}),
}
_NAMES = {n.value: n for n in Name}


def parse_behaviour(model: str) -> Behaviour:
    """Parse a model string into a Behaviour. Raises BehaviourError for a known name with bad
    parameters; anything that is not a behaviour name is `normal`."""
    head, sep, tail = model.partition(":")
    name = _NAMES.get(head.strip())
    if name is None:
        return _parse_opaque(tail) if sep else NORMAL
    params = _split(tail, model) if sep else {}
    allowed = _KEYS[name] | _COMMON
    unknown = sorted(set(params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed))
        raise BehaviourError(f"{name.value!r} does not take {', '.join(unknown)}; it takes {takes}")
    return _build(name, params)


def _parse_opaque(tail: str) -> Behaviour:
    # "llama3:8b" or "ft:gpt-4o:org:id" are model names, not parameters: only a suffix made
    # entirely of valid common parameters is read as such.
    try:
        params = _split(tail, tail)
        if not params or set(params) - _COMMON:
            return NORMAL
        return _build(Name.NORMAL, params)
    except BehaviourError:
        return NORMAL


def _split(tail: str, model: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in tail.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise BehaviourError(f"bad parameter {part!r} in {model!r}: expected key=value")
        if key in params:
            raise BehaviourError(f"parameter {key!r} given twice in {model!r}")
        params[key] = value
    return params


def _build(name: Name, p: dict[str, str]) -> Behaviour:
    rate: float | None = None
    body_rate: float | None = None
    if "rate" in p:
        if name is Name.SLOW_BODY:
            body_rate = _num(p, "rate", positive=True)
        else:
            rate = _num(p, "rate")
    if "interval" in p:
        if rate is not None:
            raise BehaviourError("give either rate or interval, not both")
        rate = 1.0 / _num(p, "interval", positive=True)
    tokens = _int(p, "tokens") if "tokens" in p else None
    reasoning = 0
    if name is Name.REASONING:
        reasoning, tokens = (tokens if tokens is not None else 8), None
    after = _int(p, "after") if "after" in p else None
    if name in (Name.STALL, Name.RESET, Name.MALFORMED, Name.TRUNCATE) and after is None:
        after = 0
    status = _int(p, "status") if "status" in p else 500
    if not 400 <= status <= 599:
        raise BehaviourError(f"status must be 400..599, got {status}")
    delay = _num(p, "delay") if "delay" in p else 0.0
    if name in (Name.SLOW_HEADERS, Name.SLOW_FIRST_TOKEN, Name.TAIL) and "delay" not in p:
        delay = 1.0
    return Behaviour(
        name=name,
        rate=rate,
        tokens=tokens,
        keepalive=_num(p, "keepalive", positive=True) if "keepalive" in p else None,
        cached=_int(p, "cached") if "cached" in p else 0,
        delay=delay,
        after=after,
        status=status,
        body_rate=body_rate
        if body_rate is not None
        else (1000.0 if name is Name.SLOW_BODY else None),
        empty_deltas=(_int(p, "count") if "count" in p else 3) if name is Name.EMPTY_DELTAS else 0,
        reasoning_tokens=reasoning,
        code=p.get("code"),
        p=_probability(p) if "p" in p else 0.0,
        retry_after=None
        if p.get("retry_after") == "none"
        else (_num(p, "retry_after") if "retry_after" in p else 1.0),
    )


def _num(p: dict[str, str], key: str, *, positive: bool = False) -> float:
    try:
        value = float(p[key])
    except ValueError:
        raise BehaviourError(f"{key} must be a number, got {p[key]!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise BehaviourError(f"{key} must be a finite number >= 0, got {p[key]!r}")
    if positive and value == 0:
        raise BehaviourError(f"{key} must be > 0")
    return value


def _probability(p: dict[str, str]) -> float:
    value = _num(p, "p")
    if value > 1:
        raise BehaviourError(f"p must be a probability in 0..1, got {p['p']!r}")
    return value


def _int(p: dict[str, str], key: str) -> int:
    try:
        value = int(p[key])
    except ValueError:
        raise BehaviourError(f"{key} must be an integer, got {p[key]!r}") from None
    if value < 0:
        raise BehaviourError(f"{key} must be >= 0, got {value}")
    return value
