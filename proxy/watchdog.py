"""Enforces `Deadlines` on the task that owns a request, by cancelling it.

Timeouts are policy, cancellation is plumbing: when a deadline passes, the watchdog cancels the
request's task, so the same unwinding that handles a client disconnect closes the upstream
socket. The relay then asks `consume()` whether the CancelledError was ours.

The timer is lazy: moving a deadline later (every content chunk resets `idle`) is one float
store; the timer re-arms itself only when it fires early. A deadline moving earlier (a phase
change) needs `rearm()`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from proxy.bare_context import BARE_CONTEXT
from proxy.outcome import TimeoutKind
from proxy.timeouts import Deadlines


class Watchdog:
    __slots__ = ("_deadlines", "_handle", "_loop", "_task", "fired")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[object]) -> None:
        self._deadlines = deadlines
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self.fired: TimeoutKind | None = None

    def __enter__(self) -> Watchdog:
        self.rearm()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Synchronous on purpose: the task can only be suspended inside the `with` body, so a
        # cancel we issued is always delivered inside it, never after.
        self.stop()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def rearm(self) -> None:
        """Re-arm if the earliest deadline is now sooner than the armed timer (or none is)."""
        if self.fired is not None:
            return
        nxt = self._deadlines.next()
        if nxt is None:
            self.stop()
            return
        if self._handle is not None:
            if self._handle.when() <= nxt[0]:
                return
            self._handle.cancel()
        self._handle = self._loop.call_at(nxt[0], self._on_timer, context=BARE_CONTEXT)

    def headers_sent(self) -> None:
        """The attempt's request went out: its deadline moves from connect to headers. Only the
        phase's deadline changed: the timer stands unless that one is sooner."""
        at = self._deadlines.headers_sent(self._loop.time())
        handle = self._handle
        if at is None or (handle is not None and handle.when() <= at):
            return
        self.rearm()

    def response_started(self, now: float, *, sse: bool) -> None:
        """Response headers came: the phase's deadline ends, and idle (a body) or first token
        (a stream not watched for it yet) begins. Called on every answer: the timer stands
        unless the new deadline is sooner (no `Deadlines.next` when it is not)."""
        at = self._deadlines.response_started(now, sse=sse)
        handle = self._handle
        if handle is not None and (at is None or handle.when() <= at):
            return
        self.rearm()

    def _on_timer(self) -> None:
        self._handle = None
        nxt = self._deadlines.next()
        if nxt is None:
            return
        when, kind = nxt
        if when > self._loop.time():
            self._handle = self._loop.call_at(when, self._on_timer, context=BARE_CONTEXT)
            return
        self.fired = kind
        self._task.cancel(msg=f"hangup: {kind.value} timeout")

    def resume(self) -> None:
        """A fired per-attempt deadline was handled (the next attempt has its own): watch
        again. Until then `rearm()` does nothing, so the next attempt would have no deadline."""
        self.fired = None
        self.stop()

    def consume(self) -> TimeoutKind | None:
        """In an `except CancelledError`: the timeout kind if the cancellation was only ours
        (it is then withdrawn and the caller may go on to answer), else None (re-raise)."""
        if self.fired is None:
            return None
        if self._task.uncancel() > 0:
            # Someone else (the client's disconnect, shutdown) cancelled too: theirs wins.
            return None
        return self.fired
