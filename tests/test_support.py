"""The test helpers themselves fail loudly: a wait that never ends names what it awaited."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import RawClient, RecordSink


async def _server_that_says(payload: bytes) -> asyncio.Server:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_server(reply, "127.0.0.1", 0)


async def test_read_until_raises_at_eof_naming_what_it_awaited() -> None:
    server = await _server_that_says(b"HTTP/1.1 200 OK\r\n\r\npartial")
    port = server.sockets[0].getsockname()[1]
    client = await RawClient.connect("127.0.0.1", port)
    try:
        with pytest.raises(AssertionError, match=r"closed before the DONE marker.*partial"):
            await client.read_until(lambda b: b"[DONE]" in b, timeout=5, what="the DONE marker")
    finally:
        client.close()
        await client.writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_read_until_timeout_is_an_assertion_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    client = await RawClient.connect("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for bytes"):
            await client.read_until(lambda b: bool(b), timeout=0.05, what="bytes")
    finally:
        client.close()
        await client.writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_record_sink_wait_timeout_names_what_it_awaited() -> None:
    sink = RecordSink()
    with pytest.raises(AssertionError, match="waiting for a record for request nope"):
        await sink.wait_for("nope", timeout=0.05)
