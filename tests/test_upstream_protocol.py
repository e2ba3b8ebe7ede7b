"""`UpstreamProtocol` resumes reading only when paused: an answer larger than the body
reader's high-water mark pauses reading, and reads resume it until the whole body is in.
Over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.upstream_connector import Connector, UpstreamProtocol
from proxy.upstream_request import UpstreamRequest, send

BODY = bytes(range(256)) * (16 * 1024)  # 4 MiB: far above the reader's 128 KiB high water


async def test_a_paused_answer_is_read_to_its_end() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = aiohttp.ClientSession(connector=Connector(limit=0), request_class=UpstreamRequest)
    try:
        url = URL(f"http://127.0.0.1:{port}/big")
        response = await asyncio.wait_for(
            send(session, "GET", url, CIMultiDict(), None, asyncio.get_running_loop()), 5
        )
        assert response.connection is not None
        protocol = response.connection.protocol
        assert type(protocol) is UpstreamProtocol
        # Nothing read yet: the body fills the reader past its high water and reading pauses.
        until = time.monotonic() + 5
        while not protocol._reading_paused:
            assert time.monotonic() < until, "reading never paused"
            await asyncio.sleep(0.01)
        received = bytearray()
        while chunk := await asyncio.wait_for(response.content.readany(), 5):
            received += chunk
            assert not protocol._buffer_paused
        assert received == BODY
        assert not protocol._reading_paused
        response.release()
    finally:
        await session.close()
        server.close()
        await server.wait_closed()
