"""The SSE half of what an exchange sends its client: a stream relayed read by read (usage the
client did not ask for filtered out, malformed events dropped, a huge event passed through as
it arrives), held before its first content while the request may still switch targets.

`SSERelay` is the base of `downstream.Downstream`, which adds the response head, the body pump
and the error answers; the lifecycle (attempts, deadlines, the one outcome) is relay.py's. The
reads of a huge event passed through are its mixin's, `sse_large_relay.LargeEventRelay`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from proxy import relaying
from proxy.admission import Plan, TargetPlan
from proxy.attempts import RESULT_CUT, RESULT_OK, Attempt, AttemptResult
from proxy.chunked_write import DIRECT_MAX, DRAIN_PAST, direct_writer, write_chunk
from proxy.client_writes import ClientGone, ClientWrites
from proxy.errors import UpstreamFailed
from proxy.outcome import OUTCOME_COMPLETED, RequestRecord, settle_relayed
from proxy.resilience.classify import status_result
from proxy.routing import Route
from proxy.secrets import StreamScrubber
from proxy.sse import SSEDecoder, SSEEvent, ends_block
from proxy.sse_large import LargeEvent, passable
from proxy.sse_large_relay import LargeEventRelay
from proxy.sse_stream import (
    HOLD_CAP,
    MAX_SSE_EVENT,
    WRITE_PIECE,
    Pieces,
    StreamState,
    content_text,
    failed_before_content,
    held_too_much,
    loop_clock,
    too_large,
    too_large_whole,
)
from proxy.state import ProxyState
from proxy.steady_reader import SteadyReader
from proxy.timeouts import PHASE_STREAMING, Phase
from proxy.upstream import UpstreamResponse
from proxy.upstream_body import BodyReader
from proxy.upstream_connector import UpstreamProtocol
from proxy.upstream_errors import READ_ERRORS, AttemptFailed
from proxy.usage import EventKind, RequestFacts, StreamUsageTracker
from proxy.usage.fast import Shape
from proxy.usage.filter import (
    CLOSED_END,
    CUT_INLINE_BELOW,
    NULL_USAGE_CUT,
    cut_null_usage,
    cut_null_usages,
)
from proxy.watchdog import Watchdog

# The CR byte as an int: `int in bytes` is one memchr, while a one-byte bytes operand is
# first tried as an int, which raises and formats a TypeError (~2k instructions, every read).
_CR = 0x0D


class SSERelay(ClientWrites, LargeEventRelay):
    """The base of `Downstream` (and so of `relay.Exchange`): the exchange's fields (slots
    here, set in `relay.Exchange.__init__`; accounting reads tracker, json_body and
    delivered_tokens) and the SSE pump."""

    # One per held stream: slots keep it small (no per-instance dict).
    __slots__ = (
        "_pending",
        "content_encoding",
        "content_sent",
        "continuing",
        "decoder",
        "delivered_text",
        "delivered_tokens",
        "drained",
        "facts",
        "json_body",
        "loop",
        "plan",
        "record",
        "request",
        "response",
        "route",
        "scrubber",
        "state",
        "steady_stream",
        "target",
        "tracker",
    )

    state: ProxyState
    request: web.Request
    record: RequestRecord
    loop: asyncio.AbstractEventLoop
    clock: Callable[[], float]  # the loop's clock: a slot of `relay.Exchange`'s
    plan: Plan | None
    facts: RequestFacts | None
    route: Route | None
    target: TargetPlan | None
    response: web.StreamResponse | None
    _pending: web.StreamResponse | None
    tracker: StreamUsageTracker | None
    decoder: SSEDecoder | None  # of the stream being relayed (or drained)
    json_body: bytearray | None
    content_encoding: str | None
    delivered_tokens: int
    drained: bool
    content_sent: bool
    scrubber: StreamScrubber
    steady_stream: StreamState | None  # while `take_steady` may take reads (the pump's)
    delivered_text: list[str] | None
    continuing: bool

    async def _pump_sse(
        self,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        attempt: Attempt,
        holding: bool,
    ) -> web.StreamResponse:
        """Relay a stream (`proxy.relaying` around it) and end it: the coroutine that stays
        alive while the stream is held, so the only one of this exchange's under the read."""
        record, deadlines, clock = self.record, plan.deadlines, loop_clock(self.loop)
        self.decoder = SSEDecoder()
        tracker = self.tracker = StreamUsageTracker(plan.facts)
        stream = StreamState(plan, watchdog, attempt, holding, self.continuing)
        # An idle stream waits in the read below. What this frame holds across that wait is
        # the per-stream state only: each read's bytes and events live in `_sse_step`'s frame
        # and are gone before the next read begins (~1 KB of heap per idle stream, measured).
        # The body's reader itself, not `upstream.read()`: one coroutine level less to resume
        # on every read and to keep alive under every idle stream (None: a hedge's winner,
        # whose first reads are replayed by its `read()`).
        content = upstream.content
        chunk: bytes | None
        data: bytes | Pieces
        direct: StreamWriter | None = None  # the client's writer, once writes may skip to it
        probe = True
        # Whether reads may be taken by `take_steady` (once the stream is steady and writes
        # skip to the client's writer); asked once.
        inline = asked = False
        await relaying.begin(self, holding)
        try:
            # Three clock reads a read: when it came, and around the write to the client. The
            # next read's wait begins when the write (or the step) ended: `stream.before`,
            # which `take_steady` moves on for the reads it takes while the pump waits.
            stream.before = clock()
            while True:
                commit_at = deadlines.client_commit_at() if stream.held is not None else None
                try:
                    if commit_at is not None and self.response is None:
                        async with asyncio.timeout_at(commit_at):
                            try:
                                chunk = await (
                                    upstream.read() if content is None else content.readany()
                                )
                            except READ_ERRORS as exc:
                                raise upstream.cut_off(exc) from exc
                    else:
                        try:
                            chunk = await (
                                upstream.read() if content is None else content.readany()
                            )
                        except READ_ERRORS as exc:
                            raise upstream.cut_off(exc) from exc
                except TimeoutError:  # the commit deadline (a read's own errors are mapped above)
                    chunk = None
                finally:  # a read cut by a deadline, a hang-up or an error was a wait all the same
                    now = clock()
                    record.upstream_wait_s += now - stream.before
                if chunk is None:
                    # The client's SDK gives up without response headers soon: send them now.
                    # A switch stays invisible (it has seen headers only), so holding goes on.
                    await self._commit()
                    stream.before = clock()
                    continue
                end = not chunk
                if (
                    stream.steady
                    and _CR not in chunk
                    and (shape := tracker.feed_shaped(chunk)) is not None
                ):
                    # The usual read of a steady stream (one block of the last content chunk's
                    # shape), one that `take_steady` left: `_sse_step`'s shaped read without its
                    # setup. A steady stream has no huge event in progress, nothing held, and a
                    # decoder holding nothing. tests/test_sse_steady.py holds it to `_sse_step`'s.
                    data = self._shaped_read(stream, chunk, shape, now)
                else:
                    # (A steady stream's read was tried as a shaped one already.)
                    data = self._sse_step(stream, upstream, chunk, now, stream.steady)
                chunk = None
                if data:
                    response = self.response
                    if response is None:
                        response = await self._commit()
                    # What _client_io does, inline: this runs once per read of every stream.
                    written_at = clock()
                    try:
                        if isinstance(data, Pieces):
                            sent = 0
                            for piece in data:
                                await response.write(piece)
                                sent += len(piece)
                                await asyncio.sleep(0)  # the loop runs between pieces
                            record.bytes_to_client += sent
                        elif direct is not None and len(data) <= DIRECT_MAX:
                            # The usual write: aiohttp's chunked write without its calls.
                            if write_chunk(direct, data):
                                await direct.drain()
                            record.bytes_to_client += len(data)
                        elif len(data) <= WRITE_PIECE:
                            await response.write(data)
                            record.bytes_to_client += len(data)
                            if probe:  # the head is out with this write: may the next skip?
                                probe = False
                                direct = direct_writer(response)
                        else:
                            await self._write_pieces(response, data)
                            record.bytes_to_client += len(data)
                    except ConnectionError as exc:
                        record.client_gone_at = written_at
                        raise ClientGone from exc
                    finally:
                        stream.before = clock()
                        record.client_wait_s += stream.before - written_at
                    self.delivered_tokens = tracker.generated  # (an attribute: no frame)
                    if attempt.first_token_at is not None:
                        self.content_sent = True
                    data = b""
                else:
                    stream.before = clock()
                if end:
                    break
                if not asked and stream.steady and direct is not None and content is not None:
                    asked = True
                    inline = self._begin_steady(content, stream, direct, clock)
        except asyncio.CancelledError:
            if inline:
                inline = self._end_steady(content)
            await relaying.client_left(self, plan, upstream, watchdog)
            raise
        finally:
            if inline:
                self._end_steady(content)
            relaying.end(self)
        return await self._relayed(plan, upstream, attempt)

    def _begin_steady(
        self,
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

    def _end_steady(self, content: StreamReader | None) -> bool:
        """No more reads to `take_steady`: before the pump leaves, and before a client gone
        is drained (its reads are the drain's). False, for the pump's flag."""
        if content is not None:
            content._protocol.steady_sink = None  # type: ignore[attr-defined]
        self.steady_stream = None
        return False

    def take_steady(self, chunk: bytes) -> bool:
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

    def flush_steady(self) -> None:
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

    def _shaped_read(self, stream: StreamState, chunk: bytes, shape: Shape, now: float) -> bytes:
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

    async def _relayed(
        self, plan: Plan, upstream: UpstreamResponse, attempt: Attempt
    ) -> web.StreamResponse:
        """The answer is relayed whole: its end to the client, then the request's outcome and
        the attempt's."""
        plan.deadlines.done()
        response = self.response
        assert response is not None
        await self._client_io(response.write_eof())
        tracker = self.tracker
        settle_relayed(
            self.record,
            upstream.status,
            stream_error=None if tracker is None else tracker.error,
            stream_terminated=None if tracker is None else tracker.terminated,
        )
        attempt.delivered = True
        ok = self.record.outcome is OUTCOME_COMPLETED
        result = status_result(upstream.status) or RESULT_CUT
        attempt.end(RESULT_OK if ok else result, self.loop.time())
        return response

    def _sse_step(
        self,
        stream: StreamState,
        upstream: UpstreamResponse,
        chunk: bytes,
        now: float,
        tried: bool = False,
    ) -> bytes | Pieces:
        """One upstream read of a stream (b"": its end): the bytes for the client, if any
        (in `Pieces` when they hold a huge event among others). `tried`: the pump found the
        read is not a shaped one (`feed_shaped` said None), so not again."""
        if stream.large is not None:
            return self._large_step(stream, upstream, chunk, now, stream.large)
        record, attempt, decoder = self.record, stream.attempt, self.decoder
        tracker, chunk_filter = self.tracker, stream.chunk_filter
        assert tracker is not None and decoder is not None
        out: list[bytes] = []
        content = False  # deadlines and first token: once per read (its events share `now`)
        if not chunk:
            events = decoder.flush()
            upstream.check_end(mid_event=any(not ends_block(e.raw) for e in events))
        else:
            taken = 0
            if _CR not in chunk and (
                stream.steady
                or (
                    stream.held is None
                    and stream.plain
                    and not (self.continuing and attempt.first_token_at is None)
                    and decoder.at_boundary(chunk)
                )
            ):
                # The usual read: one event of the last content chunk's shape, known without a
                # search (`feed_shaped`); or whole `data: {...}` events, classified from their
                # bytes (no SSEEvent, no text decode) and edited in one pass, the decoder
                # getting the rest.
                shape = None if tried else tracker.feed_shaped(chunk)
                if shape is not None:
                    record.content_chunks += 1
                    if record.first_token_at is None or attempt.first_token_at is None:
                        self._content_came(stream, now)
                    else:  # all that `_content_came` does once the first token is marked
                        deadlines = stream.deadlines
                        if deadlines.phase is Phase.STREAMING:
                            deadlines.last_progress = now  # `Deadlines.content`, no frame
                        else:
                            deadlines.content(now)
                    if chunk_filter is not None and shape.null_usage is not None:
                        if shape.null_usage:
                            if len(chunk) < CUT_INLINE_BELOW:  # `cut_null_usage`, no frame
                                chunk = chunk[:NULL_USAGE_CUT] + CLOSED_END
                            else:
                                chunk = cut_null_usage(chunk)
                        else:
                            chunk = chunk_filter.plain_bytes(chunk)
                    stream.steady = True
                    scrubber = self.scrubber
                    return scrubber.feed(chunk) if scrubber.active else chunk
                taken, contents, ends, usage_only = tracker.feed_plain(chunk)
                if taken:
                    if contents:
                        record.content_chunks += contents
                        content = True
                        self._content_came(stream, now)
                    if taken == len(chunk):  # all of it (the usual read): nothing else to do
                        stream.steady = True
                        if chunk_filter is not None:
                            if ends is not None:  # shaped blocks: cut where they end
                                chunk = cut_null_usages(chunk, ends)
                            elif usage_only is None:
                                chunk = chunk_filter.plain_bytes(chunk)
                            else:  # the stream's usage chunk among them
                                chunk = chunk_filter.plain_bytes_around(chunk, usage_only)
                        return self.scrubber.feed(chunk)
                    run = chunk[:taken]
                    if chunk_filter is not None:
                        if ends is not None:
                            run = cut_null_usages(run, ends)
                        elif usage_only is None:
                            run = chunk_filter.plain_bytes(run)
                        else:
                            run = chunk_filter.plain_bytes_around(run, usage_only)
                    out.append(run)
            stream.steady = False
            events = decoder.feed(chunk[taken:] if taken else chunk)
            if decoder.buffered > MAX_SSE_EVENT:
                raise too_large(attempt.upstream)
        return self._sse_events(stream, chunk, now, events, out, content)

    def _sse_events(
        self,
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
                if kind is EventKind.OTHER and not event.comment:
                    continue  # a continuation's role chunk: the client has one already
            if kind is EventKind.CONTENT and stream.collect_text:
                self._delivered_texts().append(content_text(event.data))
            if kind is EventKind.CONTENT:
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
                if kind is EventKind.ERROR:
                    raise failed_before_content(attempt.upstream, tracker)
                if kind is EventKind.CONTENT or kind is EventKind.DONE:
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

    def _delivered_texts(self) -> list[str]:
        texts = self.delivered_text
        if texts is None:
            texts = self.delivered_text = []
        return texts

    def _content_came(self, stream: StreamState, now: float) -> None:
        """The first content event of a read: deadlines and first-token marks."""
        stream.deadlines.content(now)
        record, attempt = self.record, stream.attempt
        if record.first_token_at is None:
            record.first_token_at = now
            # The stream enters the idle phase: its deadline may be the first one armed (when
            # first_token_s is off).
            stream.watchdog.rearm()
        if attempt.first_token_at is None:
            attempt.first_token_at = now
