"""The timeout taxonomy as pure, absolute deadlines (no asyncio here; `watchdog.py` enforces).

Five phases, each measured from its own start point:

| phase        | starts at                          | ends at                              |
|--------------|------------------------------------|--------------------------------------|
| connect      | each upstream attempt begins       | request headers written upstream     |
| headers      | request headers written upstream   | response headers received            |
| first_token  | the request arrived at the proxy   | first content-bearing SSE event      |
| idle         | each content-bearing SSE event     | the next one (non-SSE: next body read)|
| total        | the request arrived at the proxy   | the exchange ends                    |

first_token applies to streamed requests from the start (it also bounds the connect and headers
waits of a stream). Only *content* resets first_token and idle: SSE comments, keep-alive pings,
role-only chunks and empty deltas do not, or a silent stream would live until total_s.
At any moment the deadline in force is the earliest of the active ones; that one is reported.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.outcome import TimeoutKind
from proxy.route_options import TimeoutsConfig

# Headers a client may use to tell us its own deadline, in seconds, each meaning what its
# sender means by it:
# - x-hangup-timeout (ours, any client): the whole request; caps total_s.
# - x-stainless-timeout (the Node SDK's `timeout`, whole seconds): its fetch is aborted if the
#   response headers have not arrived by then; the body is not bounded. So it bounds the wait
#   for *response headers*, never the stream.
# - x-stainless-read-timeout (the Python SDK: httpx's read timeout): the longest gap between two
#   reads, the first read included. It bounds the wait for response headers and caps idle_s.
CLIENT_DEADLINE_HEADERS = ("x-hangup-timeout",)
CLIENT_HEADERS_DEADLINE_HEADERS = ("x-stainless-timeout", "x-stainless-read-timeout")
CLIENT_READ_GAP_HEADERS = ("x-stainless-read-timeout",)
ALL_CLIENT_DEADLINE_HEADERS = (
    *CLIENT_DEADLINE_HEADERS,
    *CLIENT_HEADERS_DEADLINE_HEADERS,
)


def _positive_seconds(value: str) -> float | None:
    """A header's value as a deadline: positive, finite seconds, or None."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def client_deadline(
    headers: Mapping[str, str], names: tuple[str, ...] = CLIENT_DEADLINE_HEADERS
) -> tuple[float, str] | None:
    """The tightest positive deadline the client announced in `names`, with its header."""
    best: tuple[float, str] | None = None
    for name in names:
        value = headers.get(name)
        if value is None:
            continue
        seconds = _positive_seconds(value)
        if seconds is not None and (best is None or seconds < best[0]):
            best = (seconds, name)
    return best


def client_deadlines(
    headers: Mapping[str, str],
) -> tuple[tuple[float, str] | None, tuple[float, str] | None, tuple[float, str] | None]:
    """`client_deadline` of CLIENT_DEADLINE_HEADERS, CLIENT_HEADERS_DEADLINE_HEADERS and
    CLIENT_READ_GAP_HEADERS, in that order, in one call that reads each header once (every
    request asks for all three)."""
    total = whole = read_gap = None
    value = headers.get("x-hangup-timeout")
    if value is not None and (seconds := _positive_seconds(value)) is not None:
        total = (seconds, "x-hangup-timeout")
    value = headers.get("x-stainless-timeout")
    if value is not None and (seconds := _positive_seconds(value)) is not None:
        whole = (seconds, "x-stainless-timeout")
    value = headers.get("x-stainless-read-timeout")
    if value is not None and (seconds := _positive_seconds(value)) is not None:
        read_gap = (seconds, "x-stainless-read-timeout")
    # The tighter of the two bounds the response headers; the first name wins a tie.
    response_headers = whole
    if read_gap is not None and (whole is None or read_gap[0] < whole[0]):
        response_headers = read_gap
    return total, response_headers, read_gap


def client_margin(seconds: float) -> float:
    """How long before a client's own headers deadline we answer: its 504 (or the held stream's
    headers) must reach it before it gives up by itself."""
    return min(0.5, 0.1 * seconds)


