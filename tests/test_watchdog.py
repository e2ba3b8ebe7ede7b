"""The watchdog cancels the guarded task at the earliest deadline, and only then."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest

from proxy.outcome import TimeoutKind
from proxy.route_options import TimeoutsConfig
from proxy.timeouts import Budget, Deadlines
from proxy.watchdog import Alarm, Watchdog


def make(loop_now: float, **timeouts: float | None) -> Deadlines:
    policy = TimeoutsConfig(
        **{
            "connect_s": None,
            "headers_s": None,
            "first_token_s": None,
            "idle_s": None,
            "total_s": None,
            **timeouts,
        }
    )
    budget = Budget.for_request(policy, None, honor_client_deadline=False)
    return Deadlines(budget, loop_now, watch_first_token=True)


async def test_fires_at_the_deadline_and_consume_reports_it() -> None:
    loop = asyncio.get_running_loop()
    d = make(loop.time(), connect_s=0.05)
    task = asyncio.current_task()
    assert task is not None
    wd = Watchdog(d, task)
    start = loop.time()
    try:
        with wd:
            await asyncio.sleep(5)
        raise AssertionError("not cancelled")
    except asyncio.CancelledError:
        assert wd.consume() is TimeoutKind.CONNECT
    elapsed = loop.time() - start
    assert 0.05 <= elapsed < 0.5
    assert task.cancelling() == 0  # withdrawn: the task may go on


async def test_moving_a_deadline_later_rearms_lazily() -> None:
    """Content every 50 ms keeps a 100 ms idle timer from firing; once content stops, the
    timer (which woke early each time and re-armed itself) fires 100 ms after the last one."""
    loop = asyncio.get_running_loop()
    d = make(loop.time(), idle_s=0.1, total_s=None)
    d.response_started(loop.time(), sse=True)
    d.content(loop.time())
    task = asyncio.current_task()
    assert task is not None
    wd = Watchdog(d, task)
    last_content = loop.time()
    async with asyncio.timeout(5):  # bounds a watchdog that never fires
        try:
            with wd:
                for _ in range(4):
                    await asyncio.sleep(0.05)
                    last_content = loop.time()
                    d.content(last_content)
                await loop.create_future()  # only a cancellation ends this
        except asyncio.CancelledError:
            fired_at = loop.time()
            assert wd.consume() is TimeoutKind.IDLE, "the watchdog never fired"
    # Not early (a timer armed for the first deadline would fire at 0.1 s, mid-loop)...
    assert fired_at >= last_content + 0.1
    assert task.cancelling() == 0


async def test_another_cancellation_wins_over_a_fired_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def guarded() -> TimeoutKind | None:
        task = asyncio.current_task()
        assert task is not None
        wd = Watchdog(make(loop.time(), total_s=0.01), task)
        try:
            with wd:
                started.set()
                await asyncio.sleep(5)
        except asyncio.CancelledError:
            return wd.consume()
        return None

    task = asyncio.create_task(guarded())
    await started.wait()
    await asyncio.sleep(0.05)  # let the watchdog fire first
    # By now guarded() has returned TIMEOUT; a second, external cancel arriving while the
    # timeout's CancelledError is pending is covered below.
    assert await task is TimeoutKind.TOTAL

    async def doubly_cancelled() -> tuple[TimeoutKind | None, TimeoutKind | None]:
        me = asyncio.current_task()
        assert me is not None
        d = make(loop.time(), total_s=0.02)
        due = d.next()
        assert due is not None
        wd = Watchdog(d, me)
        try:
            with wd:
                # The client leaves at the very moment the deadline passes: both timers are
                # due together, so both cancels land before this task resumes.
                loop.call_at(due[0], me.cancel)
                await asyncio.sleep(5)
        except asyncio.CancelledError:
            return wd.fired, wd.consume()
        return None, None

    fired, consumed = await asyncio.create_task(doubly_cancelled())
    assert fired is TimeoutKind.TOTAL  # the watchdog did fire...
    assert consumed is None  # ...but the other cancellation wins: the caller re-raises


async def test_stop_disarms() -> None:
    """Leaving the `with` cancels the timer: nothing fires at the deadline it was armed for."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    d = make(loop.time(), total_s=0.02)
    due = d.next()
    assert due is not None
    with Watchdog(d, task) as wd:
        pass
    # The loop runs due timers in time order: had the watchdog's timer stayed armed for `due`,
    # it would cancel this task before the later one below wakes it.
    past_due = loop.create_future()
    loop.call_at(due[0] + 0.001, past_due.set_result, None)
    await past_due
    assert wd.fired is None
    assert task.cancelling() == 0


