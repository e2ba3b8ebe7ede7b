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
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.background import cancel_background
from proxy.errors import (
    BadRequest,
    Draining,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    UpstreamFailed,
    UpstreamUnreachable,
    render_body,
    render_sse_event,
)
from proxy.headers import client_response_headers, upstream_request_headers
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, Usage
from proxy.routing import Route
from proxy.sse import SSEDecoder
from proxy.state import STATE, ProxyState
from proxy.timeouts import Budget, Deadlines, client_deadline
from proxy.upstream import BODY_ERRORS, OPEN_ERRORS, AttemptHooks, map_body_error, map_open_error
from proxy.usage import (
    EventKind,
    RequestFacts,
    StreamUsageTracker,
    UsageChunkFilter,
    body_usage,
    inject_stream_usage,
    inspect_request,
)
from proxy.watchdog import Watchdog

log = logging.getLogger("hangup.relay")

_JSON_TYPES = ("application/json",)
# A copy of a non-streamed JSON body is kept for usage accounting, up to this size.
_USAGE_BODY_CAP = 8 * 1024 * 1024
_RETRYABLE_STATUS = frozenset({502, 503})
# Outcomes after which the upstream may have processed the prompt without our seeing usage.
_UPSTREAM_HAD_IT = frozenset(
    {Outcome.COMPLETED, Outcome.CLIENT_CANCELLED, Outcome.TIMEOUT, Outcome.SHUTDOWN}
)
_MAX_SSE_EVENT = 16 * 1024 * 1024  # one event; an upstream that never ends one is broken
_DRAIN_ENDS: tuple[type[BaseException], ...] = (TimeoutError, *BODY_ERRORS)


class _ClientGone(Exception):
    """A write to the client failed: its socket is gone (seen without handler cancellation,
    or when the kernel reports the broken pipe before the server does)."""


@dataclass(slots=True)
class Plan:
    """Everything decided before the first upstream byte is sent."""

    route: Route
    url: URL
    headers: CIMultiDict[str]
    body: bytes
    facts: RequestFacts
    # Set when we injected usage the client did not ask for: hides it from the client.
    usage_filter: UsageChunkFilter | None
    deadlines: Deadlines


def _too_large(limit_mb: float) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds {limit_mb:g} MiB (limits.max_request_body_mb)")


