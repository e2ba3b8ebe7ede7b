"""The lean body reader (proxy/upstream_body.py) against aiohttp's own `StreamReader`, over real
sockets on 127.0.0.1, through the production upstream seam (`Upstreams`: its session,
connector and its protocol): the same bytes and the same exceptions on generated
answers (content-length, chunked and read-until-EOF bodies, cut, reset, in generated pieces
read at generated moments), and aiohttp's bounds (bytes and count of buffered chunks) kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from unittest import mock

import pytest
from aiohttp.streams import StreamReader
from hypothesis import event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

import proxy.upstream_connector
from proxy.upstream import Upstreams
from proxy.upstream_body import BodyReader, lean_body
from proxy.upstream_connector import UpstreamProtocol
from proxy.upstream_request import send
from tests.conftest import StartProxy
from tests.hostile_support import (
    ScriptedUpstream,
    ScriptedUpstreams,
    SeenRequest,
    chat_body,
    exchange_raw,
    proxy_before,
    request_bytes,
    reset,
)
from tests.upstream_support import open_attempt, upstream_seam

Framing = Literal["length", "chunked", "eof"]
Ending = Literal["close", "reset"]
Reader = Literal["aiohttp", "lean"]


@dataclass
class Answer:
    """An upstream answer as it goes on the wire: its head and body bytes (split at `cuts`),
    how much of it is sent (`sent`), how it ends, and the body bytes the client can get."""

    framing: Framing
    wire: bytes
    cuts: list[int]
    sent: int
    ending: Ending
    body: bytes  # what a reader gets before the end (all of it, or what came before the cut)


def encode(framing: Framing, body: bytes, chunk_sizes: list[int]) -> tuple[bytes, list[int]]:
    """The head and body on the wire, and for each wire offset ending a body byte, that
    offset (so that the body bytes of any prefix of the wire are known)."""
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if framing == "length":
        head += f"Content-Length: {len(body)}\r\n\r\n"
        start = len(head)
        return head.encode() + body, [start + i + 1 for i in range(len(body))]
    if framing == "eof":
        head += "\r\n"
        start = len(head)
        return head.encode() + body, [start + i + 1 for i in range(len(body))]
    wire = bytearray((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    ends: list[int] = []
    at, sizes = 0, iter(chunk_sizes)
    while at < len(body):
        piece = body[at : at + max(1, next(sizes, len(body)))]
        wire += b"%x\r\n" % len(piece)
        ends.extend(len(wire) + i + 1 for i in range(len(piece)))
        wire += piece + b"\r\n"
        at += len(piece)
    wire += b"0\r\n\r\n"
    return bytes(wire), ends


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    framing: Framing = draw(st.sampled_from(["length", "chunked", "eof"]))
    body = draw(st.binary(min_size=0, max_size=3000))
    chunk_sizes = draw(st.lists(st.integers(1, 600), max_size=40))
    wire, ends = encode(framing, body, chunk_sizes)
    head_end = wire.index(b"\r\n\r\n") + 4
    cut = framing != "eof" and draw(st.booleans())
    sent = draw(st.integers(head_end, len(wire) - 1)) if cut and len(wire) > head_end else len(wire)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, sent - 1)), max_size=12))))
    ending: Ending = draw(st.sampled_from(["close", "reset"]))
    got = sum(1 for end in ends if end <= sent)
    return Answer(framing, wire, [c for c in cuts if c < sent], sent, ending, body[:got])


@dataclass
class Progress:
    """What the client has read of the answer being sent (the scripted upstream ends it only
    once everything it sent was read, so that the end is seen after the bytes, not with them)."""

    read: int = 0
    late: bool = False


def scripted_reply(
    answer: Answer, progress: Progress, pause_s: float
) -> Callable[[SeenRequest, asyncio.StreamWriter], Awaitable[None]]:
    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        begin = 0
        for cut in [*answer.cuts, answer.sent]:
            writer.write(answer.wire[begin:cut])
            await writer.drain()
            begin = cut
            if pause_s:
                await asyncio.sleep(pause_s)  # most often its own socket read
        loop = asyncio.get_running_loop()
        until = loop.time() + 5
        while progress.read < len(answer.body):
            if loop.time() > until:
                progress.late = True
                break
            await asyncio.sleep(0.001)
        if answer.ending == "reset":
            reset(writer)

    return reply


def no_lean_body() -> contextlib.AbstractContextManager[object]:
    """aiohttp's own reader on the production connection (everything else as in production)."""
    return mock.patch.object(proxy.upstream_connector, "lean_body", lambda reader: None)


