"""Enforces `Deadlines` on the task that owns a request, by cancelling it.

Timeouts are policy, cancellation is plumbing: when a deadline passes, the watchdog cancels the
request's task, so the same unwinding that handles a client disconnect closes the upstream
socket. The relay then asks `consume()` whether the CancelledError was ours.

The timer is lazy: moving a deadline later (every content chunk resets `idle`) is one float
store; the timer re-arms itself only when it fires early. A deadline moving earlier (a phase
change) needs `rearm()`.

The timer itself is an `Alarm`, and a client connection keeps one for its requests, which it
serves one after another: a request that ends leaves the timer armed rather than cancelling
it, and the next request's watchdog finds it armed no later than its own first deadline, so
it stands (as any too-early timer does, it re-arms itself for that deadline when it fires).
A timer made and cancelled per request becomes one every connect_s per busy connection.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from proxy.bare_context import BARE_CONTEXT
from proxy.outcome import TimeoutKind
from proxy.timeouts import Deadlines


class Alarm:
    """The timer behind watchdogs: a watchdog's own, or a client connection's (`kept`), which
    outlives each request's watchdog and serves the next one's; `close()` when the connection
    is gone. At most one watchdog is attached at a time: the one it wakes."""

    __slots__ = ("handle", "kept", "loop", "watchdog")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, kept: bool) -> None:
        self.loop = loop
        self.kept = kept
        self.handle: asyncio.TimerHandle | None = None
        self.watchdog: Watchdog | None = None

    def arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_at(when, self._rang, context=BARE_CONTEXT)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def idle(self) -> None:
        """No deadline is in force: a kept timer may stay armed (it lapses when it rings),
        a watchdog's own is cancelled."""
        if not self.kept:
            self.cancel()

    def release(self, watchdog: Watchdog) -> None:
        """`watchdog` stops: it is never woken again."""
        if self.watchdog is watchdog:
            self.watchdog = None
        self.idle()

    def close(self) -> None:
        """The connection is gone: no next request. A watchdog still attached (a drain after
        the client left, say) keeps the timer until it stops."""
        self.kept = False
        if self.watchdog is None:
            self.cancel()

    def _rang(self) -> None:
        self.handle = None
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog._on_timer()


class Watchdog:
    __slots__ = ("_alarm", "_deadlines", "_task", "fired")

    def __init__(
        self, deadlines: Deadlines, task: asyncio.Task[object], alarm: Alarm | None = None
    ) -> None:
        """`alarm`: the client connection's (kept between its requests), or None for one of
        the watchdog's own."""
        self._deadlines = deadlines
        self._task = task
        if alarm is None or alarm.watchdog is not None:  # (taken: an earlier one re-armed)
            alarm = Alarm(asyncio.get_running_loop(), kept=False)
        alarm.watchdog = self
        self._alarm = alarm
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
        """Never cancel the task from now on (a kept timer stays armed for the next request)."""
        # `self._alarm.release(self)` inline (once a request: two calls fewer).
        alarm = self._alarm
        if alarm.watchdog is self:
            alarm.watchdog = None
        if not alarm.kept:
            alarm.cancel()

    def rearm(self) -> None:
        """Re-arm if the earliest deadline is now sooner than the armed timer (or none is)."""
        if self.fired is not None:
            return
        nxt = self._deadlines.next()
        alarm = self._alarm
        if nxt is None:
            alarm.idle()
            return
        if alarm.watchdog is not self:  # it stopped, and is armed again
            if alarm.watchdog is not None:  # the connection's next request has the alarm
                alarm = self._alarm = Alarm(alarm.loop, kept=False)
            alarm.watchdog = self
        handle = alarm.handle
        if handle is not None and handle.when() <= nxt[0]:
            return
        alarm.arm(nxt[0])

    def headers_sent(self) -> None:
        """The attempt's request went out: its deadline moves from connect to headers. Only the
        phase's deadline changed: the timer stands unless that one is sooner."""
        alarm = self._alarm
        at = self._deadlines.headers_sent(alarm.loop.time())
        handle = alarm.handle
        if at is None or (handle is not None and handle.when() <= at):
            return
        self.rearm()

    def response_started(self, now: float, *, sse: bool) -> None:
        """Response headers came: the phase's deadline ends, and idle (a body) or first token
        (a stream not watched for it yet) begins. Called on every answer: the timer stands
        unless the new deadline is sooner (no `Deadlines.next` when it is not)."""
        at = self._deadlines.response_started(now, sse=sse)
        handle = self._alarm.handle
        if handle is not None and (at is None or handle.when() <= at):
            return
        self.rearm()

    def streaming(self, now: float) -> None:
        """A stream's first content came at `now`: its idle deadline comes into force, and the
        first token's goes. Every other deadline in force was before, so the timer stands
        when it is armed no later than `now` + idle (no `Deadlines.next`; a timer early for
        the deadlines in force re-arms itself when it rings)."""
        idle = self._deadlines.budget.idle_s
        handle = self._alarm.handle
        if idle is not None and handle is not None and handle.when() <= now + idle:
            return
        self.rearm()

    def _on_timer(self) -> None:
        """The alarm rang (its handle is gone): cancel the task if a deadline passed, else
        re-arm for the earliest one (the timer was early, or armed for someone before)."""
        nxt = self._deadlines.next()
        if nxt is None:
            return
        when, kind = nxt
        alarm = self._alarm
        if when > alarm.loop.time():
            alarm.arm(when)
            return
        self.fired = kind
        self._task.cancel(msg=f"hangup: {kind.value} timeout")

    def resume(self) -> None:
        """A fired per-attempt deadline was handled (the next attempt has its own): watch
        again. Until then `rearm()` does nothing, so the next attempt would have no deadline."""
        self.fired = None
        self._alarm.cancel()

    def consume(self) -> TimeoutKind | None:
        """In an `except CancelledError`: the timeout kind if the cancellation was only ours
        (it is then withdrawn and the caller may go on to answer), else None (re-raise)."""
        if self.fired is None:
            return None
        if self._task.uncancel() > 0:
            # Someone else (the client's disconnect, shutdown) cancelled too: theirs wins.
            return None
        return self.fired
