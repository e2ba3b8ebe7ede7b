"""The reader of an upstream answer's body: aiohttp's `StreamReader` less the bookkeeping
hangup never reads.

aiohttp's C parser builds every body's reader from a C-level global (`cdef object
StreamReader` in aiohttp/_http_parser.pyx), which nothing outside can replace. The reader has
`__slots__`, so `BodyReader` (a subclass with no slot of its own) becomes an answer's reader by
assigning its `__class__` as soon as the parser made it (`lean_body`, called by
proxy/upstream_connector.py's `UpstreamProtocol` when it gets a response's head and reader).
What it leaves out, per upstream chunk (one SSE event of a paced stream is one HTTP chunk and
one socket read):

- the HTTP chunk boundaries (`begin_http_chunk_receiving`, `end_http_chunk_receiving`: a deque
  of offsets, pruned again on every read), which only `readchunk`/`iter_chunks` answer from.
  hangup never calls them; `readchunk` here refuses loudly rather than answer without them.
- in `readany`, the usual read's detour through `_wait`, `_read_nowait` and
  `_read_nowait_chunk` (a coroutine, a timer context entered and left, a list, the boundary
  pruning and a `resume_reading` call whether reading was paused or not).

aiohttp's bounds stay: reading pauses when more than the high-water mark of bytes is buffered
or, whatever the encoding, more than `_high_water_chunks` pieces (aiohttp's own bound counts
the unread HTTP chunks of a chunked body: a hostile upstream's 1-byte chunks cannot grow the
buffer further than aiohttp lets them). A read that empties the buffer resumes reading only if
it was paused. Exceptions are aiohttp's, raised where aiohttp raises them.
tests/test_upstream_body.py holds it to aiohttp's reader over real sockets.
"""

from __future__ import annotations

from typing import Final

from aiohttp.helpers import TimerNoop
from aiohttp.streams import StreamReader

_EMPTY: Final = b""
_NOTHING: Final = [].clear  # a call that does nothing (it empties an empty list)


class BodyReader(StreamReader):
    """aiohttp's `StreamReader` whose reads are `readany` (and what `read`/`readexactly` build
    on it), with no HTTP chunk boundaries kept. Only ever made from an aiohttp reader whose
    timer is a `TimerNoop` (`lean_body`): its reads skip the timer."""

    __slots__ = ()

    # The C parser calls these two around every HTTP chunk: they keep the chunk boundaries,
    # which nothing here reads (the count of buffered pieces is bounded in `feed_data`). A
    # builtin that takes no argument and returns None rather than a `def`: no Python frame.
    begin_http_chunk_receiving = end_http_chunk_receiving = _NOTHING

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        """aiohttp's `feed_data`, plus its bound on buffered chunks (which aiohttp applies in
        `end_http_chunk_receiving`): pause above either high-water mark."""
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return False
        length = len(data)
        self._size = buffered = self._size + length
        buffer = self._buffer
        buffer.append(data)
        self.total_bytes += length
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # cancelled: its reader is gone
                waiter.set_result(None)
        if buffered > self._high_water or len(buffer) > self._high_water_chunks:
            self._protocol.pause_reading()
        return False

    async def readany(self) -> bytes:
        """What is buffered (waiting for it if nothing is), b"" at the end: aiohttp's
        `readany`, the usual case (every buffered piece whole) without its calls."""
        if self._exception is not None:
            raise self._exception
        buffer = self._buffer
        while not buffer:
            if self._eof:
                return _EMPTY
            # aiohttp's `_wait`, inline (one coroutine fewer alive under every idle stream),
            # without its timer: a TimerNoop.
            if self._protocol.transport is None:
                raise RuntimeError("Connection closed.")
            if self._waiter is not None:
                raise RuntimeError(
                    "readany() called while another coroutine is already waiting for incoming data"
                )
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._buffer_offset:  # a `read(n)` took part of the first piece
            return self._read_nowait(-1)
        if len(buffer) == 1:
            data = buffer.popleft()
        else:
            data = _EMPTY.join(buffer)
            buffer.clear()
        self._size = 0
        # Resumed only when paused: a paused parser holds the rest of the socket's bytes,
        # which this call parses into the buffer (aiohttp calls it after any read that leaves
        # the buffer under its low-water marks, which an empty buffer always is). The
        # protocol's tail pause (`_buffer_paused`) is for a connection without a parser.
        protocol = self._protocol
        if protocol._reading_paused:
            protocol.resume_reading()
        return data

    async def readchunk(self) -> tuple[bytes, bool]:
        raise RuntimeError("BodyReader keeps no HTTP chunk boundaries: readchunk() is refused")


def lean_body(reader: StreamReader) -> None:
    """Make a response's body reader a `BodyReader` (aiohttp's own made a moment ago by the
    parser), before anything reads it: bytes and chunk boundaries the parser fed in the
    read that held the head are kept (the boundaries then dropped). Readers of another kind
    (no body, a decompressing one) or with a timer of aiohttp's stay as they are."""
    if type(reader) is StreamReader and type(reader._timer) is TimerNoop:
        reader.__class__ = BodyReader
        reader._http_chunk_splits = None
