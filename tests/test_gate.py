"""The gate's shortcut to the relay's handler takes exactly the requests the router would give
the relay's route, and only those with nothing to run before that route's handler."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.edge.gate import DIRECT_ROUTE, UnroutedAnswered
from proxy.relay import Relay
from tests.support import make_config


async def _extra(request: web.Request) -> web.Response:
    return web.Response(text="another route")  # pragma: no cover (never served here)


def _app() -> web.Application:
    app = create_app(make_config("http://127.0.0.1:9/v1"))
    # A route of its own under the relay's prefix: the router prefers it (the most specific
    # match), so the shortcut must leave it to the router too.
    app.router.add_get("/v1/own", _extra)
    return app


APP = _app()
GATE = UnroutedAnswered(APP)

_segment = st.sampled_from(["v1", "V1", "v1%2F", "own", "healthz", "metrics", "", "..", "%20", "a"])
_paths = st.lists(_segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
_methods = st.sampled_from(["GET", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"])


async def _routed_to_relay(method: str, path: str, headers: dict[str, str]) -> tuple[bool, bool]:
    request = make_mocked_request(method, path, headers=headers, app=APP)
    match: Any = await APP.router.resolve(request)
    handler = getattr(match, "handler", None)
    by_router = getattr(handler, "__func__", None) is Relay.serve
    assert not by_router or handler == APP[DIRECT_ROUTE].route.handler  # (this app's relay)
    return GATE.goes_direct(request), by_router


@settings(max_examples=400, deadline=None)
@given(method=_methods, path=_paths, expect=st.booleans())
async def test_the_shortcut_takes_what_the_router_gives_the_relay(
    method: str, path: str, expect: bool
) -> None:
    headers = {"Expect": "100-continue"} if expect else {}
    direct, by_router = await _routed_to_relay(method, path, headers)
    # Direct only where the router agrees; with an Expect, never (its handler comes first).
    assert not direct or (by_router and not expect), (method, path, expect)
    # And wherever the router agrees, but for the exact path of a route of its own: there the
    # router gives the relay the methods that route does not take (POST /v1/own), and the
    # shortcut, which does not look at methods, leaves all of them to the router.
    if by_router and not expect and path != "/v1/own":
        assert direct, (method, path, expect)


async def test_the_cases_that_matter_each_way() -> None:
    assert await _routed_to_relay("POST", "/v1/chat/completions", {}) == (True, True)
    assert await _routed_to_relay("GET", "/v1/own", {}) == (False, False)
    assert await _routed_to_relay("POST", "/v1/own", {}) == (False, True)  # the router's to give
    assert await _routed_to_relay("GET", "/healthz", {}) == (False, False)
    assert await _routed_to_relay("GET", "/v1", {}) == (False, False)
    expect = {"Expect": "100-continue"}
    assert await _routed_to_relay("POST", "/v1/chat/completions", expect) == (False, True)
