"""Which target next, for one request: the pure policy (`proxy.resilience`) fed with this
request's targets, its remaining budget and the upstreams' circuit breakers."""

from __future__ import annotations

import asyncio

from proxy.admission import Plan
from proxy.resilience.circuit import Circuit, Circuits
from proxy.resilience.policy import Decision, Failure, RetryRules, TargetView, next_step


class Chooser:
    def __init__(self, plan: Plan, circuits: Circuits, loop: asyncio.AbstractEventLoop) -> None:
        self.plan, self._circuits, self._loop = plan, circuits, loop
        options = plan.route.options
        self._views = [TargetView(t.upstream_name, t.target.long_context) for t in plan.targets]
        self._rules = RetryRules(
            options.max_retries, options.retry_backoff_s, options.retry_after_max_s
        )

    def circuit(self, upstream: str) -> Circuit:
        """The upstream's breaker (created with this route's settings on first use)."""
        options = self.plan.route.options
        return self._circuits.get(upstream, options.circuit_failures, options.circuit_cooldown_s)

    def first(self) -> int:
        """The primary, unless its circuit is open and a later target's is not; when every
        circuit is open, the primary all the same (skipping would make the error certain)."""
        return self.next_available(-1) or 0

    def next_available(self, index: int) -> int | None:
        """The first target after `index` whose circuit lets a request through."""
        now = self._loop.time()
        targets = self.plan.targets
        for j in range(index + 1, len(targets)):
            if self.circuit(targets[j].upstream_name).would_allow(now):
                return j
        return None

    def can_switch(self, index: int) -> bool:
        """Would a failure of target `index` before content have somewhere else to go?"""
        return self.next_available(index) is not None

    def decide(self, index: int, retries_here: int, failure: Failure) -> Decision:
        now = self._loop.time()
        return next_step(
            failure,
            targets=self._views,
            index=index,
            retries_here=retries_here,
            rules=self._rules,
            remaining_s=self.plan.deadlines.remaining(now),
            available=lambda name: self.circuit(name).would_allow(now),
        )
