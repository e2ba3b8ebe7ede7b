"""One upstream attempt, as a value.

A request may make several attempts (a retry on the same target, a fallback to another, a hedge
started in parallel). Each is an `Attempt` appended to the request's record; the request still
settles exactly one `Outcome`. `AttemptResult` is a closed set: it is a metric label.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.outcome import AttemptBill, Usage

_MODEL_CHARS = 64  # of a model name in the access log's attempt chain


class AttemptResult(enum.StrEnum):
    """How an attempt ended. Only `ok` means its answer went to the client."""

    OK = "ok"  # its answer (any status the relay passed on) reached the client
    CONNECT_ERROR = "connect_error"  # no connection: the upstream never saw the request
    RESET = "reset"  # closed or reset before any response byte
    INVALID_RESPONSE = "invalid_response"  # not HTTP, or a broken status line / headers
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 500/502/503/504
    CLIENT_ERROR = "client_error"  # a 4xx we did not pass on (e.g. context length, to a fallback)
    TIMEOUT = "timeout"  # one of the per-attempt deadlines (connect, headers, first token)
    STREAM_ERROR = "stream_error"  # the stream failed (cut, in-band error) before any content
    CUT = "cut"  # the stream failed after its content had reached the client
    ABANDONED = "abandoned"  # we closed it: client gone, request deadline, hedge loser
    SKIPPED = "skipped"  # never opened: the target's circuit is open


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us). Modules
# that test them import these names.
RESULT_OK: Final = AttemptResult.OK
RESULT_CUT: Final = AttemptResult.CUT
RESULT_CLIENT_ERROR: Final = AttemptResult.CLIENT_ERROR


@dataclass(slots=True)
class Attempt:
    """One try at one target. Times are `loop.time()` seconds."""

    upstream: str
    model: str | None  # the model sent (after a fallback's rename)
    started_at: float
    reason: str = "primary"  # primary | retry | fallback | hedge
    headers_at: float | None = None
    first_token_at: float | None = None
    status: int | None = None  # the upstream's HTTP status, when it answered
    result: AttemptResult | None = None
    error: str | None = None  # short, for the log: what failed
    closed_at: float | None = None
    tokens_generated: int = 0  # completion tokens seen from this attempt
    delivered: bool = False  # its content reached the client (at most one attempt)
    resent: bool = False  # the seam resent it once on a fresh connection (stale pooled one)
    # Usage counted from this attempt's own answer (its stream, or the body), when it had one.
    usage: Usage | None = None
    # What this attempt costs, set by `Accountant.settle` (proxy/bills.py).
    bill: AttemptBill | None = None

    def end(self, result: AttemptResult, now: float, error: str | None = None) -> None:
        """Close the books on this attempt once; the first verdict stands."""
        if self.result is None:
            self.result = result
            if error is not None:
                self.error = error[:200]
        if self.closed_at is None:
            self.closed_at = now

    def describe(self) -> str:
        """`upstream/model:result[status]`, one link of the access log's attempt chain."""
        status = f"[{self.status}]" if self.status is not None else ""
        result = self.result.value if self.result is not None else "open"
        model = (self.model or "-")[:_MODEL_CHARS]
        return f"{self.upstream}/{model}:{result}{status}"
