"""The checks every request passes before any handler's own work: the connection's limits, the
request target's form, what browsers may do; and aiohttp's own 404/405 turned into ours.

Not an aiohttp middleware: with any middleware at all, aiohttp wraps every handler in two more
coroutines (the middleware's and its own `_fix_request_current_app`), created on every request
and alive for as long as a stream is held (~500 B each stream, measured). The relay's handler
calls `edge_answer` first thing; the other handlers are wrapped by `gated`. A request no route
matches never reaches a handler: `UnroutedAnswered`, the runner's server's handler, answers it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest

from proxy import browser, unparsed
from proxy.browser import BrowserPolicy
from proxy.edge.connections import oversized_head_refusal, probe_only_refusal
from proxy.refusal import refuse

BROWSER_POLICY = web.AppKey("hangup_browser_policy", BrowserPolicy)


def edge_answer(request: web.Request) -> web.StreamResponse | None:
    """The answer to a request refused before routing's work, or None to serve it."""
    # A connection over connections.max_connections may only ask a probe path; a head over
    # connections.max_head_kb that the connection's byte count could not see gets 431.
    refusal = probe_only_refusal(request) or oversized_head_refusal(request)
    if refusal is not None:
        response = refuse(request, refusal)
        response.force_close()
        return response
    return unparsed.target_refusal(request) or browser.refusal(request.app[BROWSER_POLICY], request)


def gated(handler: Handler) -> Handler:
    """`handler` behind the edge checks (for routes other than the relay's)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        answer = edge_answer(request)
        return answer if answer is not None else await handler(request)

    return checked


class UnroutedAnswered:
    """The app's handler (`Application._handle`, which routes), with aiohttp's own 404/405 made
    ours (after the same edge checks as every route). The routes take every method on every
    path that starts with `/`, so only another target (authority form, absolute form without
    a path) can miss them; the app has no middleware to catch that, so the runner's server
    calls this instead of the app, without a coroutine of its own for any other request."""

    __slots__ = ("_handle", "app")

    def __init__(self, app: web.Application) -> None:
        self.app = app  # for proxy.unparsed._app_of
        self._handle = app._handle

    def __call__(self, request: BaseRequest) -> Awaitable[web.StreamResponse]:
        # The app's request factory makes `web.Request`s (the server's type says less).
        routed = cast(web.Request, request)
        if routed.rel_url.path[:1] == "/":
            return self._handle(routed)
        return self._unrouted(routed)

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except web.HTTPException as exc:
            answer = edge_answer(request) or unparsed.routing_refusal(request, exc)
            if answer is None:
                raise
            return answer
