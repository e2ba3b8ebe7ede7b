"""Secure defaults at the edge, over real sockets through the production runner: request size
limits, and no client-chosen upstream (the proxy only talks to the configured base URLs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.support import config_from

BODY_LIMIT_MB = 0.01  # 10 KiB
CHAT = json.dumps(
    {"model": "normal:tokens=2,rate=0", "messages": [{"role": "user", "content": "hi"}]}
).encode()


async def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 3.0) -> bytes:
    """Send raw bytes, return the response head (up to the blank line) or what came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        async with asyncio.timeout(timeout):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


def post_head(
    target: str = "/v1/chat/completions", extra: str = "", length: int = 0, host: str = "localhost"
) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


@pytest.fixture
async def limited(sim: SimulatedProvider, start_proxy: StartProxy) -> ProxyServer:
    assert sim.base_url is not None
    config = config_from(
        {
            "upstreams": {"sim": {"base_url": sim.base_url}},
            "routes": [{"name": "default", "upstream": "sim"}],
            "limits": {"max_request_body_mb": BODY_LIMIT_MB},
        }
    )
    server, _ = await start_proxy(config)
    return server


async def test_body_over_the_limit_is_refused(limited: ProxyServer, sim: SimulatedProvider) -> None:
    big = b'{"x": "' + b"a" * 20_000 + b'"}'
    head = await exchange(limited.port, post_head(length=len(big)), big)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"x-should-retry: false" in head.lower()
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(big):x}\r\n".encode()
        + big
        + b"\r\n0\r\n\r\n"
    )
    assert (await exchange(limited.port, chunked)).startswith(b"HTTP/1.1 413 ")
    assert sim.requests == []
    # Just under the limit is fine.
    ok = CHAT[:-1] + b', "pad": "' + b"a" * 9_000 + b'"}'
    assert (await exchange(limited.port, post_head(length=len(ok)), ok)).startswith(
        b"HTTP/1.1 200 "
    )


@pytest.mark.parametrize(
    "head",
    [
        post_head(extra="X-Big: " + "a" * 9_000 + "\r\n"),
        post_head(extra="".join(f"X-H{i}: a\r\n" for i in range(200))),
        b"GET /v1/" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ],
    ids=["header-over-8KiB", "200-headers", "target-over-8KiB"],
)
async def test_oversized_heads_are_refused(
    head: bytes, limited: ProxyServer, sim: SimulatedProvider
) -> None:
    # aiohttp's parser limits (8190 bytes a line, 128 fields) answer 400 before any handler.
    assert (await exchange(limited.port, head)).startswith(b"HTTP/1.0 400 ")
    assert sim.requests == []


async def test_declared_length_over_the_limit_is_refused_at_once(limited: ProxyServer) -> None:
    head = await exchange(limited.port, post_head(length=10**9), b"{", timeout=1.0)
    assert head.startswith(b"HTTP/1.1 413 ")


class Elsewhere:
    """A server a client would like the proxy to reach instead: counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[Elsewhere, str]]:
    target = Elsewhere()
    address = await target.start()
    try:
        yield target, address
    finally:
        assert target.server is not None
        target.server.close()
        await target.server.wait_closed()


async def test_clients_cannot_choose_the_upstream(
    proxy: tuple[ProxyServer, object],
    sim: SimulatedProvider,
    elsewhere: tuple[Elsewhere, str],
) -> None:
    server, _ = proxy
    target, address = elsewhere
    attempts = [
        post_head(f"http://{address}/v1/chat/completions", length=len(CHAT)),
        post_head(f"/v1//{address}/v1/chat/completions", length=len(CHAT)),
        post_head(host=address, length=len(CHAT)),
        post_head(extra=f"X-Forwarded-Host: {address}\r\n", length=len(CHAT)),
        post_head(extra=f"Forwarded: host={address}\r\n", length=len(CHAT)),
        post_head(f"/v1/chat/completions?base_url=http://{address}/v1", length=len(CHAT)),
        f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode(),
    ]
    for head in attempts:
        await exchange(server.port, head, CHAT if b"CONNECT" not in head else b"")
    assert target.connections == 0
    # Everything that was forwarded went to the configured upstream.
    assert len(sim.requests) == len(attempts) - 1  # CONNECT: 404, forwarded nowhere


@pytest.mark.parametrize("target", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/x/..%2f..%2fadmin"])
async def test_paths_cannot_climb_out_of_the_base_url(
    target: str, proxy: tuple[ProxyServer, object], sim: SimulatedProvider
) -> None:
    server, _ = proxy
    head = await exchange(server.port, post_head(target, length=len(CHAT)), CHAT)
    if head.startswith(b"HTTP/1.1 400 "):
        return
    (seen,) = sim.requests
    assert ".." not in seen.path.split("/"), seen.path


async def test_an_absolute_form_target_is_served_as_its_path(
    proxy: tuple[ProxyServer, object], sim: SimulatedProvider
) -> None:
    server, _ = proxy
    head = await exchange(
        server.port, post_head("http://localhost/v1/chat/completions", length=len(CHAT)), CHAT
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    (seen,) = sim.requests
    assert seen.path == "/v1/chat/completions"
