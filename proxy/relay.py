"""The request lifecycle, in one place: admit, make attempts on the route's targets (retries,
fallbacks, hedges, as `proxy.resilience` directs through `targets.Chooser`), relay the one that
answers (`downstream.py`), enforce deadlines, settle exactly one Outcome, and hand the record
(with every attempt on it) to accounting, metrics and the log in a single `finally`.

Cancellation is structural. The server runs with `handler_cancellation=True`, so a client that
goes away cancels this handler's task at whatever `await` it is in: reading the request body,
connecting, waiting for headers, waiting for the next chunk, backing off before a retry. The
CancelledError unwinds through the attempt's `finally`, which closes the upstream socket at
once (`_abandon` is the one place an attempt is given up); we record when, then re-raise.
Timeouts reuse the same path: the watchdog cancels the task, and `Watchdog.consume()` tells its
cancellation from the client's; a per-attempt deadline may then hand over to the next target.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from proxy.admission import Plan, TargetPlan, admit
from proxy.answer_status import RELAYED_AS_IS, PolicyFailed, check_status
from proxy.attempt_failures import AttemptFailures, _DeadlineFired
from proxy.attempts import Attempt, AttemptResult
from proxy.browser import BrowserPolicy
from proxy.client_writes import ClientGone
from proxy.drain import open_upstream
from proxy.edge.gate import edge_answer
from proxy.engine_work import Sent
from proxy.engines import Named
from proxy.engines.naming import NAME_ONE_STEP_BYTES
from proxy.errors import (
    GatewayTimeout,
    ProxyError,
)
from proxy.hedged import hedges, relay_hedged
from proxy.outcome import OUTCOME_CLIENT_CANCELLED, Outcome, RequestRecord, TimeoutKind
from proxy.request_body import LARGE_RELEASE_BYTES, release_in_turns
from proxy.request_ids import new_request_id
from proxy.resilience.policy import Decision, Step
from proxy.routing import Route
from proxy.seal import attempt_closed
from proxy.secrets import Secrets
from proxy.sse_stream import loop_clock
from proxy.state import ProxyState
from proxy.targets import Chooser
from proxy.upstream import OpenAttempt
from proxy.upstream_errors import AttemptFailed
from proxy.usage import (
    RequestFacts,
    StreamUsageTracker,
)
from proxy.watchdog import Watchdog

log = logging.getLogger("hangup.relay")


class Exchange(AttemptFailures):
    """One request, from arrival to its record."""

    # Slots (one Exchange per held stream, no per-instance dict); the rest are its bases'.
    __slots__ = ("_cut", "_raced_to", "clock")

    def __init__(self, state: ProxyState, request: web.Request, secrets: Secrets) -> None:
        self.state = state
        self.request = request
        # aiohttp's loop for the request, the running one: on Python 3.11
        # `asyncio.get_running_loop()` (and `current_task()` without a loop) is a getpid()
        # syscall, and this request needs the loop everywhere.
        self.loop = request._loop
        # `loop.time` as a plain callable (`time.monotonic` on asyncio's loops: no frame).
        self.clock = clock = loop_clock(self.loop)
        request_id = request.headers.get("x-request-id") or new_request_id()
        if len(request_id) > 200:  # it is echoed and logged: keep it bounded
            request_id = new_request_id()
        self.record = RequestRecord(
            request_id=request_id,
            method=request.method,
            path=request.path,
            started_at=clock(),
            wall_started_at=time.time(),
        )
        self.response: web.StreamResponse | None = None
        self.plan: Plan | None = None
        self.facts: RequestFacts | None = None
        self.route: Route | None = None
        self.tracker: StreamUsageTracker | None = None
        self.decoder = None  # a stream's, made when one is relayed
        self.json_body: bytearray | None = None
        self.content_encoding: str | None = None
        self.delivered_tokens = 0
        self.drained = False
        self.target: TargetPlan | None = None  # the attempt's target (the last one tried)
        self._pending: web.StreamResponse | None = None  # its response, before commit
        self.content_sent = False  # some content reached the client: no more switching
        self._raced_to: int | None = None  # the highest target index a failed hedge race used
        self.chooser: Chooser  # set when the attempts begin
        self.scrubber = secrets.stream()  # configured secrets never reach the client
        # Continuing a cut stream: the text the client has (choice 0), and the cut itself.
        self.delivered_text: list[str] | None = None  # made when a route collects it
        self.continuing = False
        self._continuations = 0
        self._cut: tuple[ProxyError, TimeoutKind | None] | None = None
        # Each attempt as sent (its target, and the name its engine runs it under) until it
        # ends: what `_abandon` tells the engine to stop. A tuple, not a dict by id(attempt):
        # one or two entries, alive for as long as a stream is held (~170 B less a stream).
        self._sent: tuple[Sent, ...] = ()

    def _release_large_bodies(self, plan: Plan) -> None:
        """The client's body and a fallback's or an engine's copy: not freed in one step."""
        targets, sent = plan.targets, self._sent
        bodies = (plan.body, *(t.body for t in targets), *(s[2].body for s in sent))
        release_in_turns(self.loop, bodies)

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
        record, clock, deadlines = self.record, self.clock, plan.deadlines
        chooser = self.chooser = Chooser(plan, self.state.circuits, self.loop)
        # (A route's only target is its first, whatever its circuit: `Chooser.first`.)
        index = 0 if len(plan.targets) == 1 else self._first_target()
        retries_here, reason = 0, "primary"
        override: TargetPlan | None = None  # a continuation's request (its own body)
        while True:
            target = override or plan.targets[index]
            now = clock()
            # (`target.target`'s name, not the property: no call; no name bound for it: each
            # name this frame binds is 8 B more under every held stream)
            attempt = Attempt(target.target.upstream_name, target.model, now, reason)
            record.attempts.append(attempt)
            circuit = chooser.circuit(attempt.upstream)
            circuit.allows(now)
            if reason in ("fallback", "continue"):
                deadlines.next_target(now)
            else:
                deadlines.connecting(now)
            watchdog.rearm()
            decision: Decision | None = None
            timeout_kind: TimeoutKind | None = None
            try:
                # (`hedges`' first test inline: most routes do not hedge, and ask no more.)
                if plan.route.options.hedge_after_s is not None and hedges(self, plan, index):
                    return await relay_hedged(self, plan, index, attempt, watchdog)
                # The attempt runs inline, not in a coroutine of its own: that frame would
                # stay alive under every held stream (~400 B each). A large body an engine
                # names is named a step at a time.
                opened = (
                    await self._send_named_in_steps(plan, index, attempt, watchdog, override)
                    if len(target.body) >= NAME_ONE_STEP_BYTES  # (`names_in_steps`' first test)
                    and self.state.aborts.names_in_steps(target)
                    else self._send(plan, index, attempt, watchdog, override)
                )
                opened_at = clock()
                try:
                    try:
                        if plan.route.options.on_disconnect == "drain":
                            upstream = await open_upstream(self, opened, plan, watchdog)
                        else:  # what `open_upstream` does for them, without its coroutine
                            upstream = await opened.start()
                    finally:  # also when the wait ends in an error, a deadline or a hang-up
                        now = clock()
                        record.upstream_wait_s += now - opened_at
                    attempt.headers_at, attempt.status = now, upstream.status
                    attempt.resent = opened.resent
                    prefix = (
                        b""
                        if upstream.status in RELAYED_AS_IS  # (no coroutine for a 200)
                        else await check_status(chooser, record, index, attempt, upstream)
                    )
                    return await self._relay_response(
                        plan, upstream, watchdog, attempt, prefix, chooser.can_switch(index)
                    )
                finally:
                    if not opened.closed_at_once():  # (most: no coroutine to close them)
                        await opened.close()
                    attempt.closed_at = record.upstream_closed_at = clock()
                    attempt_closed(attempt, self.tracker)
            # The failures are handled in methods of their own, not here: each name this
            # frame binds is 8 B more under every held stream (this frame waits under it).
            except PolicyFailed as exc:
                failure, error, decision = exc.failure, exc.error, exc.decision
            except AttemptFailed as exc:
                failure, error = self._attempt_failed(attempt, exc)
            except asyncio.CancelledError:  # (re-raised there when it is the client's)
                failure, error, timeout_kind = self._attempt_timed_out(
                    plan, index, attempt, watchdog
                )
            finally:
                circuit.report(attempt.result or AttemptResult.ABANDONED, clock())
                self.state.resilience_observed(plan.route.name, attempt, circuit)
            if self._raced_to is not None:
                index, self._raced_to = max(index, self._raced_to), None
            if failure.content_sent:
                if self._cut is None:
                    self._cut = (error, timeout_kind)  # the error the client gets if all fails
                index, override = await self._resumed(plan, index, attempt)
                if override is not None:
                    reason, self.continuing = "continue", True
                    continue
                error, timeout_kind = self._cut
            override = None
            if decision is None:
                decision = chooser.decide(index, retries_here, failure)
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
                await self._back_off(deadlines, watchdog, decision.delay_s)

    def _first_target(self) -> int:
        index = self.chooser.first()
        if index > 0:  # the primary's circuit is open: record that it was skipped
            now, primary = self.loop.time(), self.chooser.plan.targets[0]
            self.record.attempts.append(
                Attempt(
                    primary.upstream_name,
                    primary.model,
                    now,
                    "primary",
                    result=AttemptResult.SKIPPED,
                    closed_at=now,
                )
            )
        return index

    # --- one attempt ------------------------------------------------------------------------
    async def _send_named_in_steps(
        self,
        plan: Plan,
        index: int,
        attempt: Attempt,
        watchdog: Watchdog,
        target: TargetPlan | None,
    ) -> OpenAttempt:
        """`_send`, for a large body its engine names: named a step at a time first."""
        aborts, sent_to = self.state.aborts, target or plan.targets[index]
        named = await aborts.name_attempt_in_steps(plan, sent_to, self.record)
        return self._send(plan, index, attempt, watchdog, target, named)

    def _send(
        self,
        plan: Plan,
        index: int,
        attempt: Attempt,
        watchdog: Watchdog,
        target: TargetPlan | None = None,
        named: Named | None = None,
    ) -> OpenAttempt:
        """Start one attempt on `target` (the plan's `index` by default), `named` at its
        engine already or here: its request goes out as `_attempts` waits for its answer."""
        deadlines, options, record = plan.deadlines, plan.route.options, self.record
        target = self.target = target or plan.targets[index]
        self.tracker = None
        headers = target.headers
        if options.deadline_header:
            remaining = deadlines.remaining(self.loop.time())
            if remaining is not None:
                headers[options.deadline_header] = str(int(remaining * 1000))
        self.state.attempt_starting(record, headers, attempt)
        if named is None:
            named = self.state.aborts.name_attempt(plan, target, record)
        self._sent += ((attempt, target, named),)
        return self.state.upstreams.attempt(
            target.target.upstream_name,
            self.request.method,
            target.url,
            headers=named.headers,
            body=named.body,
            on_headers_sent=watchdog.headers_sent,  # a bound method: no closure per attempt
            stream=plan.facts.stream,
        )


