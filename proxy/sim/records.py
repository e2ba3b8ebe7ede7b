"""The records the simulator keeps: one per TCP connection, one per request.

Timestamps are `time.monotonic()`; CLOCK_MONOTONIC is shared by all processes of a machine, so
records read over HTTP (``/_sim/requests``) compare with another process's clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.sim.behaviour import Behaviour
from proxy.sim.engine import Progress

ClosedBy = Literal["peer", "server"]
End = Literal["completed", "peer_closed", "reset", "error", "stopped", "aborted"]

# Never kept in a record: replaced by a fingerprint marker.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})


def key_fingerprint(key: str) -> str:
    """sha256 prefix of an API key, as recorded for the Authorization header's bearer token."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_token(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token else value


@dataclass(eq=False, slots=True)
class ConnectionRecord:
    id: int
    opened_at: float
    peer: str | None
    closed_at: float | None = None
    closed_by: ClosedBy | None = None
    request_ids: list[str] = field(default_factory=list)
    # The request in flight on it; a close by the peer marks that request peer_closed_at.
    current: RequestRecord | None = None
    # Set before the simulator itself closes or aborts the socket (reset behaviour, stop).
    server_closing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "opened_at": self.opened_at,
            "peer": self.peer,
            "closed_at": self.closed_at,
            "closed_by": self.closed_by,
            "request_ids": list(self.request_ids),
        }


@dataclass(eq=False, slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    seen_at: float
    headers: dict[str, str]
    auth_present: bool
    auth_fingerprint: str | None  # key_fingerprint() of the bearer token
    connection: ConnectionRecord | None
    model: str | None = None
    behaviour: Behaviour | None = None
    body: Any = None  # parsed JSON; None when absent, invalid or above the body limit
    body_bytes: int = 0  # request body bytes read so far
    stream: bool = False
    status: int | None = None  # HTTP status sent
    headers_sent_at: float | None = None
    finished_at: float | None = None
    end: End | None = None
    peer_closed_at: float | None = None
    error: str | None = None  # message of an error answer
    response_id: str | None = None  # Responses API id, background jobs included
    progress: Progress = field(default_factory=Progress)
    # Engine modes (proxy.sim.aborts): the id the engine runs the request under, when an abort
    # call stopped it, and tokens generated when the abort arrived and when the peer closed.
    engine_id: str | None = None
    aborted_at: float | None = None
    generated_at_abort: int | None = None
    generated_at_peer_close: int | None = None
    # The response body bytes as written (SSE events, JSON), up to capture_limit bytes.
    sent: bytearray | None = None
    sent_truncated: bool = False
    capture_limit: int = 0

    def capture(self, data: bytes) -> None:
        buf = self.sent
        if buf is None:
            return
        room = self.capture_limit - len(buf)
        if len(data) > room:
            self.sent_truncated = True
            data = data[: max(0, room)]
        buf += data

    @property
    def chunks_sent(self) -> int:
        return self.progress.chunks

    @property
    def content_tokens_sent(self) -> int:
        return self.progress.content_tokens

    @property
    def reasoning_tokens_sent(self) -> int:
        return self.progress.reasoning_tokens

    @property
    def completion_tokens_sent(self) -> int:
        return self.progress.content_tokens + self.progress.reasoning_tokens

    @property
    def tokens_generated(self) -> int:
        return self.progress.generated

    @property
    def tokens_after_peer_close(self) -> int | None:
        """Tokens generated after the peer closed the connection (None: it did not)."""
        if self.generated_at_peer_close is None:
            return None
        return self.progress.generated - self.generated_at_peer_close

    @property
    def first_token_at(self) -> float | None:
        return self.progress.first_token_at

    @property
    def last_content_at(self) -> float | None:
        return self.progress.last_content_at

    def to_dict(self) -> dict[str, Any]:
        conn = self.connection
        p = self.progress
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "behaviour": self.behaviour.describe() if self.behaviour else None,
            "stream": self.stream,
            "headers": self.headers,
            "auth_present": self.auth_present,
            "auth_fingerprint": self.auth_fingerprint,
            "body": self.body,
            "body_bytes": self.body_bytes,
            "status": self.status,
            "seen_at": self.seen_at,
            "headers_sent_at": self.headers_sent_at,
            "first_token_at": p.first_token_at,
            "last_content_at": p.last_content_at,
            "finished_at": self.finished_at,
            "end": self.end,
            "peer_closed_at": self.peer_closed_at,
            "error": self.error,
            "response_id": self.response_id,
            "chunks_sent": p.chunks,
            "keepalives_sent": p.keepalives,
            "content_tokens_sent": p.content_tokens,
            "reasoning_tokens_sent": p.reasoning_tokens,
            "tokens_generated": p.generated,
            "engine_id": self.engine_id,
            "aborted_at": self.aborted_at,
            "tokens_generated_at_abort": self.generated_at_abort,
            "tokens_generated_after_peer_close": self.tokens_after_peer_close,
            "connection_id": conn.id if conn else None,
            "connection_closed_at": conn.closed_at if conn else None,
            "connection_closed_by": conn.closed_by if conn else None,
        }
