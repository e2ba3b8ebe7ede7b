"""The client side of one exchange: response headers (sent at once, or held while the request
may still switch targets), the body pump, and the error answers; the SSE pump is its base's
(`proxy.sse_relay.SSERelay`).

`Downstream` is the base of `relay.Exchange`; the lifecycle (attempts, deadlines, the one
outcome) stays in relay.py. Here is only what goes to the client, and how; once headers went
out, an error can only end the stream in band.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from proxy import relaying
from proxy.admission import JSON_TYPES, Plan
from proxy.attempts import Attempt, AttemptResult
from proxy.drain import USAGE_BODY_CAP
from proxy.errors import ProxyError, UpstreamFailed, render_body, render_sse_event
from proxy.headers import client_response_headers
from proxy.sse_relay import SSERelay
from proxy.upstream import UpstreamResponse
from proxy.upstream_checks import check_response_head
from proxy.upstream_errors import AttemptFailed
from proxy.watchdog import Watchdog

# A JSON answer is held whole up to this while a switch is possible, so a body cut mid-way
# goes to the next target instead of reaching the client truncated; a longer one is relayed
# from there on as it comes (a cut then closes the client connection, as without).
BODY_HOLD_CAP = 8 * 1024 * 1024


class _OneWriteResponse(web.StreamResponse):
    """Headers held until the first body write, as aiohttp's own `web.Response` does, so a
    complete answer's headers, body and end leave in one send. (Were aiohttp to drop this
    switch, the headers would simply go at once again.)"""

    _send_headers_immediately = False


class Downstream(SSERelay):
    """What an exchange sends to its client (fields and the SSE pump: `SSERelay`)."""

    __slots__ = ()

    def _relay_response(
        self,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        attempt: Attempt,
        prefix: bytes,
        can_switch: bool,
    ) -> Coroutine[Any, Any, web.StreamResponse]:
        """Accept the upstream's answer and return its relay, for the caller to await. The
        relay (`_pump_sse`, `_relay_body`) is the one coroutine that stays alive while a
        stream is held: returned, not awaited here, so this frame is not kept under it."""
        record = self.record
        now = self.clock()
        record.upstream_status = upstream.status
        record.upstream = attempt.upstream
        try:
            check_response_head(
                upstream.status,
                upstream.reason,
                upstream.headers,
                attempt.upstream,
                event_stream=upstream.event_stream,
            )
        except UpstreamFailed as err:  # not relayable as it is: the upstream's fault
            raise AttemptFailed(AttemptResult.INVALID_RESPONSE, err) from err
        self.state.metrics.upstream_connection_opened()
        try:
            sse = upstream.event_stream
            watchdog.response_started(now, sse=sse)
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
        except BaseException:
            self.state.metrics.upstream_connection_closed()
            raise
        if sse:
            return self._pump_sse(plan, upstream, watchdog, attempt, holding)
        return self._relay_body(plan, upstream, watchdog, attempt, prefix, holding)

    async def _relay_body(
        self,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        attempt: Attempt,
        prefix: bytes,
        holding: bool,
    ) -> web.StreamResponse:
        await relaying.begin(self, holding)
        try:
            ended = await self._pump_body(plan, upstream, prefix, holding)
        except asyncio.CancelledError:
            await relaying.client_left(self, plan, upstream, watchdog)
            raise
        finally:
            relaying.end(self)
        return await self._relayed(plan, upstream, attempt, ended)

    async def _pump_body(
        self, plan: Plan, upstream: UpstreamResponse, prefix: bytes, holding: bool
    ) -> bool:
        """Relay the body; True when its end went out with its last chunk (the usual
        complete answer), so `_relayed` has no end of its own to write."""
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
                return False
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
                scrubber = self.scrubber
                # Without secrets `feed` hands the chunk back and nothing is held: no calls.
                data = scrubber.feed(chunk) + scrubber.flush() if scrubber.active else chunk
                await self._client_io(response.write_eof(data))
                record.bytes_to_client += len(chunk)
                self.content_sent = True
                return True
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
