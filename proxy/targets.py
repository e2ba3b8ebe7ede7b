"""Which target next, for one request: the pure policy (`proxy.resilience`) fed with this
request's targets, its remaining budget and the upstreams' circuit breakers; and where to
continue a cut stream."""

from __future__ import annotations

import asyncio
from collections.abc import Generator

from proxy.admission import Plan, TargetPlan
from proxy.attempts import Attempt
from proxy.resilience.circuit import Circuit, Circuits
from proxy.resilience.continuation import continuation_body, continuation_target
from proxy.resilience.continuation_steps import IN_STEPS_FROM, Steps, continuation_in_steps
from proxy.resilience.policy import Decision, Failure, RetryRules, TargetView, next_step

Resume = tuple[int, TargetPlan]  # the target to continue on, and its request
# A large body's continuation, built a step at a time (`proxy.edge.body.in_steps`).
ResumeSteps = Generator[None, None, Resume | None]


class Chooser:
    __slots__ = ("_circuits", "_loop", "plan")

    def __init__(self, plan: Plan, circuits: Circuits, loop: asyncio.AbstractEventLoop) -> None:
        self.plan, self._circuits, self._loop = plan, circuits, loop

    def circuit(self, upstream: str) -> Circuit:
        """The upstream's breaker (created with this route's settings on first use)."""
        options = self.plan.route.options
        return self._circuits.get(upstream, options.circuit_failures, options.circuit_cooldown_s)

    def first(self) -> int:
        """The primary, unless its circuit is open and a later target's is not; when every
        circuit is open, the primary all the same (skipping would make the error certain)."""
        if len(self.plan.targets) == 1:  # (most routes: the primary, whatever its circuit)
            return 0
        return self.next_available(-1) or 0

    def next_available(self, index: int) -> int | None:
        """The first target after `index` whose circuit lets a request through."""
        targets = self.plan.targets
        if index + 1 >= len(targets):  # none after it (the last, or a route's only one)
            return None
        now = self._loop.time()
        for j in range(index + 1, len(targets)):
            if self.circuit(targets[j].upstream_name).would_allow(now):
                return j
        return None

    def can_switch(self, index: int) -> bool:
        """Would a failure of target `index` before content have somewhere else to go?"""
        # (None after the last target, or a route's only one: `next_available`'s first test)
        return index + 1 < len(self.plan.targets) and self.next_available(index) is not None

    def continuation(
        self, index: int, last: Attempt, delivered_text: str, delivered_tokens: int
    ) -> Resume | ResumeSteps | None:
        """The target (and its request) to continue a chat stream cut after content: the same
        target first if it accepts an assistant prefix, else the next available one that does;
        never one whose continuation just failed. None: end the stream in band as usual.

        For a large body whose admission told whether it can be continued, the request is
        not built here: the steps that build it are returned, not started (so that asking
        whether a stall is resumable costs no parse)."""
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
        if len(base.body) >= IN_STEPS_FROM and plan.continuable is not None:
            if not plan.continuable or not delivered_text:
                return None  # what `continuation_body` would say
            steps = continuation_in_steps(base.body, delivered_text, style, delivered_tokens)
            return _resumed(j, base, steps)
        body = continuation_body(base.body, delivered_text, style, delivered_tokens)
        if body is None:
            return None
        return j, TargetPlan(base.target, base.url, base.headers, body, base.model)

    def decide(self, index: int, retries_here: int, failure: Failure) -> Decision:
        # The policy's views of the targets and rules are made here, after a failure, not
        # kept for every request (~200 B under every held stream, for a rare event).
        now, plan = self._loop.time(), self.plan
        options = plan.route.options
        return next_step(
            failure,
            targets=[TargetView(t.upstream_name, t.target.long_context) for t in plan.targets],
            index=index,
            retries_here=retries_here,
            rules=RetryRules(
                options.max_retries, options.retry_backoff_s, options.retry_after_max_s
            ),
            remaining_s=self.plan.deadlines.retry_window(now),
            available=lambda name: self.circuit(name).would_allow(now),
        )


def _resumed(j: int, base: TargetPlan, steps: Steps) -> ResumeSteps:
    body = yield from steps
    if body is None:
        return None
    return j, TargetPlan(base.target, base.url, base.headers, body, base.model)
