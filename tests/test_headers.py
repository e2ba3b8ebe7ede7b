"""Header handling at the proxy, as RFC 9110 section 7.6 asks of an intermediary: what stops
here (hop-by-hop fields and those `Connection` names), what is recomputed, what is added
(`Via`, `x-request-id`), and what passes unchanged; in both directions, as pure functions and
over real sockets through the production runner."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import SecretStr

from proxy import headers as headers_module
from proxy.config import UpstreamConfig
from proxy.headers import client_response_headers, upstream_request_headers
from tests.conftest import StartProxy
from tests.support import RawClient, make_config

HOP_BY_HOP_REQUEST = [
    ("Connection", "keep-alive, X-Hop"),
    ("X-Hop", "nominated by Connection"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "h2c"),
    ("Transfer-Encoding", "chunked"),
]
END_TO_END_REQUEST = [
    ("User-Agent", "OpenAI/Python 1.0"),
    ("Accept", "text/event-stream"),
    ("OpenAI-Organization", "org-123"),
    ("X-Stainless-Retry-Count", "0"),
    ("X-Multi", "one"),
    ("X-Multi", "two"),
    ("X-Forwarded-For", "203.0.113.7"),
]


def proxy_of(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream(api_key: str | None = None, **headers: str) -> UpstreamConfig:
    return UpstreamConfig(
        base_url="https://api.example/v1",
        api_key=SecretStr(api_key) if api_key else None,
        headers=headers,
    )


def test_request_drops_hop_by_hop_and_keeps_end_to_end() -> None:
    incoming = proxy_of(
        [
            *HOP_BY_HOP_REQUEST,
            *END_TO_END_REQUEST,
            ("Host", "hangup.local"),
            ("Content-Length", "10"),
            ("Content-Encoding", "gzip"),
            ("Expect", "100-continue"),
            ("Via", "1.1 edge-lb"),
            ("x-request-id", "client-chosen"),
        ]
    )
    out = upstream_request_headers(
        incoming, upstream=upstream(), request_id="rid-1", drop_client_credentials=False
    )
    names = {k.lower() for k in out}
    for name, _ in HOP_BY_HOP_REQUEST:
        assert name.lower() not in names
    for name in ("host", "content-length", "content-encoding", "expect"):
        assert name not in names  # recomputed for the new connection, or already handled
    # Lower-cased on the way out (aiohttp's client would merge mixed-case repeats).
    end_to_end = {n.lower() for n, _ in END_TO_END_REQUEST}
    assert [(k, v) for k, v in out.items() if k in end_to_end] == [
        (k.lower(), v) for k, v in END_TO_END_REQUEST
    ]
    assert out.getall("via") == ["1.1 edge-lb", "1.1 hangup"]
    assert out.getall("x-request-id") == ["rid-1"]


def test_request_credentials_follow_the_upstream() -> None:
    incoming = proxy_of(
        [("Authorization", "Bearer client"), ("api-key", "c1"), ("x-api-key", "c2")]
    )
    passed = upstream_request_headers(
        incoming, upstream=upstream(), request_id="r", drop_client_credentials=False
    )
    assert passed["authorization"] == "Bearer client"
    assert passed["api-key"] == "c1" and passed["x-api-key"] == "c2"

    injected = upstream_request_headers(
        incoming, upstream=upstream("sk-server"), request_id="r", drop_client_credentials=False
    )
    assert injected.getall("authorization") == ["Bearer sk-server"]
    assert "api-key" not in injected and "x-api-key" not in injected

    proxy_key = upstream_request_headers(
        incoming, upstream=upstream(), request_id="r", drop_client_credentials=True
    )
    assert not {"authorization", "api-key", "x-api-key"} & {k.lower() for k in proxy_key}

    configured = upstream_request_headers(
        incoming,
        upstream=upstream("sk-server", **{"OpenAI-Organization": "org-cfg"}),
        request_id="r",
        drop_client_credentials=False,
        drop=["x-hangup-timeout"],
    )
    assert configured["openai-organization"] == "org-cfg"


def test_response_drops_hop_by_hop_and_origin_specific() -> None:
    incoming = proxy_of(
        [
            ("Connection", "close, X-Hop-Resp"),
            ("X-Hop-Resp", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Transfer-Encoding", "chunked"),
            ("Trailer", "X-Checksum"),
            ("Alt-Svc", 'h3=":443"; ma=86400'),
            ("Content-Type", "application/json"),
            ("Content-Length", "42"),
            ("OpenAI-Processing-Ms", "12"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Via", "1.1 upstream-lb"),
        ]
    )
    out = client_response_headers(incoming, request_id="rid", keep_length=True)
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("Content-Length", "42"),
        ("OpenAI-Processing-Ms", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Via", "1.1 upstream-lb"),
        ("x-request-id", "rid"),
        ("via", "1.1 hangup"),
    ]
    # When the proxy edits the body (hidden usage chunk), the length is no longer the
    # upstream's.
    assert "content-length" not in client_response_headers(
        incoming, request_id="rid", keep_length=False
    )


class EchoUpstream:
    """A minimal HTTP/1.1 origin over plain asyncio streams, like many small servers: it knows
    nothing of `Expect: 100-continue`, answers with the request head it received (as JSON) and
    with response fields a proxy must not pass on."""

    RESPONSE_HOP: ClassVar[list[tuple[str, str]]] = [
        ("Connection", "close, X-Hop-Resp"),
        ("X-Hop-Resp", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Alt-Svc", 'h3=":443"'),
    ]

    def __init__(self) -> None:
        self.heads: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.rstrip("\r\n").split("\r\n")
            headers = [tuple(part.strip() for part in ln.split(":", 1)) for ln in lines]
            length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
            body = await reader.readexactly(length)
            self.heads.append({"request_line": request_line, "headers": headers, "body": body})
            payload = json.dumps({"ok": True}).encode()
            fields = [
                *self.RESPONSE_HOP,
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("X-End-To-End", "kept"),
                ("Via", "1.1 upstream-lb"),
            ]
            response = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
            writer.write(response.encode("latin-1") + b"\r\n" + payload)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    upstream = EchoUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def response_head(raw: bytes) -> list[tuple[str, str]]:
    final = raw.split(b"\r\n\r\n")
    # Skip an interim 100 Continue, if any.
    head = final[1] if raw.startswith(b"HTTP/1.1 100") else final[0]
    lines = head.decode("latin-1").split("\r\n")
    return [(k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:])]


async def test_over_real_sockets(echo: EchoUpstream, start_proxy: StartProxy) -> None:
    assert echo.server is not None
    url = f"http://127.0.0.1:{echo.server.sockets[0].getsockname()[1]}/v1"
    server, _ = await start_proxy(make_config(url, include_usage=False))
    client = await RawClient.connect("127.0.0.1", server.port)
    sent = [
        (k, v)
        for k, v in HOP_BY_HOP_REQUEST
        if k.lower() not in {"upgrade", "transfer-encoding", "connection"}
    ]
    headers = dict(
        [
            *sent,
            ("Connection", "keep-alive, X-Hop"),
            ("Via", "1.0 corp-proxy"),
            ("Expect", "100-continue"),
        ]
    )
    headers.update({"User-Agent": "test-agent", "X-Request-Id": "hdr-1"})
    # One field sent twice, spelt two ways: both values must arrive.
    headers.update({"X-Multi": "one", "x-multi": "two"})
    await client.post_json("/v1/chat/completions", {"model": "m", "messages": []}, headers)
    raw = await client.read_until(lambda b: b.endswith(b'{"ok": true}'), timeout=5)
    client.close()
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")

    (seen,) = echo.heads
    assert seen["request_line"] == "POST /v1/chat/completions HTTP/1.1"
    upstream_names = [k.lower() for k, _ in seen["headers"]]
    for name in (
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "expect",
    ):
        assert name not in upstream_names, name
    got = CIMultiDict(seen["headers"])
    assert got["host"] == url.removeprefix("http://").removesuffix("/v1")
    assert int(got["content-length"]) == len(seen["body"])
    assert got.getall("via") == ["1.0 corp-proxy", "1.1 hangup"]
    assert got["user-agent"] == "test-agent" and got["x-request-id"] == "hdr-1"
    assert got.getall("x-multi") == ["one", "two"]

    to_client = CIMultiDict(response_head(raw))
    for name in ("x-hop-resp", "keep-alive", "proxy-authenticate", "alt-svc"):
        assert name not in to_client, name
    assert to_client["x-end-to-end"] == "kept"
    assert to_client.getall("via") == ["1.1 upstream-lb", "1.1 hangup"]
    assert to_client["x-request-id"] == "hdr-1"


async def test_upstream_gets_no_header_the_client_did_not_send(
    echo: EchoUpstream, start_proxy: StartProxy
) -> None:
    """No aiohttp default header (`User-Agent`, `Accept`, `Accept-Encoding`, a payload's
    `Content-Type`) is added on the way up: the upstream sees the client's fields and ours."""
    assert echo.server is not None
    url = f"http://127.0.0.1:{echo.server.sockets[0].getsockname()[1]}/v1"
    server, _ = await start_proxy(make_config(url, include_usage=False))
    ours = {"host", "content-length", "x-request-id", "via"}

    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json("/v1/chat/completions", {"model": "m", "messages": []})
    await client.read_until(lambda b: b.endswith(b'{"ok": true}'), timeout=5)
    # A body that is not JSON, without a Content-Type: aiohttp's payload would name one.
    client.send_head("POST", "/v1/chat/completions", {}, 5)
    client.writer.write(b"hello")
    await client.read_until(lambda b: b.count(b'{"ok": true}') == 2, timeout=5)
    client.close()

    json_head, plain_head = echo.heads
    assert {k.lower() for k, _ in json_head["headers"]} == ours | {"content-type"}
    assert {k.lower() for k, _ in plain_head["headers"]} == ours
    assert plain_head["body"] == b"hello"


def test_no_connection_field_no_connection_options_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a Connection field neither direction looks for its options (no call, no set);
    a name to drop is dropped all the same, and a Connection field's options still are."""

    def no_tokens(headers: object) -> set[str]:
        raise AssertionError("read the Connection options")

    incoming = proxy_of([("X-Hangup-Timeout", "30"), ("X-Kept", "1")])
    real = headers_module._connection_tokens
    monkeypatch.setattr(headers_module, "_connection_tokens", no_tokens)
    out = upstream_request_headers(
        incoming,
        upstream=upstream(),
        request_id="r",
        drop_client_credentials=False,
        drop=["X-Hangup-Timeout"],
    )
    assert "x-hangup-timeout" not in out and out["x-kept"] == "1"
    answer = client_response_headers(incoming, request_id="r", keep_length=True)
    assert answer["X-Hangup-Timeout"] == "30"
    monkeypatch.setattr(headers_module, "_connection_tokens", real)
    named = proxy_of([("Connection", "X-Kept"), ("X-Kept", "1"), ("X-Other", "2")])
    out = upstream_request_headers(
        named, upstream=upstream(), request_id="r", drop_client_credentials=False, drop=["x-other"]
    )
    assert "x-kept" not in out and "x-other" not in out
