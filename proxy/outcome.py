"""The one record every request ends in.

Every request gets exactly one terminal `Outcome`, set once by the relay (`relay.py`) and read by
metrics, the access log and token accounting. Nothing re-derives the outcome from status codes or
strings: a 200 that was cut mid-stream is `client_cancelled`, not "success".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from proxy.tracing.context import TraceIds

from proxy.attempts import Attempt


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # the upstream's answer (status < 400) was relayed whole
    CLIENT_CANCELLED = "client_cancelled"  # the downstream client went away first
    TIMEOUT = "timeout"  # one of the route's deadlines fired (see `TimeoutKind`)
    # unreachable, reset, malformed, 5xx, an in-band error event, or a stream that ended without
    # its terminal event (`error_type` "upstream_truncated")
    UPSTREAM_ERROR = "upstream_error"
    # The upstream refused the request (a 4xx other than 429: bad key, unknown model, invalid
    # body). Providers do not bill what they reject: no tokens, no cost.
    UPSTREAM_REJECTED = "upstream_rejected"
    # The upstream answered 429. Its own outcome: it calls for backing off or more quota, not for
    # fixing the request or the upstream, and nothing was generated or billed.
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"  # refused by the proxy before any upstream work (4xx, draining 503)
    SHUTDOWN = "shutdown"  # still running when the shutdown grace period ran out
    INTERNAL_ERROR = "internal_error"  # a bug in hangup (answered 500, logged with traceback)


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us). Modules
# that test them import these names.
OUTCOME_COMPLETED: Final = Outcome.COMPLETED
OUTCOME_UPSTREAM_ERROR: Final = Outcome.UPSTREAM_ERROR
OUTCOME_CLIENT_CANCELLED: Final = Outcome.CLIENT_CANCELLED
OUTCOME_INTERNAL_ERROR: Final = Outcome.INTERNAL_ERROR


def response_outcome(status: int, *, stream_error: bool, stream_terminated: bool | None) -> Outcome:
    """The outcome of an upstream answer that was relayed to its end.

    stream_error: the stream carried an in-band error event. stream_terminated: whether a stream
    ended with its terminal event (`[DONE]`, `response.completed`/`incomplete`/`cancelled`, or a
    `finish_reason`); None for answers that are not streams. A stream that closed without one
    was cut by the upstream: a failure, however clean the close looked.
    """
    if status == 429:
        return Outcome.RATE_LIMITED
    if 400 <= status < 500:
        return Outcome.UPSTREAM_REJECTED
    if status >= 500 or stream_error or stream_terminated is False:
        return Outcome.UPSTREAM_ERROR
    return OUTCOME_COMPLETED


def settle_relayed(
    record: RequestRecord, status: int, *, stream_error: str | None, stream_terminated: bool | None
) -> None:
    """Settle a request whose upstream answer was relayed to its end (see `response_outcome`)."""
    if stream_error is not None:
        # A 200 stream that ended in an in-band error event: the upstream failed.
        record.error_type = "upstream_error"
        record.error_message = stream_error[:500]
    outcome = response_outcome(
        status, stream_error=stream_error is not None, stream_terminated=stream_terminated
    )
    if outcome is OUTCOME_UPSTREAM_ERROR and stream_error is None and stream_terminated is False:
        record.error_type = "upstream_truncated"
        record.error_message = "the upstream closed the stream without its terminal event"
    record.settle(outcome)


class TimeoutKind(enum.StrEnum):
    """The five timeout phases, each an absolute deadline from its own start point."""

    CONNECT = "connect"
    HEADERS = "headers"
    FIRST_TOKEN = "first_token"
    IDLE = "idle"
    TOTAL = "total"

    @property
    def config_key(self) -> str:
        return f"timeouts.{self.value}_s"


class BackgroundCancel(enum.StrEnum):
    """What happened to a provider-side background response when its client left."""

    CANCELLED = "cancelled"
    ALREADY_FINISHED = "already_finished"
    FAILED = "failed"
    KEPT = "kept"


class CountSource(enum.StrEnum):
    """How a token count was obtained, from the most to the least trustworthy."""

    REPORTED = "reported"  # the upstream's own usage object: what the provider bills
    TOKENIZED = "tokenized"  # counted by hangup with the model's tokenizer (exact where it applies)
    ESTIMATED = "estimated"  # a heuristic (characters / 4, one token per chunk)


class EngineAbort(enum.StrEnum):
    """What came of telling an engine to stop a request whose client left (proxy/engines)."""

    SENT = "sent"  # on the wire, no answer before hangup had to stop waiting (shutdown)
    ACKNOWLEDGED = "acknowledged"  # the engine answered 2xx
    FAILED = "failed"  # another answer, two transport errors, or no answer within the bound
    UNSUPPORTED = "unsupported"  # the upstream has no such endpoint (404/405): not called again


class Usage(msgspec.Struct, gc=False):
    """Token counts of one request; each figure knows how it was obtained.

    `*_estimated` says a heuristic made the figure; `prompt_tokenized` says a tokenizer counted
    the prompt (then `prompt_estimated` is False). Neither: the upstream reported it.

    A msgspec Struct (counts and flags only: not tracked by the garbage collector): one or two
    are made for every request, in C (a dataclass's generated `__init__` runs as Python).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_estimated: bool = False
    completion_estimated: bool = False
    prompt_tokenized: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prompt_source(self) -> CountSource:
        if self.prompt_tokenized:
            return CountSource.TOKENIZED
        return CountSource.ESTIMATED if self.prompt_estimated else CountSource.REPORTED

    @property
    def completion_source(self) -> CountSource:
        return CountSource.ESTIMATED if self.completion_estimated else CountSource.REPORTED


@dataclass(slots=True)
class Savings:
    """What hanging up avoided (see docs/accounting.md for the estimator).

    tokens_saved: completion tokens the upstream did not generate because we hung up (estimate):
        compute saved. Dollars follow only where the upstream's billing stops at a hang-up
        (`billing` "stops"); a self-hosted engine saves GPU time, not dollars; an upstream that
        bills the full answer ("full") generates it anyway, so nothing is saved there.
    tokens_saved_upper: the bound `max_tokens - generated`, when the request set a limit.
    tokens_wasted: completion tokens that still arrived after the client had left.
    expected_tokens: the typical completion length the estimate assumed.
    basis: where `expected_tokens` came from ("history", "route_default").
    billing: the billing policy that applied ("stops", "full", "self_hosted"; proxy/billing.py).
    """

    tokens_saved: int = 0
    tokens_saved_upper: int | None = None
    tokens_wasted: int = 0
    expected_tokens: int = 0
    basis: str = "none"
    billing: str = "stops"


class Cost(msgspec.Struct, gc=False):
    """Money, in USD, from configured prices; `None` when the model has no price.

    A msgspec Struct, as `AttemptBill`: one is made for every request, in C (a dataclass's
    generated `__init__` runs as Python)."""

    used_usd: float | None = None
    saved_usd: float | None = None
    wasted_usd: float | None = None

    @property
    def priced(self) -> bool:
        return self.used_usd is not None


class AttemptBill(msgspec.Struct):
    """What one attempt costs (proxy/bills.py): what the provider bills for it, under its own
    upstream's billing policy, at the price of the model sent to it. A msgspec Struct: one is
    made for every attempt, in C.

    usage: the attempt's billed tokens: its prompt (reported, tokenized or estimated) and the
        completion tokens it generated. Under `billing` "full" a cut attempt may be billed for
        its whole answer: `usage` is then the part hangup saw, a lower bound.
    waste: why its output never reached the client ("hedge": lost a hedge race; "failover":
        failed before content and another target was tried), or None.
    tokens_saved: completion tokens a hedge loser did not generate because hangup closed it
        (compute; estimated like any saving); 0 under billing "full".
    saved_usd: those tokens at the output price, only where billing stops ("stops").
    """

    usage: Usage
    billing: str
    used_usd: float | None = None
    waste: str | None = None
    tokens_saved: int = 0
    saved_usd: float | None = None


@dataclass(slots=True)
class Waste:
    """Tokens and dollars spent on attempts whose output the client never received, for one
    reason ("hedge", "failover"); see `AttemptBill`."""

    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float | None = None  # None: no wasted attempt had a price
    tokens_saved: int = 0  # hedge losers: tokens not generated (compute)
    saved_usd: float | None = None  # ... as dollars, where their billing stops

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# msgspec allows a frozen Struct to subclass a mutable one (tests/test_outcome.py checks the
# instance refuses writes); mypy's dataclass rules do not know that.
class _NoUsage(Usage, frozen=True):  # type: ignore[misc]
    """The usage of a record not yet settled: all zero, one shared instance, immutable (a
    write raises AttributeError). `Accountant.settle` gives every record a `Usage` of its own;
    until then this one stands, rather than a `Usage()` made (by a default factory) for every
    request and thrown away. Frozen, so a Struct's field takes it as its default."""


NO_USAGE: Final[Usage] = _NoUsage()


# A record's waste until its attempts are billed (`proxy.bills.bill_attempts` sets a new dict):
# one shared empty mapping, not an empty dict kept under every held stream.
NO_WASTE: Final[Mapping[str, Waste]] = MappingProxyType({})


class RequestRecord(msgspec.Struct):
    """Everything known about one request when it ends. Times are `loop.time()` seconds.

    A msgspec Struct, not a slotted dataclass: one is made for every request, and the
    dataclass's generated `__init__` set its 56 fields one bytecode store at a time (~0.7 us;
    the Struct's, in C, ~0.4 us). Attribute reads cost the same (both are slots)."""

    request_id: str
    method: str
    path: str
    started_at: float
    wall_started_at: float  # time.time(), for logs
    route: str | None = None
    model: str | None = None  # the model the client asked for, verbatim (not a metric label)
    upstream: str | None = None
    endpoint: str = "other"  # closed set: see proxy/usage/facts.py ENDPOINTS
    stream: bool = False
    status: int | None = None  # the status the client got (None: no response was sent)
    upstream_status: int | None = None
    outcome: Outcome | None = None
    timeout_kind: TimeoutKind | None = None
    error_type: str | None = None
    error_message: str | None = None
    sdk_retry_count: int = 0
    client_deadline_s: float | None = None
    # who sent it (never a key): the auth.keys name, "anonymous" without auth, None if the
    # request was refused before it was identified
    client: str | None = None
    client_address: str | None = None
    user_agent: str | None = None  # bounded and sanitised (see proxy/callers.py)
    upstream_attempts: int = 0  # upstream requests sent for it (retries included)
    finish_reason: str | None = None  # the last one the upstream sent (for traces)
    response_model: str | None = None  # the model the upstream says answered (for traces)
    trace: TraceIds | None = None  # set when tracing is on (proxy/tracing)
    # timings
    first_token_at: float | None = None
    client_gone_at: float | None = None
    upstream_closed_at: float | None = None
    ended_at: float | None = None
    # Time spent awaiting others, counted also when the wait ends in an error, a deadline, a
    # hang-up or a shutdown (see `waiting`): overhead is what is left, hangup's own time.
    upstream_wait_s: float = 0.0  # connect, headers, body reads, drains, control calls
    client_wait_s: float = 0.0  # reading the request body, writes to a slow client
    backoff_wait_s: float = 0.0  # sleeping between retry attempts
    # traffic
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    content_chunks: int = 0  # content-bearing SSE events relayed
    # facts for accounting, put here by the relay's one sealing step (`seal.seal`), so
    # that `Accountant.settle` is a function of the record alone
    sent_upstream: bool = False  # the request was admitted and sent (the upstream saw the prompt)
    max_tokens: int | None = None  # the request's completion limit, if it set one
    prompt_estimate: int = 0  # the heuristic prompt count (used when nothing better exists)
    seen_usage: Usage | None = None  # usage as counted from the answer (stream or body)
    generated_tokens: int = 0  # completion tokens the upstream produced, as far as seen
    delivered_tokens: int = 0  # ... of which reached the client before it left
    drained: bool = False  # read on after the client left (`on_disconnect: drain`)
    stream_terminated: bool | None = None  # a stream's terminal event came (None: no stream)
    prompt_tokenized: int | None = None  # the prompt counted by a tokenizer, after the end
    tokenizer: str | None = None  # which one ("o200k_base", "llamacpp", "vllm", "sglang")
    # accounting
    usage: Usage = NO_USAGE  # until settled (`_NoUsage`)
    savings: Savings | None = None
    cost: Cost | None = None
    # Attempt waste by reason ("hedge", "failover"): what attempts whose output never reached
    # the client cost (proxy/bills.py). Empty when every billed attempt was delivered.
    waste: Mapping[str, Waste] = NO_WASTE
    background: BackgroundCancel | None = None
    background_response_id: str | None = None
    # Every upstream attempt, in the order they began (see proxy/attempts.py).
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # The id hangup gave the request at the engine (`engine: sglang | vllm`), and what came of
    # the abort sent for it: result, and seconds from the decision to abort to the answer.
    engine_request_id: str | None = None
    engine_abort: EngineAbort | None = None
    engine_abort_s: float | None = None

    def settle(self, outcome: Outcome, *, timeout_kind: TimeoutKind | None = None) -> bool:
        """Set the terminal outcome once; later calls are ignored and return False.

        The first decision wins: a timeout that fired stays a timeout even if the client then
        drops while the 504 is being written.
        """
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.timeout_kind = timeout_kind
        return True

    @property
    def attempt_waste_tokens(self) -> int:
        """Completion tokens generated by attempts whose content never reached the client
        (hedge losers, streams that failed before content): paid for, not delivered."""
        return sum(a.tokens_generated for a in self.attempts if not a.delivered)

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def cancel_propagation_s(self) -> float | None:
        """Client gone -> upstream socket closed, when both happened."""
        if self.client_gone_at is None or self.upstream_closed_at is None:
            return None
        return max(0.0, self.upstream_closed_at - self.client_gone_at)

    @property
    def overhead_s(self) -> float | None:
        """Time the proxy itself spent: total minus every wait on the upstream, the client and
        retry backoff, in every outcome."""
        d = self.duration_s
        if d is None:
            return None
        return max(0.0, d - self.upstream_wait_s - self.client_wait_s - self.backoff_wait_s)
