"""The production runner, built the same way by the CLI and by the tests.

aiohttp's `AppRunner` defaults to `handler_cancellation=False`, which would let a request whose
client left run on to the end (and keep the upstream generating). pytest-aiohttp's test server
forces it on, hiding a missing flag; so tests start this class, not only the test server.

Shutdown, in order (the CLI calls `begin_drain` from the signal handler, then `shutdown`):

1. drain: readiness answers 503 and new requests get an OpenAI-shaped 503 at once, while the
   listener stays open, so a client that races the load balancer gets an answer it can retry
   elsewhere instead of a refused connection; responses carry `Connection: close`;
2. grace: in-flight requests may finish for `shutdown.grace_s`;
3. stop: the rest are cancelled (outcome `shutdown`, their upstream sockets closed by the
   relay's `async with`), then listeners, connections and the upstream session are closed.

Every step is bounded, so `shutdown(grace)` returns within grace + `STOP_BUDGET_S`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections import Counter
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.app import create_app
from proxy.config import HangupConfig
from proxy.edge.capacity import ConnectionGuard
from proxy.edge.descriptors import (
    ACCEPT_BATCH,
    AcceptErrors,
    fit_to_descriptors,
    raise_soft_limit,
    widen_backlog,
)
from proxy.edge.runner import GuardedAppRunner, handler_kwargs
from proxy.outcome import RequestRecord
from proxy.state import STATE, ProxyState

log = logging.getLogger("hangup")

# After the grace period: cancelled requests unwind (their `finally` records them) within
# _UNWIND_S, then aiohttp closes the connections within _CLOSE_S. Unwinding is a few ms per
# request (measured); the budgets are backstops that keep the exit bounded, not waits.
_UNWIND_S = 2.0
_CLOSE_S = 1.0
# The most `stop_now` can take; the CLI promises an exit within grace + 5 s.
STOP_BUDGET_S = _UNWIND_S + _CLOSE_S + 1.0
# Past grace + this, the process exits regardless (exit code 1): see `serve`. Above
# STOP_BUDGET_S, so it only fires when a bound inside failed; below the promised 5 s.
EXIT_DEADLINE_S = 4.8


class ProxyServer:
    def __init__(
        self,
        config: HangupConfig,
        *,
        host: str | None = None,
        port: int | None = None,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.host = config.listen.host if host is None else host
        self.port = config.listen.port if port is None else port
        self.app = create_app(config, registry=registry, listen_host=self.host)
        _quiet_parse_errors()
        probes = {"/healthz", "/readyz"} | (
            {config.metrics.path} if config.metrics.enabled else set()
        )
        # Deadlines, a connection cap and head bounds per client connection; no inflating on
        # the loop; no draining after an early answer (proxy/edge/connections.py).
        self.guard = ConnectionGuard(config.connections, probe_paths=frozenset(probes))
        self.runner = GuardedAppRunner(
            self.app,
            guard=self.guard,
            handler_cancellation=True,
            access_log=None,  # ours is written per request by ProxyState.finish
            # We drain in-flight requests ourselves (see shutdown); aiohttp's own wait only
            # has idle keep-alive connections left to close.
            shutdown_timeout=_CLOSE_S,
            **handler_kwargs(config.connections),
        )
        self._accept_errors: AcceptErrors | None = None
        self._reuse_port = reuse_port
        self._sock = sock
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def state(self) -> ProxyState:
        return self.app[STATE]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        fit_to_descriptors(self.guard)
        self._accept_errors = AcceptErrors(asyncio.get_running_loop(), self.guard.log)
        self._accept_errors.install()
        await self.runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(self.runner, self._sock, backlog=ACCEPT_BATCH)
        else:
            site = web.TCPSite(
                self.runner,
                self.host,
                self.port,
                backlog=ACCEPT_BATCH,
                reuse_port=self._reuse_port or None,
            )
        await site.start()
        widen_backlog(site, self.config.listen.backlog)
        addresses = self.runner.addresses
        if addresses and isinstance(addresses[0], tuple):
            self.port = int(addresses[0][1])

    def begin_drain(self) -> None:
        """Readiness 503 and new requests refused, from this instant (synchronous, so a signal
        handler can flip it before the loop runs anything else)."""
        self.state.draining = True

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Graceful stop: refuse new requests at once (readiness 503, new requests 503), let
        in-flight ones finish for `grace_s`, then cancel the rest (outcome `shutdown`, their
        upstreams closed), then close everything."""
        state = self.state
        grace = self.config.shutdown.grace_s if grace_s is None else grace_s
        self.begin_drain()
        if state.inflight and grace > 0:
            log.info("draining %d in-flight requests for up to %gs", len(state.inflight), grace)
            try:
                await asyncio.wait_for(state.wait_idle(), timeout=grace)
            except TimeoutError:
                pass
        await self.stop_now()

    async def stop_now(self) -> None:
        """Cancel whatever is still in flight and close. Also the second-signal path."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        state = self.state
        state.draining = True
        # Read by the relay when its task is cancelled: the outcome is `shutdown`, not
        # `client_cancelled`.
        state.hard_stopping = True
        remaining = [t for t in state.inflight if not t.done()]
        for task in remaining:
            task.cancel()
        if remaining:
            log.info("cancelled %d requests still in flight at shutdown", len(remaining))
            try:
                await asyncio.wait_for(state.wait_idle(), timeout=_UNWIND_S)
            except TimeoutError:
                log.warning("%d requests did not unwind in %gs", len(state.inflight), _UNWIND_S)
        try:  # records still counting their prompts (each bounded): publish them before closing
            await asyncio.wait_for(state.wait_accounted(), timeout=_UNWIND_S)
        except TimeoutError:
            pass
        try:
            await self.runner.cleanup()
        finally:
            if self._accept_errors is not None:
                self._accept_errors.uninstall()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class _ParseErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a line over 8190 bytes, a malformed header) as an
    ERROR with a traceback whose message quotes the start of the offending header value: a
    client can trigger it at will, and the quoted bytes can be a key (an oversized
    `Proxy-Authorization: Basic ...` value is logged as is). Keep one warning naming the problem,
    without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused a request that could not be parsed: %s (HTTP %d)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _quiet_parse_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParseErrorFilter) for f in logger.filters):
        logger.addFilter(_ParseErrorFilter())


async def serve(
    config: HangupConfig,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    supervisor_fd: int | None = None,
) -> int:
    """Run one proxy process until SIGTERM/SIGINT (or its supervisor's death); the exit code.

    First signal: drain (see the module docstring). Second signal: stop now, still closing
    every upstream. Either way the process exits within grace + 5 s: should unwinding ever
    hang (a bug, or a blocked thread), a deadline exits with code 1 rather than outlive the
    orchestrator's grace period and be killed with SIGKILL, which would close nothing.
    """
    raise_soft_limit()
    server = ProxyServer(config, host=host, port=port, sock=sock)
    try:
        await server.start()
    except OSError as exc:  # port taken, address not local, no permission
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        log.error("cannot listen on %s:%d: %s", host, port, reason)
        await server.runner.cleanup()
        return 1
    log.info(
        "hangup %s listening on %s (routes: %s)",
        __version__,
        server.base_url,
        ", ".join(r.name for r in config.routes),
        extra={"fields": {"event": "listening", "url": server.base_url, "pid": os.getpid()}},
    )
    loop = asyncio.get_running_loop()
    grace = config.shutdown.grace_s
    stops_asked = 0
    stopping: set[asyncio.Task[None]] = set()  # strong references until done
    ended: Counter[str] = Counter()

    # The state once: `server.state` is a property reading the app's mapping (three calls),
    # and this listener runs for every request.
    state = server.state

    def count(record: RequestRecord) -> None:
        if state.draining and record.outcome is not None:
            ended[record.outcome.value] += 1

    state.listeners.append(count)

    def overran() -> None:
        log.error("shutdown overran grace + %gs; exiting without finishing it", EXIT_DEADLINE_S)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    def stop(reason: str) -> None:
        nonlocal stops_asked
        stops_asked += 1
        if stops_asked == 1:
            server.begin_drain()
            log.info(
                "%s: draining %d in-flight requests for up to %gs (signal again to stop now)",
                reason,
                len(server.state.inflight),
                grace,
                extra={"fields": {"event": "draining", "grace_s": grace}},
            )
            loop.call_later(grace + EXIT_DEADLINE_S, overran)
            task = loop.create_task(server.shutdown(grace), name="hangup-shutdown")
        else:
            log.info("%s again: stopping now", reason, extra={"fields": {"event": "stop_now"}})
            task = loop.create_task(server.stop_now(), name="hangup-stop-now")
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, signal.Signals(sig).name)
    if supervisor_fd is not None:
        _watch_supervisor(loop, supervisor_fd, stop)
    await server.wait_stopped()
    for task in list(stopping):
        task.cancel()
    log.info(
        "hangup stopped (requests ended while stopping: %s)",
        dict(ended) or "none",
        extra={"fields": {"event": "stopped", "ended_while_stopping": dict(ended)}},
    )
    return 0


def _watch_supervisor(
    loop: asyncio.AbstractEventLoop, fd: int, stop: Callable[[str], None]
) -> None:
    """A `--workers` worker holds the read end of a pipe only its supervisor can write to: EOF
    means the supervisor is gone (even by SIGKILL), and the worker drains as on SIGTERM
    instead of serving on as an orphan."""

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            os.close(fd)
            stop("supervisor gone")

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