@dataclass(frozen=True, slots=True)
class Budget:
    """The effective timeouts of one request: the route's policy, capped by the client's own
    deadlines (each where its SDK applies it; see CLIENT_*_HEADERS)."""

    connect_s: float | None
    headers_s: float | None
    first_token_s: float | None
    idle_s: float | None
    total_s: float | None
    total_source: str | None = None  # None: the route; else the client header that capped it
    # The client gives up unless response headers reach it within this many seconds.
    client_headers_s: float | None = None
    client_headers_source: str | None = None
    idle_source: str | None = None  # the client header that capped idle_s, if one did

    @classmethod
    def for_request(
        cls,
        policy: TimeoutsConfig,
        client: tuple[float, str] | None,
        *,
        honor_client_deadline: bool,
        client_headers: tuple[float, str] | None = None,
        read_gap: tuple[float, str] | None = None,
    ) -> Budget:
        # Budgets are frozen, so one is shared by every request with the same policy and the
        # same client deadlines: the SDKs send the same deadline headers on every request
        # (the Python SDK's x-stainless-read-timeout), so almost every request finds its
        # budget made (a frozen dataclass's __init__ is ~75 bytecodes). Keyed by the
        # policy's id, checked by identity on a hit; a client varying its values only
        # refills the bounded cache.
        key = (id(policy), honor_client_deadline, client, client_headers, read_gap)
        known = _BUDGETS.get(key)
        if known is not None and known[0] is policy:
            return known[1]
        budget = cls._made(
            policy,
            client,
            honor_client_deadline=honor_client_deadline,
            client_headers=client_headers,
            read_gap=read_gap,
        )
        if len(_BUDGETS) >= BUDGETS_KEPT:
            _BUDGETS.clear()
        _BUDGETS[key] = (policy, budget)
        return budget

    @classmethod
    def _made(
        cls,
        policy: TimeoutsConfig,
        client: tuple[float, str] | None,
        *,
        honor_client_deadline: bool,
        client_headers: tuple[float, str] | None,
        read_gap: tuple[float, str] | None,
    ) -> Budget:
        total, source = policy.total_s, None
        idle, idle_source = policy.idle_s, None
        if not honor_client_deadline:
            client = client_headers = read_gap = None
        # A client deadline may only shorten the route's policy, never extend it.
        if client is not None and (total is None or client[0] < total):
            total, source = client
        if read_gap is not None and (idle is None or read_gap[0] < idle):
            idle, idle_source = read_gap
        return cls(
            policy.connect_s,
            policy.headers_s,
            policy.first_token_s,
            idle,
            total,
            source,
            None if client_headers is None else client_headers[0],
            None if client_headers is None else client_headers[1],
            idle_source,
        )

    def seconds(self, kind: TimeoutKind) -> float | None:
        value: float | None = getattr(self, kind.config_key.removeprefix("timeouts."))
        return value


BUDGETS_KEPT = 256
_BUDGETS: dict[
    tuple[int, bool, tuple[float, str] | None, tuple[float, str] | None, tuple[float, str] | None],
    tuple[TimeoutsConfig, Budget],
] = {}


class Phase(enum.Enum):
    CONNECT = "connect"
    HEADERS = "headers"
    AWAIT_CONTENT = "await_content"  # SSE response open, no content yet
    STREAMING = "streaming"  # SSE, content flowing
    BODY = "body"  # non-SSE body
    BACKOFF = "backoff"  # between retry attempts
    DONE = "done"


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us).
_PHASE_AWAIT_CONTENT: Final = Phase.AWAIT_CONTENT
_PHASE_BODY: Final = Phase.BODY
_PHASE_CONNECT: Final = Phase.CONNECT
_PHASE_DONE: Final = Phase.DONE
_PHASE_HEADERS: Final = Phase.HEADERS
PHASE_STREAMING: Final = Phase.STREAMING
_TIMEOUT_CONNECT: Final = TimeoutKind.CONNECT
_TIMEOUT_HEADERS: Final = TimeoutKind.HEADERS
_TIMEOUT_IDLE: Final = TimeoutKind.IDLE
_TIMEOUT_FIRST_TOKEN: Final = TimeoutKind.FIRST_TOKEN
_TIMEOUT_TOTAL: Final = TimeoutKind.TOTAL

