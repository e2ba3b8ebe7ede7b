"""The proxy's app-owned state: one object, created by `create_app`, reached through an AppKey.

No module globals: two apps in one process (tests, workers) never share anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from proxy.access_line import log_record
from proxy.accounting import Accountant
from proxy.attempts import Attempt
from proxy.auth import Auth
from proxy.callers import note_caller
from proxy.config import HangupConfig
from proxy.engines import EngineAborts, engine_for
from proxy.metrics import Metrics
from proxy.outcome import OUTCOME_INTERNAL_ERROR, Outcome, RequestRecord
from proxy.resilience.circuit import Circuit, Circuits
from proxy.routing import Router
from proxy.seal import seal
from proxy.tracing import make_tracing
from proxy.tracing.response import note_response_body
from proxy.upstream import Upstreams

if TYPE_CHECKING:
    from proxy.relay import Exchange
    from proxy.seal import Facts

log = logging.getLogger("hangup")


RecordListener = Callable[[RequestRecord], None]


class ProxyState:
    def __init__(
        self,
        config: HangupConfig,
        *,
        registry: CollectorRegistry | None = None,
        listen_host: str | None = None,
    ) -> None:
        self.config = config
        self.router = Router(config)
        self.upstreams = Upstreams()
        self.auth = Auth(config, listen_host=listen_host)
        self.accountant = Accountant(config)
        self._prompts = self.accountant.prompts  # the prompt counter `seal` hands on
        configured_models = set(config.prices) | self.router.exact_models()
        self.metrics = Metrics(
            config.metrics,
            routes=[r.name for r in self.router.routes],
            configured_models=configured_models,
            clients=self.auth.client_names(),
            registry=registry,
            upstreams=config.upstreams,
            abort_upstreams=[
                name for name, u in config.upstreams.items() if engine_for(u.engine).aborts
            ],
        )
        self.circuits = Circuits()
        # Engine aborts and background cancels in flight (off the requests' path).
        self.aborts = EngineAborts(self.upstreams, self.metrics)
        self.tracing = make_tracing(config)
        # The tasks of requests in progress. A task is aiohttp's per-connection handler task,
        # which outlives its request on keep-alive connections: wait with `wait_idle`, not on
        # the tasks.
        self.inflight: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False  # readiness 503, new requests refused
        self.hard_stopping = False  # grace ran out: in-flight requests are being cancelled
        # Called with every finished record (tests and the demo subscribe).
        self.listeners: list[RecordListener] = []
        # Records waiting for accounting facts that need I/O (see `finish`).
        self.accounting_tasks: set[asyncio.Task[None]] = set()

    def request_began(self, task: asyncio.Task[object]) -> None:
        inflight = self.inflight
        if not inflight:  # (the event is set exactly while nothing is in flight)
            self._idle.clear()
        inflight.add(task)
        self.metrics.request_started()

    def request_ended(self, task: asyncio.Task[object]) -> None:
        self.inflight.discard(task)
        self.metrics.request_ended()
        if not self.inflight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is in progress."""
        await self._idle.wait()

    def resilience_observed(self, route: str, attempt: Attempt, circuit: Circuit) -> None:
        """An attempt ended: publish its upstream's circuit state (the attempt itself is counted
        from the finished record)."""
        self.metrics.circuit_changed(attempt.upstream, circuit.state)

    def arrived(self, record: RequestRecord, request: web.Request) -> None:
        """A request came in: note who sent it and which trace it continues."""
        note_caller(record, request)
        try:
            self.tracing.arrived(record, request.headers)
        except Exception:  # tracing never fails a request: it goes on untraced
            log.exception("tracing failed for request %s", record.request_id)
            record.trace = None

    def attempt_starting(
        self, record: RequestRecord, headers: CIMultiDict[str], attempt: Attempt
    ) -> None:
        """`attempt` is about to send its upstream request with these headers."""
        record.upstream_attempts += 1
        if record.trace is None:
            return
        try:
            self.tracing.attempt(record, headers, attempt)
        except Exception:  # tracing never fails a request: it goes on untraced
            log.exception("tracing failed for request %s", record.request_id)
            record.trace = None

    def finish(self, record: RequestRecord, exchange: Exchange | None = None) -> None:
        """The single exit of every request: accounting, metrics, access log, listeners.

        Runs in the relay's `finally`; it must not raise, or a request could end without its
        record, so each step is guarded on its own. Accounting facts that wait for I/O (a
        prompt to tokenize, a compressed body to decode) complete in a task of their own,
        bounded in time; the record is published when they are done. When an abort for the
        request is still in flight (proxy.engines), this runs again once it settles, so the
        record carries it.
        """
        # The closure only when an abort is in flight at all: a lambda here would make
        # `record`, `exchange` and `self` cells on every call (MAKE_CELL at entry).
        if self.aborts.in_flight and self._held(record, exchange):
            return
        if record.outcome is None:  # defensive: the relay settles every path
            record.settle(Outcome.INTERNAL_ERROR)
        pending = None
        if exchange is not None:
            tracker = exchange.tracker
            if tracker is not None:
                record.finish_reason = tracker.finish_reason
                record.response_model = tracker.response_model
            elif exchange.json_body is not None and record.trace and record.trace.sampled:
                note_response_body(record, bytes(exchange.json_body), exchange.content_encoding)
            try:
                # `seal` itself, not a method of the accountant's around it: a frame fewer.
                pending = seal(record, exchange, self._prompts)
            except Exception:
                log.exception("accounting failed for request %s", record.request_id)
        if pending is None:
            self._publish(record)
            return
        task = asyncio.get_running_loop().create_task(self._publish_after(record, pending))
        self.accounting_tasks.add(task)
        task.add_done_callback(self.accounting_tasks.discard)

    def _held(self, record: RequestRecord, exchange: Exchange | None) -> bool:
        """`aborts.hold` with this request's finish, run again once its abort settles."""
        return self.aborts.hold(record, lambda: self.finish(record, exchange))

    async def _publish_after(self, record: RequestRecord, pending: Facts) -> None:
        try:
            await pending.complete(record)
        except Exception:
            log.exception("accounting facts failed for request %s", record.request_id)
        finally:  # also when cancelled at shutdown: the record goes out with what is known
            self._publish(record)

    async def wait_accounted(self) -> None:
        """Until every finished request's record is published (they are bounded in time)."""
        while self.accounting_tasks:
            await asyncio.gather(*self.accounting_tasks, return_exceptions=True)

    def _publish(self, record: RequestRecord) -> None:
        try:
            self.accountant.settle(record)
        except Exception:
            log.exception("accounting failed for request %s", record.request_id)
        try:
            self.metrics.request_finished(record)
        except Exception:
            log.exception("metrics failed for request %s", record.request_id)
        if self.config.logging.access_log:
            log_record(record, error=record.outcome is OUTCOME_INTERNAL_ERROR)
        if record.trace is not None:  # an untraced record is nothing to any tracing's `finished`
            try:
                self.tracing.finished(record)
            except Exception:
                log.exception("tracing failed for request %s", record.request_id)
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:
                log.exception("record listener failed")


STATE = web.AppKey("hangup_state", ProxyState)