async def _fires_after_response_started(
    *, sse: bool, watch_first_token: bool, **timeouts: float | None
) -> tuple[TimeoutKind | None, float]:
    """Arm for a 5 s connect deadline, start the response at once, and wait (bounded) for the
    deadline the response brought into force: the kind that fired, and after how long."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    d = make(loop.time(), connect_s=5.0, **timeouts)
    d.watch_first_token = watch_first_token
    wd = Watchdog(d, task)
    started = loop.time()
    async with asyncio.timeout(2):  # a watchdog still armed for the 5 s connect fails here
        try:
            with wd:
                wd.response_started(loop.time(), sse=sse)
                await loop.create_future()  # only a cancellation ends this
        except asyncio.CancelledError:
            return wd.consume(), loop.time() - started
    return None, loop.time() - started


async def test_response_started_arms_a_sooner_idle_deadline() -> None:
    """A body's idle deadline (0.05 s) is sooner than the armed connect timer (5 s): the
    watchdog re-arms for it when the response starts, rather than waiting for the timer."""
    kind, after = await _fires_after_response_started(
        sse=False, watch_first_token=False, idle_s=0.05
    )
    assert kind is TimeoutKind.IDLE
    assert 0.05 <= after < 1.0


async def test_response_started_arms_a_newly_watched_first_token() -> None:
    """A request that did not ask for a stream gets one: its first-token deadline comes into
    force at the response and is sooner than the armed timer."""
    kind, after = await _fires_after_response_started(
        sse=True, watch_first_token=False, first_token_s=0.05
    )
    assert kind is TimeoutKind.FIRST_TOKEN
    assert 0.05 <= after < 1.0


# --- a connection's kept alarm, shared by its requests one after another ---------------------


async def _fired_within(wd: Watchdog, bound_s: float) -> tuple[TimeoutKind | None, float]:
    """Wait (bounded) under `wd` for its cancellation: the kind it reports, and when."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(bound_s):  # a watchdog that never fires fails here
        try:
            with wd:
                await loop.create_future()  # only a cancellation ends this
        except asyncio.CancelledError:
            return wd.consume(), loop.time()
    return None, loop.time()


async def test_a_kept_alarm_stays_armed_and_serves_the_next_watchdog_on_its_deadline() -> None:
    """A stopped watchdog leaves the connection's timer armed (no cancel) and never cancels
    its task; the next request's later deadline fires on time all the same (the early timer
    re-arms for it), the same kind at the same time as a watchdog with a timer of its own."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    earlier = asyncio.create_task(asyncio.sleep(5))  # the first request's task
    alarm = Alarm(loop, kept=True)
    first = Watchdog(make(loop.time(), connect_s=0.05), earlier, alarm)
    first.rearm()
    armed = alarm.handle
    first.stop()
    assert alarm.handle is armed and armed is not None  # kept: not cancelled
    began = loop.time()
    second = Watchdog(make(began, connect_s=0.15), me, alarm)
    kind, fired_at = await _fired_within(second, 2)
    assert kind is TimeoutKind.CONNECT
    assert fired_at >= began + 0.15  # not at the first request's 0.05
    assert not earlier.cancelled() and earlier.cancelling() == 0  # stopped: never cancelled
    earlier.cancel()
    # The general path: a watchdog with a timer of its own, the same deadline.
    began = loop.time()
    kind, own_at = await _fired_within(Watchdog(make(began, connect_s=0.15), me), 2)
    assert kind is TimeoutKind.CONNECT and own_at >= began + 0.15
    assert me.cancelling() == 0


async def test_a_kept_alarm_armed_later_than_the_next_deadline_is_moved_sooner() -> None:
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    alarm = Alarm(loop, kept=True)
    first = Watchdog(make(loop.time(), connect_s=5.0), me, alarm)
    first.rearm()
    first.stop()
    began = loop.time()
    kind, fired_at = await _fired_within(Watchdog(make(began, connect_s=0.05), me, alarm), 2)
    assert kind is TimeoutKind.CONNECT
    assert began + 0.05 <= fired_at < began + 1.0
    last = Watchdog(make(loop.time(), connect_s=5.0), me, alarm)
    last.rearm()
    last.stop()
    assert alarm.handle is not None  # kept for a next request...
    alarm.close()
    assert alarm.handle is None  # ...until the connection is gone: nothing left armed


async def test_a_closed_alarm_is_cancelled_when_its_watchdog_stops() -> None:
    """The connection went while a request still runs (a drain after the client left): its
    deadline stays watched, and the timer goes when the watchdog stops."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    alarm = Alarm(loop, kept=True)
    began = loop.time()
    wd = Watchdog(make(began, connect_s=0.05), me, alarm)
    wd.rearm()
    alarm.close()
    assert alarm.handle is not None
    kind, fired_at = await _fired_within(wd, 2)  # `with` re-arms (the same timer stands)
    assert kind is TimeoutKind.CONNECT and fired_at >= began + 0.05
    wd.rearm()  # fired: nothing armed
    assert alarm.handle is None
    wd2 = Watchdog(make(loop.time(), connect_s=5.0), me, alarm)
    wd2.rearm()
    assert alarm.handle is not None
    wd2.stop()
    assert alarm.handle is None


