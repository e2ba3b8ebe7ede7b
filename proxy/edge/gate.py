"""The checks every request passes before any handler's own work: the connection's limits, the
request target's form, what browsers may do; and aiohttp's own 404/405 turned into ours.

Not an aiohttp middleware: with any middleware at all, aiohttp wraps every handler in two more
coroutines (the middleware's and its own `_fix_request_current_app`), created on every request
and alive for as long as a stream is held (~500 B each stream, measured). The relay's handler
calls `edge_answer` first thing; the other handlers are wrapped by `gated`. A request no route
matches never reaches a handler: `UnroutedAnswered`, the runner's server's handler, answers it.
The same handler takes relayed requests straight to the relay's handler (`DirectRoute`).
A connection's refusals (`connection_refusal`: over the cap, a head over max_head_kb) read what
its handler (proxy/edge/connections.py) learned of it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import AbstractRoute, PlainResource, UrlMappingMatchInfo

from proxy import browser, unparsed
from proxy.browser import BrowserPolicy
from proxy.edge.capacity import TIER_PROBES_ONLY, over_capacity
from proxy.edge.connections import GuardedRequestHandler, head_size
from proxy.errors import HeadTooLarge, Overloaded, ProxyError
from proxy.refusal import refuse

BROWSER_POLICY = web.AppKey("hangup_browser_policy", BrowserPolicy)


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """The relay's route: every method on every path under `prefix`, no other route's."""

    prefix: str
    route: AbstractRoute


DIRECT_ROUTE = web.AppKey("hangup_direct_route", DirectRoute)


def edge_answer(request: web.Request, policy: BrowserPolicy) -> web.StreamResponse | None:
    """The answer to a request refused before routing's work, or None to serve it. `policy`:
    the app's (`BROWSER_POLICY`), which its handler holds."""
    # A connection over connections.max_connections may only ask a probe path; a head over
    # connections.max_head_kb that the connection's byte count could not see gets 431.
    refusal = connection_refusal(request)
    if refusal is not None:
        response = refuse(request, refusal)
        response.force_close()
        return response
    return unparsed.target_refusal(request) or browser.refusal(policy, request)


def gated(handler: Handler, policy: BrowserPolicy) -> Handler:
    """`handler` behind the edge checks (for routes other than the relay's)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        answer = edge_answer(request, policy)
        return answer if answer is not None else await handler(request)

    return checked


class UnroutedAnswered:
    """The app's handler (`Application._handle`, which routes), with aiohttp's own 404/405 made
    ours (after the same edge checks as every route). The routes take every method on every
    path that starts with `/`, so only another target (authority form, absolute form without
    a path) can miss them; the app has no middleware to catch that, so the runner's server
    calls this instead of the app, without a coroutine of its own for any other request.

    A relayed request (a path under the relay's prefix that no other route has, no `Expect`)
    goes to the relay's handler directly, with the route's match already made: routing it
    through `Application._handle` would find the same route by walking the router, and that
    coroutine would stay alive under every held stream (~300 B; and ~15 µs of a request's
    CPU). Its match info is one, shared by all such requests: it has no `tail` (nothing
    reads it), only the route and the app, which is what `request.app` needs."""

    __slots__ = ("_direct_handler", "_elsewhere", "_handle", "_matched", "_prefix", "app")

    def __init__(self, app: web.Application) -> None:
        self.app = app  # for proxy.unparsed._app_of
        self._handle = app._handle
        direct = app.get(DIRECT_ROUTE)
        self._prefix = direct.prefix if direct is not None else None
        if direct is not None:
            matched = UrlMappingMatchInfo({}, direct.route)
            matched.add_app(app)
            matched.freeze()
            self._matched = matched
            self._direct_handler = direct.route.handler
        # Exact paths the router gives another route, even under the prefix (the router
        # prefers the most specific match).
        self._elsewhere = frozenset(
            resource.canonical
            for resource in app.router.resources()
            if isinstance(resource, PlainResource)
        )

    def __call__(self, request: BaseRequest) -> Awaitable[web.StreamResponse]:
        # The app's request factory makes `web.Request`s (the server's type says less).
        routed = cast(web.Request, request)
        if self.goes_direct(routed):
            routed._match_info = self._matched
            return self._direct_handler(routed)
        if routed.rel_url.path[:1] == "/":
            return self._handle(routed)
        return self._unrouted(routed)

    def goes_direct(self, request: web.Request) -> bool:
        """Whether the router would give `request` the relay's route, and nothing (an
        `Expect`, for its route's expect handler) must run before that route's handler."""
        prefix = self._prefix
        path = request.rel_url.path_safe  # what the router matches
        return (
            prefix is not None
            and path.startswith(prefix)
            and path not in self._elsewhere
            and "Expect" not in request.headers
        )

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except web.HTTPException as exc:
            policy = request.app[BROWSER_POLICY]
            answer = edge_answer(request, policy) or unparsed.routing_refusal(request, exc)
            if answer is None:
                raise
            return answer


def connection_refusal(request: web.Request) -> ProxyError | None:
    """`probe_only_refusal(request) or oversized_head_refusal(request)`, the connection read
    once: one in any tier but probes-only whose parsing never stopped (almost every one) gets
    neither refusal, and neither function is called for it."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedRequestHandler) or (
        protocol.tier is not TIER_PROBES_ONLY and not protocol._parsing_stopped
    ):
        return None
    return probe_only_refusal(request) or oversized_head_refusal(request)


def oversized_head_refusal(request: web.Request) -> HeadTooLarge | None:
    """431 for a request whose head passed the byte count unseen (see _check_parsed_heads)."""
    protocol = request.protocol
    # Such a head stopped the parsing (`_check_parsed_heads`): until then, no request has one.
    if not isinstance(protocol, GuardedRequestHandler) or not protocol._parsing_stopped:
        return None
    limit_kb = protocol.guard.config.max_head_kb
    if head_size(request.raw_path, request.raw_headers) <= limit_kb * 1024:
        return None
    return HeadTooLarge(
        f"the request line and headers exceed {limit_kb} KiB (connections.max_head_kb)"
    )


def probe_only_refusal(request: web.Request) -> Overloaded | None:
    """For a request on a connection over the cap: 503 unless it asks a probe path."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedRequestHandler) or protocol.tier is not TIER_PROBES_ONLY:
        return None
    if request.method in ("GET", "HEAD") and request.path in protocol.guard.probe_paths:
        return None
    return over_capacity(protocol.guard)
