"""`browser.refusal`'s shortcut for the usual request (one Host value already allowed, an
origin-form target, no Origin, not OPTIONS) answers exactly what every check answers."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import browser
from proxy.app import create_app
from proxy.browser import BrowserPolicy, checked_refusal, refusal
from proxy.edge.gate import BROWSER_POLICY
from tests.support import config_from

CONFIG = config_from(
    {
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9/v1"}},
        "routes": [{"name": "all", "upstream": "up"}],
        "listen": {"allowed_hosts": ["proxy.internal"]},
        "cors": {"allowed_origins": ["http://localhost:3000"]},
    }
)
APP = create_app(CONFIG)

_hosts = st.lists(
    st.sampled_from(
        [
            "127.0.0.1:8080",
            "localhost",
            "proxy.internal:80",
            "evil.example",
            "LOCALHOST:1",
            "[::1]:80",
            "a b",
            "localhost:99999",
        ]
    ),
    max_size=2,
)
_origins = st.none() | st.sampled_from(["http://localhost:3000", "https://evil.example", "null"])
_methods = st.sampled_from(["GET", "POST", "OPTIONS", "options", "DELETE"])
_targets = st.sampled_from(
    ["/v1/chat/completions", "/v1/models?x=1", "*", "http://evil.example/v1/models"]
)


def _request(
    method: str, target: str, hosts: list[str], origin: str | None, preflight: bool
) -> web.Request:
    headers = CIMultiDict([("Host", host) for host in hosts])
    headers["X-Request-Id"] = "browser-1"  # a refusal echoes it: the same in both answers
    if origin is not None:
        headers["Origin"] = origin
    if preflight:
        headers["Access-Control-Request-Method"] = "POST"
    return make_mocked_request(method, target, headers=headers, app=APP)


def _answer(
    response: web.StreamResponse | None,
) -> tuple[int, object, list[tuple[str, str]]] | None:
    if response is None:
        return None
    assert isinstance(response, web.Response)
    return response.status, response.body, list(response.headers.items())


@settings(max_examples=300, deadline=None)
@given(
    method=_methods,
    target=_targets,
    hosts=_hosts,
    origin=_origins,
    preflight=st.booleans(),
    seen_before=st.booleans(),
)
async def test_the_shortcut_answers_what_every_check_answers(
    method: str,
    target: str,
    hosts: list[str],
    origin: str | None,
    preflight: bool,
    seen_before: bool,
) -> None:
    policy = BrowserPolicy(CONFIG, "127.0.0.1")
    if seen_before:  # the Host values a client sent before, found allowed then
        for host in hosts:
            checked_refusal(policy, _request("GET", "/v1/models", [host], None, False))
    every_check = _answer(
        checked_refusal(policy, _request(method, target, hosts, origin, preflight))
    )
    shortcut = _answer(refusal(policy, _request(method, target, hosts, origin, preflight)))
    assert shortcut == every_check


async def test_the_usual_request_takes_the_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = APP[BROWSER_POLICY]
    usual = ("POST", "/v1/chat/completions", ["127.0.0.1:8080"], None, False)
    assert refusal(policy, _request(*usual)) is None  # the first time, every check
    checks: list[int] = []

    def counted(policy: BrowserPolicy, request: web.Request) -> web.StreamResponse | None:
        checks.append(1)
        return checked_refusal(policy, request)

    monkeypatch.setattr(browser, "checked_refusal", counted)
    assert refusal(policy, _request(*usual)) is None
    assert checks == []
    with_origin = _answer(refusal(policy, _request(*usual[:3], "https://evil.example", False)))
    assert checks == [1] and with_origin is not None and with_origin[0] == 403