@pytest.mark.parametrize("earlier_rearms_first", [False, True])
async def test_a_stopped_watchdog_armed_again_takes_a_timer_of_its_own(
    earlier_rearms_first: bool,
) -> None:
    """Re-armed after it stopped while the connection's next request has the alarm (and,
    the other way round, made while an earlier one re-armed it): each is watched on its own
    deadline."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    alarm = Alarm(loop, kept=True)
    stopped, made = asyncio.Event(), asyncio.Event()

    async def earlier() -> tuple[TimeoutKind | None, float]:
        me = asyncio.current_task()
        assert me is not None
        wd = Watchdog(make(began, connect_s=0.1), me, alarm)
        wd.rearm()
        wd.stop()
        stopped.set()
        if not earlier_rearms_first:
            await made.wait()
        return await _fired_within(wd, 2)  # `with` arms it again

    async def later() -> tuple[TimeoutKind | None, float]:
        me = asyncio.current_task()
        assert me is not None
        await stopped.wait()
        await asyncio.sleep(0)  # (the earlier one re-arms here, if first)
        wd = Watchdog(make(began, connect_s=0.05), me, alarm)
        made.set()
        return await _fired_within(wd, 2)

    (kind1, at1), (kind2, at2) = await asyncio.gather(earlier(), later())
    assert kind1 is kind2 is TimeoutKind.CONNECT
    assert at1 >= began + 0.1 and at2 >= began + 0.05


# --- a stream's first content ------------------------------------------------------------------


async def _streaming_fires(
    first_token_s: float | None, idle_s: float, armed_s: float | None
) -> tuple[TimeoutKind | None, float, int]:
    """A stream whose timer is armed `armed_s` from now (None: not armed) gets its first
    content now, and none after: the kind that fires, after how long, and how many times
    the earliest deadline was computed when the content came."""
    loop = asyncio.get_running_loop()
    d = make(loop.time(), first_token_s=first_token_s, idle_s=idle_s)
    task = asyncio.current_task()
    assert task is not None
    wd = Watchdog(d, task)
    computed = 0
    async with asyncio.timeout(2):  # a deadline that never fires fails here
        try:
            with wd:
                d.response_started(loop.time(), sse=True)
                wd._alarm.cancel()
                if armed_s is not None:
                    wd._alarm.arm(loop.time() + armed_s)
                now = loop.time()
                d.content(now)
                with mock.patch.object(
                    Deadlines, "next", autospec=True, side_effect=Deadlines.next
                ) as nxt:
                    wd.streaming(now)
                computed = nxt.call_count
                started = loop.time()
                await loop.create_future()  # only a cancellation ends this
        except asyncio.CancelledError:
            return wd.consume(), loop.time() - started, computed
    return None, 0.0, computed


async def test_first_content_keeps_a_timer_armed_before_its_idle_deadline() -> None:
    """The timer rings (0.02 s) before the idle deadline (0.1 s): it stands, no deadline is
    computed when the content comes, and idle fires on time (the early timer re-arms)."""
    kind, after, computed = await _streaming_fires(first_token_s=5, idle_s=0.1, armed_s=0.02)
    assert (kind, computed) == (TimeoutKind.IDLE, 0)
    assert 0.08 <= after < 1.0


@pytest.mark.parametrize("armed_s", [5.0, None])
async def test_first_content_arms_an_idle_deadline_sooner_than_the_timer(
    armed_s: float | None,
) -> None:
    """The timer is armed for the first token (5 s), or not at all (first_token_s off): the
    idle deadline (0.05 s) is sooner, so the watchdog re-arms for it when the content comes."""
    kind, after, computed = await _streaming_fires(
        first_token_s=None if armed_s is None else 5, idle_s=0.05, armed_s=armed_s
    )
    assert (kind, computed) == (TimeoutKind.IDLE, 1)
    assert 0.04 <= after < 1.0
