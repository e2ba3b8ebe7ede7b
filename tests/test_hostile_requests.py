"""Hostile clients, over raw sockets, against the production runner (issue 13).

One test per class of attack. Each asserts the exact status, that nothing reached a host it
should not (a witness listener records any connection; the configured upstream records every
request), that the log has no ERROR line, and that the request left exactly one access line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest

from proxy.outcome import Outcome
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.hostile_support import (
    OK_BODY,
    ScriptedUpstream,
    ScriptedUpstreams,
    SeenRequest,
    Witness,
    access_lines,
    assert_clean_log,
    bind_port_ending_in,
    chat_body,
    exchange_raw,
    json_head,
    request_bytes,
    sse_head,
)
from tests.support import RecordSink, config_from


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def proxy_with_sink(
    start_proxy: StartProxy, base_url: str, **extra: object
) -> tuple[ProxyServer, RecordSink]:
    data: dict[str, object] = {
        "upstreams": {"up": {"base_url": base_url, "api_key": "sk-hostile-test-key-0001"}},
        "routes": [{"name": "default", "upstream": "up"}],
        **extra,
    }
    return await start_proxy(config_from(data))


async def proxy_for(start_proxy: StartProxy, base_url: str, **extra: object) -> ProxyServer:
    server, _ = await proxy_with_sink(start_proxy, base_url, **extra)
    return server


# --- item 1: the key only ever goes to the configured upstream ------------------------------


async def test_glued_digits_cannot_change_the_upstream_port(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # `/v%31/x` routes as /v1/x; glued onto `http://127.0.0.1:<P>` its raw tail `31/x` would
    # make the port P31: the witness listens exactly there.
    witness = await Witness(bind_port_ending_in((31, 61))).start()
    try:
        base_port, digits = divmod(witness.port, 100)
        target = "/v%31/chat/completions" if digits == 31 else "/%761/chat/completions"
        server = await proxy_for(start_proxy, f"http://127.0.0.1:{base_port}")
        response = await exchange_raw(server.port, request_bytes("POST", target, body=chat_body()))
        assert response.status == 400
        assert response.error()["code"] == "invalid_request"
        assert witness.connections == 0
        assert_clean_log(caplog)
    finally:
        await witness.stop()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/..%5cadmin",
        "/v1/..%5Cadmin",
        "/v1/x/..\\admin",
        "/v1/..;/admin",
        "/v1/x/..;jsessionid=1/admin",
        "/v1/%2e%2e/admin",
        "/v1/x/.%2e/admin",
        "/v1/models%00.json",
        "/v1/x%0d%0aHost:%20evil/y",
    ],
)
async def test_paths_that_could_leave_the_base_url_are_refused(
    target: str,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    response = await exchange_raw(server.port, request_bytes("POST", target, body=chat_body()))
    assert response.status == 400
    assert upstream.requests == []
    assert witness.connections == 0
    assert_clean_log(caplog)


async def test_encoded_characters_reach_the_configured_upstream_encoded(
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    target = "/v1/files/a%20b%3Fc%23d/content?x=%2F1&y=2"
    response = await exchange_raw(server.port, request_bytes("GET", target))
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.target == "/v1/files/a%20b%3Fc%23d/content?x=%2F1&y=2"
    assert seen.headers["authorization"] == "Bearer sk-hostile-test-key-0001"
    assert witness.connections == 0
    assert_clean_log(caplog)


async def test_an_unsafe_background_id_from_the_upstream_is_never_put_in_a_url(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Responses background stream whose id tries to climb to another path; the client leaves,
    # and the cancel call must not be made with it.
    created = (
        b'event: response.created\ndata: {"type":"response.created","response":'
        b'{"id":"../../admin/keys","status":"queued"}}\n\n'
    )
    first_sent = asyncio.Event()

    async def stream_forever(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        if seen.target != "/v1/responses":  # anything else (a cancel): answer at once
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(sse_head() + created)
        await writer.drain()
        first_sent.set()
        await asyncio.sleep(10)

    upstream = await scripted.start(stream_forever)
    server, sink = await proxy_with_sink(start_proxy, upstream.base_url)
    body = b'{"model":"m","input":"hi","stream":true,"background":true}'
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes("POST", "/v1/responses", body=body))
    async with asyncio.timeout(5):
        await reader.readuntil(b"response.created")
    writer.close()
    await sink.wait(lambda: sink.records, 5.0, "no record")
    assert [r.target for r in upstream.requests] == ["/v1/responses"]
    assert witness.connections == 0
    assert_clean_log(caplog)
    assert any("not a plain id" in r.getMessage() for r in caplog.records)


# --- item 4: browsers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("attacker.example", "/v1/chat/completions"),  # DNS rebinding: the page's own name
        ("attacker.example:8080", "/v1/chat/completions"),
        ("127.0.0.1", "http://attacker.example/v1/chat/completions"),  # absolute form
        ("localhost@attacker.example", "/v1/chat/completions"),
    ],
)
async def test_a_host_this_listener_does_not_serve_is_misdirected(
    host: str,
    target: str,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    request = request_bytes("POST", target, body=chat_body(), host=host)
    response = await exchange_raw(server.port, request)
    assert response.status == 421
    assert response.error()["code"] == "host_not_allowed"
    assert upstream.requests == []
    assert witness.connections == 0
    assert_clean_log(caplog)


@pytest.mark.parametrize(
    "target",
    ["/healthz", "/readyz", "/metrics", "/elsewhere", "/v1/models", "http://attacker.example"],
)
async def test_every_route_and_no_route_is_behind_the_host_check(
    target: str,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The edge checks are no middleware (proxy.edge.gate): each route, and the server's answer
    to a target no route matches, applies them itself."""
    server = await proxy_for(start_proxy, upstream.base_url)
    response = await exchange_raw(
        server.port, request_bytes("GET", target, host="attacker.example")
    )
    assert response.status == 421
    assert response.error()["code"] == "host_not_allowed"
    assert upstream.requests == []
    assert witness.connections == 0
    assert_clean_log(caplog)


