"""A steady stream's usual read, the pump's and the one taken from the upstream parser's
callback while the pump waits (proxy/steady_reader.py): `_shaped_read` makes the read's marks
and its bytes for the client; `_begin_steady` and `_end_steady` turn the taking of reads on
and off; `take_steady` takes a read, `flush_steady` writes what was taken of one upstream read.

`SteadyRelay` is a mixin of `sse_relay.SSERelay` (so of `relay.Exchange`), with no slots of its
own: the fields it uses are `SSERelay`'s (`_Exchange`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from proxy.chunked_write import DIRECT_MAX, DRAIN_PAST, write_chunk
from proxy.outcome import RequestRecord
from proxy.secrets import StreamScrubber
from proxy.sse_stream import StreamState
from proxy.steady_reader import SteadyReader
from proxy.timeouts import PHASE_STREAMING
from proxy.upstream_body import BodyReader
from proxy.upstream_connector import UpstreamProtocol
from proxy.usage import StreamUsageTracker
from proxy.usage.fast import Shape
from proxy.usage.filter import CLOSED_END, CUT_INLINE_BELOW, NULL_USAGE_CUT, cut_null_usage

# The CR byte as an int: `int in bytes` is one memchr, while a one-byte bytes operand is
# first tried as an int, which raises and formats a TypeError (~2k instructions, every read).
_CR = 0x0D


class _Exchange(Protocol):
    """What the steady reads read and set: `SSERelay`'s fields and methods."""

    record: RequestRecord
    tracker: StreamUsageTracker | None
    scrubber: StreamScrubber
    steady_stream: StreamState | None
    delivered_tokens: int
    content_sent: bool

    def take_steady(self: _Exchange, chunk: bytes) -> bool: ...

    def flush_steady(self: _Exchange) -> None: ...

    def _shaped_read(
        self: _Exchange, stream: StreamState, chunk: bytes, shape: Shape, now: float
    ) -> bytes: ...

    def _content_came(self, stream: StreamState, now: float) -> None: ...


class SteadyRelay:
    """The steady reads of `SSERelay`: a mixin, whose state is the exchange's (`_Exchange`)."""

    # Slots are SSERelay's: an empty tuple here keeps the exchange free of an instance dict.
    __slots__ = ()

    steady_stream: StreamState | None  # set here, declared by SSERelay (type checker)

    def _begin_steady(
        self: _Exchange,
        content: StreamReader,
        stream: StreamState,
        direct: StreamWriter,
        clock: Callable[[], float],
    ) -> bool:
        """Let the reads the pump would take next come to `take_steady` (proxy/steady_reader.py):
        whether they will (a reader and a connection of ours)."""
        protocol = content._protocol
        if not isinstance(protocol, UpstreamProtocol):
            return False
        if type(content) is BodyReader:
            content.__class__ = SteadyReader  # the same slots: the body's reader, extended
        elif type(content) is not SteadyReader:
            return False
        stream.direct, stream.clock = direct, clock
        self.steady_stream = stream
        protocol.steady_sink = self
        return True

    def _end_steady(self: _Exchange, content: StreamReader | None) -> bool:
        """No more reads to `take_steady`: before the pump leaves, and before a client gone
        is drained (its reads are the drain's). False, for the pump's flag."""
        if content is not None:
            content._protocol.steady_sink = None  # type: ignore[attr-defined]
        self.steady_stream = None
        return False

    def take_steady(self: _Exchange, chunk: bytes) -> bool:
        """A read the waiting pump would take next, offered by its reader: taken now (True)
        when it is the usual read of a steady stream (`feed_shaped` takes it) and the client's
        writer takes it without a wait; else False with nothing changed, and the pump relays
        it. The pump's steady read, without waking it; its bytes for the client wait in
        `stream.pending` for the end of the upstream's read (`flush_steady`), so that the
        events of one read go out in one write, as the pump's join of them would."""
        stream = self.steady_stream
        if stream is None or not stream.steady or _CR in chunk:
            return False
        pending = stream.pending
        if (len(chunk) if pending is None else len(pending) + len(chunk)) > DIRECT_MAX:
            return False
        writer = stream.direct
        assert writer is not None
        protocol = writer._protocol
        transport = protocol.transport
        # Not paused: so `write_chunk`'s drain, when it asks for one, would not wait (the
        # transport pauses above 64 KiB buffered; the write adds at most DIRECT_MAX and a
        # frame), and the pump's write would have gone on at once as this one does.
        if transport is None or protocol._paused or transport.is_closing():
            return False
        tracker = self.tracker
        assert tracker is not None
        shape = tracker.feed_shaped(chunk)
        if shape is None:
            return False
        now = stream.clock()
        self.record.upstream_wait_s += now - stream.before
        stream.before = now  # (until the write: hangup's own time, as in the pump)
        data = self._shaped_read(stream, chunk, shape, now)
        if data:
            stream.pending = data if pending is None else pending + data
        return True

    def flush_steady(self: _Exchange) -> None:
        """At the end of an upstream read: what `take_steady` took of it goes to the client,
        in one write (the pump's write of a read, without waking it)."""
        stream = self.steady_stream
        if stream is None or stream.pending is None:
            return
        data, stream.pending = stream.pending, None
        writer = stream.direct
        assert writer is not None
        protocol = writer._protocol
        transport = protocol.transport
        if transport is None or transport.is_closing():
            return  # the client is gone since: the pump learns it (its task is cancelled)
        clock, record = stream.clock, self.record
        written_at = clock()
        if write_chunk(writer, data) and protocol._paused:
            # The drain this write asks for would wait: it is owed, and aiohttp's count says
            # so again at the pump's next write (which takes the reads from here on, the
            # client being paused), which pays it.
            writer.buffer_size = DRAIN_PAST + 1
        record.bytes_to_client += len(data)
        stream.before = clock()
        record.client_wait_s += stream.before - written_at
        tracker = self.tracker
        assert tracker is not None
        self.delivered_tokens = tracker.generated
        if stream.attempt.first_token_at is not None:
            self.content_sent = True

    def _shaped_read(
        self: _Exchange, stream: StreamState, chunk: bytes, shape: Shape, now: float
    ) -> bytes:
        """A steady stream's usual read, fed to the tracker already (`feed_shaped` said
        `shape`): its marks, and the bytes for the client (the pump's and `take_steady`'s)."""
        record = self.record
        record.content_chunks += 1
        if record.first_token_at is None or stream.attempt.first_token_at is None:
            self._content_came(stream, now)
        elif (deadlines := stream.deadlines).phase is PHASE_STREAMING:
            deadlines.last_progress = now  # `Deadlines.content`, no frame
        else:
            deadlines.content(now)
        chunk_filter = stream.chunk_filter
        if shape.null_usage is not None and chunk_filter is not None:
            if not shape.null_usage:
                chunk = chunk_filter.plain_bytes(chunk)
            elif len(chunk) < CUT_INLINE_BELOW:  # `cut_null_usage`, no frame
                chunk = chunk[:NULL_USAGE_CUT] + CLOSED_END
            else:
                chunk = cut_null_usage(chunk)
        scrubber = self.scrubber
        return scrubber.feed(chunk) if scrubber.active else chunk
