"""The client side of one exchange: response headers (sent at once, or held while the request
may still switch targets), the SSE and body pumps, and the error answers.

`Downstream` is the base of `relay.Exchange`; the lifecycle (attempts, deadlines, the one
outcome) stays in relay.py. Here is only what goes to the client, and how: an SSE stream is
relayed event by event (usage the client did not ask for filtered out, malformed events
dropped); once headers went out, an error can only end the stream in band.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from aiohttp import web

from proxy.admission import JSON_TYPES, Plan, TargetPlan
from proxy.attempts import Attempt, AttemptResult
from proxy.drain import USAGE_BODY_CAP, drain
from proxy.errors import ProxyError, UpstreamFailed, render_body, render_sse_event
from proxy.headers import client_response_headers
from proxy.outcome import Outcome, RequestRecord, settle_relayed
from proxy.resilience.classify import status_result
from proxy.routing import Route
from proxy.secrets import StreamScrubber
from proxy.sse import SSEDecoder, SSEEvent, ends_block
from proxy.sse_large import LARGE_EVENT, LargeEvent, passable
from proxy.state import ProxyState
from proxy.upstream import READ_ERRORS, AttemptFailed, UpstreamResponse
from proxy.upstream_checks import check_response_head
from proxy.usage import EventKind, RequestFacts, StreamUsageTracker, strip_usage_member
from proxy.usage.filter import cut_null_usage
from proxy.usage.skeleton import MIN_RUN, restore
from proxy.watchdog import Watchdog

if TYPE_CHECKING:
    from proxy.relay import Exchange

_MAX_SSE_EVENT = 16 * 1024 * 1024  # one event; an upstream that never ends one is broken
_CR = b"\r"
_WRITE_PIECE = 1024 * 1024  # a larger output goes to the client in pieces of this size
# Bytes of events held back before the first content token while a switch is possible; an
# upstream that sends more than this without content is broken, and memory stays bounded.
HOLD_CAP = 1024 * 1024
# A JSON answer is held whole up to this while a switch is possible, so a body cut mid-way
# goes to the next target instead of reaching the client truncated; a longer one is relayed
# from there on as it comes (a cut then closes the client connection, as without).
BODY_HOLD_CAP = 8 * 1024 * 1024


def held_too_much(upstream: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" sent over {HOLD_CAP // 1024} KiB of events before any content'
        ),
    )


def _too_large(upstream: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" sent an SSE event over '
            f"{_MAX_SSE_EVENT // (1024 * 1024)} MiB without ending it"
        ),
    )


def _failed_before_content(upstream: str, tracker: StreamUsageTracker) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" failed the stream before any '
            f"content: {(tracker.error or '')[:200]}"
        ),
    )


def _content_text(data: str | None) -> str:
    """The text of choice 0 in a chat chunk (for continuing a cut stream)."""
    try:
        obj = json.loads(data or "")
        delta = obj["choices"][0]["delta"]
        text = delta.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


class _StreamState:
    """What one attempt's SSE relay carries from one upstream read to the next."""

    # A huge event's thresholds (class attributes: no bytes per stream; tests subclass): an
    # event line over `large_at` passes through, text stretches of `large_run` characters or
    # more may stand as markers.
    large_at = LARGE_EVENT
    large_run = MIN_RUN

    __slots__ = (
        "attempt",
        "chunk_filter",
        "collect_text",
        "deadlines",
        "held",
        "held_bytes",
        "large",
        "malformed",
        "plain",
        "raw_mode",
        "watchdog",
    )

    def __init__(
        self, plan: Plan, watchdog: Watchdog, attempt: Attempt, holding: bool, continuing: bool
    ) -> None:
        self.attempt, self.watchdog, self.deadlines = attempt, watchdog, plan.deadlines
        self.chunk_filter = plan.usage_filter
        # Events of this attempt not yet sent: before its first content, while a switch to
        # another target is still possible, nothing but keep-alive comments goes out.
        self.held: list[bytes] | None = [] if holding else None
        self.held_bytes = 0
        self.large: LargeEvent | None = None  # a huge event in progress (proxy/sse_large.py)
        self.malformed = 0
        self.collect_text = plan.route.options.continue_cut_streams
        # Whole plain data events may skip the decoder (`_sse_step`); not when their text is
        # collected for a continuation.
        self.plain = not self.collect_text
        # Nothing to hold, filter or drop: bytes go on as they come, partial events included
        # (a slow event is not delayed until its end). Otherwise the stream is relayed event
        # by event, and malformed events are dropped.
        self.raw_mode = self.chunk_filter is None and not holding and not continuing


