"""The request lifecycle, in one place: admit, open the upstream, relay, enforce deadlines,
settle exactly one Outcome, and hand the record to accounting, metrics and the log in a single
`finally`.

Cancellation is structural. The server runs with `handler_cancellation=True`, so a client that
goes away cancels this handler's task at whatever `await` it is in: reading the request body,
connecting, waiting for headers, waiting for the next chunk, backing off before a retry. The
CancelledError unwinds the `async with` around the upstream request, which closes the upstream
socket at once; we record when, then re-raise. Timeouts reuse the same path: the watchdog
cancels the task, and `Watchdog.consume()` tells its cancellation from the client's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import aiohttp
from aiohttp import web

from proxy.admission import JSON_TYPES, Plan, admit
from proxy.background import cancel_background
from proxy.drain import USAGE_BODY_CAP, drain, open_upstream
from proxy.errors import (
    GatewayTimeout,
    ProxyError,
    UpstreamFailed,
    UpstreamUnreachable,
    render_body,
    render_sse_event,
)
from proxy.headers import client_response_headers
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, settle_relayed
from proxy.routing import Route
from proxy.secrets import stream_scrubber
from proxy.sse import SSEDecoder
from proxy.state import STATE, ProxyState
from proxy.upstream import BODY_ERRORS, OPEN_ERRORS, AttemptHooks, map_body_error, map_open_error
from proxy.upstream_checks import FramingWatch, check_response_head
from proxy.usage import (
    EventKind,
    RequestFacts,
    StreamUsageTracker,
)
from proxy.watchdog import Watchdog

log = logging.getLogger("hangup.relay")

_RETRYABLE_STATUS = frozenset({502, 503})
_MAX_SSE_EVENT = 16 * 1024 * 1024  # one event; an upstream that never ends one is broken


class _ClientGone(Exception):
    """A write to the client failed: its socket is gone (seen without handler cancellation,
    or when the kernel reports the broken pipe before the server does)."""


def _stale_keepalive(exc: Exception, fresh_connection: bool) -> bool:
    """A reused connection that turned out closed before any response byte."""
    return (
        not fresh_connection
        and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
    )


async def handle(request: web.Request) -> web.StreamResponse:
    """The aiohttp handler for every path under /v1/."""
    return await Exchange(request.app[STATE], request).run()


class Exchange:
    """One request, from arrival to its record."""

    def __init__(self, state: ProxyState, request: web.Request) -> None:
        self.state = state
        self.request = request
        self.loop = asyncio.get_running_loop()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if len(request_id) > 200:  # it is echoed and logged: keep it bounded
            request_id = uuid.uuid4().hex
        self.record = RequestRecord(
            request_id=request_id,
            method=request.method,
            path=request.path,
            started_at=self.loop.time(),
            wall_started_at=time.time(),
        )
        self.response: web.StreamResponse | None = None
        self.plan: Plan | None = None
        self.facts: RequestFacts | None = None
        self.route: Route | None = None
        self.tracker: StreamUsageTracker | None = None
        self.decoder = SSEDecoder()
        self.json_body: bytearray | None = None
        self.content_encoding: str | None = None
        self.delivered_tokens = 0
        self.drained = False
        self.scrubber = stream_scrubber(request)  # configured secrets never reach the client

    # --- the lifecycle -----------------------------------------------------------------------
    async def run(self) -> web.StreamResponse:
        state, record = self.state, self.record
        task = asyncio.current_task()
        assert task is not None
        state.request_began(task)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if record.client_gone_at is None:
                record.client_gone_at = self.loop.time()
            record.settle(Outcome.SHUTDOWN if state.hard_stopping else Outcome.CLIENT_CANCELLED)
            await self._stop_background_work()
            raise
        except Exception as exc:
            # A bug of ours. The client gets a plain 500, never the traceback; the log gets it.
            log.exception("internal error in request %s", record.request_id)
            record.settle(Outcome.INTERNAL_ERROR)
            record.error_type = type(exc).__name__
            return self._internal_error_response()
        finally:
            record.ended_at = self.loop.time()
            state.request_ended(task)
            if record.client_gone_at is not None:
                # The upstream socket's close is queued for the loop's next step; accounting,
                # metrics and the log can wait one step so its FIN goes out first.
                self.loop.call_soon(state.finish, record, self)
            else:
                state.finish(record, self)

    async def _run(self) -> web.StreamResponse:
        try:
            plan = await admit(self.state, self.request, self.record)
        except ProxyError as err:
            self.record.settle(err.outcome)
            return self._error_response(err)
        self.plan, self.facts, self.route = plan, plan.facts, plan.route
        return await self._exchange(plan)

    async def _exchange(self, plan: Plan) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        watchdog = Watchdog(plan.deadlines, task)
        try:
            with watchdog:
                return await self._relay(plan, watchdog)
        except asyncio.CancelledError:
            kind = watchdog.consume()
            if kind is None:
                raise
            self.record.settle(Outcome.TIMEOUT, timeout_kind=kind)
            message = plan.deadlines.describe(kind, plan.route.name)
            # Tell the client first: a background cancel may take up to CANCEL_CALL_S.
            response = await self._fail(
                GatewayTimeout(message, kind, retry=plan.route.options.sdk_retry)
            )
            await self._stop_background_work()
            return response
        except _ClientGone:
            if self.record.client_gone_at is None:
                self.record.client_gone_at = self.loop.time()
            self.record.settle(Outcome.CLIENT_CANCELLED)
            await self._stop_background_work()
            assert self.response is not None
            return self.response
        except ProxyError as err:
            self.record.settle(err.outcome)
            return await self._fail(err)

    # --- talking to the upstream --------------------------------------------------------------
    async def _relay(self, plan: Plan, watchdog: Watchdog) -> web.StreamResponse:
        deadlines, options, record = plan.deadlines, plan.route.options, self.record
        loop = self.loop

        def headers_sent() -> None:
            deadlines.headers_sent(loop.time())
            watchdog.rearm()

        fresh_connection = False

        def connected() -> None:
            nonlocal fresh_connection
            fresh_connection = True

        hooks = AttemptHooks(on_headers_sent=headers_sent, on_connection=connected)
        attempt = 0
        stale_retried = False
        while True:
            fresh_connection = False
            deadlines.connecting(loop.time())
            watchdog.rearm()
            if options.deadline_header:
                remaining = deadlines.remaining(loop.time())
                if remaining is not None:
                    plan.headers[options.deadline_header] = str(int(remaining * 1000))
            retryable: ProxyError | None = None
            opened_at = loop.time()
            try:
                request_cm = self.state.upstreams.request(
                    self.request.method,
                    plan.url,
                    headers=plan.headers,
                    body=plan.body,
                    hooks=hooks,
                )
                try:
                    upstream = await open_upstream(self, request_cm, plan, watchdog)
                finally:  # also when the wait ends in an error, a deadline or a hang-up
                    record.upstream_wait_s += loop.time() - opened_at
                async with upstream:
                    if upstream.status in _RETRYABLE_STATUS and attempt < options.max_retries:
                        retryable = UpstreamFailed(f"upstream answered {upstream.status}")
                    else:
                        return await self._relay_response(plan, upstream, watchdog)
            except asyncio.CancelledError:
                if record.upstream_headers_at is None:
                    hooks.abort()  # the body may still be in flight: reset, don't flush
                raise
            except OPEN_ERRORS as exc:
                if self.response is not None:
                    # Headers went to the client already; the body read failed.
                    raise map_body_error(exc, plan.route.upstream_name) from exc
                if _stale_keepalive(exc, fresh_connection) and not stale_retried:
                    # The upstream closed a pooled keep-alive connection just as we reused it
                    # (llama-server closes after every stream while advertising keep-alive). It
                    # never saw this request: resend at once on a new connection.
                    stale_retried = True
                    log.info(
                        "request %s: pooled upstream connection was closed; resending on a new one",
                        record.request_id,
                    )
                    continue
                err = map_open_error(exc, plan.route.upstream_name)
                if not isinstance(err, UpstreamUnreachable) or attempt >= options.max_retries:
                    raise err from exc
                retryable = err
            finally:
                # The attempt's socket (or connection attempt) is closed by now.
                record.upstream_closed_at = loop.time()
            # Backing off: a client that leaves now cancels this sleep, and nothing is open.
            attempt += 1
            deadlines.backing_off()
            watchdog.rearm()
            log.info(
                "retrying request %s after %s (attempt %d)",
                record.request_id,
                retryable.message,
                attempt + 1,
            )
            backoff_at = loop.time()
            try:
                await asyncio.sleep(options.retry_backoff_s * 2 ** (attempt - 1))
            finally:
                record.backoff_wait_s += loop.time() - backoff_at

    async def _relay_response(
        self, plan: Plan, upstream: aiohttp.ClientResponse, watchdog: Watchdog
    ) -> web.StreamResponse:
        record, loop = self.record, self.loop
        now = loop.time()
        record.upstream_headers_at = now
        record.upstream_status = upstream.status
        check_response_head(
            upstream.status,
            upstream.reason,
            upstream.headers.items(),
            plan.route.upstream_name,
            event_stream=upstream.content_type == "text/event-stream",
        )
        self.framing = FramingWatch(upstream)
        self.state.metrics.upstream_connection_opened()
        try:
            sse = upstream.content_type == "text/event-stream"
            plan.deadlines.response_started(now, sse=sse)
            watchdog.rearm()
            filtering = sse and plan.usage_filter is not None
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(
                    upstream.headers, request_id=record.request_id, keep_length=not filtering
                ),
            )
            record.status = upstream.status
            self.response = response  # before prepare: a client gone mid-head still has one
            await self._client_io(response.prepare(self.request))
            try:
                if sse:
                    await self._pump_sse(plan, upstream, response, watchdog)
                else:
                    await self._pump_body(plan, upstream, response)
            except asyncio.CancelledError:
                # Client gone (or our deadline): note when, then let `async with` close the
                # upstream. In drain mode, first read on for exact usage.
                gone = watchdog.fired is None and not self.state.hard_stopping
                if gone and record.client_gone_at is None:
                    record.client_gone_at = loop.time()
                    if plan.route.options.on_disconnect == "drain":
                        watchdog.stop()
                        drain_at = loop.time()
                        try:
                            await drain(self, plan, upstream)
                        finally:
                            record.upstream_wait_s += loop.time() - drain_at
                raise
            plan.deadlines.done()
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
        return response

    async def _pump_sse(
        self,
        plan: Plan,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        watchdog: Watchdog,
    ) -> None:
        record, deadlines = self.record, plan.deadlines
        decoder = self.decoder = SSEDecoder()
        tracker = self.tracker = StreamUsageTracker(plan.facts)
        chunk_filter = plan.usage_filter
        while True:
            chunk, now = await self._read_upstream(plan, upstream)
            if not chunk:
                events = decoder.flush()
                self.framing.check_end(plan.route.upstream_name, mid_event=bool(events))
            else:
                events = decoder.feed(chunk)
                if decoder.buffered > _MAX_SSE_EVENT:
                    raise UpstreamFailed(
                        f'upstream "{plan.route.upstream_name}" sent an SSE event over '
                        f"{_MAX_SSE_EVENT // (1024 * 1024)} MiB without ending it"
                    )
            out: list[bytes] | None = [] if chunk_filter is not None else None
            for event in events:
                kind = tracker.feed(event)
                if kind is EventKind.CONTENT:
                    record.content_chunks += 1
                    deadlines.content(now)
                    if record.first_token_at is None:
                        record.first_token_at = now
                        # The stream enters the idle phase: its deadline may be the first
                        # one armed (when first_token_s is off).
                        watchdog.rearm()
                if out is not None and chunk_filter is not None:
                    out.append(chunk_filter.client_bytes(event, kind))
            data = chunk if out is None else b"".join(out)
            data = self.scrubber.feed(data) + (b"" if chunk else self.scrubber.flush())
            if data:
                await self._client_io(response.write(data))
                record.bytes_to_client += len(data)
                self.delivered_tokens = tracker.generated_tokens
            if not chunk:
                return

    async def _pump_body(
        self, plan: Plan, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> None:
        record, deadlines = self.record, plan.deadlines
        keep_copy = (
            plan.facts.endpoint != "other"
            and upstream.status < 300
            and upstream.content_type in JSON_TYPES
        )
        if keep_copy:
            self.json_body = bytearray()
            self.content_encoding = upstream.headers.get("content-encoding")
        while True:
            chunk, now = await self._read_upstream(plan, upstream)
            if not chunk:
                self.framing.check_end(plan.route.upstream_name)
                if held := self.scrubber.flush():
                    await self._client_io(response.write(held))
                return
            deadlines.content(now)
            if self.json_body is not None:
                if len(self.json_body) + len(chunk) <= USAGE_BODY_CAP:
                    self.json_body += chunk
                else:
                    self.json_body = None  # too big to account; usage will be estimated
            await self._client_io(response.write(self.scrubber.feed(chunk)))
            record.bytes_to_client += len(chunk)

    async def _read_upstream(
        self, plan: Plan, upstream: aiohttp.ClientResponse
    ) -> tuple[bytes, float]:
        """The next body chunk (b"" at the end) and when it came; the wait is the upstream's."""
        loop = self.loop
        before = loop.time()
        try:
            chunk = await upstream.content.readany()
        except BODY_ERRORS as exc:
            raise map_body_error(exc, plan.route.upstream_name) from exc
        finally:  # a read cut by a deadline, a hang-up or an error was a wait all the same
            now = loop.time()
            self.record.upstream_wait_s += now - before
        return chunk, now

    async def _stop_background_work(self) -> None:
        """The upstream socket is closed by now; for a Responses `background: true` stream that
        stops nothing (the provider keeps the job running), so cancel the job itself."""
        plan, tracker = self.plan, self.tracker
        if plan is None or not (plan.facts.background and plan.facts.stream):
            return
        response_id = tracker.response_id if tracker is not None else None
        if response_id is None:
            return  # the job's id never arrived: there is nothing we can name to cancel
        self.record.background_response_id = response_id[:200]  # upstream text: bounded
        if plan.route.options.on_disconnect_background == "keep":
            self.record.background = BackgroundCancel.KEPT
            return
        headers = plan.headers
        if plan.route.options.deadline_header:
            # The stream's remaining-budget header is stale by now; the cancel has its own bound.
            headers = headers.copy()
            headers.popall(plan.route.options.deadline_header, None)
        called_at = self.loop.time()
        try:
            self.record.background = await cancel_background(
                self.state.upstreams, plan.route.upstream.base_url, response_id, headers
            )
        finally:
            self.record.upstream_wait_s += self.loop.time() - called_at

    async def _client_io(self, write: object) -> None:
        """Await a write to the client; a failed write means the client is gone."""
        before = self.loop.time()
        try:
            await write  # type: ignore[misc]
        except ConnectionError as exc:
            self.record.client_gone_at = before
            raise _ClientGone from exc
        finally:
            self.record.client_wait_s += self.loop.time() - before

    # --- answering with an error ----------------------------------------------------------------
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
        if self.record.upstream_headers_at is not None and self.tracker is not None:
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