_BEFORE_CONTENT = frozenset({Phase.CONNECT, Phase.HEADERS, Phase.BACKOFF, Phase.AWAIT_CONTENT})


class Deadlines:
    """Which deadline is in force, as absolute `loop.time()` values. Mutated by the relay at
    phase transitions; read by the watchdog only when its timer fires (so an idle reset per
    chunk costs one float store)."""

    __slots__ = (
        "_client_headers_at",
        "_first_token_at",
        "_phase_deadline",
        "_total_at",
        "budget",
        "last_progress",
        "phase",
        "started",
        "watch_first_token",
    )

    def __init__(self, budget: Budget, started: float, *, watch_first_token: bool) -> None:
        self.budget = budget
        self.started = started
        self.watch_first_token = watch_first_token
        self.phase = _PHASE_CONNECT
        self.last_progress = started
        self._total_at = None if budget.total_s is None else started + budget.total_s
        self._first_token_at = (
            None if budget.first_token_s is None else started + budget.first_token_s
        )
        connect = budget.connect_s  # (inline: no call per request)
        self._phase_deadline = None if connect is None else started + connect
        self._client_headers_at: float | None = None
        if budget.client_headers_s is not None:
            d = budget.client_headers_s
            self._client_headers_at = started + d - client_margin(d)

    @staticmethod
    def _after(start: float, seconds: float | None) -> float | None:
        return None if seconds is None else start + seconds

    # --- transitions -------------------------------------------------------------------------
    def connecting(self, now: float) -> None:
        """A new upstream attempt (first or retry) begins."""
        self.phase = _PHASE_CONNECT
        connect = self.budget.connect_s
        self._phase_deadline = None if connect is None else now + connect

    def next_target(self, now: float) -> None:
        """A fallback attempt begins: it gets its own connect, headers and first-token time
        (the previous target used up its share); only `total` is one budget for them all."""
        self.connecting(now)
        self._first_token_at = self._after(now, self.budget.first_token_s)

    def backing_off(self) -> None:
        """Waiting before a retry: only first_token (streams) and total run."""
        self.phase = Phase.BACKOFF
        self._phase_deadline = None

    def headers_sent(self, now: float) -> float | None:
        """The request went out: the headers phase begins. Its deadline, when it is one that
        did not exist before (None: nothing moved earlier, the watchdog's timer stands)."""
        if self.phase is _PHASE_CONNECT:
            self.phase = _PHASE_HEADERS
            headers = self.budget.headers_s
            at = self._phase_deadline = None if headers is None else now + headers
            return at
        return None

    def response_started(self, now: float, *, sse: bool) -> float | None:
        """Response headers came: content is awaited (SSE) or the body read. The earliest
        deadline this brings into force (None: none): every other one in force now already
        was (the phase's own ends), so the watchdog's timer stands unless this one is sooner."""
        self.last_progress = now
        if sse:
            self.phase = _PHASE_AWAIT_CONTENT
            if self.watch_first_token:
                return None
            self.watch_first_token = True
            return self._first_token_at
        self.phase = _PHASE_BODY
        idle = self.budget.idle_s
        return None if idle is None else now + idle

    def content(self, now: float) -> None:
        """A content-bearing event (SSE) or any body bytes (non-SSE) arrived."""
        self.last_progress = now
        if self.phase is _PHASE_AWAIT_CONTENT:
            self.phase = PHASE_STREAMING

    def done(self) -> None:
        self.phase = _PHASE_DONE

    def client_committed(self) -> None:
        """Response headers went to the client: its headers deadline is met."""
        self._client_headers_at = None

    def client_commit_at(self) -> float | None:
        """When a stream whose headers are held must send them, so that they reach the client
        before its headers deadline (a little before the 504 would fire)."""
        at, d = self._client_headers_at, self.budget.client_headers_s
        return None if at is None or d is None else at - client_margin(d)

    def client_headers_expired(self, now: float) -> bool:
        """The client's own headers deadline (not a route phase) is what fired."""
        return self._client_headers_at is not None and now >= self._client_headers_at

    # --- query -------------------------------------------------------------------------------
    def next(self) -> tuple[float, TimeoutKind] | None:
        """The earliest deadline in force and its kind; ties go to the phase, not `total`."""
        # Called on every watchdog re-arm (several times a request): no closure, no tuples
        # but the answer. A candidate replaces the best so far only when strictly earlier.
        phase = self.phase
        if phase is _PHASE_DONE:
            return None
        # The client's headers deadline is reported as the headers phase: it fires only
        # before response headers went out.
        when, kind = self._client_headers_at, _TIMEOUT_HEADERS
        if phase is _PHASE_CONNECT or phase is _PHASE_HEADERS:
            at = self._phase_deadline
            if at is not None and (when is None or at < when):
                when = at
                kind = _TIMEOUT_CONNECT if phase is _PHASE_CONNECT else _TIMEOUT_HEADERS
        if self.watch_first_token and phase in _BEFORE_CONTENT:
            at = self._first_token_at
            if at is not None and (when is None or at < when):
                when, kind = at, _TIMEOUT_FIRST_TOKEN
        if phase is PHASE_STREAMING or phase is _PHASE_BODY:
            idle = self.budget.idle_s
            if idle is not None:
                at = self.last_progress + idle
                if when is None or at < when:
                    when, kind = at, _TIMEOUT_IDLE
        at = self._total_at
        if at is not None and (when is None or at < when):
            when, kind = at, _TIMEOUT_TOTAL
        return None if when is None else (when, kind)

    def remaining(self, now: float) -> float | None:
        """Seconds left of the budget (for deadline propagation upstream and for the policy):
        the total, or the client's headers deadline while the response has not begun."""
        ends = [t for t in (self._total_at, self._client_headers_at) if t is not None]
        return None if not ends else max(0.0, min(ends) - now)

    def retry_window(self, now: float) -> float | None:
        """Seconds a wait before retrying the same target may take: `remaining`, and for a
        stream also this target's first-token deadline (it keeps running through the wait; a
        retry that could not answer before it would only turn the fallback into a 504)."""
        left = self.remaining(now)
        if self.watch_first_token and self._first_token_at is not None:
            mine = max(0.0, self._first_token_at - now)
            left = mine if left is None else min(left, mine)
        return left

    def describe(self, kind: TimeoutKind, route: str) -> str:
        """The message a client sees; it names the config key that fired."""
        budget = self.budget
        if (
            kind is TimeoutKind.HEADERS
            and budget.client_headers_source is not None
            and self._client_headers_at is not None
            and (self._phase_deadline is None or self._client_headers_at <= self._phase_deadline)
        ):
            return (
                f"client deadline of {budget.client_headers_s:g}s "
                f"({budget.client_headers_source}) for response headers exceeded on "
                f'route "{route}"'
            )
        if kind is TimeoutKind.IDLE and budget.idle_source is not None:
            return (
                f"client read timeout of {budget.idle_s:g}s ({budget.idle_source}) exceeded "
                f'on route "{route}" (it caps timeouts.idle_s)'
            )
        if kind is TimeoutKind.TOTAL and budget.total_source is not None:
            return (
                f"client deadline of {budget.total_s:g}s ({budget.total_source}) exceeded on "
                f'route "{route}" (it caps timeouts.total_s)'
            )
        seconds = budget.seconds(kind)
        what = {
            TimeoutKind.CONNECT: "connecting to the upstream",
            TimeoutKind.HEADERS: "waiting for the upstream's response headers",
            TimeoutKind.FIRST_TOKEN: "waiting for the first content token",
            TimeoutKind.IDLE: "waiting for the next content chunk",
            TimeoutKind.TOTAL: "for the whole request",
        }[kind]
        return f'{kind.config_key}={seconds:g} exceeded on route "{route}" ({what})'
