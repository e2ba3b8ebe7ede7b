"""Which target next, and why (pure). See docs/resilience.md for the rules and their reasons.

The relay reports each failed attempt as a `Failure` and asks `next_step`. The answer is to try
the same target again after a delay, to move on to a later target, or to give up and answer
the client with this failure. Nothing here knows about sockets or time sources.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.attempts import AttemptResult
from proxy.resilience.classify import CONTENT_POLICY, CONTEXT_LENGTH, SAME_TARGET_STATUSES


class Step(enum.StrEnum):
    SAME = "same"  # the same target again, after `delay_s`
    NEXT = "next"  # target `index`
    GIVE_UP = "give_up"  # answer the client with this failure


@dataclass(frozen=True, slots=True)
class Failure:
    result: AttemptResult
    status: int | None = None
    retry_after_s: float | None = None
    error_code: str | None = None  # context_length_exceeded / content_policy (400s)
    content_sent: bool = False  # some of this attempt's content already reached the client


@dataclass(frozen=True, slots=True)
class TargetView:
    """What the policy needs to know of a target."""

    upstream: str
    long_context: bool = False


@dataclass(frozen=True, slots=True)
class RetryRules:
    max_retries: int = 0  # same-target retries of refusals (connect error, 429/502/503)
    backoff_s: float = 0.5  # first backoff; doubles per retry
    retry_after_max_s: float = 2.0  # a longer Retry-After moves on instead of waiting


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    index: int = 0  # the target to use (SAME: the current one)
    delay_s: float = 0.0
    why: str = ""


# Failures after which the upstream cannot have started the request: asking it again is safe.
_NOT_STARTED = frozenset({AttemptResult.CONNECT_ERROR})


def next_step(
    failure: Failure,
    *,
    targets: Sequence[TargetView],
    index: int,
    retries_here: int,
    rules: RetryRules,
    remaining_s: float | None,
    available: Callable[[str], bool] = lambda _: True,
) -> Decision:
    """The next move after `targets[index]` failed with `failure`.

    - Content already reached the client: give up (the relay ends the stream in band; a
      silent restart would duplicate or contradict what the client has).
    - A 400 is never sent to the same target again. `context_length_exceeded` goes on only to
      a later target marked `long_context`; any other 4xx (content policy included) is the
      answer.
    - A refusal the upstream did not start (connect error; 429/502/503) is retried on the same
      target while `max_retries` allows: 429 after its Retry-After when that is at most
      `retry_after_max_s` (else we move on at once), the others after the backoff.
    - Everything else that failed before content (reset or close before any byte, 500/504,
      a per-attempt deadline, a stream broken before content) moves on to the next target
      that is `available` (its circuit is not open), never to the same one.
    - Nothing left, or the wait would not fit the remaining budget: give up.
    """
    if failure.content_sent:
        return Decision(Step.GIVE_UP, why="content already reached the client")
    result = failure.result
    if result is AttemptResult.CLIENT_ERROR:
        if failure.error_code == CONTEXT_LENGTH:
            for j in range(index + 1, len(targets)):
                if targets[j].long_context and available(targets[j].upstream):
                    return Decision(Step.NEXT, j, why="context length: a long_context fallback")
            return Decision(Step.GIVE_UP, why="context length and no long_context fallback")
        if failure.error_code == CONTENT_POLICY:
            return Decision(Step.GIVE_UP, why="content policy refusals are the answer")
        return Decision(Step.GIVE_UP, why="a 4xx is the answer")
    same = _same_target(failure, retries_here, rules)
    if same is not None and (remaining_s is None or same.delay_s < remaining_s):
        return Decision(Step.SAME, index, same.delay_s, same.why)
    for j in range(index + 1, len(targets)):
        if available(targets[j].upstream):
            return Decision(Step.NEXT, j, why=f"{result.value} on {targets[index].upstream}")
    return Decision(Step.GIVE_UP, why="no target left")


def _same_target(failure: Failure, retries_here: int, rules: RetryRules) -> Decision | None:
    """A retry on the same target, when the failure allows one and retries are left."""
    result = failure.result
    if result is AttemptResult.RATE_LIMITED:
        wait = failure.retry_after_s
        if (
            wait is not None
            and wait <= rules.retry_after_max_s
            and retries_here < max(1, rules.max_retries)
        ):
            # The upstream said when: one wait of that length is honoured even with
            # max_retries 0, because it told us exactly what would work.
            return Decision(Step.SAME, delay_s=wait, why=f"429 with Retry-After {wait:g}s")
        if wait is not None:
            return None  # it asked for longer than we wait: move on now
    if retries_here >= rules.max_retries:
        return None
    refused = result in _NOT_STARTED or (
        failure.status is not None and failure.status in SAME_TARGET_STATUSES
    )
    if not refused:
        return None
    delay = rules.backoff_s * 2**retries_here
    return Decision(Step.SAME, delay_s=delay, why=f"{result.value}: retry after backoff")
