"""The relay's side of one huge SSE event passed through as it arrives (the event itself, sans
I/O, is proxy/sse_large.py's `LargeEvent`): each read while it is in progress, and what its end
means, as `_sse_events` decides it for any other event.

`LargeEventRelay` is a mixin of `sse_relay.SSERelay` (so of `relay.Exchange`), with no slots
of its own: the fields and methods it uses are `SSERelay`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.outcome import RequestRecord
from proxy.secrets import StreamScrubber
from proxy.sse import SSEDecoder, SSEEvent, ends_block
from proxy.sse_large import LargeEvent
from proxy.sse_stream import (
    HOLD_CAP,
    MAX_SSE_EVENT,
    Pieces,
    StreamState,
    content_text,
    failed_before_content,
    held_too_much,
    too_large,
    too_large_whole,
)
from proxy.upstream import UpstreamResponse
from proxy.usage import EventKind, StreamUsageTracker, strip_usage_member


class LargeEventRelay:
    """The huge-event reads of `SSERelay`'s pump (`_sse_step` hands them here)."""

    # Slots are SSERelay's: an empty tuple here keeps the exchange free of an instance dict.
    __slots__ = ()

    # SSERelay's fields and methods used here (declared for the type checker).
    record: RequestRecord
    response: web.StreamResponse | None
    tracker: StreamUsageTracker | None
    decoder: SSEDecoder | None
    scrubber: StreamScrubber
    continuing: bool

    if TYPE_CHECKING:

        def _sse_events(
            self,
            stream: StreamState,
            chunk: bytes,
            now: float,
            events: list[SSEEvent],
            out: list[bytes],
            content: bool,
        ) -> bytes | Pieces: ...

        def _delivered_texts(self) -> list[str]: ...

        def _content_came(self, stream: StreamState, now: float) -> None: ...

    def _large_step(
        self,
        stream: StreamState,
        upstream: UpstreamResponse,
        chunk: bytes,
        now: float,
        large: LargeEvent,
    ) -> bytes | Pieces:
        """A read while a huge event is in progress (proxy/sse_large.py)."""
        decoder = self.decoder
        assert decoder is not None
        if not chunk:
            if large.in_line:
                upstream.check_end(mid_event=True)  # cut inside the event: raises
            events = large.flush(decoder)
            upstream.check_end(mid_event=any(not ends_block(e.raw) for e in events))
            forward = b""
        else:
            forward, done = large.feed(chunk, decoder)
            if done is None:
                if large.size > MAX_SSE_EVENT:
                    raise too_large(stream.attempt.upstream)
                if large.block_rest(decoder) > stream.whole_max:
                    # The block's lines after the huge one (another huge one): read whole.
                    raise too_large_whole(stream.attempt.upstream)
                if stream.raw_mode:
                    return self.scrubber.feed(chunk)
                return self.scrubber.feed(forward) if large.forward and forward else b""
            if decoder.buffered > MAX_SSE_EVENT:
                raise too_large(stream.attempt.upstream)
            events = done
        stream.large = None
        out = [forward] if large.forward and forward else []
        content = False
        if events:
            content = self._large_end(stream, large, events[0], out, now)
        return self._sse_events(stream, chunk, now, events[1:], out, content)

    def _large_end(
        self, stream: StreamState, large: LargeEvent, event: SSEEvent, out: list[bytes], now: float
    ) -> bool:
        """A huge event's end: what `_sse_events` does with an event, for one whose start may
        have gone out already. Returns whether it carried content."""
        record, attempt, tracker = self.record, stream.attempt, self.tracker
        assert tracker is not None
        kind: EventKind | None = None
        skeleton = large.skeleton
        if skeleton is not None and large.skeleton_text:
            kind = tracker.feed_skeleton(event, skeleton.restore)
        if kind is None:
            if skeleton is not None:
                event = large.whole()  # the skeleton cannot tell: read it whole (one step)
                skeleton = None
            kind = tracker.feed(event)
        sent = large.forward and large.safe > 0
        if self.continuing and attempt.first_token_at is None:
            if kind is EventKind.OTHER and not event.comment:
                return False  # a continuation's role chunk (kept, not sent): dropped
        if kind is EventKind.CONTENT and stream.collect_text:
            text = content_text(event.data)  # of the skeleton: its markers stand for parts
            texts = self._delivered_texts()
            texts.extend([text] if skeleton is None else skeleton.text_of(text))
        content = False
        if kind is EventKind.CONTENT:
            record.content_chunks += 1
            content = True
            self._content_came(stream, now)
        elif tracker.malformed_events > stream.malformed:
            stream.malformed = tracker.malformed_events
            if not sent:
                return False  # dropped and counted, as any malformed event
            # Its start went out: relayed whole (docs/resilience.md), counted all the same.
        pieces = [] if large.forward else large.safe_pieces()
        rest = large.held()
        chunk_filter = stream.chunk_filter
        if chunk_filter is not None:
            if kind is EventKind.USAGE_ONLY and not sent:
                if chunk_filter.drops_usage_chunk:
                    pieces, rest = [], b""
            elif event.data is not None:
                # The usage member, cut as `client_bytes` cuts it: every `"usage"` is in the
                # held tail, and the byte before it says whether a comma goes too.
                last = large.last_safe_byte()
                rest = strip_usage_member(last + rest)[len(last) :]
        data = [*pieces, rest] if rest else pieces
        held = stream.held
        if held is not None:
            if kind is EventKind.ERROR:
                raise failed_before_content(attempt.upstream, tracker)
            if kind is EventKind.CONTENT or kind is EventKind.DONE:
                out.extend(held)
                stream.held = None
            elif event.comment:
                if self.response is not None:
                    out.extend(data)
                return content
            else:
                held.extend(data)
                stream.held_bytes += sum(map(len, data))
                if stream.held_bytes > HOLD_CAP:
                    raise held_too_much(attempt.upstream)
                return content
        out.extend(data)
        return content
