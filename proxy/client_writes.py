"""What an exchange writes to its client besides the SSE pump's own write of each read (that
one stays inline in `sse_relay.SSERelay._pump_sse`: it runs once per read of every stream):
the response head's commit (once a request), an awaited write whose failure means the client
is gone (`ClientGone`), and a large output in pieces.

`ClientWrites` is a mixin of `sse_relay.SSERelay` (so of `relay.Exchange`), with no slots of
its own: the fields it uses are `SSERelay`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from proxy.admission import Plan
from proxy.outcome import RequestRecord
from proxy.sse_stream import WRITE_PIECE


class ClientGone(Exception):
    """A write to the client failed: its socket is gone (seen without handler cancellation,
    or when the kernel reports the broken pipe before the server does)."""


class _Exchange(Protocol):
    """What the writes read and set: `SSERelay`'s fields."""

    request: web.Request
    record: RequestRecord
    loop: asyncio.AbstractEventLoop
    clock: Callable[[], float]  # the loop's (`Exchange.clock`)
    plan: Plan | None
    response: web.StreamResponse | None
    _pending: web.StreamResponse | None

    async def _client_io(self: _Exchange, write: object) -> None: ...


class ClientWrites:
    """The response head's commit and the awaited writes of `SSERelay` and `Downstream`: a
    mixin, whose state is the exchange's (`_Exchange`)."""

    # Slots are SSERelay's: an empty tuple here keeps the exchange free of an instance dict.
    __slots__ = ()

    response: web.StreamResponse | None  # set here, declared by SSERelay (type checker)

    async def _commit(self: _Exchange) -> web.StreamResponse:
        """Send the response headers held for the current attempt (once per request)."""
        if self.response is None:
            pending = self._pending
            assert pending is not None
            self.record.status = pending.status
            self.response = pending  # before prepare: a client gone mid-head still has one
            if pending._send_headers_immediately:
                await self._client_io(pending.prepare(self.request))
            else:
                # A head held for the first body write (`downstream._OneWriteResponse`, a
                # complete answer) is only serialized here: nothing is written or waited
                # for, so no client wait to time (`_client_io`'s two clock reads and frame).
                try:
                    await pending.prepare(self.request)
                except ConnectionError as exc:  # (as `_client_io`, should a hook write)
                    self.record.client_gone_at = self.clock()
                    raise ClientGone from exc
            if self.plan is not None:
                self.plan.deadlines.client_committed()
        return self.response

    async def _client_io(self: _Exchange, write: object) -> None:
        """Await a write to the client; a failed write means the client is gone."""
        before = self.clock()
        try:
            await write  # type: ignore[misc]
        except ConnectionError as exc:
            self.record.client_gone_at = before
            raise ClientGone from exc
        finally:
            self.record.client_wait_s += self.clock() - before

    @staticmethod
    async def _write_pieces(response: web.StreamResponse, data: bytes) -> None:
        """A large output (a huge event) in pieces: each write copies one piece, and once the
        client's socket is full the write waits, so the loop runs between pieces instead of
        copying the whole output in one step. The client gets the same bytes."""
        if len(data) <= WRITE_PIECE:
            if data:
                await response.write(data)
            return
        view = memoryview(data)  # not released here: a transport may still hold a slice
        for start in range(0, len(data), WRITE_PIECE):
            await response.write(view[start : start + WRITE_PIECE])
