"""What an exchange leaves for the engines to stop, and where it gives an attempt up.

A closed socket stops most upstreams; where it does not (an engine behind a buffering proxy,
a Responses `background: true` job), proxy.engines sends the engine's own abort or cancel,
off the request's path. The exchange keeps each attempt as it was sent (its target, and the
name its engine runs it under) until the attempt ends: `_abandon` is the one place an attempt
is given up, and `_stop_background_work` what is left to stop once the request is over.

A base of `relay.Exchange` (through `attempt_failures.AttemptFailures`), above `Downstream`:
one more slot, no instance dict.
"""

from __future__ import annotations

from proxy.admission import TargetPlan
from proxy.attempts import Attempt, AttemptResult
from proxy.downstream import Downstream
from proxy.engines import Named

# One attempt as sent: what `_abandon` tells its engine to stop.
Sent = tuple[Attempt, TargetPlan, Named]


class EngineWork(Downstream):
    """The exchange's attempts as sent, and giving them up (the base of `relay.Exchange`)."""

    __slots__ = ("_sent",)

    _sent: tuple[Sent, ...]

    def _abandon(
        self, attempt: Attempt, why: str, result: AttemptResult = AttemptResult.ABANDONED
    ) -> None:
        """THE place where hangup gives up on an attempt that may still be running upstream
        (client gone, a request deadline, a per-attempt deadline before the next target, a
        hedge loser). Its socket is closed by the unwinding `finally` around the attempt in
        `_attempts` (a racer's own, for a hedge); an engine abort (naming the request to the
        engine) belongs here: proxy.engines sends it, off the request's path. `result`:
        TIMEOUT for a per-attempt deadline, so the circuit and the record count it as one."""
        attempt.end(result, self.loop.time(), why)
        sent = self._take_sent(attempt)
        if sent is not None and self.plan is not None:
            self.state.aborts.abandon(self.record, self.plan, *sent)

    def _take_sent(self, attempt: Attempt) -> tuple[TargetPlan, Named] | None:
        """The attempt's target and engine name, forgotten (None: not sent, or given up)."""
        for entry in self._sent:
            if entry[0] is attempt:
                self._sent = tuple(e for e in self._sent if e is not entry)
                return entry[1], entry[2]
        return None

    async def _stop_background_work(self) -> None:
        """The request is over and its upstream socket closed by now. Where that does not stop
        the work, proxy.engines does, off this request's path: a Responses `background: true`
        job is cancelled; an attempt not given up through `_abandon` (the client's socket
        failed on a write) is aborted at its engine."""
        plan, tracker = self.plan, self.tracker
        if plan is None:
            return
        if plan.facts.background and plan.facts.stream:
            target = self.target if self.target is not None else plan.targets[0]
            response_id = tracker.response_id if tracker is not None else None
            self.state.aborts.cancel_background(self.record, plan, target, response_id)
            return
        if self.record.attempts:
            sent = self._take_sent(self.record.attempts[-1])
            if sent is not None:
                self.state.aborts.abandon(self.record, plan, *sent)
