"""Hedging, as `relay.Exchange` runs it: an attempt slow to its first token raced against the
next target, and the winner relayed (docs/resilience.md, "Hedging"). The race itself is
proxy/hedging.py's; this is the exchange's side of it (its fields and methods: relay.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admission import Plan
from proxy.attempts import Attempt, AttemptResult
from proxy.hedging import Racer, last_index, race
from proxy.seal import attempt_closed
from proxy.watchdog import Watchdog

if TYPE_CHECKING:
    from proxy.relay import Exchange


def hedges(ex: Exchange, plan: Plan, index: int) -> bool:
    """Race this attempt against the next target (docs/resilience.md, "Hedging")?"""
    return (
        plan.route.options.hedge_after_s is not None
        and plan.facts.stream
        and ex.response is None
        and ex.chooser.can_switch(index)
    )


async def relay_hedged(
    ex: Exchange, plan: Plan, index: int, attempt: Attempt, watchdog: Watchdog
) -> web.StreamResponse:
    """Run `index` and, if it is slow to its first token, the next target in parallel;
    relay the one whose content comes first."""
    record, loop = ex.record, ex.loop
    hedge_after = plan.route.options.hedge_after_s
    assert hedge_after is not None

    method = ex.request.method

    def named_racer(j: int, attempt: Attempt) -> Racer:
        target = plan.targets[j]
        ex.state.attempt_starting(record, target.headers, attempt)
        named = ex.state.aborts.name_attempt(plan, target, record)
        ex._sent += ((attempt, target, named),)  # a loser is aborted by `_abandon`
        return Racer(ex.state.upstreams, method, plan, j, attempt, named, watchdog.headers_sent)

    racers = [named_racer(index, attempt)]

    def make_hedge() -> Racer | None:
        j = ex.chooser.next_available(index)
        if j is None:
            return None
        target = plan.targets[j]
        hedge = Attempt(target.upstream_name, target.model, loop.time(), "hedge")
        record.attempts.append(hedge)
        ex.chooser.circuit(target.upstream_name).allows(loop.time())
        racers.append(named_racer(j, hedge))
        return racers[-1]

    opened_at = loop.time()
    try:
        started = await race(racers[0], hedge_after, make_hedge, ex._abandon)
    finally:  # also when the race ends in an error, a deadline or a hang-up
        record.upstream_wait_s += loop.time() - opened_at
        ex._raced_to = last_index(racers)
        for racer in racers[1:]:
            circuit = ex.chooser.circuit(racer.attempt.upstream)
            circuit.report(racer.attempt.result or AttemptResult.ABANDONED, loop.time())
            ex.state.resilience_observed(plan.route.name, racer.attempt, circuit)
    ex._raced_to = None
    ex.target = plan.targets[started.index]
    winner = started.attempt
    try:
        return await ex._relay_response(
            plan, started.response, watchdog, winner, b"", can_switch=False
        )
    finally:
        await started.opened.close()
        winner.closed_at = record.upstream_closed_at = loop.time()
        attempt_closed(winner, ex.tracker)