class Relay:
    """The aiohttp handler for every path under /v1/ (`Relay(...).serve`), one per app: what
    a request needs of its app (the state, the browser policy, the secrets) at hand, rather
    than looked up through `request.app` on every request (~20 bytecodes each)."""

    __slots__ = ("policy", "secrets", "state")

    def __init__(self, state: ProxyState, policy: BrowserPolicy, secrets: Secrets) -> None:
        self.state = state
        self.policy = policy
        self.secrets = secrets

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """One request, from arrival to its record (an `Exchange`): the aiohttp handler.

        Admission and the exchange run inline in this one coroutine rather than in coroutines
        of their own: every nested frame stays alive for as long as a stream is held (~450 B
        each), and each costs its creation on every request. For the same reason the edge
        checks run here, not in a middleware (`proxy.edge.gate`)."""
        answer = edge_answer(request, self.policy)
        if answer is not None:
            return answer
        exchange = Exchange(self.state, request, self.secrets)
        state, record = exchange.state, exchange.record
        task = asyncio.current_task(exchange.loop)
        assert task is not None
        state.request_began(task)
        try:
            try:
                plan = await admit(state, exchange.request, record, exchange.clock)
            except ProxyError as err:
                record.settle(err.outcome)
                return exchange._error_response(err)
            exchange.plan, exchange.facts, exchange.route = plan, plan.facts, plan.route
            # The client connection's timer, kept between its requests (None: one of its own).
            watchdog = Watchdog(plan.deadlines, task, getattr(request.protocol, "alarm", None))
            try:
                # What `with watchdog:` does, without the bound `__exit__` that a `with` keeps
                # on this frame's stack for as long as a stream is held (64 B). Its arming is
                # `_attempts`' first step (each attempt arms it), before anything is awaited.
                try:
                    return await exchange._attempts(plan, watchdog)
                finally:  # synchronous: a cancel we issued is delivered inside, never after
                    watchdog.stop()
            except asyncio.CancelledError:
                kind = watchdog.consume()
                if kind is None:
                    raise
                return await exchange._timed_out(plan, kind)
            except _DeadlineFired as err:  # (one name for every error: a smaller frame)
                return await exchange._timed_out(plan, err.kind)
            except ClientGone:
                if record.client_gone_at is None:
                    record.client_gone_at = exchange.loop.time()
                record.settle(Outcome.CLIENT_CANCELLED)
                await exchange._stop_background_work()
                assert exchange.response is not None
                return exchange.response
            except ProxyError as err:
                record.settle(err.outcome)
                return await exchange._fail(err)
        except asyncio.CancelledError:
            if record.client_gone_at is None:
                record.client_gone_at = exchange.loop.time()
            record.settle(Outcome.SHUTDOWN if state.hard_stopping else OUTCOME_CLIENT_CANCELLED)
            await exchange._stop_background_work()
            raise
        except Exception as err:
            # A bug of ours. The client gets a plain 500, never the traceback; the log gets it.
            log.exception("internal error in request %s", record.request_id)
            record.settle(Outcome.INTERNAL_ERROR)
            record.error_type = type(err).__name__
            return exchange._internal_error_response()
        finally:
            record.ended_at = exchange.clock()
            state.request_ended(task)
            if exchange.plan is not None and len(exchange.plan.body) >= LARGE_RELEASE_BYTES:
                exchange._release_large_bodies(exchange.plan)
            if record.client_gone_at is not None:
                # The upstream socket's close is queued for the loop's next step; accounting,
                # metrics and the log can wait one step so its FIN goes out first.
                exchange.loop.call_soon(state.finish, record, exchange)
            else:
                state.finish(record, exchange)
