"""The SSE half of what an exchange sends its client: a stream relayed read by read (usage the
client did not ask for filtered out, malformed events dropped, a huge event passed through as
it arrives), held before its first content while the request may still switch targets.

`SSERelay` is the base of `downstream.Downstream`, which adds the response head, the body pump
and the error answers; the lifecycle (attempts, deadlines, the one outcome) is relay.py's. Its
mixins: `steady_relay.SteadyRelay` a steady stream's usual read (also taken while the pump
waits), `event_relay.EventRelay` a read relayed event by event, `sse_large_relay.LargeEventRelay`
the reads of a huge event passed through, `client_writes.ClientWrites` the awaited writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from proxy import relaying
from proxy.admission import Plan, TargetPlan
from proxy.attempts import RESULT_CUT, RESULT_OK, Attempt
from proxy.chunked_write import DIRECT_MAX, direct_writer, write_chunk
from proxy.client_writes import ClientGone, ClientWrites
from proxy.event_relay import EventRelay
from proxy.outcome import OUTCOME_COMPLETED, RequestRecord, settle_relayed
from proxy.resilience.classify import status_result
from proxy.routing import Route
from proxy.secrets import StreamScrubber
from proxy.sse import SSEDecoder, ends_block
from proxy.sse_large_relay import LargeEventRelay
from proxy.sse_stream import (
    MAX_SSE_EVENT,
    WRITE_PIECE,
    Pieces,
    StreamState,
    loop_clock,
    too_large,
)
from proxy.state import ProxyState
from proxy.steady_relay import SteadyRelay
from proxy.timeouts import PHASE_STREAMING
from proxy.upstream import UpstreamResponse
from proxy.upstream_errors import READ_ERRORS
from proxy.usage import RequestFacts, StreamUsageTracker
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


class SSERelay(ClientWrites, EventRelay, LargeEventRelay, SteadyRelay):
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

    async def _relayed(
        self, plan: Plan, upstream: UpstreamResponse, attempt: Attempt, ended: bool = False
    ) -> web.StreamResponse:
        """The answer is relayed whole: its end to the client (unless `ended`: the body pump
        wrote it with the last chunk, and aiohttp's own `write_eof` would do nothing but
        return), then the request's outcome and the attempt's."""
        plan.deadlines.done()
        response = self.response
        assert response is not None
        if not ended:
            await self._client_io(response.write_eof())
        tracker = self.tracker
        settle_relayed(
            self.record,
            upstream.status,
            stream_error=None if tracker is None else tracker.error,
            stream_terminated=None if tracker is None else tracker.terminated,
        )
        attempt.delivered = True
        if self.record.outcome is OUTCOME_COMPLETED:
            attempt.end(RESULT_OK, self.loop.time())
        else:  # the status's own failure only for an answer that is not the outcome
            attempt.end(status_result(upstream.status) or RESULT_CUT, self.loop.time())
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
            if not events and stream.held is None:
                # The usual end (the decoder held nothing): what `_sse_events` answers for it.
                scrubber = self.scrubber
                return scrubber.feed(b"") + scrubber.flush()
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
                        if deadlines.phase is PHASE_STREAMING:
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
            # first_token_s is off, or is longer than idle_s and the timer was armed for it).
            stream.watchdog.streaming(now)
        if attempt.first_token_at is None:
            attempt.first_token_at = now
