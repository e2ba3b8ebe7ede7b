"""The span of relaying one upstream answer to the client, around its pump (`_pump_sse`,
`_relay_body`): `begin` before it, `client_left` when it is cancelled, `end` after it in every
case.

On `begin` the response headers go out, unless they are held while the request may still
switch targets. If the client leaves (or a deadline cancels) during the pump, `client_left`
notes when and, with `on_disconnect: drain`, reads the upstream on for exact usage first.
`end` takes the open-upstream-connections gauge down again (it went up when the answer was
accepted).

Functions the pump calls at its two ends, not an async context manager nor a coroutine that
awaits the pump: a `with` keeps its bound exit method on the pump's frame, and a wrapping
coroutine its own frame, for as long as a stream is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from proxy.admission import Plan
from proxy.drain import drain
from proxy.upstream import UpstreamResponse
from proxy.watchdog import Watchdog

if TYPE_CHECKING:
    from proxy.relay import Exchange
    from proxy.sse_relay import SSERelay


async def begin(exchange: SSERelay, holding: bool) -> None:
    if holding:
        return
    try:
        await exchange._commit()
    except BaseException:
        end(exchange)
        raise


async def client_left(
    exchange: SSERelay, plan: Plan, upstream: UpstreamResponse, watchdog: Watchdog
) -> None:
    """Client gone (or our deadline): note when; in drain mode, read on for exact usage.
    The attempt's own unwinding closes the upstream afterwards."""
    record, loop = exchange.record, exchange.loop
    gone = watchdog.fired is None and not exchange.state.hard_stopping
    if gone and record.client_gone_at is None:
        record.client_gone_at = loop.time()
        if plan.route.options.on_disconnect == "drain":
            watchdog.stop()
            drain_at = loop.time()
            try:
                await drain(cast("Exchange", exchange), plan, upstream)
            finally:
                record.upstream_wait_s += loop.time() - drain_at


def end(exchange: SSERelay) -> None:
    exchange.state.metrics.upstream_connection_closed()
