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

from aiohttp import web

from proxy.admission import JSON_TYPES, Plan, TargetPlan, admit
from proxy.attempts import Attempt, AttemptResult
from proxy.background import cancel_background
from proxy.drain import USAGE_BODY_CAP, drain, open_upstream
from proxy.errors import (
    GatewayTimeout,
    ProxyError,
    UpstreamFailed,
    render_body,
    render_sse_event,
)
from proxy.headers import client_response_headers
from proxy.hedging import Racer, last_index, race
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, TimeoutKind
from proxy.resilience.circuit import Circuit
from proxy.resilience.classify import ERROR_BODY_CAP, error_code, retry_after_s, status_result
from proxy.resilience.policy import Decision, Failure, RetryRules, Step, TargetView, next_step
from proxy.routing import Route
from proxy.secrets import stream_scrubber
from proxy.sse import SSEDecoder
from proxy.state import STATE, ProxyState
from proxy.upstream import AttemptFailed, UpstreamResponse
from proxy.usage import (
    EventKind,
    RequestFacts,
    StreamUsageTracker,
)
from proxy.watchdog import Watchdog

log = logging.getLogger("hangup.relay")

# Deadlines that belong to one attempt: when one fires, another target may still answer.
_PER_ATTEMPT = frozenset({TimeoutKind.CONNECT, TimeoutKind.HEADERS, TimeoutKind.FIRST_TOKEN})
_MAX_SSE_EVENT = 16 * 1024 * 1024  # one event; an upstream that never ends one is broken


class _ClientGone(Exception):
    """A write to the client failed: its socket is gone (seen without handler cancellation,
    or when the kernel reports the broken pipe before the server does)."""


class _DeadlineFired(Exception):
    """A request deadline fired (its cancellation already withdrawn): answer with a timeout."""

    def __init__(self, kind: TimeoutKind) -> None:
        super().__init__(kind.value)
        self.kind = kind