def _retrieve(future: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """Mark a shielded upstream attempt's failure as seen (its caller may have gone)."""
    if not future.cancelled():
        future.exception()


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
            state.finish(record, self)

    async def _run(self) -> web.StreamResponse:
        try:
            plan = await self._admit()
        except ProxyError as err:
            self.record.settle(err.outcome)
            return self._error_response(err)
        self.plan = plan
        return await self._exchange(plan)

    async def _admit(self) -> Plan:
        """Read and check the request; decide route, deadlines, headers and body."""
        state, request, record = self.state, self.request, self.record
        if state.draining:
            raise Draining("hangup is shutting down; retry on another instance")
        proxy_key_used = state.auth.check(request)
        limit = state.config.limits.max_request_body_bytes
        if request.content_length is not None and request.content_length > limit:
            # Refuse at once, rather than after reading up to the limit.
            raise _too_large(state.config.limits.max_request_body_mb)
        if any(part in (".", "..") for part in request.rel_url.path.split("/")):
            # An upstream that normalises dot segments would serve a path outside base_url.
            raise BadRequest("the path must not contain '.' or '..' segments")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _too_large(state.config.limits.max_request_body_mb) from exc
        record.bytes_from_client = len(body)
        parsed: object = None
        if body and request.content_type in _JSON_TYPES:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        facts = inspect_request(request.path, parsed if isinstance(parsed, dict) else None)
        self.facts = facts
        record.model, record.stream, record.endpoint = facts.model, facts.stream, facts.endpoint
        route = state.router.match(request.path, facts.model)
        if route is None:
            with_model = f" with model {facts.model!r}" if facts.model else ""
            raise NotFound(f"no route for {request.method} {request.path}{with_model}")
        self.route = route
        record.route, record.upstream = route.name, route.upstream_name
        options = route.options
        try:
            record.sdk_retry_count = int(request.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            record.sdk_retry_count = 0
        announced = client_deadline(request.headers)
        if announced is not None:
            record.client_deadline_s = announced[0]
        budget = Budget.for_request(
            options.timeouts, announced, honor_client_deadline=options.honor_client_deadline
        )
        deadlines = Deadlines(budget, record.started_at, watch_first_token=facts.stream)
        usage_filter: UsageChunkFilter | None = None
        if options.include_usage and facts.stream:
            continuous = options.continuous_usage_stats
            injected = inject_stream_usage(body, facts, continuous=continuous)
            if injected is not None:
                body = injected
                usage_filter = UsageChunkFilter.needed(facts, continuous=continuous)
        drop = [options.deadline_header] if options.deadline_header else []
        headers = upstream_request_headers(
            request.headers,
            upstream=route.upstream,
            request_id=record.request_id,
            drop_client_credentials=proxy_key_used,
            drop=drop,
        )
        # The path and query only (an absolute-form target's scheme and authority are not
        # ours to forward), with the client's own percent-encoding.
        target = request.rel_url
        tail = target.raw_path[len("/v1") :]
        if target.raw_query_string:
            tail += "?" + target.raw_query_string
        url = URL(route.upstream.base_url + tail, encoded=True)
        return Plan(route, url, headers, body, facts, usage_filter, deadlines)

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
                upstream = await self._open(request_cm, plan, watchdog)
                async with upstream:
                    record.upstream_wait_s += loop.time() - opened_at
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
            await asyncio.sleep(options.retry_backoff_s * 2 ** (attempt - 1))

    async def _relay_response(
        self, plan: Plan, upstream: aiohttp.ClientResponse, watchdog: Watchdog
    ) -> web.StreamResponse:
        record, loop = self.record, self.loop
        now = loop.time()
        record.upstream_headers_at = now
        record.upstream_status = upstream.status
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
            await self._client_io(response.prepare(self.request))
            self.response = response
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
                        await self._drain(plan, upstream)
                raise
            plan.deadlines.done()
            await self._client_io(response.write_eof())
        finally:
            self.state.metrics.upstream_connection_closed()
        status = upstream.status
        failed = status >= 500 or status == 429
        if self.tracker is not None and self.tracker.error is not None:
            # A 200 stream that ended in an in-band error event: the upstream failed.
            failed = True
            record.error_type = "upstream_error"
            record.error_message = self.tracker.error[:500]
        record.settle(Outcome.UPSTREAM_ERROR if failed else Outcome.COMPLETED)
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
            and upstream.content_type in _JSON_TYPES
        )
        if keep_copy:
            self.json_body = bytearray()
            self.content_encoding = upstream.headers.get("content-encoding")
        while True:
            chunk, now = await self._read_upstream(plan, upstream)
            if not chunk:
                return
            deadlines.content(now)
            if self.json_body is not None:
                if len(self.json_body) + len(chunk) <= _USAGE_BODY_CAP:
                    self.json_body += chunk
                else:
                    self.json_body = None  # too big to account; usage will be estimated
            await self._client_io(response.write(chunk))
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
        now = loop.time()
        self.record.upstream_wait_s += now - before
        return chunk, now

    async def _open(
        self, request_cm: Any, plan: Plan, watchdog: Watchdog
    ) -> aiohttp.ClientResponse:
        """Send the request; return once the upstream's response headers arrive.

        On a `drain` route the wait is shielded from the client's departure: that provider
        bills the answer anyway, so when the client leaves we wait for it and read it to the
        end (bounded by drain_max_s) for exact usage. Everywhere else a departure cancels the
        wait, which closes the upstream socket."""
        if plan.route.options.on_disconnect != "drain":
            response: aiohttp.ClientResponse = await request_cm
            return response
        opening: asyncio.Future[aiohttp.ClientResponse] = asyncio.ensure_future(request_cm)
        opening.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            if watchdog.fired is None and not self.state.hard_stopping:
                self.record.client_gone_at = self.loop.time()
                watchdog.stop()
                await self._drain_unanswered(plan, opening)
            opening.cancel()
            raise

    async def _drain_unanswered(
        self, plan: Plan, opening: asyncio.Future[aiohttp.ClientResponse]
    ) -> None:
        """Drain for a client that left before the upstream answered."""
        self.drained = True
        try:
            async with asyncio.timeout(plan.route.options.drain_max_s):
                upstream = await opening
                async with upstream:
                    self.record.upstream_status = upstream.status
                    self.record.upstream_headers_at = self.loop.time()
                    if upstream.content_type == "text/event-stream":
                        self.tracker = StreamUsageTracker(plan.facts)
                    elif upstream.status < 300 and upstream.content_type in _JSON_TYPES:
                        self.json_body = bytearray()
                        self.content_encoding = upstream.headers.get("content-encoding")
                    await self._read_to_end(upstream)
        except _DRAIN_ENDS:
            pass  # best effort: what was read is counted, the rest stays an estimate

    async def _drain(self, plan: Plan, upstream: aiohttp.ClientResponse) -> None:
        """`on_disconnect: drain`: the client left, but this provider bills the whole answer
        anyway, so read it to the end (bounded) for exact usage instead of an estimate."""
        self.drained = True
        try:
            async with asyncio.timeout(plan.route.options.drain_max_s):
                await self._read_to_end(upstream)
        except _DRAIN_ENDS:
            pass  # best effort: what was read is counted, the rest stays an estimate

    async def _read_to_end(self, upstream: aiohttp.ClientResponse) -> None:
        """Read what is left of a response for accounting only (nothing goes to the client)."""
        tracker, decoder = self.tracker, self.decoder
        while chunk := await upstream.content.readany():
            if tracker is not None:
                for event in decoder.feed(chunk):
                    tracker.feed(event)
            elif self.json_body is not None:
                if len(self.json_body) + len(chunk) <= _USAGE_BODY_CAP:
                    self.json_body += chunk
                else:
                    self.json_body = None

    async def _stop_background_work(self) -> None:
        """The upstream socket is closed by now; for a Responses `background: true` stream that
        stops nothing (the provider keeps the job running), so cancel the job itself."""
        plan, tracker = self.plan, self.tracker
        if plan is None or not (plan.facts.background and plan.facts.stream):
            return
        response_id = tracker.response_id if tracker is not None else None
        if response_id is None:
            return  # the job's id never arrived: there is nothing we can name to cancel
        self.record.background_response_id = response_id
        if plan.route.options.on_disconnect_background == "keep":
            self.record.background = BackgroundCancel.KEPT
            return
        headers = plan.headers
        if plan.route.options.deadline_header:
            # The stream's remaining-budget header is stale by now; the cancel has its own bound.
            headers = headers.copy()
            headers.popall(plan.route.options.deadline_header, None)
        self.record.background = await cancel_background(
            self.state.upstreams, plan.route.upstream.base_url, response_id, headers
        )

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
            try:
                await response.write(render_sse_event(err))
                await response.write_eof()
            except ConnectionError:
                pass  # the client left as well; nothing more to tell it
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

    # --- for accounting (read by ProxyState.finish) -----------------------------------------
    def usage_inputs(self) -> tuple[int, int]:
        """(generated completion tokens, tokens that arrived after the client was gone)."""
        if self.tracker is None:
            if self.drained:  # a plain body read after the client left: none of it delivered
                generated = self.record.usage.completion_tokens
                return generated, generated
            return 0, 0
        generated = self.tracker.generated_tokens
        wasted = 0
        if self.record.client_gone_at is not None:
            wasted = max(0, generated - self.delivered_tokens)
        return generated, wasted

    def final_usage(self) -> None:
        """Fill `record.usage` from what was seen (reported where possible)."""
        facts = self.facts
        if facts is None:
            return
        record = self.record
        if self.tracker is not None:
            record.usage = self.tracker.usage()
        elif self.json_body is not None and (record.outcome is Outcome.COMPLETED or self.drained):
            record.usage = body_usage(bytes(self.json_body), facts, self.content_encoding)
        elif self.plan is not None and record.outcome in _UPSTREAM_HAD_IT:
            # The upstream got the prompt (and may have generated), but we never saw its
            # figures: an estimate, flagged as one, is closer than zero passed off as reported.
            record.usage = Usage(
                prompt_tokens=facts.prompt_tokens_estimate,
                prompt_estimated=True,
                completion_estimated=facts.endpoint != "embeddings",
            )
