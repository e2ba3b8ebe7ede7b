"""Admission on its own: what it refuses (and with which error), and what it decides for the
exchange (route, record fields, usage injection, headers, URL), from aiohttp requests made in
the test, with no server and no upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest import mock

import pytest
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request

from proxy.admission import Plan, admit
from proxy.errors import BadRequest, Draining, NotFound, PayloadTooLarge, ProxyError
from proxy.outcome import RequestRecord
from proxy.state import ProxyState
from tests.support import config_from, make_config

UPSTREAM = "http://127.0.0.1:9/v1"  # never contacted: admission sends nothing
CHAT = "/v1/chat/completions"


def request(
    path: str,
    body: bytes | None,
    *,
    headers: dict[str, str] | None = None,
    eof: bool = True,
    content_length: int | None = None,
) -> web.Request:
    payload = streams.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    if body:
        payload.feed_data(body)
    if eof:
        payload.feed_eof()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    length = content_length if content_length is not None else len(body or b"")
    all_headers["Content-Length"] = str(length)
    return make_mocked_request("POST", path, headers=all_headers, payload=payload)


def chat_body(**fields: Any) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


async def admitted(
    state: ProxyState, req: web.Request, request_id: str = "r1"
) -> tuple[Plan, RequestRecord]:
    record = RequestRecord(
        request_id=request_id,
        method=req.method,
        path=req.path,
        started_at=asyncio.get_running_loop().time(),
        wall_started_at=0.0,
    )
    async with asyncio.timeout(2):  # a refusal that waits for a body nobody sends fails here
        plan = await admit(state, req, record, asyncio.get_running_loop().time)
    return plan, record


async def refused(state: ProxyState, req: web.Request) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        await admitted(state, req)
    return caught.value


async def test_a_draining_proxy_refuses_with_a_retryable_503() -> None:
    state = ProxyState(make_config(UPSTREAM))
    state.draining = True
    err = await refused(state, request(CHAT, chat_body()))
    assert isinstance(err, Draining) and err.status == 503 and err.should_retry is True


async def test_an_announced_body_over_the_limit_is_refused_before_it_is_read() -> None:
    state = ProxyState(config_from({**_base(), "limits": {"max_request_body_mb": 1}}))
    # The body never arrives (no data, no EOF): reading it would wait past the 2 s bound.
    req = request(CHAT, None, eof=False, content_length=2 * 1024 * 1024)
    err = await refused(state, req)
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert "1 MiB" in err.message and "limits.max_request_body_mb" in err.message


async def test_dot_segments_are_refused() -> None:
    state = ProxyState(make_config(UPSTREAM))
    req = make_mocked_request(
        "POST", "/v1/chat/%2E%2E/models", headers={"Content-Length": "0"}, payload=_eof()
    )
    # The encoded dots reach admission as a '..' segment (yarl decodes, does not normalise).
    assert ".." in req.rel_url.path.split("/"), req.rel_url.path
    err = await refused(state, req)
    assert isinstance(err, BadRequest) and "'..'" in err.message


async def test_a_body_that_is_not_json_is_a_400_naming_the_problem() -> None:
    state = ProxyState(make_config(UPSTREAM))
    err = await refused(state, request(CHAT, b'{"model": "m",'))
    assert isinstance(err, BadRequest) and err.status == 400
    assert err.message.startswith("request body is not valid JSON")


async def test_no_route_is_a_404_naming_path_and_model() -> None:
    state = ProxyState(
        config_from(
            {
                "upstreams": {"sim": {"base_url": UPSTREAM}},
                "routes": [{"name": "gpt", "match": {"model": "gpt-*"}, "upstream": "sim"}],
            }
        )
    )
    err = await refused(state, request(CHAT, chat_body(model="claude-3")))
    assert isinstance(err, NotFound) and err.status == 404
    assert err.message == "no route for POST /v1/chat/completions with model 'claude-3'"
    plan, record = await admitted(state, request(CHAT, chat_body(model="gpt-4o")))
    assert (record.route, record.upstream, plan.route.name) == ("gpt", "sim", "gpt")


async def test_the_record_learns_what_the_request_says() -> None:
    state = ProxyState(make_config(UPSTREAM))
    body = chat_body(model="gpt-4o-mini", stream=True)
    headers = {"x-stainless-retry-count": "2", "x-stainless-timeout": "30"}
    _, record = await admitted(state, request(CHAT, body, headers=headers))
    assert (record.model, record.stream, record.endpoint) == (
        "gpt-4o-mini",
        True,
        "chat.completions",
    )
    assert (record.route, record.upstream) == ("default", "sim")
    assert record.bytes_from_client == len(body)
    assert record.sdk_retry_count == 2
    assert record.client_deadline_s == 30.0
    _, record = await admitted(
        state, request(CHAT, body, headers={"x-stainless-retry-count": "two"})
    )
    assert record.sdk_retry_count == 0  # unparsable: ignored, not an error


async def test_usage_is_injected_where_the_route_asks_and_the_client_did_not() -> None:
    state = ProxyState(make_config(UPSTREAM))
    plan, _ = await admitted(state, request(CHAT, chat_body(stream=True)))
    assert json.loads(plan.body)["stream_options"] == {"include_usage": True}
    assert plan.usage_filter is not None  # the client must not see what it did not ask for
    asked = chat_body(stream=True, stream_options={"include_usage": True})
    plan, _ = await admitted(state, request(CHAT, asked))
    assert plan.body == asked and plan.usage_filter is None
    plan, _ = await admitted(state, request(CHAT, chat_body(stream=False)))
    assert plan.body == chat_body(stream=False) and plan.usage_filter is None
    off = ProxyState(make_config(UPSTREAM, include_usage=False))
    plan, _ = await admitted(off, request(CHAT, chat_body(stream=True)))
    assert plan.body == chat_body(stream=True) and plan.usage_filter is None


async def test_upstream_url_and_headers() -> None:
    state = ProxyState(make_config(UPSTREAM, deadline_header="x-deadline-ms"))
    headers = {"x-deadline-ms": "5000", "x-custom": "kept", "Authorization": "Bearer client"}
    plan, _ = await admitted(
        state, request("/v1/chat/completions?api-version=2", chat_body(), headers=headers)
    )
    assert str(plan.url) == "http://127.0.0.1:9/v1/chat/completions?api-version=2"
    assert plan.headers["x-custom"] == "kept"
    assert plan.headers["x-request-id"] == "r1"
    # The client's deadline header is the proxy's to set per attempt, never forwarded as sent.
    assert "x-deadline-ms" not in plan.headers
    assert "content-length" not in plan.headers  # recomputed for the (maybe rewritten) body


def _base() -> dict[str, Any]:
    return {
        "upstreams": {"sim": {"base_url": UPSTREAM}},
        "routes": [{"name": "default", "upstream": "sim"}],
    }


def _eof() -> streams.StreamReader:
    payload = streams.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    payload.feed_eof()
    return payload
