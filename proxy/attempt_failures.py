"""What an exchange does with an attempt that failed: its end recorded, a deadline's cancel
told from the client's (and a per-attempt deadline's handed to the next target), a stream cut
after content continued on another target, the back-off before a retry. Which target next is
`targets.Chooser`'s, as `proxy.resilience` directs; the loop of attempts is relay.py's.

A base of `relay.Exchange`, between it and `EngineWork`: the two slots its methods keep, no
instance dict.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.admission import Plan, TargetPlan
from proxy.attempts import Attempt, AttemptResult
from proxy.edge.body import in_steps
from proxy.engine_work import EngineWork
from proxy.errors import GatewayTimeout, ProxyError
from proxy.outcome import TimeoutKind
from proxy.resilience.policy import Failure
from proxy.targets import Chooser, Resume, ResumeSteps
from proxy.timeouts import Deadlines
from proxy.upstream_errors import AttemptFailed
from proxy.watchdog import Watchdog

# The relay's logger: these lines are part of its account of a request, under the name they had.
log = logging.getLogger("hangup.relay")

# Deadlines that belong to one attempt: when one fires, another target may still answer.
_PER_ATTEMPT = frozenset({TimeoutKind.CONNECT, TimeoutKind.HEADERS, TimeoutKind.FIRST_TOKEN})
_MAX_CONTINUATIONS = 2  # per request: a stream that keeps breaking ends in band


class _DeadlineFired(Exception):
    """A request deadline fired (its cancellation already withdrawn): answer with a timeout."""

    def __init__(self, kind: TimeoutKind) -> None:
        super().__init__(kind.value)
        self.kind = kind


class AttemptFailures(EngineWork):
    """A failed attempt's handling (the base of `relay.Exchange`)."""

    __slots__ = ("_continuations", "chooser")

    chooser: Chooser  # set when the attempts begin (`Exchange._attempts`)
    _continuations: int

    def _attempt_failed(self, attempt: Attempt, exc: AttemptFailed) -> tuple[Failure, ProxyError]:
        result = AttemptResult.CUT if self.content_sent else exc.result
        attempt.end(result, self.loop.time(), exc.error.message)
        return Failure(result, content_sent=self.content_sent), exc.error

    def _attempt_timed_out(
        self, plan: Plan, index: int, attempt: Attempt, watchdog: Watchdog
    ) -> tuple[Failure, ProxyError, TimeoutKind]:
        """The attempt was cancelled (called in the `except` that caught it): the client's
        cancel is re-raised; a deadline's is a failure when the next target may still answer
        in time, otherwise `_DeadlineFired`."""
        kind = watchdog.consume()
        if kind is None:
            self._abandon(attempt, "client gone")
            raise  # the CancelledError being handled
        # A stall after content may be resumed elsewhere (continue_cut_streams).
        resumable = kind is TimeoutKind.IDLE and self._continuation(plan, index) is not None
        # A plain answer whose held body stalled: nothing reached the client yet.
        held_body = kind is TimeoutKind.IDLE and self.response is None
        deadlines = plan.deadlines
        if not resumable and (
            (kind not in _PER_ATTEMPT and not held_body)
            or self.content_sent
            or deadlines.client_headers_expired(self.loop.time())
        ):
            self._abandon(attempt, f"{kind.value} deadline")
            raise _DeadlineFired(kind) from None
        # Given up for the next target: its engine may still be generating it.
        self._abandon(attempt, f"{kind.value} deadline", AttemptResult.TIMEOUT)
        watchdog.resume()  # the next attempt (or the answer) is watched again
        failure = Failure(AttemptResult.TIMEOUT, content_sent=self.content_sent)
        retry = plan.route.options.sdk_retry
        error = GatewayTimeout(deadlines.describe(kind, plan.route.name), kind, retry=retry)
        return failure, error, kind

    async def _resumed(
        self, plan: Plan, index: int, attempt: Attempt
    ) -> tuple[int, TargetPlan | None]:
        """After a cut with content sent: the target and request to continue the answer on,
        or (index, None) to end it."""
        if attempt.first_token_at is not None:
            attempt.delivered = True  # its content is part of the client's answer
        resume = self._continuation(plan, index)
        if resume is not None and not isinstance(resume, tuple):
            resume = await in_steps(resume)  # a large body's, a step at a time
        if resume is None:
            return index, None
        self._continuations += 1
        log.info(
            "request %s: %s; continuing the answer on %s",
            self.record.request_id,
            attempt.describe(),
            resume[1].upstream_name,
        )
        return resume

    async def _back_off(self, deadlines: Deadlines, watchdog: Watchdog, delay_s: float) -> None:
        """Backing off: a client that leaves now cancels this sleep; nothing is open."""
        deadlines.backing_off()
        watchdog.rearm()
        backoff_at = self.loop.time()
        try:
            await asyncio.sleep(delay_s)
        finally:
            self.record.backoff_wait_s += self.loop.time() - backoff_at

    def _continuation(self, plan: Plan, index: int) -> Resume | ResumeSteps | None:
        """Where and how to continue a chat stream cut after content, if the route asks to
        (docs/resilience.md, "Continuing a cut stream"); None: end it in band as usual."""
        if self._continuations >= _MAX_CONTINUATIONS:
            return None
        attempts = self.record.attempts
        delivered = sum(a.tokens_generated for a in attempts if a.delivered)
        delivered += 0 if attempts[-1].delivered else self.delivered_tokens
        return self.chooser.continuation(
            index, attempts[-1], "".join(self.delivered_text or ()), delivered
        )
