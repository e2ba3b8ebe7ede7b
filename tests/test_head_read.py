"""proxy/head_read.py: a read holding a chunked response's head and body bytes, parsed as two
(split where the head ends) with the body's part fed to the lean reader in one batch; against
the same protocol and parser fed the read whole by aiohttp (`lean_body` off). Driven at the
protocol's `data_received`, as the transport calls it, so that what one read holds is exact
(tests/test_upstream_body.py's generated answers go through it over real sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from aiohttp.helpers import TimerNoop
from aiohttp.streams import StreamReader

import proxy.head_read
import proxy.upstream_connector
from proxy.head_read import BATCH_MAX
from proxy.upstream_body import BodyReader, lean_body
from proxy.upstream_connector import UpstreamProtocol
from tests.conftest import StartProxy
from tests.hostile_support import (
    ScriptedUpstream,
    ScriptedUpstreams,
    SeenRequest,
    chat_body,
    exchange_raw,
    proxy_before,
    request_bytes,
    sse_in_chunks,
)
from tests.upstream_support import open_attempt, upstream_seam

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENTS = [b'data: {"n":%d,"choices":[{"delta":{"content":"w%d"}}]}\n\n' % (i, i) for i in range(20)]


def chunked(pieces: list[bytes], *, end: bool = True) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + (b"0\r\n\r\n" if end else b"")


class _Transport(asyncio.Transport):
    """What the protocol calls on its transport: reading paused or resumed, a close."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.closing = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def protocol_awaiting_a_head(read_bufsize: int = 2**16) -> UpstreamProtocol:
    """The upstream protocol as the connector leaves it for a request sent: its response's
    head is due (`Connector.adopt`), its parser set as proxy/upstream_request.py sets it."""
    protocol = UpstreamProtocol(asyncio.get_running_loop())
    protocol.connection_made(_Transport())
    protocol.set_response_params(
        timer=TimerNoop(), read_until_eof=True, auto_decompress=False, read_bufsize=read_bufsize
    )
    protocol._head_due = True
    return protocol


def reader_of(protocol: UpstreamProtocol) -> StreamReader:
    """The body's reader of the response whose head the protocol parsed."""
    assert len(protocol._buffer) == 1  # (one response queued for its `start`)
    reader = protocol._payload
    assert isinstance(reader, StreamReader)
    return reader


@contextmanager
def aiohttps_pieces_counted() -> Iterator[list[str]]:
    """Calls of aiohttp's own per-piece methods (its reader's `feed_data` and the chunk
    boundaries' two): the work a read fed to the lean reader does without."""
    calls: list[str] = []
    originals = {
        name: getattr(StreamReader, name)
        for name in ("feed_data", "begin_http_chunk_receiving", "end_http_chunk_receiving")
    }

    def counted(name: str) -> Any:
        def method(self: StreamReader, *args: Any) -> Any:
            calls.append(name)
            return originals[name](self, *args)

        return method

    with mock.patch.multiple(StreamReader, **{name: counted(name) for name in originals}):
        yield calls


async def read_body(reader: StreamReader) -> bytes:
    received = bytearray()
    while chunk := await asyncio.wait_for(reader.readany(), 5):
        received += chunk
    return bytes(received)


async def test_events_read_with_the_head_never_reach_aiohttps_reader() -> None:
    protocol = protocol_awaiting_a_head()
    with aiohttps_pieces_counted() as calls:
        protocol.data_received(SSE_HEAD + chunked(EVENTS, end=False))
    assert calls == []
    reader = reader_of(protocol)
    assert type(reader) is BodyReader and not protocol._head_due
    # One piece a chunk, and the counts aiohttp keeps for them set once.
    assert list(reader._buffer) == EVENTS
    body = b"".join(EVENTS)
    assert reader._size == reader.total_bytes == len(body)
    assert await asyncio.wait_for(reader.readany(), 5) == body
    protocol.data_received(chunked([b"data: [DONE]\n\n"]))
    assert await read_body(reader) == b"data: [DONE]\n\n"
    assert reader.total_bytes == len(body) + 14


