"""Never send twice what the upstream may have started (docs/resilience.md, "Resending").

Both sides of the rule, over real sockets:
- a pooled connection the upstream closes as our request reaches it (it never read the request)
  is resent once on a fresh connection, and the client gets its answer;
- a pooled connection the upstream closes after sitting silent on our request (it read it and
  may be generating) is never resent: one request upstream, a 502 to the client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import aiohttp

from proxy.attempts import AttemptResult
from proxy.sim import SimulatedProvider
from proxy.upstream_connector import _closed_while_idle
from tests.conftest import StartProxy, chat
from tests.support import make_config

CHAT = "/v1/chat/completions"


class StaleAfterOne:
    """An HTTP/1.1 upstream that answers the first request of each connection with keep-alive,
    then resets the connection the moment the next request's first byte arrives, unread:
    what an upstream that closed an idle keep-alive connection does to a request crossing its
    close on the wire."""

    def __init__(self) -> None:
        self.answered: list[str] = []  # request ids answered, in order
        self.reset_connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> StaleAfterOne:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            await reader.readexactly(int(headers.get("content-length", "0")))
            self.answered.append(headers.get("x-request-id", "?"))
            body = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            await reader.read(1)  # the next request begins: drop it unread, with a reset
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.reset_connections += 1
            writer.transport.abort()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _post(base: str, body: dict[str, object], request_id: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}{CHAT}", json=body, headers={"x-request-id": request_id}
        ) as response:
            return response.status, await response.read()


async def test_a_request_crossing_the_upstreams_close_is_resent_once(
    start_proxy: StartProxy,
) -> None:
    upstream = await StaleAfterOne().start()
    try:
        server, sink = await start_proxy(make_config(upstream.url))
        assert (await _post(server.base_url, chat("m", stream=False), "st-1"))[0] == 200
        status, _ = await _post(server.base_url, chat("m", stream=False), "st-2")
        assert status == 200
        # The stale connection was reset unread; the request was answered once, on a new one.
        assert upstream.answered == ["st-1", "st-2"]
        assert upstream.reset_connections == 1
        record = await sink.wait_for("st-2")
        assert len(record.attempts) == 1
        assert record.attempts[0].resent
        assert record.attempts[0].result is AttemptResult.OK
    finally:
        await upstream.stop()


async def test_a_request_the_upstream_sat_on_is_never_resent(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    server, sink = await start_proxy(make_config(sim.base_url))
    # A first request leaves a pooled keep-alive connection; the second reuses it, and the
    # upstream reads the request, stays silent, then closes (a crash, an idle-timeout LB).
    assert (await _post(server.base_url, chat("normal", stream=False), "silent-1"))[0] == 200
    status, body = await _post(server.base_url, chat("drop:delay=0.3", stream=False), "silent-2")
    assert status == 502
    assert b"closed the connection without a response" in body
    seen = [r for r in sim.requests if r.request_id == "silent-2"]
    assert len(seen) == 1  # never sent again: the upstream may have been generating
    assert seen[0].connection is not None
    assert seen[0].connection.request_ids[0] == "silent-1"  # it did reuse the pooled one
    record = await sink.wait_for("silent-2")
    assert [(a.result, a.resent) for a in record.attempts] == [(AttemptResult.RESET, False)]


def test_an_idle_pooled_socket_the_peer_closed_is_seen_before_reuse() -> None:
    a, b = socket.socketpair()
    try:
        assert not _closed_while_idle(_Transport(a))  # idle and open: reusable
        b.close()
        assert _closed_while_idle(_Transport(a))  # the peer's FIN is waiting: drop it
    finally:
        a.close()


async def test_an_asyncio_transports_socket_the_peer_closed_is_seen_before_reuse() -> None:
    """The same on asyncio's own transport (its descriptor read from the transport), before
    the loop has read the FIN: the case the check is for."""
    a, b = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, a)
    try:
        assert not _closed_while_idle(transport)
        b.close()
        assert _closed_while_idle(transport)  # nothing awaited: the loop has not read it
    finally:
        transport.close()


class _Transport(asyncio.BaseTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default


class SilentOnSecond:
    """An HTTP/1.1 upstream that answers the first request of each connection with keep-alive,
    then reads the next one whole, stays silent for 0.3 s (long past RESEND_WINDOW_S: it may be
    working) and closes without a response."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # request lines, in order
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> SilentOnSecond:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                if not answered:
                    await asyncio.sleep(0.3)
                    break
                body = b'{"object": "list", "data": []}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_an_idempotent_request_the_upstream_sat_on_is_never_resent(
    start_proxy: StartProxy,
) -> None:
    """The rule holds for every method: aiohttp's session would resend a GET (an idempotent
    method) once on a reused connection that broke, however long the upstream had it."""
    upstream = await SilentOnSecond().start()
    try:
        server, _ = await start_proxy(make_config(f"http://127.0.0.1:{upstream.port}/v1"))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.base_url}/v1/models") as first:
                assert first.status == 200
            async with session.get(f"{server.base_url}/v1/models") as second:
                assert second.status == 502
        assert upstream.seen == ["GET /v1/models HTTP/1.1"] * 2  # never a third
    finally:
        await upstream.stop()
