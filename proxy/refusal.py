"""A refusal outside the relay (edge checks, unparseable requests): an OpenAI-shaped body, a
`rejected` record, and so one access line and the metrics, like every other request."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.errors import ProxyError, render_body
from proxy.outcome import Outcome, RequestRecord
from proxy.request_ids import new_request_id
from proxy.state import STATE, ProxyState


def rejected_record(
    state: ProxyState, err: ProxyError, *, method: str, path: str, request_id: str | None
) -> RequestRecord:
    """Record a refusal (settled, counted, logged) and return its record."""
    loop = asyncio.get_running_loop()
    record = RequestRecord(
        request_id=(request_id or "")[:200] or new_request_id(),
        method=method[:32],
        path=path,
        started_at=loop.time(),
        wall_started_at=time.time(),
    )
    record.settle(Outcome.REJECTED)
    record.status, record.error_type, record.error_message = err.status, err.error_type, err.message
    record.ended_at = loop.time()
    state.finish(record)
    return record


def refuse(request: web.Request, err: ProxyError) -> web.Response:
    state = request.app[STATE]
    record = rejected_record(
        state,
        err,
        method=request.method,
        path=request.path,
        request_id=request.headers.get("x-request-id"),
    )
    return web.Response(
        status=err.status,
        body=render_body(err),
        content_type="application/json",
        headers={"x-request-id": record.request_id, **err.headers()},
    )


_CLOSE_AFTER = web.RequestKey("hangup_close_after_response", bool)


def close_after_response(request: web.Request) -> None:
    """The rest of this request's body cannot be read (it failed to decode): answer, then close
    the connection. Marking the body ended stops aiohttp from reading on after the handler,
    which would raise the same decoding error again and log it as unhandled."""
    request[_CLOSE_AFTER] = True
    request.content.feed_eof()


def close_if_asked(request: web.Request, response: web.StreamResponse) -> None:
    """Before a response goes out: `Connection: close` for a request marked by
    `close_after_response`."""
    if request.get(_CLOSE_AFTER):
        response.force_close()