class _Failed(Exception):
    """An attempt's answer was a failure and the policy already chose the next step."""

    def __init__(self, failure: Failure, error: ProxyError, decision: Decision) -> None:
        super().__init__(error.message)
        self.failure, self.error, self.decision = failure, error, decision


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
        self.target: TargetPlan | None = None  # the attempt's target (the last one tried)
        self._pending: web.StreamResponse | None = None  # its response, before commit
        self.content_sent = False  # some content reached the client: no more switching
        self._raced_to: int | None = None  # the highest target index a failed hedge race used

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
                return await self._attempts(plan, watchdog)
        except asyncio.CancelledError:
            kind = watchdog.consume()
            if kind is None:
                raise
            return await self._timed_out(plan, kind)
        except _DeadlineFired as fired:
            return await self._timed_out(plan, fired.kind)
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

    async def _timed_out(self, plan: Plan, kind: TimeoutKind) -> web.StreamResponse:
        self.record.settle(Outcome.TIMEOUT, timeout_kind=kind)
        message = plan.deadlines.describe(kind, plan.route.name)
        # Tell the client first: a background cancel may take up to CANCEL_CALL_S.
        response = await self._fail(
            GatewayTimeout(message, kind, retry=plan.route.options.sdk_retry)
        )
        await self._stop_background_work()
        return response

    # --- attempts: which target, and what next when one fails --------------------------------
    async def _attempts(self, plan: Plan, watchdog: Watchdog) -> web.StreamResponse:
        """Try the route's targets until one answers, as `proxy.resilience.policy` directs."""
        record, loop, deadlines, options = (
            self.record,
            self.loop,
            plan.deadlines,
            plan.route.options,
        )
        views = [TargetView(t.upstream_name, t.target.long_context) for t in plan.targets]
        rules = RetryRules(options.max_retries, options.retry_backoff_s, options.retry_after_max_s)
        index = self._first_target(plan)
        retries_here, reason = 0, "primary"
        while True:
            target = plan.targets[index]
            now = loop.time()
            attempt = Attempt(target.upstream_name, target.model, now, reason)
            record.attempts.append(attempt)
            circuit = self._circuit(plan, target.upstream_name)
            circuit.allows(now)
            if reason == "fallback":
                deadlines.next_target(now)
            else:
                deadlines.connecting(now)
            watchdog.rearm()
            decision: Decision | None = None
            timeout_kind: TimeoutKind | None = None
            try:
                if self._hedges(plan, index):
                    return await self._hedged(plan, index, attempt, watchdog)
                return await self._attempt(plan, index, attempt, watchdog)
            except _Failed as failed:
                failure, error, decision = failed.failure, failed.error, failed.decision
            except AttemptFailed as exc:
                result = AttemptResult.CUT if self.content_sent else exc.result
                attempt.end(result, loop.time(), exc.error.message)
                failure = Failure(result, content_sent=self.content_sent)
                error = exc.error
            except asyncio.CancelledError:
                kind = watchdog.consume()
                if kind is None:
                    self._abandon(attempt, "client gone")
                    raise
                if (
                    kind not in _PER_ATTEMPT
                    or self.content_sent
                    or deadlines.client_headers_expired(loop.time())
                ):
                    self._abandon(attempt, f"{kind.value} deadline")
                    raise _DeadlineFired(kind) from None
                attempt.end(AttemptResult.TIMEOUT, loop.time(), f"{kind.value} deadline")
                failure = Failure(AttemptResult.TIMEOUT)
                error = GatewayTimeout(
                    deadlines.describe(kind, plan.route.name), kind, retry=options.sdk_retry
                )
                timeout_kind = kind
            finally:
                circuit.report(attempt.result or AttemptResult.ABANDONED, loop.time())
                self.state.resilience_observed(plan.route.name, attempt, circuit)
            if self._raced_to is not None:
                index, self._raced_to = max(index, self._raced_to), None
            if decision is None:
                decision = self._decide(plan, views, index, retries_here, failure, rules)
            if decision.step is Step.GIVE_UP:
                if timeout_kind is not None:
                    raise _DeadlineFired(timeout_kind)
                raise error
            log.info(
                "request %s: %s; %s (%s)",
                record.request_id,
                attempt.describe(),
                "retrying" if decision.step is Step.SAME else "failing over",
                decision.why,
            )
            if decision.step is Step.SAME:
                retries_here, reason = retries_here + 1, "retry"
            else:
                index, retries_here, reason = decision.index, 0, "fallback"
            if decision.delay_s > 0:
                # Backing off: a client that leaves now cancels this sleep; nothing is open.
                deadlines.backing_off()
                watchdog.rearm()
                await asyncio.sleep(decision.delay_s)

    def _decide(
        self,
        plan: Plan,
        views: list[TargetView],
        index: int,
        retries_here: int,
        failure: Failure,
        rules: RetryRules,
    ) -> Decision:
        now = self.loop.time()
        return next_step(
            failure,
            targets=views,
            index=index,
            retries_here=retries_here,
            rules=rules,
            remaining_s=plan.deadlines.remaining(now),
            available=lambda name: self._circuit(plan, name).would_allow(now),
        )

    def _first_target(self, plan: Plan) -> int:
        """The primary, unless its circuit is open and a later target's is not."""
        now = self.loop.time()
        for i, target in enumerate(plan.targets):
            if self._circuit(plan, target.upstream_name).would_allow(now):
                if i > 0:
                    self.record.attempts.append(
                        Attempt(
                            plan.targets[0].upstream_name,
                            plan.targets[0].model,
                            now,
                            "primary",
                            result=AttemptResult.SKIPPED,
                            closed_at=now,
                        )
                    )
                return i
        return 0  # every circuit is open: try the primary rather than fail for certain

    def _circuit(self, plan: Plan, upstream: str) -> Circuit:
        options = plan.route.options
        return self.state.circuits.get(
            upstream, options.circuit_failures, options.circuit_cooldown_s
        )

    def _can_switch(self, plan: Plan, index: int) -> bool:
        """Would a failure before content have somewhere else to go?"""
        now = self.loop.time()
        return any(
            self._circuit(plan, t.upstream_name).would_allow(now) for t in plan.targets[index + 1 :]
        )

    def _next_available(self, plan: Plan, index: int) -> int | None:
        now = self.loop.time()
        for j in range(index + 1, len(plan.targets)):
            if self._circuit(plan, plan.targets[j].upstream_name).would_allow(now):
                return j
        return None

    def _hedges(self, plan: Plan, index: int) -> bool:
        """Race this attempt against the next target (docs/resilience.md, "Hedging")?"""
        return (
            plan.route.options.hedge_after_s is not None
            and plan.facts.stream
            and self.response is None
            and self._next_available(plan, index) is not None
        )

    async def _hedged(
        self, plan: Plan, index: int, attempt: Attempt, watchdog: Watchdog
    ) -> web.StreamResponse:
        """Run `index` and, if it is slow to its first token, the next target in parallel;
        relay the one whose content comes first."""
        record, loop, deadlines = self.record, self.loop, plan.deadlines
        hedge_after = plan.route.options.hedge_after_s
        assert hedge_after is not None

        def headers_sent() -> None:
            deadlines.headers_sent(loop.time())
            watchdog.rearm()

        method = self.request.method
        racers = [Racer(self.state.upstreams, method, plan, index, attempt, headers_sent)]

        def make_hedge() -> Racer | None:
            j = self._next_available(plan, index)
            if j is None:
                return None
            target = plan.targets[j]
            hedge = Attempt(target.upstream_name, target.model, loop.time(), "hedge")
            record.attempts.append(hedge)
            self._circuit(plan, target.upstream_name).allows(loop.time())
            racer = Racer(self.state.upstreams, method, plan, j, hedge, headers_sent)
            racers.append(racer)
            return racer

        opened_at = loop.time()
        try:
            started = await race(racers[0], hedge_after, make_hedge, self._abandon)
        finally:
            self._raced_to = last_index(racers)
            for racer in racers[1:]:
                circuit = self._circuit(plan, racer.attempt.upstream)
                circuit.report(racer.attempt.result or AttemptResult.ABANDONED, loop.time())
                self.state.resilience_observed(plan.route.name, racer.attempt, circuit)
        self._raced_to = None
        self.target = plan.targets[started.index]
        record.upstream_wait_s += loop.time() - opened_at
        winner = started.attempt
        try:
            return await self._relay_response(
                plan, started.response, watchdog, winner, b"", can_switch=False
            )
        finally:
            await started.opened.close()
            winner.closed_at = record.upstream_closed_at = loop.time()
            if self.tracker is not None:
                winner.tokens_generated = self.tracker.generated_tokens

    def _abandon(self, attempt: Attempt, why: str) -> None:
        """THE place where hangup gives up on an attempt that may still be running upstream
        (client gone, a request deadline, a failover or hedge loser). Its socket is closed by
        the unwinding `finally` of `_attempt` right after; an engine abort (naming the request
        to the engine) belongs here."""
        attempt.end(AttemptResult.ABANDONED, self.loop.time(), why)

    # --- one attempt ------------------------------------------------------------------------
    async def _attempt(
        self, plan: Plan, index: int, attempt: Attempt, watchdog: Watchdog
    ) -> web.StreamResponse:
        deadlines, options, record = plan.deadlines, plan.route.options, self.record
        loop = self.loop
        target = self.target = plan.targets[index]
        self.tracker = None

        def headers_sent() -> None:
            deadlines.headers_sent(loop.time())
            watchdog.rearm()

        headers = target.headers
        if options.deadline_header:
            remaining = deadlines.remaining(loop.time())
            if remaining is not None:
                headers[options.deadline_header] = str(int(remaining * 1000))
        opened = self.state.upstreams.attempt(
            target.upstream_name,
            self.request.method,
            target.url,
            headers=headers,
            body=target.body,
            on_headers_sent=headers_sent,
        )
        opened_at = loop.time()
        try:
            upstream = await open_upstream(self, opened, plan, watchdog)
            now = loop.time()
            record.upstream_wait_s += now - opened_at
            attempt.headers_at, attempt.status, attempt.resent = now, upstream.status, opened.resent
            prefix = await self._check_status(plan, index, attempt, upstream)
            return await self._relay_response(
                plan, upstream, watchdog, attempt, prefix, self._can_switch(plan, index)
            )
        finally:
            await opened.close()
            attempt.closed_at = record.upstream_closed_at = loop.time()
            if self.tracker is not None:
                attempt.tokens_generated = self.tracker.generated_tokens

    async def _check_status(
        self, plan: Plan, index: int, attempt: Attempt, upstream: UpstreamResponse
    ) -> bytes:
        """Raise `_Failed` when this answer is a failure the policy moves past; else return
        the body bytes read to classify it (to be relayed first), usually none."""
        status = upstream.status
        result = status_result(status)
        code: str | None = None
        prefix = b""
        if status == 400 and any(t.target.long_context for t in plan.targets[index + 1 :]):
            prefix = await self._read_error_body(upstream)
            code = error_code(prefix)
            if code is not None:
                result = AttemptResult.CLIENT_ERROR
        if result is None:
            return prefix
        retry_after = retry_after_s(upstream.headers) if status == 429 else None
        failure = Failure(result, status, retry_after, code)
        views = [TargetView(t.upstream_name, t.target.long_context) for t in plan.targets]
        options = plan.route.options
        rules = RetryRules(options.max_retries, options.retry_backoff_s, options.retry_after_max_s)
        retries_here = sum(
            1
            for a in self.record.attempts
            if a.upstream == attempt.upstream and a.reason == "retry"
        )
        decision = self._decide(plan, views, index, retries_here, failure, rules)
        if decision.step is Step.GIVE_UP:
            return prefix  # the upstream's own answer is the client's
        attempt.end(result, self.loop.time(), f"upstream answered {status}")
        raise _Failed(failure, UpstreamFailed(f"upstream answered {status}"), decision)

    async def _read_error_body(self, upstream: UpstreamResponse) -> bytes:
        body = bytearray()
        while len(body) < ERROR_BODY_CAP:
            chunk = await upstream.read()
            if not chunk:
                break
            body += chunk
        return bytes(body)

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
            self._pending = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(
                    upstream.headers, request_id=record.request_id, keep_length=not filtering
                ),
            )
            # A stream that may still switch targets keeps its headers until content comes.
            holding = sse and can_switch and upstream.status < 300
            if not holding:
                await self._commit()
            try:
                if sse:
                    await self._pump_sse(plan, upstream, watchdog, attempt, holding)
                else:
                    await self._pump_body(plan, upstream, prefix)
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
                            await drain(self, plan, upstream)
                        finally:
                            record.upstream_wait_s += loop.time() - drain_at
                raise
            plan.deadlines.done()
            assert self.response is not None
            response = self.response
            await self._client_io(response.write_eof())
        finally:
            self.state.metrics.upstream_connection_closed()
        status = upstream.status
        failed = status >= 500 or status == 429
        attempt.delivered = True
        if self.tracker is not None and self.tracker.error is not None:
            # A 200 stream that ended in an in-band error event: the upstream failed.
            failed = True
            record.error_type = "upstream_error"
            record.error_message = self.tracker.error[:500]
        attempt.end(
            AttemptResult.OK if not failed else (status_result(status) or AttemptResult.CUT),
            loop.time(),
        )
        record.settle(Outcome.UPSTREAM_ERROR if failed else Outcome.COMPLETED)
        return response

    async def _commit(self) -> web.StreamResponse:
        """Send the response headers held for the current attempt (once per request)."""
        if self.response is None:
            pending = self._pending
            assert pending is not None
            self.record.status = pending.status
            await self._client_io(pending.prepare(self.request))
            self.response = pending
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
        record, deadlines = self.record, plan.deadlines
        decoder = self.decoder = SSEDecoder()
        tracker = self.tracker = StreamUsageTracker(plan.facts)
        chunk_filter = plan.usage_filter
        # Events of this attempt not yet sent: before its first content, while a switch to
        # another target is still possible, nothing but keep-alive comments goes out.
        held: list[bytes] | None = [] if holding else None
        malformed = 0
        while True:
            commit_at = deadlines.client_commit_at() if held is not None else None
            if commit_at is not None and self.response is None:
                try:
                    async with asyncio.timeout_at(commit_at):
                        chunk, now = await self._read_upstream(upstream)
                except TimeoutError:
                    # The client's SDK gives up without response headers soon: send them now.
                    # A switch stays invisible (it has seen headers only), so holding goes on.
                    await self._commit()
                    continue
            else:
                chunk, now = await self._read_upstream(upstream)
            if not chunk:
                events = decoder.flush()
                self.framing.check_end(plan.route.upstream_name, mid_event=bool(events))
            else:
                events = decoder.feed(chunk)
                if decoder.buffered > _MAX_SSE_EVENT:
                    raise AttemptFailed(
                        AttemptResult.STREAM_ERROR,
                        UpstreamFailed(
                            f'upstream "{attempt.upstream}" sent an SSE event over '
                            f"{_MAX_SSE_EVENT // (1024 * 1024)} MiB without ending it"
                        ),
                    )
            out: list[bytes] = []
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
                    if attempt.first_token_at is None:
                        attempt.first_token_at = now
                elif tracker.malformed_events > malformed:
                    # Not a JSON object: an SDK would raise on it mid-answer. Dropped, counted.
                    malformed = tracker.malformed_events
                    continue
                data = event.raw if chunk_filter is None else chunk_filter.client_bytes(event, kind)
                if held is not None:
                    if kind is EventKind.ERROR:
                        raise AttemptFailed(
                            AttemptResult.STREAM_ERROR,
                            UpstreamFailed(
                                f'upstream "{attempt.upstream}" failed the stream before any '
                                f"content: {(tracker.error or '')[:200]}"
                            ),
                        )
                    if kind is EventKind.CONTENT or kind is EventKind.DONE:
                        out.extend(held)
                        held = None
                    elif event.comment:
                        if self.response is not None:
                            out.append(data)  # headers are out already: keep-alives pass
                        continue
                    else:
                        held.append(data)
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
            data = b"".join(out)
            if data:
                response = await self._commit()
                await self._client_io(response.write(data))
                record.bytes_to_client += len(data)
                self.delivered_tokens = tracker.generated_tokens
                if attempt.first_token_at is not None:
                    self.content_sent = True
            if not chunk:
                return

    async def _pump_body(self, plan: Plan, upstream: UpstreamResponse, prefix: bytes) -> None:
        record, deadlines = self.record, plan.deadlines
        response = self.response
        assert response is not None
        keep_copy = (
            plan.facts.endpoint != "other"
            and upstream.status < 300
            and upstream.content_type in JSON_TYPES
        )
        if keep_copy:
            self.json_body = bytearray()
            self.content_encoding = upstream.content_encoding
        first = True
        while True:
            if first and prefix:
                chunk, now = prefix, self.loop.time()
            else:
                chunk, now = await self._read_upstream(upstream)
            first = False
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
            self.content_sent = True

    async def _read_upstream(self, upstream: UpstreamResponse) -> tuple[bytes, float]:
        """The next body chunk (b"" at the end) and when it came; the wait is the upstream's."""
        loop = self.loop
        before = loop.time()
        chunk = await upstream.read()
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
        target = self.target if self.target is not None else plan.targets[0]
        headers = target.headers
        if plan.route.options.deadline_header:
            # The stream's remaining-budget header is stale by now; the cancel has its own bound.
            headers = headers.copy()
            headers.popall(plan.route.options.deadline_header, None)
        self.record.background = await cancel_background(
            self.state.upstreams, target.target.upstream.base_url, response_id, headers
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
