"""What the simulated provider saw, per TCP connection and per request, with bounded waits.

Tests of the proxy assert on the upstream's view ("the upstream connection closed within 50 ms
of the client leaving", "the proxy counted exactly the tokens the simulator sent"), so every
timestamp is `time.monotonic()` taken at the moment of the event, in the event's own callback
(connection hooks, the write that sent a chunk).

Retention is bounded (the last `max_records` requests and closed connections) so a long
benchmark does not grow memory without limit. Waiting is event-driven: `Waiters` wakes exactly
the waiters of one key; nothing polls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from proxy.sim.records import (
    SECRET_HEADERS,
    ClosedBy,
    ConnectionRecord,
    End,
    RequestRecord,
    bearer_token,
    key_fingerprint,
)
from proxy.sim.waiters import Waiters


class Recorder:
    def __init__(
        self, *, max_records: int = 10_000, capture_bytes: int = 0, waiters: Waiters | None = None
    ) -> None:
        self.max_records = max_records
        self.capture_bytes = capture_bytes
        self.waiters = waiters or Waiters()
        self.requests: deque[RequestRecord] = deque(maxlen=max_records)
        self.closed_connections: deque[ConnectionRecord] = deque(maxlen=max_records)
        self._by_id: dict[str, RequestRecord] = {}
        self._open: dict[object, ConnectionRecord] = {}  # keyed by the aiohttp protocol
        self._active: set[RequestRecord] = set()
        self._next_conn = 1
        self._next_req = 1
        self._totals: dict[str, int] = {}
        self._ends: dict[str, int] = {}
        self.reset()

    # -- connections ------------------------------------------------------------------------

    def connection_opened(self, key: object, peer: str | None) -> ConnectionRecord:
        conn = ConnectionRecord(id=self._next_conn, opened_at=time.monotonic(), peer=peer)
        self._next_conn += 1
        self._totals["connections"] += 1
        self._open[key] = conn
        return conn

    def connection_closed(self, key: object, by: ClosedBy) -> None:
        now = time.monotonic()
        conn = self._open.pop(key, None)
        if conn is None:
            return
        conn.closed_at = now
        conn.closed_by = "server" if conn.server_closing else by
        req = conn.current
        if req is not None and req.end is None and conn.closed_by == "peer":
            req.peer_closed_at = now
            req.generated_at_peer_close = req.progress.generated
        self.closed_connections.append(conn)
        self.waiters.notify(("conn", conn.id))

    def connection_for(self, key: object) -> ConnectionRecord | None:
        return self._open.get(key)

    @property
    def open_connections(self) -> list[ConnectionRecord]:
        return list(self._open.values())

    # -- requests -----------------------------------------------------------------------------

    def begin(
        self, method: str, path: str, headers: Mapping[str, str], conn: ConnectionRecord | None
    ) -> RequestRecord:
        now = time.monotonic()
        kept: dict[str, str] = {}
        fingerprint: str | None = None
        for name, value in headers.items():
            lower = name.lower()
            if lower in SECRET_HEADERS:
                digest = key_fingerprint(bearer_token(value))
                if lower == "authorization":
                    fingerprint = digest
                value = f"<redacted sha256:{digest}>"
            kept[lower] = value
        request_id = kept.get("x-request-id") or f"sim-{self._next_req}"
        self._next_req += 1
        rec = RequestRecord(
            request_id=request_id,
            method=method,
            path=path,
            seen_at=now,
            headers=kept,
            auth_present=fingerprint is not None,
            auth_fingerprint=fingerprint,
            connection=conn,
            sent=bytearray() if self.capture_bytes else None,
            capture_limit=self.capture_bytes,
        )
        if conn is not None:
            conn.request_ids.append(request_id)
            conn.current = rec
        if len(self.requests) == self.max_records:
            old = self.requests[0]
            if self._by_id.get(old.request_id) is old:
                del self._by_id[old.request_id]
        self.requests.append(rec)
        self._by_id[request_id] = rec
        self._active.add(rec)
        self._totals["requests"] += 1
        self.waiters.notify(("req", request_id))
        return rec

    def finish(self, rec: RequestRecord, end: End) -> None:
        if rec.end is not None:
            return
        rec.end = end
        rec.finished_at = time.monotonic()
        if end == "peer_closed" and rec.peer_closed_at is None:
            rec.peer_closed_at = rec.finished_at  # seen by the handler, not the connection hook
        if rec.peer_closed_at is not None and rec.generated_at_peer_close is None:
            rec.generated_at_peer_close = rec.progress.generated
        self._active.discard(rec)
        p = rec.progress
        self._totals["content_tokens_sent"] += p.content_tokens
        self._totals["reasoning_tokens_sent"] += p.reasoning_tokens
        self._totals["tokens_generated"] += p.generated
        self._ends[end] = self._ends.get(end, 0) + 1
        conn = rec.connection
        if conn is not None and conn.current is rec:
            conn.current = None
        self.waiters.notify(("req", rec.request_id))

    def get(self, request_id: str) -> RequestRecord | None:
        return self._by_id.get(request_id)

    # -- waits --------------------------------------------------------------------------------

    async def wait_request(self, request_id: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        return await self.waiters.until(
            ("req", request_id),
            lambda: self._by_id.get(request_id),
            timeout,
            f"request {request_id!r} arriving",
        )

    async def wait_finished(self, request_id: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        def check() -> RequestRecord | None:
            rec = self._by_id.get(request_id)
            return rec if rec is not None and rec.end is not None else None

        return await self.waiters.until(
            ("req", request_id), check, timeout, f"request {request_id!r} finishing"
        )

    async def wait_sent_bytes(self, request_id: str, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        rec = await self.wait_finished(request_id, timeout)
        if rec.sent is None:
            raise RuntimeError("the simulator was started with capture_bytes=0")
        if rec.sent_truncated:
            raise RuntimeError(
                f"request {request_id!r} sent more than capture_bytes={rec.capture_limit} bytes"
            )
        return bytes(rec.sent)

    async def wait_closed(self, request_id: str, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rec = await self.wait_request(request_id, timeout)
        conn = rec.connection
        if conn is None:
            # Served by a server without connection hooks (build_app in a TestServer): the
            # handler's own observation is the best there is.
            done = await self.wait_finished(request_id, max(0.0, deadline - loop.time()))
            if done.peer_closed_at is None:
                raise RuntimeError(f"request {request_id!r} ended {done.end!r}, peer did not close")
            return done.peer_closed_at
        return await self.waiters.until(
            ("conn", conn.id),
            lambda: conn.closed_at,
            max(0.0, deadline - loop.time()),
            f"connection {conn.id} of request {request_id!r} closing",
        )

    # -- summaries ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        live = self._active
        return {
            "open_connections": len(self._open),
            "active_requests": len(live),
            "total_connections": self._totals["connections"],
            "total_requests": self._totals["requests"],
            "content_tokens_sent": self._totals["content_tokens_sent"]
            + sum(r.progress.content_tokens for r in live),
            "reasoning_tokens_sent": self._totals["reasoning_tokens_sent"]
            + sum(r.progress.reasoning_tokens for r in live),
            "tokens_generated": self._totals["tokens_generated"]
            + sum(r.progress.generated for r in live),
            "ends": dict(self._ends),
        }

    def reset(self) -> None:
        """Forget history; requests still in flight stay recorded (they will finish)."""
        active = [r for r in self.requests if r in self._active]
        self.requests.clear()
        self._by_id.clear()
        for rec in active:
            self.requests.append(rec)
            self._by_id[rec.request_id] = rec
        self.closed_connections.clear()
        self._totals = dict.fromkeys(
            (
                "connections",
                "requests",
                "content_tokens_sent",
                "reasoning_tokens_sent",
                "tokens_generated",
            ),
            0,
        )
        self._ends = {}