async def test_a_whole_answer_in_one_read_reads_as_aiohttp_reads_it() -> None:
    wire = SSE_HEAD + chunked(EVENTS)
    lean = protocol_awaiting_a_head()
    lean.data_received(wire)
    with mock.patch.object(proxy.upstream_connector, "lean_body", lambda reader: None):
        whole = protocol_awaiting_a_head()
        whole.data_received(wire)  # (a head due, the lean reader off: parsed whole)
    ours, aiohttps = reader_of(lean), reader_of(whole)
    assert type(ours) is BodyReader and type(aiohttps) is StreamReader
    assert ours.is_eof() and aiohttps.is_eof()
    assert (ours._size, ours.total_bytes) == (aiohttps._size, aiohttps.total_bytes)
    assert await read_body(ours) == await read_body(aiohttps) == b"".join(EVENTS)


async def test_a_head_split_over_two_reads_is_split_from_the_one_it_ends_in() -> None:
    wire = SSE_HEAD + chunked(EVENTS[:3], end=False)
    protocol = protocol_awaiting_a_head()
    with aiohttps_pieces_counted() as calls:
        protocol.data_received(wire[:30])
        assert protocol._head_due and not protocol._buffer
        protocol.data_received(wire[30:])
    assert calls == []
    assert list(reader_of(protocol)._buffer) == EVENTS[:3]


async def test_a_body_over_the_batch_is_fed_piece_by_piece_by_the_lean_reader() -> None:
    events = [b"data: %s\n\n" % (b"x" * 1000) for _ in range(BATCH_MAX // 1000 + 1)]
    protocol = protocol_awaiting_a_head()
    with (
        aiohttps_pieces_counted() as calls,
        mock.patch.object(
            BodyReader, "feed_data", autospec=True, side_effect=BodyReader.feed_data
        ) as fed,
    ):
        protocol.data_received(SSE_HEAD + chunked(events, end=False))
    assert calls == []
    assert fed.call_count == len(events)  # (not one batch: each piece's bounds checked)
    reader = reader_of(protocol)
    assert reader.total_bytes == sum(map(len, events))


async def test_a_batch_over_the_readers_chunk_bound_pauses_reading() -> None:
    """A reader of a small limit (16 chunks at most buffered): the batch's 40 pieces, under
    the batch's own size, pause reading as `feed_data` would have once past the bound."""
    protocol = protocol_awaiting_a_head(read_bufsize=256)
    pieces = [b"%02d" % i for i in range(40)]
    protocol.data_received(SSE_HEAD + chunked(pieces, end=False))
    reader = reader_of(protocol)
    assert type(reader) is BodyReader and len(reader._buffer) > reader._high_water_chunks
    assert protocol._reading_paused
    assert await asyncio.wait_for(reader.readany(), 5) == b"".join(pieces)
    assert not protocol._reading_paused  # the read that empties the buffer resumes it


@pytest.mark.parametrize(
    "wire",
    [
        # a body framed by its length: one piece a read whatever the split
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}',
        SSE_HEAD,  # nothing after the head
        SSE_HEAD[:-2],  # no whole head
    ],
    ids=["length", "head only", "part of a head"],
)
async def test_a_read_with_nothing_to_split_is_parsed_once(wire: bytes) -> None:
    protocol = protocol_awaiting_a_head()
    with mock.patch.object(proxy.head_read, "_parse", side_effect=proxy.head_read._parse) as parsed:
        protocol.data_received(wire)
    assert parsed.call_count == 1


async def test_a_finished_answers_reader_is_never_fed_as_a_fresh_one() -> None:
    """A connection reused after a whole answer, whose next read's head does not parse: the
    reader left from the answer before keeps its counts (no batch goes to it)."""
    protocol = protocol_awaiting_a_head()
    protocol.data_received(SSE_HEAD + chunked(EVENTS[:2]))
    before = reader_of(protocol)
    assert await read_body(before) == EVENTS[0] + EVENTS[1]
    protocol._head_due = True
    broken = b"HTTP/1.1 2x0 broken\r\nTransfer-Encoding: chunked\r\n\r\n"
    protocol.data_received(broken + chunked([b"late"], end=False))
    assert protocol._payload is before
    assert before.total_bytes == len(EVENTS[0]) + len(EVENTS[1])
    assert protocol.exception() is not None


async def test_the_connector_leaves_each_sent_request_awaiting_its_head() -> None:
    """Through the production seam, twice on one kept connection: each answer written in one
    write with its head (one read here) reaches the lean reader only, in one batch."""

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunked(EVENTS))
        await writer.drain()

    server = await ScriptedUpstream(reply, keep_alive=True).start()
    try:
        async with upstream_seam() as upstreams:
            for _ in range(2):
                attempt = open_attempt(upstreams, server.base_url + "/x")
                with (
                    aiohttps_pieces_counted() as calls,
                    mock.patch.object(BodyReader, "feed_data") as fed_one_by_one,
                ):
                    response = await asyncio.wait_for(attempt.start(), 5)
                    content = response.content
                    assert type(content) is BodyReader
                    assert await read_body(content) == b"".join(EVENTS)
                assert calls == [] and fed_one_by_one.call_count == 0
                await attempt.close()
    finally:
        await server.stop()
    assert server.connections == 1


