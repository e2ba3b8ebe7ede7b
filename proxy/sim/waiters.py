"""Bounded, event-driven waits on keyed conditions (no polling, no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class Waiters:
    """Bounded waits on keyed conditions: `notify(key)` wakes the waiters of that key, which
    re-check their condition.

    The waits take their bound as a `timeout` argument (hence the ASYNC109 exemptions) on
    purpose: a test that forgets to wrap a wait must fail with a message naming what it waited
    for, not hang until the test runner's global timeout."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[asyncio.Future[None]]] = {}

    def notify(self, key: Hashable) -> None:
        for fut in self._waiting.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    async def until(
        self,
        key: Hashable,
        check: Callable[[], T | None],
        timeout: float,  # noqa: ASYNC109 (see the class docstring)
        what: str,
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = check()
            if value is not None:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"simulator: {what} did not happen within {timeout:g} s")
            fut: asyncio.Future[None] = loop.create_future()
            self._waiting.setdefault(key, []).append(fut)
            try:
                await asyncio.wait((fut,), timeout=remaining)
            finally:
                waiting = self._waiting.get(key)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._waiting[key]
