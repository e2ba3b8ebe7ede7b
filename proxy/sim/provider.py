"""`SimulatedProvider`: the simulated OpenAI-compatible server, its lifecycle and its records.

It runs on aiohttp's low-level `web.Server` (no `web.Application`): the route table is six
paths, the handler is on the hot path of every benchmark, and the low-level server is what lets
us see TCP connections open and close (see `_RecordingServer`). `build_app` wraps the same
handler in a `web.Application` for use under pytest-aiohttp's servers, at the cost of
connection records.

Control endpoints (not recorded as requests), for out-of-process users such as benchmarks:

- ``GET /_sim/requests[?limit=N]``: the request records, oldest first;
- ``GET /_sim/requests/{request_id}``: one record (404 if unknown);
- ``GET /_sim/connections[?limit=N]``: connection records (closed, then open);
- ``GET /_sim/jobs``: background jobs and cancel calls;
- ``GET /_sim/aborts``: engine abort calls (``engine="sglang"`` or ``"vllm"``);
- ``GET /_sim/stats``: counts (open connections, active requests, totals, tokens);
- ``POST /_sim/reset``: forget the history (in-flight requests stay recorded);
- ``POST /_sim/faults`` ``{"model": M, "behaviour": SPEC | null}``: requests for model M behave as
  SPEC (see `behaviour.py`) until cleared; the flapping-upstream switch.
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.sim.aborts import AbortCall, AbortFault, EngineAborts, SimEngine
from proxy.sim.api import Api
from proxy.sim.background import BackgroundJob, CancelCall, JobStore
from proxy.sim.behaviour import BehaviourError, parse_behaviour
from proxy.sim.formats import dumps
from proxy.sim.recorder import Recorder
from proxy.sim.records import ClosedBy, ConnectionRecord, RequestRecord
from proxy.sim.waiters import Waiters


class _RecordingServer(web.Server):
    """aiohttp's low-level server plus connection open/close records.

    Why a subclass: aiohttp has no public hook for a connection opening or closing, and the
    proxy's central promise is measured on the upstream's TCP connection ("closed within N ms
    of the client leaving"), which no handler-level signal gives for idle keep-alive
    connections. `RequestHandler` reports both events to its server through these two methods;
    we record, then defer to aiohttp.
    """

    def __init__(self, handler: Any, recorder: Recorder, **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=True, **kwargs)
        self._recorder = recorder

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        self._recorder.connection_opened(handler, f"{peer[0]}:{peer[1]}" if peer else None)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        # Called first thing in RequestHandler.connection_lost, before aiohttp's own cleanup,
        # so the flags below still say who started the close.
        self._recorder.connection_closed(handler, _closed_by(handler))
        super().connection_lost(handler, exc)


def _closed_by(handler: RequestHandler) -> ClosedBy:
    # aiohttp has no public "who closed" flag. Every close aiohttp starts itself goes through
    # force_close() (keep-alive timeout, shutdown, errors), close() (shutdown, unread body) or
    # the end of its keep-alive loop (Connection: close), which drops _task_handler before
    # closing the transport. Anything else is the peer.
    if handler._force_close or handler._close or handler._task_handler is None:
        return "server"
    return "peer"


class SimulatedProvider:
    """An OpenAI-compatible simulated upstream that records what happened on the wire.

    >>> async with SimulatedProvider(tokens_per_s=200.0) as sim:  # doctest: +SKIP
    ...     client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="x")
    """

    def __init__(
        self,
        *,
        tokens_per_s: float = 200.0,
        default_tokens: int = 16,
        max_records: int = 10_000,
        body_limit: int = 65_536,
        capture_bytes: int = 65_536,
        max_jobs: int = 1_000,
        engine: SimEngine = "openai",
        ignore_close: bool = False,
        vllm_abort_endpoint: bool = False,
    ) -> None:
        """tokens_per_s: default generation rate (0: as fast as possible); default_tokens:
        answer length when the request sets no maximum; max_records: request and connection
        records kept; body_limit: larger request bodies are not kept in records;
        capture_bytes: response bytes kept per request for `wait_sent_bytes` (0: none);
        max_jobs: finished background jobs kept; engine: "sglang" or "vllm" name requests and
        serve that engine's abort endpoint (proxy.sim.aborts); ignore_close: keep generating
        after the peer closes the connection, as an engine behind a buffering proxy does (only
        an abort call stops it); vllm_abort_endpoint: serve vLLM's `/abort_requests` (plain
        `vllm serve` has none)."""
        waiters = Waiters()
        self.recorder = Recorder(
            max_records=max_records, capture_bytes=capture_bytes, waiters=waiters
        )
        self.jobs_store = JobStore(waiters, max_jobs=max_jobs)
        self.engine_aborts = EngineAborts(engine, waiters)
        self.api = Api(
            self.recorder,
            self.jobs_store,
            tokens_per_s=tokens_per_s,
            default_tokens=default_tokens,
            body_limit=body_limit,
            engine_aborts=self.engine_aborts,
            ignore_close=ignore_close,
            vllm_abort_endpoint=vllm_abort_endpoint,
        )
        self.base_url: str | None = None
        self._runner: web.ServerRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 4096) -> str:
        """Listen on host:port (0: any free port); return the base URL, ``http://h:p/v1``."""
        if self._runner is not None:
            raise RuntimeError("SimulatedProvider already started")
        server = _RecordingServer(self.handle, self.recorder, access_log=None)
        # A short shutdown_timeout is a backstop only: stop() cancels in-flight handlers itself.
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.api.stopping = False
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{shown}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening, cancel background jobs and in-flight requests, close connections."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.api.stopping = True
        for site in list(runner.sites):
            await site.stop()
        await self.jobs_store.stop()
        for conn in self.recorder.open_connections:
            conn.server_closing = True
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5.0)
        await runner.cleanup()

    async def __aenter__(self) -> SimulatedProvider:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the handler --------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await self._control(request)
        conn = self.recorder.connection_for(request.protocol)
        rec = self.recorder.begin(request.method, request.path, request.headers, conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await self.api.handle(request, rec)
        finally:
            if task is not None:
                self._handlers.discard(task)

    # -- records and waits --------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self.recorder.requests)

    @property
    def connections(self) -> list[ConnectionRecord]:
        return [*self.recorder.closed_connections, *self.recorder.open_connections]

    @property
    def jobs(self) -> dict[str, BackgroundJob]:
        return dict(self.jobs_store.jobs)

    @property
    def cancel_calls(self) -> list[CancelCall]:
        return list(self.jobs_store.cancel_calls)

    @property
    def abort_calls(self) -> list[AbortCall]:
        return list(self.engine_aborts.calls)

    @property
    def abort_fault(self) -> AbortFault | None:
        return self.engine_aborts.fault

    @abort_fault.setter
    def abort_fault(self, fault: AbortFault | None) -> None:
        """Make the abort endpoint misbehave (see proxy.sim.aborts)."""
        self.engine_aborts.fault = fault

    def by_engine_id(self, engine_id: str) -> RequestRecord | None:
        """The generation request the engine runs under `engine_id` (rid, chatcmpl-...)."""
        return next((r for r in self.recorder.requests if r.engine_id == engine_id), None)

    def request(self, request_id: str) -> RequestRecord | None:
        return self.recorder.get(request_id)

    def stats(self) -> dict[str, Any]:
        return {**self.recorder.stats(), **self.jobs_store.stats()}

    def reset(self) -> None:
        self.recorder.reset()
        self.jobs_store.cancel_calls.clear()
        self.engine_aborts.calls.clear()

    async def wait_request(self, request_id: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        """The record of `request_id` once the simulator has seen its headers."""
        return await self.recorder.wait_request(request_id, timeout)

    async def wait_finished(self, request_id: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        """The record of `request_id` once it has ended (its `end` is set)."""
        return await self.recorder.wait_finished(request_id, timeout)

    async def wait_sent_bytes(self, request_id: str, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        """The response body bytes the simulator wrote for `request_id`, once it has ended."""
        return await self.recorder.wait_sent_bytes(request_id, timeout)

    async def wait_closed(self, request_id: str, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """When (time.monotonic()) the connection that carried `request_id` closed."""
        return await self.recorder.wait_closed(request_id, timeout)

    async def wait_cancel_call(self, response_id: str, timeout: float = 5.0) -> CancelCall:  # noqa: ASYNC109
        """The first cancel call received for background response `response_id`."""
        return await self.jobs_store.wait_cancel_call(response_id, timeout)

    async def wait_abort_call(self, count: int = 1, timeout: float = 5.0) -> AbortCall:  # noqa: ASYNC109
        """The `count`-th engine abort call, once it has arrived."""
        return await self.engine_aborts.wait_call(count, timeout)

    async def wait_job_done(self, response_id: str, timeout: float = 5.0) -> BackgroundJob:  # noqa: ASYNC109
        """The background job once it has ended (completed, incomplete, cancelled, failed)."""
        return await self.jobs_store.wait_done(response_id, timeout)

    def set_fault(self, model: str, behaviour: str | None) -> None:
        """Requests for `model` behave as `behaviour` (a model-string spec such as
        "error:status=503") until it is set to None: faults per model, flapping at run time."""
        if behaviour is None:
            self.api.faults.pop(model, None)
        else:
            parse_behaviour(behaviour)  # refuse a bad spec now, not on the next request
            self.api.faults[model] = behaviour

    # -- control endpoints --------------------------------------------------------------------

    async def _control(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        limit = _limit(request)
        payload: Any
        if method == "GET" and path == "/_sim/requests":
            payload = [r.to_dict() for r in _tail(self.requests, limit)]
        elif method == "GET" and path.startswith("/_sim/requests/"):
            rec = self.recorder.get(path.removeprefix("/_sim/requests/"))
            if rec is None:
                return _json(404, {"error": "unknown request id"})
            payload = rec.to_dict()
        elif method == "GET" and path == "/_sim/connections":
            payload = [c.to_dict() for c in _tail(self.connections, limit)]
        elif method == "GET" and path == "/_sim/jobs":
            payload = {
                "jobs": [j.to_dict() for j in self.jobs_store.jobs.values()],
                "cancel_calls": [c.to_dict() for c in self.jobs_store.cancel_calls],
            }
        elif method == "GET" and path == "/_sim/aborts":
            payload = [c.to_dict() for c in self.engine_aborts.calls]
        elif method == "GET" and path == "/_sim/stats":
            payload = self.stats()
        elif method == "POST" and path == "/_sim/faults":
            try:
                body = json.loads(await request.read())
                model, spec = body["model"], body.get("behaviour")
            except (ValueError, KeyError, TypeError):
                return _json(400, {"error": 'expected {"model": ..., "behaviour": ... | null}'})
            try:
                self.set_fault(str(model), None if spec is None else str(spec))
            except BehaviourError as err:
                return _json(400, {"error": f"simulator behaviour: {err}"})
            payload = {"faults": dict(self.api.faults)}
        elif method == "POST" and path == "/_sim/reset":
            self.reset()
            payload = {"reset": True}
        else:
            return _json(404, {"error": f"no control endpoint {method} {path}"})
        return _json(200, payload)


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, text=dumps(payload), content_type="application/json")


def _limit(request: web.BaseRequest) -> int | None:
    raw = request.query.get("limit")
    return int(raw) if raw is not None and raw.isdigit() else None


def _tail(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[len(items) - limit :] if limit else []


def build_app(sim: SimulatedProvider) -> web.Application:
    """The simulator as a `web.Application` (e.g. for pytest-aiohttp's `aiohttp_server`).

    Everything works except connection records: `wait_closed` then falls back to the
    handler's own observation of the peer leaving. Prefer `SimulatedProvider.start()`.
    """
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sim.handle)
    return app