Outcome = tuple[bytes, str | None]


async def read_through(
    upstreams: Upstreams, url: str, reader: Reader, progress: Progress, delays: list[float]
) -> Outcome:
    """The answer read as the stream pump reads it (`content.readany()` until b""), with
    `delays` (cycled) before reads; the bytes read and the exception that ended it, if any."""
    attempt = open_attempt(upstreams, url)
    received = bytearray()
    try:
        with no_lean_body() if reader == "aiohttp" else contextlib.nullcontext():
            response = await asyncio.wait_for(attempt.start(), 5)
        content = response.content
        assert content is not None
        assert type(content) is (StreamReader if reader == "aiohttp" else BodyReader)
        for i in range(100_000):
            if delays and delays[i % len(delays)]:
                await asyncio.sleep(delays[i % len(delays)])
            try:
                chunk = await asyncio.wait_for(content.readany(), 5)
            except TimeoutError:
                raise  # a read that hangs is a failure, never an outcome to compare
            except Exception as exc:  # noqa: BLE001 (what each reader raises is compared)
                return bytes(received), f"{type(exc).__name__}: {exc}"
            if not chunk:
                return bytes(received), None
            received += chunk
            progress.read = len(received)
        raise AssertionError("the answer never ended")
    finally:
        attempt.abort()
        await attempt.close()


async def both_readers(answer: Answer, pause_s: float, delays: list[float]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with upstream_seam() as upstreams:
        for reader in ("aiohttp", "lean"):
            progress = Progress()
            server = await ScriptedUpstream(scripted_reply(answer, progress, pause_s)).start()
            try:
                outcomes.append(
                    await read_through(upstreams, server.base_url + "/x", reader, progress, delays)
                )
            finally:
                await server.stop()
            assert not progress.late, "the client never read what was sent"
    return outcomes


@settings(max_examples=200, deadline=None)
@given(
    answers(),
    st.sampled_from([0.0, 0.001]),
    st.lists(st.sampled_from([0.0, 0.0, 0.002]), max_size=5),
)
def test_generated_answers_read_the_same_as_aiohttps_reader(
    answer: Answer, pause_s: float, delays: list[float]
) -> None:
    aiohttps, lean = asyncio.run(both_readers(answer, pause_s, delays))
    assert lean == aiohttps
    complete = answer.sent == len(answer.wire)
    event(f"{answer.framing}, {'complete' if complete else 'cut'}, {answer.ending}")
    assert lean[0] == answer.body  # everything sent was read before the end came
    if complete:
        assert lean[1] is None  # (aiohttp ends a reset unframed body as if closed)
    else:
        assert lean[1] is not None
        assert lean[1].startswith("ClientPayloadError: Response payload is not completed")


# Deterministic cases: the state aiohttp left before the swap, and the bounds.


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + 5
    while not condition():
        assert loop.time() < until, what
        await asyncio.sleep(0.001)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_chunks_aiohttp_buffered_before_the_swap_are_read_whole() -> None:
    """aiohttp's reader fed (and split, and paused on) 20,000 1-byte chunks, none read: made
    lean then, its first read gives them all and resumes reading; the rest follows."""
    first = [bytes([65 + i % 26]) for i in range(20_000)]
    rest = [b"tail %d " % i for i in range(100)]
    go = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunked(first)[:-5])  # the terminator comes later
        await writer.drain()
        await go.wait()
        writer.write(chunked(rest))
        await writer.drain()

    server = await ScriptedUpstream(reply).start()
    async with upstream_seam() as upstreams:
        assert upstreams._session is not None
        url = URL(f"http://127.0.0.1:{server.port}/v1/x")
        session = upstreams._session
        with no_lean_body():
            loop = asyncio.get_running_loop()
            response = await asyncio.wait_for(
                send(session, "GET", url, CIMultiDict(), None, loop), 5
            )
            content = response.content
            assert type(content) is StreamReader
            assert response.connection is not None
            protocol = response.connection.protocol
            assert isinstance(protocol, UpstreamProtocol)
            # aiohttp's bound on unread chunks pauses it (4,096 of them at its default limit).
            await wait_for(lambda: protocol._reading_paused, "aiohttp's reader never paused")
        splits = content._http_chunk_splits
        assert splits is not None and len(splits) > content._high_water_chunks
        buffered = b"".join(content._buffer)
        lean_body(content)
        assert type(content) is BodyReader and content._http_chunk_splits is None
        go.set()
        data = await asyncio.wait_for(content.readany(), 5)
        assert data == buffered and len(data) > 4_000
        received = bytearray(data)
        while chunk := await asyncio.wait_for(content.readany(), 5):
            received += chunk
        assert received == b"".join(first + rest)
        assert not protocol._reading_paused
        response.release()
    await server.stop()


