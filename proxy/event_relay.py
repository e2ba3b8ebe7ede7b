"""A read relayed event by event (the way of any read but the usual ones, which
`sse_relay.SSERelay._sse_step` takes whole): each event the read completed fed to the usage
tracker, filtered, dropped when malformed, held while the request may still switch targets;
then the start of a huge event passed through as it arrives, and the read's output.

`EventRelay` is a mixin of `sse_relay.SSERelay` (so of `relay.Exchange`), with no slots of its
own: the fields it uses are `SSERelay`'s (`_Exchange`).
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from proxy.attempts import AttemptResult
from proxy.errors import UpstreamFailed
from proxy.outcome import RequestRecord
from proxy.secrets import StreamScrubber
from proxy.sse import SSEDecoder, SSEEvent
from proxy.sse_large import LargeEvent, passable
from proxy.sse_stream import (
    HOLD_CAP,
    WRITE_PIECE,
    Pieces,
    StreamState,
    content_text,
    failed_before_content,
    held_too_much,
    too_large_whole,
)
from proxy.upstream_errors import AttemptFailed
from proxy.usage import StreamUsageTracker
from proxy.usage.event_kind import EVENT_CONTENT, EVENT_DONE, EVENT_ERROR, EVENT_OTHER


class _Exchange(Protocol):
    """What the events of a read read: `SSERelay`'s fields and methods."""

    record: RequestRecord
    response: web.StreamResponse | None
    tracker: StreamUsageTracker | None
    decoder: SSEDecoder | None
    scrubber: StreamScrubber
    continuing: bool

    def _delivered_texts(self) -> list[str]: ...

    def _content_came(self, stream: StreamState, now: float) -> None: ...


class EventRelay:
    """The event-by-event reads of `SSERelay` (`_sse_step`'s and `_large_step`'s): a mixin,
    whose state is the exchange's (`_Exchange`)."""

    # Slots are SSERelay's: an empty tuple here keeps the exchange free of an instance dict.
    __slots__ = ()

    def _sse_events(
        self: _Exchange,
        stream: StreamState,
        chunk: bytes,
        now: float,
        events: list[SSEEvent],
        out: list[bytes],
        content: bool,
    ) -> bytes | Pieces:
        """The events a read completed, then the read's output (`_sse_step`)."""
        record, attempt, decoder = self.record, stream.attempt, self.decoder
        tracker, chunk_filter = self.tracker, stream.chunk_filter
        assert tracker is not None and decoder is not None
        held = stream.held
        for event in events:
            kind = tracker.feed(event)
            if self.continuing and attempt.first_token_at is None:
                if kind is EVENT_OTHER and not event.comment:
                    continue  # a continuation's role chunk: the client has one already
            if kind is EVENT_CONTENT and stream.collect_text:
                self._delivered_texts().append(content_text(event.data))
            if kind is EVENT_CONTENT:
                record.content_chunks += 1
                if not content:
                    content = True
                    self._content_came(stream, now)
            elif tracker.malformed_events > stream.malformed:
                # Not a JSON object: an SDK would raise on it mid-answer. Dropped, counted.
                stream.malformed = tracker.malformed_events
                continue
            data = event.raw if chunk_filter is None else chunk_filter.client_bytes(event, kind)
            if held is not None:
                if kind is EVENT_ERROR:
                    raise failed_before_content(attempt.upstream, tracker)
                if kind is EVENT_CONTENT or kind is EVENT_DONE:
                    out.extend(held)
                    held = stream.held = None
                elif event.comment:
                    if self.response is not None:
                        out.append(data)  # headers are out already: keep-alives pass
                    continue
                else:
                    held.append(data)
                    stream.held_bytes += len(data)
                    if stream.held_bytes > HOLD_CAP:
                        raise held_too_much(attempt.upstream)
                    continue
            out.append(data)
        if held is not None and not chunk:
            # The stream ended with no content and no end marker: cut before content.
            raise AttemptFailed(
                AttemptResult.STREAM_ERROR,
                UpstreamFailed(
                    f'upstream "{attempt.upstream}" ended the stream before any content'
                ),
            )
        if chunk and passable(decoder, stream.large_at):
            # A huge event has begun: from here on it passes through as it comes.
            forward = not stream.raw_mode and held is None
            forward = forward and not (self.continuing and attempt.first_token_at is None)
            head, line = decoder.take_line()
            large = stream.large = LargeEvent(
                head,
                line,
                edit=chunk_filter is not None,
                forward=forward,
                run=stream.large_run,
                keep_text=stream.collect_text,
            )
            first = large.start()
            if forward:
                out.append(first)
        elif chunk and decoder.buffered > stream.whole_max:
            raise too_large_whole(attempt.upstream)  # it would be read whole, in one step
        scrubber = self.scrubber
        if stream.raw_mode:
            return scrubber.feed(chunk) + (b"" if chunk else scrubber.flush())
        if sum(map(len, out)) > WRITE_PIECE:
            # A huge output: its pieces go out as they are, not joined (a copy of megabytes
            # in this step), and scrubbed as they go (a secret split across pieces is held).
            return Pieces(out, scrubber, end=not chunk)
        data = b"".join(out)
        # Configured secrets never reach the client (a secret split across writes is held).
        return scrubber.feed(data) + (b"" if chunk else scrubber.flush())