class _Pieces:
    """The client's bytes of one read, left in pieces (one of them huge, or many of a huge
    event) to be written one by one: scrubbed as they are written, none over `_WRITE_PIECE`,
    so that no step of the loop handles more than a piece. `len` is the total before
    scrubbing."""

    __slots__ = ("end", "pieces", "scrubber", "size")

    def __init__(self, pieces: list[bytes], scrubber: StreamScrubber, *, end: bool) -> None:
        self.pieces, self.size = pieces, sum(map(len, pieces))
        self.scrubber, self.end = scrubber, end

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        scrubber = self.scrubber
        for piece in self.pieces:
            for start in range(0, len(piece), _WRITE_PIECE):
                if part := scrubber.feed(piece[start : start + _WRITE_PIECE]):
                    yield part
        if self.end and (rest := scrubber.flush()):
            yield rest

    def join(self) -> bytes:
        return b"".join(self)


class _OneWriteResponse(web.StreamResponse):
    """Headers held until the first body write, as aiohttp's own `web.Response` does, so a
    complete answer's headers, body and end leave in one send. (Were aiohttp to drop this
    switch, the headers would simply go at once again.)"""

    _send_headers_immediately = False


class ClientGone(Exception):
    """A write to the client failed: its socket is gone (seen without handler cancellation,
    or when the kernel reports the broken pipe before the server does)."""


