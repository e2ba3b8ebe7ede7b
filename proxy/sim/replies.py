"""How the simulated provider answers: a whole JSON body, the head of an SSE stream, a sink
that writes a stream's events to the client, or a reset connection. Each records what it sent
on the request's record."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.sim.engine import Kind, Sink
from proxy.sim.formats import dumps
from proxy.sim.records import End, RequestRecord

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def socket_sink(resp: web.StreamResponse, rec: RequestRecord, *, forgiving: bool = False) -> Sink:
    """Writes to the client. `forgiving`: once a write fails (the peer left), drop the rest
    quietly, so generation goes on as in an engine that never notices a close."""
    progress = rec.progress
    gone = False

    async def sink(data: bytes, kind: Kind) -> None:
        nonlocal gone
        if gone:
            return
        try:
            await resp.write(data)
        except ConnectionError:
            if not forgiving:
                raise
            gone = True
            return
        progress.sent(kind, time.monotonic())
        rec.capture(data)

    return sink


async def json_reply(
    request: web.BaseRequest,
    rec: RequestRecord,
    status: int,
    payload: Any,
    headers: dict[str, str] | None = None,
) -> tuple[web.StreamResponse, End]:
    """A whole JSON answer (`payload` as is when it is bytes)."""
    body = payload if isinstance(payload, bytes) else dumps(payload).encode()
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.headers["x-request-id"] = rec.request_id
    if headers:
        resp.headers.update(headers)
    await resp.prepare(request)
    rec.status = status
    rec.headers_sent_at = time.monotonic()
    await resp.write_eof()
    rec.capture(body)
    return resp, "completed"


async def sse_reply(request: web.BaseRequest, rec: RequestRecord) -> web.StreamResponse:
    """An SSE stream's head, sent: its events follow through a `socket_sink`."""
    resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
    resp.headers["x-request-id"] = rec.request_id
    await resp.prepare(request)
    rec.status = 200
    rec.headers_sent_at = time.monotonic()
    return resp


def reset_reply(request: web.BaseRequest, rec: RequestRecord) -> tuple[web.StreamResponse, End]:
    """No answer: the connection reset."""
    if rec.connection is not None:
        rec.connection.server_closing = True
    transport = request.transport
    if transport is not None:
        transport.abort()  # RST, not FIN: the "upstream crashed" case
    # Never sent: aiohttp's attempt to finish it fails quietly on the aborted transport.
    return web.Response(), "reset"
