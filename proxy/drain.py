"""The `on_disconnect: drain` policy, and the one wait it changes.

Normally a client's departure cancels the request, which closes the upstream socket (see
relay.py). Some providers bill the whole answer whether or not anyone reads it; for them a
route may say `drain`: when the client leaves, keep reading the answer (bounded by
`drain_max_s`) so usage is exact instead of estimated. Nothing read here goes to the client.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.admission import JSON_TYPES, Plan
from proxy.sse import SSEDecoder
from proxy.upstream import OpenAttempt, UpstreamResponse
from proxy.upstream_errors import AttemptFailed
from proxy.usage import StreamUsageTracker
from proxy.watchdog import Watchdog

if TYPE_CHECKING:
    from proxy.relay import Exchange

# A copy of a non-streamed JSON body is kept for usage accounting, up to this size.
USAGE_BODY_CAP = 8 * 1024 * 1024
_DRAIN_ENDS: tuple[type[BaseException], ...] = (TimeoutError, AttemptFailed)


def _retrieve(future: asyncio.Future[UpstreamResponse]) -> None:
    """Mark a shielded upstream attempt's failure as seen (its caller may have gone)."""
    if not future.cancelled():
        future.exception()


async def open_upstream(
    exchange: Exchange, opened: OpenAttempt, plan: Plan, watchdog: Watchdog
) -> UpstreamResponse:
    """Send the request; return once the upstream's response headers arrive.

    On a `drain` route the wait is shielded from the client's departure: that provider
    bills the answer anyway, so when the client leaves we wait for it and read it to the
    end (bounded by drain_max_s) for exact usage. Everywhere else a departure cancels the
    wait, which closes the upstream socket."""
    if plan.route.options.on_disconnect != "drain":
        return await opened.start()
    opening: asyncio.Future[UpstreamResponse] = asyncio.ensure_future(opened.start())
    opening.add_done_callback(_retrieve)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        if watchdog.fired is None and not exchange.state.hard_stopping:
            exchange.record.client_gone_at = exchange.loop.time()
            watchdog.stop()
            await _drain_unanswered(exchange, plan, opening)
        opening.cancel()
        raise


async def _drain_unanswered(
    exchange: Exchange, plan: Plan, opening: asyncio.Future[UpstreamResponse]
) -> None:
    """Drain for a client that left before the upstream answered."""
    exchange.drained = True
    try:
        async with asyncio.timeout(plan.route.options.drain_max_s):
            upstream = await opening
            exchange.record.upstream_status = upstream.status
            if upstream.event_stream:
                exchange.tracker = StreamUsageTracker(plan.facts)
                exchange.decoder = SSEDecoder()
            elif upstream.status < 300 and upstream.content_type in JSON_TYPES:
                exchange.json_body = bytearray()
                exchange.content_encoding = upstream.content_encoding
            await _read_to_end(exchange, upstream)
    except _DRAIN_ENDS:
        pass  # best effort: what was read is counted, the rest stays an estimate


async def drain(exchange: Exchange, plan: Plan, upstream: UpstreamResponse) -> None:
    """`on_disconnect: drain`: the client left, but this provider bills the whole answer
    anyway, so read it to the end (bounded) for exact usage instead of an estimate."""
    exchange.drained = True
    try:
        async with asyncio.timeout(plan.route.options.drain_max_s):
            await _read_to_end(exchange, upstream)
    except _DRAIN_ENDS:
        pass  # best effort: what was read is counted, the rest stays an estimate


async def _read_to_end(exchange: Exchange, upstream: UpstreamResponse) -> None:
    """Read what is left of a response for accounting only (nothing goes to the client)."""
    tracker, decoder = exchange.tracker, exchange.decoder
    while chunk := await upstream.read():
        if tracker is not None:
            assert decoder is not None  # made with the tracker
            for event in decoder.feed(chunk):
                tracker.feed(event)
        elif exchange.json_body is not None:
            if len(exchange.json_body) + len(chunk) <= USAGE_BODY_CAP:
                exchange.json_body += chunk
            else:
                exchange.json_body = None