@contextmanager
def head_reads_counted() -> Iterator[list[bytes]]:
    """The reads the upstream protocol hands to `head_read` (each still parsed by it)."""
    reads: list[bytes] = []
    split = proxy.head_read.head_read

    def counted(protocol: Any, data: bytes) -> None:
        reads.append(data)
        split(protocol, data)

    with mock.patch.object(proxy.upstream_connector, "head_read", counted):
        yield reads


async def test_only_a_streams_answer_has_its_head_read_split() -> None:
    """A completion's answer (no stream asked for) is parsed as aiohttp parses a read: the
    split's searches are a stream's only; a stream's attempt on the same kept connection
    after it has its head split again."""

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunked(EVENTS))
        await writer.drain()

    server = await ScriptedUpstream(reply, keep_alive=True).start()
    try:
        async with upstream_seam() as upstreams:
            for stream in (False, True):
                attempt = open_attempt(upstreams, server.base_url + "/x", stream=stream)
                with head_reads_counted() as reads:
                    response = await asyncio.wait_for(attempt.start(), 5)
                    assert await read_body(response._response.content) == b"".join(EVENTS)
                assert bool(reads) is stream
                await attempt.close()
    finally:
        await server.stop()
    assert server.connections == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_the_relay_splits_the_head_of_a_stream_it_was_asked_for_only(
    stream: bool, scripted: ScriptedUpstreams, start_proxy: StartProxy
) -> None:
    """The relay tells the attempt whether the client asked for a stream: the same upstream
    answer has its head read split for a stream's request only."""
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
    server, _, _ = await proxy_before(sse_in_chunks(events), scripted, start_proxy)
    with head_reads_counted() as reads:
        body = chat_body(stream=stream)
        response = await exchange_raw(
            server.port, request_bytes("POST", "/v1/chat/completions", body=body)
        )
    assert response.status == 200
    assert b"hi" in response.body
    assert bool(reads) is stream


@pytest.mark.parametrize("rest", [b"zz\r\nabc\r\n", chunked(EVENTS[:2], end=False) + b"zz\r\n"])
async def test_a_body_part_that_does_not_parse_fails_the_response_as_a_whole_read_does(
    rest: bytes,
) -> None:
    """A broken chunk in the head's read (first, or after whole ones): no response is handed
    over and reading one raises the parser's error, as when aiohttp parses the read whole."""
    wire = SSE_HEAD + rest
    outcomes = []
    for lean in (True, False):
        with mock.patch.object(
            proxy.upstream_connector,
            "lean_body",
            lean_body if lean else lambda reader: None,
        ):
            protocol = protocol_awaiting_a_head()
            protocol.data_received(wire)
        assert not protocol._buffer
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(protocol.read(), 5)
        outcomes.append((type(caught.value), str(caught.value)))
    assert outcomes[0] == outcomes[1]
