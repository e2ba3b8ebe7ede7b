"""`create_app`: the only module that knows every other one. Routes, resources, health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import browser, relay, secrets, unparsed
from proxy.browser import BrowserPolicy
from proxy.config import HangupConfig
from proxy.edge import gate
from proxy.edge.body import inflate_pool
from proxy.errors import NotFound, Unauthorized
from proxy.looplag import LoopLagProbe
from proxy.metrics import authorized
from proxy.refusal import close_if_asked, refuse
from proxy.state import STATE, ProxyState

access_log = logging.getLogger("hangup.access")


# At shutdown, queued spans get this long to reach the collector (part of the stop budget).
TRACE_FLUSH_S = 0.5
# Every path under it is relayed (the OpenAI API's `/v1/...`).
RELAY_PREFIX = "/v1/"


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstreams.start()
    yield
    await state.aborts.close()  # bounded: calls still in flight are cancelled
    await state.upstreams.close()


async def _loop_lag_probe(app: web.Application) -> AsyncIterator[None]:
    probe = LoopLagProbe(app[STATE].metrics.loop_lag)
    probe.start()
    yield
    probe.stop()


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    yield
    # The flush blocks on the exporter's thread: wait for it off the loop, bounded.
    await asyncio.to_thread(app[STATE].tracing.close, TRACE_FLUSH_S)


def _probed(request: web.Request, response: web.Response) -> web.Response:
    """Probes and scrapes are not traffic: no record, no metrics, and an access-log line only
    with `logging.health_checks: true` (a probe every few seconds would drown the real lines)."""
    if request.app[STATE].config.logging.health_checks:
        fields = {"method": request.method, "path": request.path, "status": response.status}
        access_log.info("probe", extra={"fields": fields})
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Nothing else is checked: a restart would fix nothing
    else, and a draining proxy must not be restarted (that would cut what it is finishing)."""
    return _probed(request, web.json_response({"status": "ok"}))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: config loaded (else the process would not run), upstream client up, not
    draining. 503 from the first instant of a drain, so the load balancer stops sending."""
    state = request.app[STATE]
    if state.draining:
        response = web.json_response({"status": "draining"}, status=503)
    elif not state.upstreams.ready:
        response = web.json_response({"status": "starting"}, status=503)
    elif state.config.metrics.bearer_token is not None and authorized(
        state.config.metrics, request.headers.get("authorization")
    ):
        # The load is for the operator (who holds the scrape token), not for anyone who asks.
        response = web.json_response({"status": "ready", "in_flight": len(state.inflight)})
    else:
        response = web.json_response({"status": "ready"})
    return _probed(request, response)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not authorized(state.config.metrics, request.headers.get("authorization")):
        err = Unauthorized("metrics require the bearer token in metrics.bearer_token")
        return refuse(request, err)
    # Rendering thousands of series is pure Python (~100 ms at the label bound): in a worker
    # thread the interpreter hands the loop the GIL every few ms, so requests and cancellations
    # keep flowing while a scrape is built.
    loop = asyncio.get_running_loop()
    body, content_type = await loop.run_in_executor(None, state.metrics.render)
    response = web.Response(body=request.app[secrets.SECRETS].data(body))
    response.headers["Content-Type"] = content_type
    return _probed(request, response)


async def not_found(request: web.Request) -> web.Response:
    """Anything outside /v1/ (and the health and metrics endpoints): an OpenAI-shaped 404, and a
    record like every other request gets."""
    err = NotFound(f"unknown path {request.path}: hangup serves the OpenAI API under /v1/")
    return refuse(request, err)


async def _before_response(
    policy: BrowserPolicy,
    scrubbed: secrets.Secrets | None,
    state: ProxyState,
    request: web.Request,
    response: web.StreamResponse,
) -> None:
    """on_response_prepare: one callback for every job (each would be a coroutine a response),
    in this order: CORS headers, `Connection: close` when asked, secrets out of the headers
    (`scrubbed`: None when none is configured, decided once), our Server header, and
    `Connection: close` while draining."""
    browser.fix_cors_headers(policy, request, response)
    close_if_asked(request, response)
    if scrubbed is not None:
        secrets.scrub_response_headers(scrubbed, response)
    unparsed.set_server_header(response)
    if state.draining:
        close_while_draining(response)


def close_while_draining(response: web.StreamResponse) -> None:
    """While draining, ask every client to close its connection after this response (RFC 9112
    9.6), so keep-alive clients reconnect to another instance instead of meeting our 503."""
    # aiohttp runs this hook after it computed the Connection header: set both.
    response.force_close()
    response.headers["Connection"] = "close"


def create_app(
    config: HangupConfig,
    *,
    registry: CollectorRegistry | None = None,
    listen_host: str | None = None,
) -> web.Application:
    state = ProxyState(config, registry=registry, listen_host=listen_host)
    policy = BrowserPolicy(config, config.listen.host if listen_host is None else listen_host)
    app = web.Application(
        client_max_size=config.limits.max_request_body_bytes,
    )  # no middlewares: see proxy.edge.gate
    secrets.add_to_app(app, config)
    # No secret configured (`Secrets.__bool__`, a call): no scrubbing step on any response.
    scrubbed = app[secrets.SECRETS] or None
    app.on_response_prepare.append(partial(_before_response, policy, scrubbed, state))
    unparsed.add_to_app(app)
    app[STATE] = state
    app[gate.BROWSER_POLICY] = policy
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(inflate_pool)
    app.cleanup_ctx.append(_loop_lag_probe)
    # No `100 Continue` before a request is admitted: see unparsed.expect_handler.
    expect = unparsed.expect_handler
    app.router.add_get("/healthz", gate.gated(healthz, policy), expect_handler=expect)
    app.router.add_get("/readyz", gate.gated(readyz, policy), expect_handler=expect)
    if config.metrics.enabled:
        app.router.add_get(config.metrics.path, gate.gated(metrics, policy), expect_handler=expect)
    # The relay's handler runs the edge checks itself (one coroutine less per held stream).
    handle = relay.Relay(state, policy, app[secrets.SECRETS]).serve
    route = app.router.add_route(
        "*", RELAY_PREFIX + r"{tail:[\s\S]*}", handle, expect_handler=expect
    )
    app[gate.DIRECT_ROUTE] = gate.DirectRoute(RELAY_PREFIX, route)
    app.router.add_route(
        "*", r"/{tail:[\s\S]*}", gate.gated(not_found, policy), expect_handler=expect
    )
    return app
