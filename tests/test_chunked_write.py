"""The SSE pump's direct chunked writes (proxy/chunked_write.py): the same bytes on the wire and
the same writer counters (which decide aiohttp's drain and the body's length) as aiohttp's own
`response.write`, only where that write would do nothing else, and taken by the pump on a
real stream through the production runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from proxy import sse_relay, steady_relay
from proxy.chunked_write import DIRECT_MAX, direct_writer, write_chunk
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.support import RawClient, http_body, make_config, serving

# Pieces of the sizes a stream writes (one event), and enough of them to pass aiohttp's drain
# limit (64 KiB) several times over.
PIECES = [b"data: {%d}\n\n" % i + b"x" * (i * 37 % 3000) for i in range(120)]

Counters = list[tuple[int, int]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def counters(writer: StreamWriter) -> tuple[int, int]:
    return writer.buffer_size, writer.output_size


async def through_aiohttp(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    seen: Counters = request.app[SEEN]
    for piece in PIECES:
        await response.write(piece)
        writer = direct_writer(response)
        assert writer is not None
        seen.append(counters(writer))
    await response.write_eof()
    return response


async def direct(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(PIECES[0])  # as the pump: its first write is aiohttp's
    writer = direct_writer(response)
    assert writer is not None
    seen: Counters = request.app[SEEN]
    seen.append(counters(writer))
    for piece in PIECES[1:]:
        if write_chunk(writer, piece):
            await writer.drain()
        seen.append(counters(writer))
    await response.write_eof()
    return response


async def compressed(request: web.Request) -> web.StreamResponse:
    """A response whose writes must keep aiohttp's path (it compresses them)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.enable_compression(web.ContentCoding.gzip)
    await response.prepare(request)
    await response.write(PIECES[0])
    request.app[SEEN].append((int(direct_writer(response) is not None), 0))
    await response.write(PIECES[0])
    await response.write_eof()
    return response


async def sized(request: web.Request) -> web.StreamResponse:
    """A response of a declared length (not chunked): aiohttp's path too."""
    response = web.StreamResponse()
    response.content_length = 2 * len(PIECES[0])
    await response.prepare(request)
    await response.write(PIECES[0])
    request.app[SEEN].append((int(direct_writer(response) is not None), 0))
    await response.write(PIECES[0])
    await response.write_eof()
    return response


SEEN = web.AppKey("seen", list)


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[int, Counters]]:
    app = web.Application()
    seen: Counters = []
    app[SEEN] = seen
    app.router.add_get("/", handler)
    async with serving(app, handler_cancellation=True) as port:
        yield port, seen


async def fetch(handler: Handler) -> tuple[bytes, Counters]:
    async with serve(handler) as (port, seen):
        client = await RawClient.connect("127.0.0.1", port)
        client.send_head("GET", "/", {"Connection": "close"}, None)
        raw = await client.read_to_eof()
        client.close()
        return raw, seen


async def test_direct_writes_put_the_same_bytes_and_counts_as_aiohttp() -> None:
    assert all(len(p) <= DIRECT_MAX for p in PIECES)
    assert sum(map(len, PIECES)) > 2 * 0x10000  # drained twice on both sides
    theirs, their_counts = await fetch(through_aiohttp)
    ours, our_counts = await fetch(direct)
    their_body, our_body = theirs.partition(b"\r\n\r\n")[2], ours.partition(b"\r\n\r\n")[2]
    assert our_body == their_body
    assert our_body.startswith(b"%x\r\n%s\r\n" % (len(PIECES[0]), PIECES[0]))
    assert http_body(ours) == b"".join(PIECES)
    assert our_counts == their_counts
    assert any(b == 0 for b, _ in our_counts)  # the drain point was passed and reset


async def test_compressed_or_sized_answers_keep_aiohttps_write() -> None:
    raw, seen = await fetch(compressed)
    assert raw.startswith(b"HTTP/1.1 200") and b"Content-Encoding: gzip" in raw
    assert seen == [(0, 0)]
    raw, seen = await fetch(sized)
    assert raw.startswith(b"HTTP/1.1 200") and b"chunked" not in raw
    assert http_body(raw) == PIECES[0] * 2
    assert seen == [(0, 0)]


async def test_the_pump_writes_a_streams_events_directly(
    sim: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counted(writer: StreamWriter, data: bytes) -> bool:
        calls.append(len(data))
        return write_chunk(writer, data)

    # The pump's writes and those of the reads taken while it waits.
    monkeypatch.setattr(sse_relay, "write_chunk", counted)
    monkeypatch.setattr(steady_relay, "write_chunk", counted)
    server, sink = await start_proxy(make_config(sim.base_url))
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions",
        chat("normal:tokens=12", stream=True),
        {"Connection": "close"},
    )
    raw = await asyncio.wait_for(client.read_to_eof(), 10)
    client.close()
    body = http_body(raw)
    events = body.count(b"data: ")
    assert body.endswith(b"data: [DONE]\n\n")
    # Every write after the first (which carries the response head) went the direct way.
    assert len(calls) >= 12
    assert sum(calls) < len(body)
    record = await sink.wait(lambda: next(iter(sink.records), None), 5, "the record")
    assert record.bytes_to_client == len(body)
    assert events >= 14


async def without_a_hook_attribute(request: web.Request) -> web.StreamResponse:
    """An aiohttp whose writer lacks one of the attributes `direct_writer` reads (an older or
    newer one): aiohttp's path, not an AttributeError."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(PIECES[0])
    writer = response._payload_writer
    assert writer is not None
    del writer._on_chunk_sent  # type: ignore[attr-defined]  # (a StreamWriter)
    request.app[SEEN].append((int(direct_writer(response) is not None), 0))
    await response.write_eof()
    return response


async def test_a_writer_without_an_attribute_keeps_aiohttps_write() -> None:
    raw, seen = await fetch(without_a_hook_attribute)
    assert raw.startswith(b"HTTP/1.1 200")
    assert seen == [(0, 0)]
