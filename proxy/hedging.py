"""Hedging (opt-in per route, streams): when an attempt has produced no content token after
`hedge_after_s`, the next target is started in parallel; the first content token wins and the
other attempt is abandoned at once, its socket closed in the same loop step.

Each racer runs in its own task up to its first content event, holding what it read; the
winner's held bytes are replayed to the relay, which then streams it like any attempt. A loser's
generated tokens stay on its `Attempt` (`tokens_generated`, `delivered` False): the record's
hedging waste. The relay owns the request: this module only runs the race it is asked to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from proxy.admission import Plan
from proxy.attempts import Attempt, AttemptResult
from proxy.engines import Named
from proxy.errors import UpstreamFailed
from proxy.resilience.classify import status_result
from proxy.seal import attempt_closed
from proxy.sse import SSEDecoder
from proxy.sse_stream import HOLD_CAP, held_too_much
from proxy.upstream import OpenAttempt, UpstreamResponse, Upstreams
from proxy.upstream_errors import AttemptFailed
from proxy.usage import EventKind, StreamUsageTracker


class Replay(UpstreamResponse):
    """An upstream response whose first chunks were already read: they come out first."""

    __slots__ = ("_held",)

    def __init__(self, inner: UpstreamResponse, held: list[bytes]) -> None:
        super().__init__(inner._response, inner._upstream)
        self._held = held

    async def read(self) -> bytes:
        if self._held:
            return self._held.pop(0)
        return await super().read()

    @property
    def content(self) -> None:
        return None  # every read goes through `read`, which first gives what the race read


@dataclass(slots=True)
class Started:
    """A racer that reached its first content token (or a final answer)."""

    index: int
    attempt: Attempt
    opened: OpenAttempt
    response: UpstreamResponse


class Racer:
    """One target in the race, run as a task up to its first content token."""

    def __init__(
        self,
        upstreams: Upstreams,
        method: str,
        plan: Plan,
        index: int,
        attempt: Attempt,
        named: Named,
        on_headers_sent: Callable[[], None],
    ) -> None:
        """`named`: the attempt's body and headers as its engine is to know it (the relay names
        every attempt, so that a loser given up through its `abandon` is aborted there too)."""
        self.index, self.attempt = index, attempt
        target = plan.targets[index]
        self.plan = plan
        self.opened = upstreams.attempt(
            target.upstream_name,
            method,
            target.url,
            headers=named.headers,
            body=named.body,
            on_headers_sent=on_headers_sent,
            stream=plan.facts.stream,
        )
        self.tracker = StreamUsageTracker(plan.facts)
        # Called in the very loop step this racer sees its first content token (set by race).
        self.on_first_token: Callable[[Racer], None] = lambda racer: None

    async def run(self) -> Started:
        loop = asyncio.get_running_loop()
        attempt = self.attempt
        try:
            upstream = await self.opened.start()
            attempt.headers_at, attempt.status = loop.time(), upstream.status
            result = status_result(upstream.status)
            if result is not None:
                raise AttemptFailed(result, UpstreamFailed(f"upstream answered {upstream.status}"))
            if not upstream.event_stream or upstream.status >= 300:
                return Started(self.index, attempt, self.opened, upstream)
            held = await self._until_first_token(upstream)
            return Started(self.index, attempt, self.opened, Replay(upstream, held))
        except BaseException as exc:
            # A failure or a cancellation (lost the race, client gone): close it here, now.
            if isinstance(exc, AttemptFailed):
                attempt.end(exc.result, loop.time(), exc.error.message)
            attempt_closed(attempt, self.tracker)
            await self.opened.close()
            attempt.closed_at = loop.time()
            raise

    async def _until_first_token(self, upstream: UpstreamResponse) -> list[bytes]:
        loop = asyncio.get_running_loop()
        decoder, tracker, held = SSEDecoder(), self.tracker, []
        held_bytes = 0
        while True:
            chunk = await upstream.read()
            held.append(chunk)
            held_bytes += len(chunk)
            if held_bytes > HOLD_CAP:
                raise held_too_much(self.attempt.upstream)
            for event in decoder.feed(chunk) if chunk else decoder.flush():
                kind = tracker.feed(event)
                if kind is EventKind.CONTENT or kind is EventKind.DONE:
                    if kind is EventKind.CONTENT:
                        self.attempt.first_token_at = loop.time()
                    self.on_first_token(self)
                    return held
                if kind is EventKind.ERROR:
                    raise AttemptFailed(
                        AttemptResult.STREAM_ERROR,
                        UpstreamFailed(
                            f'upstream "{self.attempt.upstream}" failed the stream before any '
                            "content"
                        ),
                    )
            if not chunk:
                raise AttemptFailed(
                    AttemptResult.STREAM_ERROR,
                    UpstreamFailed(
                        f'upstream "{self.attempt.upstream}" ended the stream before any content'
                    ),
                )


async def race(
    first: Racer,
    hedge_after_s: float,
    make_hedge: Callable[[], Racer | None],
    abandon: Callable[[Attempt, str], None],
) -> Started:
    """Run `first`; if it has no content token after `hedge_after_s`, start `make_hedge()` too.
    Return the first racer to reach its first content token; the other is abandoned and its
    socket closed before this returns. If every racer fails, the last failure is raised (the
    relay's policy then decides, from the highest target index tried: `last_index`)."""
    racers: list[Racer] = []
    won: list[Racer] = []

    def hang_up_on_the_others(winner: Racer) -> None:
        # The loser is cut in the same loop step the winner's first token is read, before any
        # task switch, not after the race's own bookkeeping.
        if won:
            return
        won.append(winner)
        for racer in racers:
            if racer is not winner:
                abandon(racer.attempt, "hedge loser")
                racer.opened.close_now()

    def enter(racer: Racer) -> asyncio.Task[Started]:
        racer.on_first_token = hang_up_on_the_others
        racers.append(racer)
        return asyncio.create_task(racer.run())

    tasks: dict[asyncio.Task[Started], Racer] = {enter(first): first}
    winner: asyncio.Task[Started] | None = None
    failure: BaseException | None = None
    try:
        done, pending = await asyncio.wait(tasks, timeout=hedge_after_s)
        if not done:
            hedge = make_hedge()
            if hedge is not None:
                tasks[enter(hedge)] = hedge
        pending = set(tasks) - done
        while True:
            for task in done:
                exc = task.exception()
                if exc is None and (not won or tasks[task] is won[0]):
                    winner = task
                    break
                if exc is not None:
                    failure = exc
            if winner is not None or not pending:
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        losers = [t for t in tasks if t is not winner and not t.done()]
        for task in losers:
            abandon(tasks[task].attempt, "hedge loser" if winner is not None else "abandoned")
            task.cancel()
        others = [t for t in tasks if t is not winner]
        if others:
            # Each loser closes its own socket as its cancellation unwinds; wait for that (one
            # loop step) and collect every loser's end (a failure is expected, not an error).
            # A cancellation of this task while waiting still propagates.
            await asyncio.gather(*others, return_exceptions=True)
    if winner is None:
        assert failure is not None
        raise failure
    return winner.result()


def last_index(racers: list[Racer]) -> int:
    return max(r.index for r in racers)
