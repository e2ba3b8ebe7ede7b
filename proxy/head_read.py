"""An upstream read that holds a chunked response's head and its body's first bytes: parsed
as two reads, split where the head ends, the body's part fed to the reader in one batch.

aiohttp's C parser parses a whole socket read before the protocol learns of the response it
holds, so the events that came with the head were fed to aiohttp's own `StreamReader`, one
HTTP chunk at a time (`feed_data`, and the chunk boundaries `begin_http_chunk_receiving` and
`end_http_chunk_receiving` keep: ~90 bytecodes an event), before the upstream protocol made
the reader lean (proxy/upstream_body.py). A busy proxy reads several of a stream's events with
its head (~9 at 50 wrk connections, all 20 of `stream20` under callgrind). Split at the head's
end (as the network may split any read), the head is parsed first, and its body's reader is
hangup's `BodyReader` before the first body byte is fed; then, while the parser feeds the rest
of the read, the reader's class is `_Batch`, whose `feed_data` only appends (the C parser calls
it once a chunk), and the counts aiohttp keeps per piece are set once at the end.

A body's part that does not parse fails the response as the read parsed whole fails it: its
head is not handed over. Nothing reads a reader made a moment ago, so no waiter waits on it,
and its buffer held nothing before. The batch is at most `BATCH_MAX` bytes of one read: under
the reader's bounds on buffered bytes and chunks (aiohttp's defaults: 128 KiB, 4,096 chunks),
which are checked once after it as `feed_data` checks them a piece. tests/test_head_read.py
holds it to the read parsed whole; tests/test_upstream_body.py's generated answers go through
it.
"""

from __future__ import annotations

from typing import Final

from aiohttp.client_proto import ResponseHandler

from proxy.upstream_body import BodyReader

_HEAD_END: Final = b"\r\n\r\n"
# A read's body part fed in one batch at most: ~60 events of a chat stream. Its pieces (at
# least 6 bytes each on the wire) stay under the default chunk bound (4,096) as its bytes do
# under the byte bound.
BATCH_MAX: Final = 16 * 1024
_parse: Final = ResponseHandler.data_received


class _Batch(BodyReader):
    """A fresh `BodyReader` while the parser feeds it the body's part of the head's read:
    pieces appended, nothing else (`head_read` sets the counts once)."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        if data:  # (the parser feeds none empty; an empty piece would read as the end)
            self._buffer.append(data)
        return False


def head_read(protocol: ResponseHandler, data: bytes) -> None:
    """Parse a read of `protocol`'s that may hold a response's head (and its body's first
    bytes, fed to the reader the head made, lean by then, in one batch)."""
    end = data.find(_HEAD_END) + 4
    if end < 4 or end == len(data) or data.find(b"chunked", 0, end) < 0:
        # No whole head, nothing after it, or a body not in chunks (one piece a read anyway).
        _parse(protocol, data)
        return
    queued, failed = len(protocol._buffer), protocol._exception
    _parse(protocol, data[:end])
    reader = protocol._payload
    if (
        type(reader) is not BodyReader
        or reader.total_bytes  # not the fresh reader of a head just parsed
        or reader._eof
        or len(data) - end > BATCH_MAX
    ):
        _parse(protocol, data[end:])
    else:
        reader.__class__ = _Batch
        try:
            _parse(protocol, data[end:])
        finally:
            reader.__class__ = BodyReader
            buffer = reader._buffer
            reader._size = reader.total_bytes = size = sum(map(len, buffer))
            if size > reader._high_water or len(buffer) > reader._high_water_chunks:
                protocol.pause_reading()
    if protocol._exception is not failed:
        # The body's part did not parse: as when aiohttp parses the read whole (its error
        # then drops what the read's head made), no response of this read is handed over,
        # and the request's start gets the error (a 502, not a head and a broken body).
        while len(protocol._buffer) > queued:
            protocol._buffer.pop()