async def test_loopback_names_and_configured_hosts_are_served(
    start_proxy: StartProxy, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server = await proxy_for(
        start_proxy, upstream.base_url, listen={"allowed_hosts": ["hangup.internal", "*.svc"]}
    )
    hosts = ["localhost", "LOCALHOST.", "a.localhost:1", "127.0.0.1:9", "[::1]:8080"]
    hosts += ["hangup.internal", "hangup.ns.svc"]
    for host in hosts:
        request = request_bytes("POST", "/v1/chat/completions", body=chat_body(), host=host)
        assert (await exchange_raw(server.port, request)).status == 200, host
    assert len(upstream.requests) == len(hosts)
    assert_clean_log(caplog, access=len(hosts))


async def test_cross_site_requests_and_preflights_are_refused_by_default(
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    simple = request_bytes(
        "POST",
        "/v1/chat/completions",
        body=chat_body(),
        content_type="text/plain",  # a "simple" request: no preflight in a browser
        headers={"Origin": "https://evil.example"},
    )
    response = await exchange_raw(server.port, simple)
    assert response.status == 403
    assert response.error()["code"] == "origin_not_allowed"
    preflight = request_bytes(
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    response = await exchange_raw(server.port, preflight)
    assert response.status == 403
    assert not any(n.startswith("access-control-") for n in response.header_names())
    assert upstream.requests == []
    assert witness.connections == 0
    assert_clean_log(caplog, access=2)


async def test_an_allowed_origin_gets_our_cors_headers_never_the_upstreams(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def permissive(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        cors = "Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Credentials: true\r\n"
        writer.write(json_head(len(OK_BODY), cors) + OK_BODY)
        await writer.drain()

    upstream = await scripted.start(permissive)
    app = "https://app.example"
    server = await proxy_for(start_proxy, upstream.base_url, cors={"allowed_origins": [app]})
    preflight = request_bytes(
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": app, "Access-Control-Request-Method": "POST"},
    )
    response = await exchange_raw(server.port, preflight)
    assert response.status == 204
    assert response.header("access-control-allow-origin") == app
    assert upstream.requests == []  # answered here, never forwarded with the key
    post = request_bytes("POST", "/v1/chat/completions", body=chat_body(), headers={"Origin": app})
    response = await exchange_raw(server.port, post)
    assert response.status == 200
    assert response.header("access-control-allow-origin") == app
    assert response.header("access-control-allow-credentials") is None
    # Without an Origin (not a browser): no CORS headers at all, the upstream's dropped.
    plain = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body())
    )
    assert plain.status == 200
    assert not any(n.startswith("access-control-") for n in plain.header_names())
    assert len(upstream.requests) == 2
    assert_clean_log(caplog, access=2)


# --- item 5: malformed client input gets its own 4xx, never internal_error ---------------------


async def test_a_non_utf8_bearer_token_is_a_wrong_key(
    start_proxy: StartProxy, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server = await proxy_for(
        start_proxy,
        upstream.base_url,
        auth={"keys": ["hk-right-key-000001"]},
        metrics={"bearer_token": "mt-right-token-0001"},
    )
    bad = b"Authorization: Bearer \xff\xfe\x80key\r\n"
    api = request_bytes("POST", "/v1/chat/completions", body=b"").replace(
        b"\r\n\r\n", b"\r\n" + bad + b"\r\n", 1
    )
    response = await exchange_raw(server.port, api)
    assert response.status == 401
    assert response.error()["code"] == "invalid_api_key"
    scrape = request_bytes("GET", "/metrics").replace(b"\r\n\r\n", b"\r\n" + bad + b"\r\n", 1)
    response = await exchange_raw(server.port, scrape)
    assert response.status == 401
    assert response.error()["type"] == "authentication_error"
    assert upstream.requests == []
    assert_clean_log(caplog, access=2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model":"m","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),
        (
            b'{"model":"m","stream":true,"stream_options":{},'
            b'"messages":[{"role":"user","content":"\\ud800"}]}',
            "not valid JSON",
        ),
        (b'{"model":"m","messages":[{"content":"\xff\xfe"}]}', "not valid UTF-8"),
        (b'{"model":"m",', "not valid JSON"),
    ],
    ids=["deep-object", "deep-array", "lone-surrogate", "not-utf8", "truncated"],
)
async def test_malformed_json_bodies_get_a_400(
    body: bytes,
    message: str,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=body)
    )
    assert response.status == 400
    error = response.error()
    assert error["code"] == "invalid_request"
    assert message in str(error["message"])
    assert upstream.requests == []
    assert_clean_log(caplog)


async def test_an_invalid_gzip_body_gets_a_4xx(
    start_proxy: StartProxy, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server = await proxy_for(start_proxy, upstream.base_url)
    garbage = b"\x1f\x8b\x08\x00not really gzip at all" * 10
    request = request_bytes(
        "POST", "/v1/chat/completions", body=garbage, headers={"Content-Encoding": "gzip"}
    )
    response = await exchange_raw(server.port, request)
    # 400 (undecodable) here; a branch that refuses request Content-Encoding answers 415.
    assert response.status in (400, 415)
    assert response.error()["type"] == "invalid_request_error"
    assert upstream.requests == []
    assert_clean_log(caplog)


# --- item 9: what no route serves, and what must not be said --------------------------------------

HEAD_ONLY = "Host: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", 405),
        (f"OPTIONS * HTTP/1.1\r\n{HEAD_ONLY}".encode(), 400),
        (b"GET /v1/models\r\n\r\n", 400),  # HTTP/0.9: no version
        (f"GET /v1/a\rb HTTP/1.1\r\n{HEAD_ONLY}".encode(), 400),  # CR in the path
        (f"GET /v1/a\nb HTTP/1.1\r\n{HEAD_ONLY}".encode(), 400),  # LF in the path
        (f"GARBAGE\x00 /v1/models HTTP/1.1\r\n{HEAD_ONLY}".encode(), 400),
        (f"GET /v1/models HTTP/1.1\r\nX-Big: {'a' * 9000}\r\n{HEAD_ONLY}".encode(), 400),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: bogus\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            417,
        ),
        (f"DELETE /v1x HTTP/1.1\r\n{HEAD_ONLY}".encode(), 404),
        # Absolute form without a path: no route can match it (aiohttp's own 404 otherwise).
        (f"GET http://127.0.0.1 HTTP/1.1\r\n{HEAD_ONLY}".encode(), 404),
    ],
    ids=[
        "connect",
        "options-star",
        "http-0.9",
        "cr",
        "lf",
        "bad-method",
        "long-header",
        "expect",
        "unknown-path",
        "absolute-no-path",
    ],
)
async def test_requests_no_route_serves_get_an_openai_error_and_a_record(
    raw: bytes,
    status: int,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, sink = await proxy_with_sink(start_proxy, upstream.base_url)
    response = await exchange_raw(server.port, raw)
    assert response.status == status
    assert response.error()["type"] == "invalid_request_error"
    assert response.header("server") == "hangup"
    await sink.wait(lambda: sink.records, 5.0, "no record")
    assert [r.outcome for r in sink.records] == [Outcome.REJECTED]
    assert upstream.requests == []
    assert witness.connections == 0
    assert_clean_log(caplog)


async def test_unparseable_requests_are_logged_at_a_bounded_rate(
    start_proxy: StartProxy, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server, sink = await proxy_with_sink(start_proxy, upstream.base_url)
    sent = 60
    for _ in range(sent):
        response = await exchange_raw(server.port, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        assert response.status == 400
    # 20 a second: a burst of 60 (well under a second) spans at most two windows.
    assert 20 <= len(access_lines(caplog)) <= 40
    assert len(sink.records) == len(access_lines(caplog))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_502_does_not_name_the_upstream_address(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    server = await proxy_for(start_proxy, f"http://127.0.0.1:{port}/v1")
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body())
    )
    assert response.status == 502
    assert response.error()["code"] == "upstream_unreachable"
    assert str(port) not in response.body.decode() and "127.0.0.1" not in response.body.decode()
    assert f"127.0.0.1:{port}" in caplog.text  # the operator's log has it
    assert_clean_log(caplog)


async def test_readyz_shows_load_only_to_the_scrape_token(
    start_proxy: StartProxy, upstream: ScriptedUpstream
) -> None:
    open_server = await proxy_for(start_proxy, upstream.base_url)
    ready = await exchange_raw(open_server.port, request_bytes("GET", "/readyz"))
    assert json.loads(ready.body) == {"status": "ready"}
    server = await proxy_for(
        start_proxy, upstream.base_url, metrics={"bearer_token": "mt-scrape-token-0001"}
    )
    anonymous = await exchange_raw(server.port, request_bytes("GET", "/readyz"))
    assert json.loads(anonymous.body) == {"status": "ready"}
    operator = await exchange_raw(
        server.port,
        request_bytes("GET", "/readyz", headers={"Authorization": "Bearer mt-scrape-token-0001"}),
    )
    assert json.loads(operator.body) == {"status": "ready", "in_flight": 0}


async def test_a_huge_model_and_max_tokens_stay_bounded(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def stream_then_wait(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        writer.write(sse_head() + event)
        await writer.drain()
        started.set()
        await asyncio.sleep(10)

    upstream = await scripted.start(stream_then_wait)
    server, sink = await proxy_with_sink(start_proxy, upstream.base_url)
    model = "m" * (1 << 20)
    body = chat_body(model, stream=True, max_tokens=10**18)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes("POST", "/v1/chat/completions", body=body))
    async with asyncio.timeout(5):
        await started.wait()
        await reader.readuntil(b"data: ")
    writer.close()  # the client leaves: savings are computed against max_tokens
    await sink.wait(lambda: sink.records, 5.0, "no record")
    (record,) = sink.records
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.savings is not None and record.savings.tokens_saved_upper is not None
    assert record.savings.tokens_saved_upper <= 1_000_000
    (line,) = access_lines(caplog)
    assert len(line.getMessage()) + len(str(getattr(line, "fields", ""))) < 4096
    scrape = await exchange_raw(server.port, request_bytes("GET", "/metrics"))
    assert b"mmmmmmmmmmmmmmmm" not in scrape.body
    assert_clean_log(caplog)
