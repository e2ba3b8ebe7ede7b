"""A relayed stream's writes to its client straight to the transport, framed as aiohttp frames
them: the per-read write of the SSE pump without aiohttp's four Python calls for it
(`StreamResponse.write`, `StreamWriter.write`, `_write_chunked_payload`, `_writelines`: two
coroutines and a frame each, once per event of every stream).

Only where that path would do nothing but frame the bytes as an HTTP/1.1 chunk, count them and
drain past its limit: a chunked answer whose head is out (aiohttp holds the head until the
first write, to send it with that write), with no compression, no declared length and no
per-chunk or per-write hooks. Anything else (and any aiohttp without these attributes) keeps
`response.write`. The bytes on the wire are the same: `<size in hex>\\r\\n<data>\\r\\n`, one
transport write, as aiohttp's joined write; the counters aiohttp keeps (`buffer_size`, which
decides its drain, and `output_size`, the body's length) move as its own write moves them.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_writer import StreamWriter

# aiohttp's `StreamWriter.write` drains once more than this many bytes went out since its last
# drain (its `LIMIT` default).
DRAIN_PAST = 0x10000
# Larger pieces take `response.write` (a huge event's pieces: rare, and a copy saved there).
DIRECT_MAX = 0x4000


def direct_writer(response: web.StreamResponse) -> StreamWriter | None:
    """The response's writer when `write_chunk` may stand for `response.write`, else None.
    Asked after a write through `response.write`: what it checks holds until the answer's
    end (only `write_eof`, called once the stream is relayed, changes it)."""
    # Attributes read as attributes, an aiohttp without one of them answered by the
    # AttributeError: `getattr` with a default is a builtin call each (~1k instructions for
    # the seven, once a stream).
    try:
        writer = response._payload_writer
        if type(writer) is not StreamWriter:
            return None
        if (
            writer.chunked
            and writer.length is None
            and writer._compress is None
            and writer._on_chunk_sent is None
            and writer.on_body_write is None
            and writer._headers_written is True
            and not writer._eof
            and writer.buffer_size is not None
        ):
            return writer
    except AttributeError:
        pass
    return None


def write_chunk(writer: StreamWriter, data: bytes) -> bool:
    """`data` (non-empty, at most `DIRECT_MAX` bytes) as one chunk; True when the caller must
    now `await writer.drain()`, as `StreamWriter.write` would. A closing transport raises
    ConnectionResetError, as aiohttp's write does (its error is a subclass)."""
    transport = writer._protocol.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("Cannot write to closing transport")
    framed = b"%x\r\n%s\r\n" % (len(data), data)
    transport.write(framed)
    size = len(framed)
    writer.output_size += size
    buffered = writer.buffer_size = writer.buffer_size + size
    if buffered > DRAIN_PAST:
        writer.buffer_size = 0
        return True
    return False
