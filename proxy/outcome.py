"""The one record every request ends in.

Every request gets exactly one terminal `Outcome`, set once by the relay (`relay.py`) and read by
metrics, the access log and token accounting. Nothing re-derives the outcome from status codes or
strings: a 200 that was cut mid-stream is `client_cancelled`, not "success".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # the upstream's answer (any status < 500, not 429) was relayed whole
    CLIENT_CANCELLED = "client_cancelled"  # the downstream client went away first
    TIMEOUT = "timeout"  # one of the route's deadlines fired (see `TimeoutKind`)
    UPSTREAM_ERROR = "upstream_error"  # unreachable, reset, malformed, 5xx or 429 from upstream
    REJECTED = "rejected"  # refused by the proxy before any upstream work (4xx, draining 503)
    SHUTDOWN = "shutdown"  # still running when the shutdown grace period ran out
    INTERNAL_ERROR = "internal_error"  # a bug in hangup (answered 500, logged with traceback)


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


@dataclass(slots=True)
class Usage:
    """Token counts of one request; each figure knows whether it was reported or estimated."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_estimated: bool = False
    completion_estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Savings:
    """What hanging up avoided (see docs/accounting.md for the estimator).

    tokens_saved: completion tokens the upstream did not generate because we hung up (estimate).
    tokens_saved_upper: the bound `max_tokens - generated`, when the request set a limit.
    tokens_wasted: completion tokens that still arrived after the client had left.
    expected_tokens: the typical completion length the estimate assumed.
    basis: where `expected_tokens` came from ("history", "route_default").
    """

    tokens_saved: int = 0
    tokens_saved_upper: int | None = None
    tokens_wasted: int = 0
    expected_tokens: int = 0
    basis: str = "none"


@dataclass(slots=True)
class Cost:
    """Money, in USD, from configured prices; `None` when the model has no price."""

    used_usd: float | None = None
    saved_usd: float | None = None
    wasted_usd: float | None = None

    @property
    def priced(self) -> bool:
        return self.used_usd is not None


@dataclass(slots=True)
class RequestRecord:
    """Everything known about one request when it ends. Times are `loop.time()` seconds."""

    request_id: str
    method: str
    path: str
    started_at: float
    wall_started_at: float  # time.time(), for logs
    route: str | None = None
    model: str | None = None  # the model the client asked for, verbatim (not a metric label)
    upstream: str | None = None
    endpoint: str = "other"  # closed set: see proxy/usage.py ENDPOINTS
    stream: bool = False
    status: int | None = None  # the status the client got (None: no response was sent)
    upstream_status: int | None = None
    outcome: Outcome | None = None
    timeout_kind: TimeoutKind | None = None
    error_type: str | None = None
    error_message: str | None = None
    sdk_retry_count: int = 0
    client_deadline_s: float | None = None
    # timings
    upstream_headers_at: float | None = None
    first_token_at: float | None = None
    client_gone_at: float | None = None
    upstream_closed_at: float | None = None
    ended_at: float | None = None
    upstream_wait_s: float = 0.0  # time spent awaiting the upstream (connect, headers, body reads)
    client_wait_s: float = 0.0  # time spent awaiting writes to a slow client
    # traffic
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    content_chunks: int = 0  # content-bearing SSE events relayed
    # accounting
    usage: Usage = field(default_factory=Usage)
    savings: Savings | None = None
    cost: Cost | None = None
    background: BackgroundCancel | None = None
    background_response_id: str | None = None

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
        """Time the proxy itself spent: total minus waiting on the upstream and on the client."""
        d = self.duration_s
        if d is None:
            return None
        return max(0.0, d - self.upstream_wait_s - self.client_wait_s)
