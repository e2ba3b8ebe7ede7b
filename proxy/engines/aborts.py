"""Telling the engine to stop, after the socket close: one mechanism for every kind of abort.

When a request is abandoned (its client hung up, a deadline fired, or shutdown cut it) the
relay has already closed the upstream socket. Where that is not enough, `abandon` starts one
named task that makes the abort call: SGLang's `/abort_request`, vLLM's `/abort_requests`
(proxy.engines.protocols), or the Responses API background cancel (proxy.engines.background).

- Off the request's path: the client's answer (a 504, an in-band error) never waits for it;
  the task is held in `_tasks` (a strong reference) until it ends.
- Bounded: both tries together take at most ENGINE_ABORT_S (CANCEL_CALL_S for a background
  cancel); one retry, on a transport error only; an HTTP answer is final.
- At most once per request; with the upstream's own credentials.
- Recorded: the request's record is finished (accounting, metrics, access log) once the abort
  has settled, so its line carries the result and latency.
- A 404 or 405 from an engine's abort endpoint means the upstream has none: it is not called
  again for that upstream (one WARNING), and later requests record `unsupported`.
- Shutdown waits for calls in flight at most SHUTDOWN_WAIT_S, then cancels them (`sent`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.edge.body import in_steps
from proxy.engines import background
from proxy.engines.naming import NAME_ONE_STEP_BYTES
from proxy.engines.protocols import CREDENTIAL_HEADERS, AbortCall, Named, SGLang, engine_for
from proxy.metrics import Metrics
from proxy.outcome import BackgroundCancel, EngineAbort, RequestRecord
from proxy.timeouts import Phase
from proxy.upstream import Upstreams
from proxy.upstream_errors import OPEN_ERRORS

if TYPE_CHECKING:
    from proxy.admission import Plan, TargetPlan

log = logging.getLogger("hangup.engines")

ENGINE_ABORT_S = 2.0  # the whole abort call, both tries; read at call time
SHUTDOWN_WAIT_S = 0.5  # at shutdown, calls still in flight get this long, then are cancelled
# The request reached the engine and the engine had not finished it: worth an abort.
_AT_THE_ENGINE = frozenset({Phase.HEADERS, Phase.AWAIT_CONTENT, Phase.BODY, Phase.STREAMING})
_UNSUPPORTED_STATUS = frozenset({404, 405})


class EngineAborts:
    """The app's abort calls in flight, and which upstreams turned out to have no endpoint."""

    def __init__(self, upstreams: Upstreams, metrics: Metrics) -> None:
        self._upstreams = upstreams
        self._metrics = metrics
        self._tasks: dict[int, asyncio.Task[None]] = {}  # by id() of the record they settle
        self._disabled: set[str] = set()  # upstream names whose abort endpoint is missing
        self._warned: set[tuple[str, str]] = set()  # (upstream, problem) already logged
        self._closing = False

    # --- the request's side ------------------------------------------------------------------

    def name_attempt(self, plan: Plan, target: TargetPlan, record: RequestRecord) -> Named:
        """The attempt's body and headers, named at the engine when it can be aborted."""
        named = engine_for(target.target.upstream.engine).name_attempt(
            plan.facts, target.body, target.headers
        )
        self._named(record, named)
        return named

    def names_in_steps(self, target: TargetPlan) -> bool:
        """Whether naming this attempt rewrites a body large enough to take several steps."""
        return len(target.body) >= NAME_ONE_STEP_BYTES and isinstance(
            engine_for(target.target.upstream.engine), SGLang
        )

    async def name_attempt_in_steps(
        self, plan: Plan, target: TargetPlan, record: RequestRecord
    ) -> Named:
        """`name_attempt` for a target that `names_in_steps`, a bounded step per iteration."""
        engine = engine_for(target.target.upstream.engine)
        assert isinstance(engine, SGLang)
        named = await in_steps(
            engine.name_attempt_in_steps(plan.facts, target.body, target.headers)
        )
        self._named(record, named)
        return named

    def _named(self, record: RequestRecord, named: Named) -> None:
        if id(record) not in self._tasks and record.engine_abort is None:
            # Once an earlier attempt was aborted (a failover), the record keeps naming it.
            record.engine_request_id = named.engine_id

    def abandon(
        self, record: RequestRecord, plan: Plan, target: TargetPlan, named: Named | None
    ) -> None:
        """An attempt was given up and its upstream socket is closed: if its engine can be
        told to stop it by name, start that call. Returns at once; at most once a request."""
        if (
            self._closing
            or id(record) in self._tasks
            or named is None
            or named.engine_id is None
            or record.engine_abort is not None  # at most once per request
            or plan.deadlines.phase not in _AT_THE_ENGINE
        ):
            return
        upstream = target.upstream_name
        if upstream in self._disabled:
            record.engine_abort = EngineAbort.UNSUPPORTED
            self._metrics.engine_abort_settled(upstream, EngineAbort.UNSUPPORTED, None)
            return
        config = target.target.upstream
        call = engine_for(config.engine).abort_call(config.base_url, named.engine_id)
        headers: CIMultiDict[str] = CIMultiDict()
        for name in CREDENTIAL_HEADERS:
            for value in named.headers.getall(name, ()):
                headers.add(name, value)
        for name, value in config.headers.items():
            headers[name.lower()] = value
        headers["content-type"] = "application/json"
        # A request may have named several attempts (retries, fallbacks, hedges): its record
        # names the one aborted.
        record.engine_request_id = named.engine_id
        self._start(record, self._abort(record, upstream, call, headers))

    def cancel_background(
        self, record: RequestRecord, plan: Plan, target: TargetPlan, response_id: str | None
    ) -> None:
        """A Responses `background: true` stream was given up: the closed socket stops nothing
        at the provider, so cancel the job (route permitting). Returns at once."""
        if self._closing or id(record) in self._tasks or record.background is not None:
            return
        if response_id is None:
            return  # the job's id never arrived: there is nothing we can name to cancel
        record.background_response_id = response_id[:200]  # upstream text, logged: bounded
        if plan.route.options.on_disconnect_background == "keep":
            record.background = BackgroundCancel.KEPT
            return
        headers = target.headers
        if plan.route.options.deadline_header:
            # The stream's remaining-budget header is stale by now; the cancel has its own bound.
            headers = headers.copy()
            headers.popall(plan.route.options.deadline_header, None)
        base_url = target.target.upstream.base_url

        async def cancel() -> None:
            record.background = await background.cancel_background(
                self._upstreams, base_url, response_id, headers
            )

        self._start(record, cancel())

    def hold(self, record: RequestRecord, finish: Callable[[], None]) -> bool:
        """If an abort for `record` is in flight, call `finish` once it settles and return
        True; else return False (finish now)."""
        task = self._tasks.get(id(record))
        if task is None:
            return False
        task.add_done_callback(lambda _: finish())
        return True

    async def close(self, wait_s: float | None = None) -> None:
        """Shutdown: let calls in flight finish for a moment, then cancel them."""
        self._closing = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=SHUTDOWN_WAIT_S if wait_s is None else wait_s)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # --- the calls ---------------------------------------------------------------------------

    def _start(self, record: RequestRecord, coro: Coroutine[Any, Any, None]) -> None:
        key = id(record)
        task = asyncio.get_running_loop().create_task(
            coro, name=f"hangup-abort-{record.request_id[:64]}"
        )
        self._tasks[key] = task

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(key, None)
            if not task.cancelled() and (exc := task.exception()) is not None:
                # A bug of ours; the request's record is still finished (see `hold`).
                log.error("abort task for request %s failed", record.request_id, exc_info=exc)

        task.add_done_callback(done)

    def _warn_once(self, upstream: str, problem: str, message: str, *args: object) -> None:
        """A failing abort endpoint fails for every request: say so once per upstream and
        problem at WARNING, then at DEBUG."""
        key = (upstream, problem)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, message, *args)

    async def _abort(
        self, record: RequestRecord, upstream: str, call: AbortCall, headers: CIMultiDict[str]
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        record.engine_abort = EngineAbort.SENT
        self._metrics.engine_abort_sent(upstream)
        status: int | None = None
        try:
            async with asyncio.timeout(ENGINE_ABORT_S):
                for attempt in (1, 2):
                    try:
                        status, _ = await self._upstreams.post_control(call.url, headers, call.body)
                        break
                    except OPEN_ERRORS as exc:
                        self._warn_once(
                            upstream,
                            type(exc).__name__,
                            "engine abort on upstream %s failed (try %d of request %s): %s",
                            upstream,
                            attempt,
                            record.request_id,
                            type(exc).__name__,
                        )
            if status is None:
                record.engine_abort = EngineAbort.FAILED
            elif 200 <= status < 300:
                record.engine_abort = EngineAbort.ACKNOWLEDGED
            elif status in _UNSUPPORTED_STATUS:
                record.engine_abort = EngineAbort.UNSUPPORTED
                if upstream not in self._disabled:
                    self._disabled.add(upstream)
                    log.warning(
                        "upstream %s answered %d to POST %s: it has no abort endpoint there, "
                        "so hangup stops calling it and relies on the socket close "
                        "(docs/cancellation.md)",
                        upstream,
                        status,
                        call.url.path,
                    )
            else:
                record.engine_abort = EngineAbort.FAILED
                self._warn_once(
                    upstream,
                    f"status {status}",
                    "engine abort on upstream %s answered %d (request %s)",
                    upstream,
                    status,
                    record.request_id,
                )
        except TimeoutError:
            record.engine_abort = EngineAbort.FAILED
            self._warn_once(
                upstream,
                "timeout",
                "engine abort on upstream %s got no answer within %gs (request %s)",
                upstream,
                ENGINE_ABORT_S,
                record.request_id,
            )
        finally:
            # Cancelled at shutdown: the call was sent, its answer is unknown (stays SENT).
            record.engine_abort_s = loop.time() - started
            self._metrics.engine_abort_settled(upstream, record.engine_abort, record.engine_abort_s)