class Downstream:
    """What an exchange sends to its client. The fields are the exchange's (set in
    `relay.Exchange.__init__`, slots declared there); accounting reads tracker, json_body and
    delivered_tokens."""

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
        "target",
        "tracker",
    )

    state: ProxyState
    request: web.Request
    record: RequestRecord
    loop: asyncio.AbstractEventLoop
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
    delivered_text: list[str]
    continuing: bool

    async def _relay_response(
        self,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        attempt: Attempt,
        prefix: bytes,
        can_switch: bool,
    ) -> web.StreamResponse:
        record, loop = self.record, self.loop
        now = loop.time()
        record.upstream_headers_at = now
        record.upstream_status = upstream.status
        record.upstream = attempt.upstream
        try:
            check_response_head(
                upstream.status,
                upstream.reason,
                upstream.headers.items(),
                attempt.upstream,
                event_stream=upstream.event_stream,
            )
        except UpstreamFailed as err:  # not relayable as it is: the upstream's fault
            raise AttemptFailed(AttemptResult.INVALID_RESPONSE, err) from err
        self.state.metrics.upstream_connection_opened()
        try:
            sse = upstream.event_stream
            plan.deadlines.response_started(now, sse=sse)
            watchdog.rearm()
            if self.response is not None and not (sse and upstream.status < 300):
                # A fallback after headers went out (a stream that failed before content):
                # only another stream can continue it.
                raise AttemptFailed(
                    AttemptResult.SERVER_ERROR
                    if upstream.status >= 500
                    else AttemptResult.CLIENT_ERROR,
                    UpstreamFailed(
                        f'upstream "{attempt.upstream}" answered {upstream.status} '
                        "after the stream had begun"
                    ),
                )
            filtering = sse and plan.usage_filter is not None
            # A non-streamed answer already complete goes out in one write: headers, body
            # and end (otherwise the headers go at once, and the body as it comes).
            response_type = (
                _OneWriteResponse if not sse and upstream.body_complete() else web.StreamResponse
            )
            self._pending = response_type(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(
                    upstream.headers, request_id=record.request_id, keep_length=not filtering
                ),
            )
            # A stream that may still switch targets keeps its headers until content comes.
            holding = (
                can_switch
                and upstream.status < 300
                and (sse or upstream.content_type in JSON_TYPES)
            )
            if not holding:
                await self._commit()
            try:
                if sse:
                    await self._pump_sse(plan, upstream, watchdog, attempt, holding)
                else:
                    await self._pump_body(plan, upstream, prefix, holding)
            except asyncio.CancelledError:
                # Client gone (or our deadline): note when, then let the attempt close the
                # upstream. In drain mode, first read on for exact usage.
                gone = watchdog.fired is None and not self.state.hard_stopping
                if gone and record.client_gone_at is None:
                    record.client_gone_at = loop.time()
                    if plan.route.options.on_disconnect == "drain":
                        watchdog.stop()
                        drain_at = loop.time()
                        try:
                            await drain(cast("Exchange", self), plan, upstream)
                        finally:
                            record.upstream_wait_s += loop.time() - drain_at
                raise
            plan.deadlines.done()
            assert self.response is not None
            response = self.response
            await self._client_io(response.write_eof())
        finally:
            self.state.metrics.upstream_connection_closed()
        tracker = self.tracker
        settle_relayed(
            record,
            upstream.status,
            stream_error=None if tracker is None else tracker.error,
            stream_terminated=None if tracker is None else tracker.terminated,
        )
        attempt.delivered = True
        ok = record.outcome is Outcome.COMPLETED
        result = status_result(upstream.status) or AttemptResult.CUT
        attempt.end(AttemptResult.OK if ok else result, loop.time())
        return response

    async def _commit(self) -> web.StreamResponse:
        """Send the response headers held for the current attempt (once per request)."""
        if self.response is None:
            pending = self._pending
            assert pending is not None
            self.record.status = pending.status
            self.response = pending  # before prepare: a client gone mid-head still has one
            await self._client_io(pending.prepare(self.request))
            if self.plan is not None:
                self.plan.deadlines.client_committed()
        return self.response

    async def _pump_sse(
        self,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        attempt: Attempt,
        holding: bool,
    ) -> None:
        record, deadlines, loop = self.record, plan.deadlines, self.loop
        self.decoder = SSEDecoder()
        tracker = self.tracker = StreamUsageTracker(plan.facts)
        stream = _StreamState(plan, watchdog, attempt, holding, self.continuing)
        # An idle stream waits in the read below. What this frame holds across that wait is
        # the per-stream state only: each read's bytes and events live in `_sse_step`'s frame
        # and are gone before the next read begins (~1 KB of heap per idle stream, measured).
        # The body's reader itself, not `upstream.read()`: one coroutine level less to resume
        # on every read and to keep alive under every idle stream (None: a hedge's winner,
        # whose first reads are replayed by its `read()`).
        content = upstream.content
        chunk: bytes | None
        while True:
            commit_at = deadlines.client_commit_at() if stream.held is not None else None
            before = loop.time()
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
                        chunk = await (upstream.read() if content is None else content.readany())
                    except READ_ERRORS as exc:
                        raise upstream.cut_off(exc) from exc
            except TimeoutError:  # the commit deadline (a read's own errors are mapped above)
                chunk = None
            finally:  # a read cut by a deadline, a hang-up or an error was a wait all the same
                now = loop.time()
                record.upstream_wait_s += now - before
            if chunk is None:
                # The client's SDK gives up without response headers soon: send them now.
                # A switch stays invisible (it has seen headers only), so holding goes on.
                await self._commit()
                continue
            end = not chunk
            data = self._sse_step(stream, upstream, chunk, now)
            chunk = None
            if data:
                response = self.response
                if response is None:
                    response = await self._commit()
                # What _client_io does, inline: this runs once per read of every stream.
                written_at = loop.time()
                try:
                    if isinstance(data, _Pieces):
                        sent = 0
                        for piece in data:
                            await response.write(piece)
                            sent += len(piece)
                            await asyncio.sleep(0)  # the loop runs between pieces
                        record.bytes_to_client += sent
                    elif len(data) <= _WRITE_PIECE:
                        await response.write(data)
                        record.bytes_to_client += len(data)
                    else:
                        await self._write_pieces(response, data)
                        record.bytes_to_client += len(data)
                except ConnectionError as exc:
                    record.client_gone_at = written_at
                    raise ClientGone from exc
                finally:
                    record.client_wait_s += loop.time() - written_at
                self.delivered_tokens = tracker.generated_tokens
                if attempt.first_token_at is not None:
                    self.content_sent = True
                data = b""
            if end:
                return

    @staticmethod
    async def _write_pieces(response: web.StreamResponse, data: bytes) -> None:
        """A large output (a huge event) in pieces: each write copies one piece, and once the
        client's socket is full the write waits, so the loop runs between pieces instead of
        copying the whole output in one step. The client gets the same bytes."""
        if len(data) <= _WRITE_PIECE:
            if data:
                await response.write(data)
            return
        view = memoryview(data)  # not released here: a transport may still hold a slice
        for start in range(0, len(data), _WRITE_PIECE):
            await response.write(view[start : start + _WRITE_PIECE])

    def _sse_step(
        self, stream: _StreamState, upstream: UpstreamResponse, chunk: bytes, now: float
    ) -> bytes | _Pieces:
        """One upstream read of a stream (b"": its end): the bytes for the client, if any
        (in `_Pieces` when they hold a huge event among others)."""
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
            if (
                stream.held is None
                and stream.plain
                and _CR not in chunk
                and not (self.continuing and attempt.first_token_at is None)
                and decoder.at_boundary(chunk)
            ):
                # The usual read: one event of the last content chunk's shape, known without a
                # search (`feed_shaped`); or whole `data: {...}` events, classified from their
                # bytes (no SSEEvent, no text decode) and edited in one pass, the decoder
                # getting the rest.
                shape = tracker.feed_shaped(chunk)
                if shape is not None:
                    record.content_chunks += 1
                    self._content_came(stream, now)
                    if chunk_filter is not None and shape.null_usage is not None:
                        if shape.null_usage:
                            chunk = cut_null_usage(chunk)
                        else:
                            chunk = chunk_filter.plain_bytes(chunk)
                    return self.scrubber.feed(chunk)
                taken, contents = tracker.feed_plain(chunk)
                if taken:
                    if contents:
                        record.content_chunks += contents
                        content = True
                        self._content_came(stream, now)
                    if taken == len(chunk):  # all of it (the usual read): nothing else to do
                        if chunk_filter is not None:
                            chunk = chunk_filter.plain_bytes(chunk)
                        return self.scrubber.feed(chunk)
                    run = chunk[:taken]
                    out.append(run if chunk_filter is None else chunk_filter.plain_bytes(run))
            events = decoder.feed(chunk[taken:] if taken else chunk)
            if decoder.buffered > _MAX_SSE_EVENT:
                raise _too_large(attempt.upstream)
        return self._sse_events(stream, chunk, now, events, out, content)

    def _sse_events(
        self,
        stream: _StreamState,
        chunk: bytes,
        now: float,
        events: list[SSEEvent],
        out: list[bytes],
        content: bool,
    ) -> bytes | _Pieces:
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
                self.delivered_text.append(_content_text(event.data))
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
                    raise _failed_before_content(attempt.upstream, tracker)
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
        scrubber = self.scrubber
        if stream.raw_mode:
            return scrubber.feed(chunk) + (b"" if chunk else scrubber.flush())
        if sum(map(len, out)) > _WRITE_PIECE:
            # A huge output: its pieces go out as they are, not joined (a copy of megabytes
            # in this step), and scrubbed as they go (a secret split across pieces is held).
            return _Pieces(out, scrubber, end=not chunk)
        data = b"".join(out)
        # Configured secrets never reach the client (a secret split across writes is held).
        return scrubber.feed(data) + (b"" if chunk else scrubber.flush())

    def _large_step(
        self,
        stream: _StreamState,
        upstream: UpstreamResponse,
        chunk: bytes,
        now: float,
        large: LargeEvent,
    ) -> bytes | _Pieces:
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
                if large.size > _MAX_SSE_EVENT:
                    raise _too_large(stream.attempt.upstream)
                if stream.raw_mode:
                    return self.scrubber.feed(chunk)
                return self.scrubber.feed(forward) if large.forward and forward else b""
            if decoder.buffered > _MAX_SSE_EVENT:
                raise _too_large(stream.attempt.upstream)
            events = done
        stream.large = None
        out = [forward] if large.forward and forward else []
        content = False
        if events:
            content = self._large_end(stream, large, events[0], out, now)
        return self._sse_events(stream, chunk, now, events[1:], out, content)

    def _large_end(
        self, stream: _StreamState, large: LargeEvent, event: SSEEvent, out: list[bytes], now: float
    ) -> bool:
        """A huge event's end: what `_sse_events` does with an event, for one whose start may
        have gone out already. Returns whether it carried content."""
        record, attempt, tracker = self.record, stream.attempt, self.tracker
        assert tracker is not None
        kind: EventKind | None = None
        skeleton = large.skeleton
        if skeleton is not None and large.skeleton_text:
            runs = skeleton.runs
            kind = tracker.feed_skeleton(event, lambda obj: restore(obj, runs))
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
            text = _content_text(event.data)  # of the skeleton: its markers stand for parts
            self.delivered_text.extend([text] if skeleton is None else skeleton.text_of(text))
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
                raise _failed_before_content(attempt.upstream, tracker)
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

    def _content_came(self, stream: _StreamState, now: float) -> None:
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

    async def _pump_body(
        self, plan: Plan, upstream: UpstreamResponse, prefix: bytes, holding: bool
    ) -> None:
        record, deadlines = self.record, plan.deadlines
        # While holding, the body is kept until it is whole (or BODY_HOLD_CAP): a cut before
        # then raises with nothing sent, and the next target answers instead.
        held: list[bytes] | None = [] if holding else None
        held_bytes = 0
        keep_copy = (
            plan.facts.endpoint != "other"
            and upstream.status < 300
            and upstream.content_type in JSON_TYPES
        )
        # A failed earlier attempt's partial copy is not this answer's.
        self.json_body = bytearray() if keep_copy else None
        if keep_copy:
            self.content_encoding = upstream.content_encoding
        first = True
        while True:
            if first and prefix:
                chunk, now = prefix, self.loop.time()
            else:
                chunk, now = await self._read_upstream(upstream)
            first = False
            if not chunk:
                upstream.check_end()
                response = self.response or await self._commit()
                data = self.scrubber.feed(b"".join(held)) if held else b""
                if held:
                    record.bytes_to_client += held_bytes
                if data := data + self.scrubber.flush():
                    await self._client_io(response.write(data))
                return
            deadlines.content(now)
            if self.json_body is not None:
                if len(self.json_body) + len(chunk) <= USAGE_BODY_CAP:
                    self.json_body += chunk
                else:
                    self.json_body = None  # too big to account; usage will be estimated
            if held is not None:
                held.append(chunk)
                held_bytes += len(chunk)
                if held_bytes <= BODY_HOLD_CAP and not upstream.at_end():
                    continue
                chunk, held = b"".join(held), None
            response = self.response or await self._commit()
            if upstream.at_end():
                # The last chunk: it and the end go in one write (with the headers, if they
                # are still buffered), not in two or three.
                upstream.check_end()
                data = self.scrubber.feed(chunk) + self.scrubber.flush()
                await self._client_io(response.write_eof(data))
                record.bytes_to_client += len(chunk)
                self.content_sent = True
                return
            await self._client_io(response.write(self.scrubber.feed(chunk)))
            record.bytes_to_client += len(chunk)
            self.content_sent = True

    async def _read_upstream(self, upstream: UpstreamResponse) -> tuple[bytes, float]:
        """The next body chunk (b"" at the end) and when it came; the wait is the upstream's."""
        loop = self.loop
        before = loop.time()
        try:
            chunk = await upstream.read()
        finally:  # a read cut by a deadline, a hang-up or an error was a wait all the same
            now = loop.time()
            self.record.upstream_wait_s += now - before
        return chunk, now

    async def _client_io(self, write: object) -> None:
        """Await a write to the client; a failed write means the client is gone."""
        before = self.loop.time()
        try:
            await write  # type: ignore[misc]
        except ConnectionError as exc:
            self.record.client_gone_at = before
            raise ClientGone from exc
        finally:
            self.record.client_wait_s += self.loop.time() - before

    def _error_response(self, err: ProxyError) -> web.Response:
        self.record.status = err.status
        self.record.error_type = err.error_type
        self.record.error_message = err.message
        headers = {"x-request-id": self.record.request_id, **err.headers()}
        return web.Response(
            status=err.status,
            body=render_body(err),
            content_type="application/json",
            headers=headers,
        )

    async def _fail(self, err: ProxyError) -> web.StreamResponse:
        """Report an error the right way for what the client has already received."""
        response = self.response
        if response is None:
            return self._error_response(err)
        self.record.error_type = err.error_type
        self.record.error_message = err.message
        if response.content_type == "text/event-stream":
            # Mid-stream: one in-band error event (the SDKs raise it as APIError), then end.
            written_at = self.loop.time()
            try:
                await response.write(render_sse_event(err))
                await response.write_eof()
            except ConnectionError:
                pass  # the client left as well; nothing more to tell it
            finally:
                self.record.client_wait_s += self.loop.time() - written_at
            return response
        # Mid-body of a plain response: close the connection so the client sees truncation
        # (finishing the chunked encoding would pass a cut body off as complete).
        transport = self.request.transport
        if transport is not None:
            transport.close()
        return response

    def _internal_error_response(self) -> web.StreamResponse:
        if self.response is not None:
            transport = self.request.transport
            if transport is not None:
                transport.close()
            return self.response
        err = ProxyError(
            f"internal error in hangup; see its log for request id {self.record.request_id}"
        )
        return self._error_response(err)