@contextlib.asynccontextmanager
async def held_answer(
    body: bytes, head: bytes, reader: Reader
) -> AsyncIterator[tuple[StreamReader, UpstreamProtocol]]:
    """An answer whose body is sent only once the response (and its reader) is ours."""
    go = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        await go.wait()
        writer.write(body)
        await writer.drain()
        await done.wait()  # the connection stays open: the body ends by its framing

    done = asyncio.Event()
    server = await ScriptedUpstream(reply).start()
    try:
        async with upstream_seam() as upstreams:
            attempt = open_attempt(upstreams, server.base_url + "/x")
            try:
                with no_lean_body() if reader == "aiohttp" else contextlib.nullcontext():
                    response = await asyncio.wait_for(attempt.start(), 5)
                content = response.content
                assert content is not None
                assert response._response.connection is not None
                protocol = response._response.connection.protocol
                assert isinstance(protocol, UpstreamProtocol)
                go.set()
                yield content, protocol
            finally:
                attempt.abort()
                await attempt.close()
    finally:
        done.set()
        await server.stop()


async def read_all(content: StreamReader) -> bytes:
    received = bytearray()
    while chunk := await asyncio.wait_for(content.readany(), 5):
        received += chunk
        # The count of buffered bytes (which the byte bound reads) stays exact.
        assert content._size == sum(map(len, content._buffer)) - content._buffer_offset
    return bytes(received)


READERS = pytest.mark.parametrize("reader", ["aiohttp", "lean"])


@READERS
async def test_one_byte_chunks_pause_reading_at_the_chunk_bound(reader: Reader) -> None:
    """20,000 1-byte chunks (120 KB on the wire, 20 KB of body: far under the byte bound)
    stop being read once the chunk bound is passed, and are read to their end."""
    pieces = [bytes([48 + i % 10]) for i in range(20_000)]
    async with held_answer(chunked(pieces), CHUNKED_HEAD, reader) as (content, protocol):
        await wait_for(lambda: protocol._reading_paused, "reading never paused")
        assert content._size < content._low_water
        assert content._high_water_chunks < len(content._buffer) <= content._high_water_chunks + 2
        assert await read_all(content) == b"".join(pieces)
        assert not protocol._reading_paused


@READERS
async def test_a_large_answer_pauses_reading_at_the_byte_bound(reader: Reader) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB: 32 times the reader's high water
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with held_answer(body, head, reader) as (content, protocol):
        await wait_for(lambda: protocol._reading_paused, "reading never paused")
        # At most one socket read (asyncio's 256 KiB) past the high-water mark.
        assert content._high_water < content._size <= content._high_water + 256 * 1024
        assert await read_all(content) == body
        assert not protocol._reading_paused


