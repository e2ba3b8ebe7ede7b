"""Event-loop lag: how late a timer fires, sampled all the time, for the lag histogram.

Every request, stream and cancellation of a process shares one event loop, so a callback that
runs long (a huge JSON body parsed, a big scrape rendered) delays all of them, cancellations
included. `LoopLagProbe` arms a timer every `interval` seconds and records how much later than
asked it ran: about zero on a healthy loop, the length of whatever blocked the loop otherwise.
One timer, no task: ~20 cheap callbacks a second.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Final

__all__ = ["DEFAULT_INTERVAL_S", "YOUNG_COLLECTION_AT", "LoopLagProbe", "freeze_startup_heap"]

DEFAULT_INTERVAL_S: Final = 0.05


class LoopLagProbe:
    """`start()` on the running loop; `observe(lag_seconds)` is called after every tick."""

    __slots__ = ("_due", "_handle", "_interval", "_loop", "_observe")

    def __init__(
        self, observe: Callable[[float], None], *, interval: float = DEFAULT_INTERVAL_S
    ) -> None:
        self._observe = observe
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # A timer may fire up to the clock's resolution early: that is no lag.
        self._observe(max(0.0, now - self._due))
        self._arm(now)


# Young-generation collections start at this many tracked objects allocated and not yet freed
# (CPython's default: 700). A request's own objects are freed by reference counting, almost
# none in cycles, but with tens of requests in flight their live objects pass 700 every
# ~10 requests, and each young collection then walks them all for nothing: ~24 us per small
# completion and ~31 us per 20-event stream, measured (scratch gc.callbacks timing under wrk);
# at 5,000 or more, next to none in 4 s of saturating load. A collection at this size walks at
# most ~10,000 objects: a few ms, under the loop's 10 ms budget.
YOUNG_COLLECTION_AT = 10_000


def freeze_startup_heap() -> None:
    """Move everything alive now (modules, config, the app) out of the collector's reach, and
    let young collections wait for `YOUNG_COLLECTION_AT` objects.

    A full (generation 2) collection walks every tracked object and pauses the whole process,
    the event loop included: ~40-60 ms here with hangup's imports, measured by bench.looplag
    under ordinary traffic, the longest loop stall of all. Startup objects live for the whole
    process; frozen, a full collection walks only what requests created (5-6 ms). Once per
    process, by the CLI just before it serves.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_AT, *gc.get_threshold()[1:])
