"""Which target next, for one request: the pure policy (`proxy.resilience`) fed with this
request's targets, its remaining budget and the upstreams' circuit breakers; and where to
continue a cut stream."""

from __future__ import annotations

import asyncio

from proxy.admission import Plan, TargetPlan
from proxy.attempts import Attempt
from proxy.resilience.circuit import Circuit, Circuits
from proxy.resilience.continuation import continuation_body, continuation_target
from proxy.resilience.policy import Decision, Failure, RetryRules, TargetView, next_step


class Chooser:
    __slots__ = ("_circuits", "_loop", "_rules", "_views", "plan")

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

    def continuation(
        self, index: int, last: Attempt, delivered_text: str, delivered_tokens: int
    ) -> tuple[int, TargetPlan] | None:
        """The target (and its request) to continue a chat stream cut after content: the same
        target first if it accepts an assistant prefix, else the next available one that does;
        never one whose continuation just failed. None: end the stream in band as usual."""
        plan, facts = self.plan, self.plan.facts
        if (
            not plan.route.options.continue_cut_streams
            or facts.endpoint != "chat.completions"
            or not facts.stream
        ):
            return None
        targets = plan.targets
        if last.reason == "continue" and not last.delivered:
            index += 1  # that target refused or failed the continuation: never ask it again
            if index >= len(targets):
                return None
        now = self._loop.time()
        j = continuation_target(
            [t.target.upstream.assistant_prefix for t in targets],
            [t.upstream_name for t in targets],
            index,
            lambda name: self.circuit(name).would_allow(now),
        )
        if j is None:
            return None
        base = targets[j]
        style = base.target.upstream.assistant_prefix
        body = continuation_body(base.body, delivered_text, style, delivered_tokens)
        if body is None:
            return None
        return j, TargetPlan(base.target, base.url, base.headers, body, base.model)

    def decide(self, index: int, retries_here: int, failure: Failure) -> Decision:
        now = self._loop.time()
        return next_step(
            failure,
            targets=self._views,
            index=index,
            retries_here=retries_here,
            rules=self._rules,
            remaining_s=self.plan.deadlines.retry_window(now),
            available=lambda name: self.circuit(name).would_allow(now),
        )