@READERS
async def test_a_second_reader_at_once_is_refused_alike(reader: Reader) -> None:
    async with held_answer(b"", CHUNKED_HEAD, reader) as (content, _):
        first = asyncio.ensure_future(content.readany())
        await wait_for(lambda: content._waiter is not None, "the first read never waited")
        with pytest.raises(RuntimeError) as caught:
            await content.readany()
        assert str(caught.value) == (
            "readany() called while another coroutine is already waiting for incoming data"
        )
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first


@READERS
async def test_a_read_of_part_then_readany_and_read_alike(reader: Reader) -> None:
    """`read(n)` (a control call's bounded read) leaves part of a piece: `readany` and `read`
    give the rest, once."""
    body = b"".join(b"piece %d;" % i for i in range(50))
    async with held_answer(chunked([body[:200], body[200:]]), CHUNKED_HEAD, reader) as (
        content,
        _,
    ):
        await wait_for(content.is_eof, "the answer never ended")
        assert await content.read(3) == body[:3]
        assert await content.readany() == body[3:]
        assert content._size == 0 and await content.readany() == b""
        assert await content.read() == b""


async def test_chunk_boundaries_are_refused_rather_than_made_up() -> None:
    async with held_answer(chunked([b"ab", b"c"]), CHUNKED_HEAD, "lean") as (content, _):
        with pytest.raises(RuntimeError, match="no HTTP chunk boundaries"):
            await content.readchunk()
        with pytest.raises(RuntimeError, match="no HTTP chunk boundaries"):
            async for _ in content.iter_chunks():
                pass
        assert await read_all(content) == b"abc"


# Through the production runner: the proxy relays what either reader reads, alike.

EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
)
DONE = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,'
    b'"total_tokens":7}}\n\ndata: [DONE]\n\n'
)
COMPLETION = (
    b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"' + b"word " * 2000 + b'"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2000,"total_tokens":2003}}'
)
SSE_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
JSON_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def one_byte_chunks(data: bytes) -> bytes:
    return b"".join(b"1\r\n%c\r\n" % byte for byte in data)


SCRIPTS: dict[str, tuple[bool, list[bytes]]] = {
    # a stream whose every byte is an HTTP chunk of its own (in three writes)
    "stream in 1-byte chunks": (
        True,
        [SSE_CHUNKED, one_byte_chunks(EVENT * 3), one_byte_chunks(DONE) + b"0\r\n\r\n"],
    ),
    # a completion of 10 KB in 2,500 chunks, then its end
    "completion in chunks": (
        False,
        [JSON_CHUNKED, chunked([COMPLETION[i : i + 4] for i in range(0, len(COMPLETION), 4)])],
    ),
    # a completion cut in its middle chunk (the connection closes)
    "completion cut": (
        False,
        [JSON_CHUNKED, chunked([COMPLETION])[: len(COMPLETION) // 2]],
    ),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
async def test_the_proxy_relays_alike_with_either_reader(
    script: str, scripted: ScriptedUpstreams, start_proxy: StartProxy
) -> None:
    stream, writes = SCRIPTS[script]

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        for data in writes:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.005)

    server, sink, _ = await proxy_before(reply, scripted, start_proxy)
    seen: list[tuple[int, bytes, str | None]] = []
    for reader in ("aiohttp", "lean"):
        with no_lean_body() if reader == "aiohttp" else contextlib.nullcontext():
            response = await exchange_raw(
                server.port,
                request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=stream)),
            )
        await sink.wait(lambda: len(sink.records) == len(seen) + 1, 5.0, "no record")
        record = sink.records[-1]
        seen.append((response.status, response.body, record.outcome))
    assert seen[0] == seen[1]
    if script == "completion cut":
        assert seen[1][2] == "upstream_error"
    else:
        assert seen[1][:1] == (200,) and seen[1][2] == "completed"
        assert (EVENT in seen[1][1]) if stream else (seen[1][1] == COMPLETION)
