"""The span of relaying one upstream answer to the client, around its pump.

On entry the response headers go out, unless they are held while the request may still switch
targets; if the client leaves (or a deadline cancels) during the pump, the time is noted and,
with `on_disconnect: drain`, the upstream is read on for exact usage first; on every exit the
open-upstream-connections gauge goes down again (it went up when the answer was accepted).

An async context manager rather than a coroutine that awaits the pump: its enter and exit run
only at the two ends, so nothing of it but this small object stays alive while a stream is
held (a coroutine's frame would, ~400 B under every held stream).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, cast

from proxy.admission import Plan
from proxy.drain import drain
from proxy.upstream import UpstreamResponse
from proxy.watchdog import Watchdog

if TYPE_CHECKING:
    from proxy.relay import Exchange
    from proxy.sse_relay import SSERelay


class Relaying:
    __slots__ = ("_exchange", "_holding", "_plan", "_upstream", "_watchdog")

    def __init__(
        self,
        exchange: SSERelay,
        plan: Plan,
        upstream: UpstreamResponse,
        watchdog: Watchdog,
        holding: bool,
    ) -> None:
        self._exchange, self._plan, self._upstream = exchange, plan, upstream
        self._watchdog, self._holding = watchdog, holding

    async def __aenter__(self) -> None:
        if self._holding:
            return
        try:
            await self._exchange._commit()
        except BaseException:
            self._exchange.state.metrics.upstream_connection_closed()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        exchange = self._exchange
        try:
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                await self._left()
        finally:
            exchange.state.metrics.upstream_connection_closed()

    async def _left(self) -> None:
        """Client gone (or our deadline): note when; in drain mode, read on for exact usage.
        The attempt's own unwinding closes the upstream afterwards."""
        exchange, plan, watchdog = self._exchange, self._plan, self._watchdog
        record, loop = exchange.record, exchange.loop
        gone = watchdog.fired is None and not exchange.state.hard_stopping
        if gone and record.client_gone_at is None:
            record.client_gone_at = loop.time()
            if plan.route.options.on_disconnect == "drain":
                watchdog.stop()
                drain_at = loop.time()
                try:
                    await drain(cast("Exchange", exchange), plan, self._upstream)
                finally:
                    record.upstream_wait_s += loop.time() - drain_at
