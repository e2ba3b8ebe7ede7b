"""The production runner, built the same way by the CLI and by the tests.

aiohttp's `AppRunner` defaults to `handler_cancellation=False`, which would let a request whose
client left run on to the end (and keep the upstream generating). pytest-aiohttp's test server
forces it on, hiding a missing flag; so tests start this class, not only the test server.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.config import HangupConfig
from proxy.state import STATE, ProxyState

log = logging.getLogger("hangup")

# Seconds allowed, after the grace period, for cancelled requests to unwind and record.
_UNWIND_S = 5.0


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
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,  # ours is written per request by ProxyState.finish
            # We drain in-flight requests ourselves (see shutdown); aiohttp's own wait is moot.
            shutdown_timeout=1.0,
        )
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
        await self.runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(self.runner, self._sock, backlog=self.config.listen.backlog)
        else:
            site = web.TCPSite(
                self.runner,
                self.host,
                self.port,
                backlog=self.config.listen.backlog,
                reuse_port=self._reuse_port or None,
            )
        await site.start()
        addresses = self.runner.addresses
        if addresses and isinstance(addresses[0], tuple):
            self.port = int(addresses[0][1])

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Graceful stop: refuse new requests at once (readiness 503, new requests 503), let
        in-flight ones finish for `grace_s`, then cancel the rest (outcome `shutdown`, their
        upstreams closed), then close everything."""
        state = self.state
        grace = self.config.shutdown.grace_s if grace_s is None else grace_s
        state.draining = True
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
        await self.runner.cleanup()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
