"""Whether an upstream's answer is a failure the failover policy moves past (another attempt,
here or on the next target) or the client's answer, relayed as it is.

The status decides, with two refinements: a 429's Retry-After goes to the policy, and a 400
is read (up to `ERROR_BODY_CAP`) when a long-context target could still take the request, to
learn whether it said the context was too long.
"""

from __future__ import annotations

import asyncio

from proxy.attempts import Attempt, AttemptResult
from proxy.errors import ProxyError, UpstreamFailed
from proxy.outcome import RequestRecord
from proxy.resilience.classify import ERROR_BODY_CAP, error_code, retry_after_s, status_result
from proxy.resilience.policy import Decision, Failure, Step
from proxy.targets import Chooser
from proxy.upstream import UpstreamResponse

# The statuses `check_status` answers with no body read and nothing decided (not a failure,
# not a 400 that may name a too-long context): decided once, from the same rules, so that
# `_attempts` skips its coroutine for them (almost every answer: 200). Anything else,
# including a status outside 100-599, goes through `check_status`.
RELAYED_AS_IS = frozenset(
    status for status in range(100, 600) if status != 400 and status_result(status) is None
)


class PolicyFailed(Exception):
    """An attempt's answer was a failure and the policy already chose the next step."""

    def __init__(self, failure: Failure, error: ProxyError, decision: Decision) -> None:
        super().__init__(error.message)
        self.failure, self.error, self.decision = failure, error, decision


async def check_status(
    chooser: Chooser,
    record: RequestRecord,
    index: int,
    attempt: Attempt,
    upstream: UpstreamResponse,
) -> bytes:
    """Raise `PolicyFailed` when this answer (of target `index`) is a failure the policy moves
    past; else return the body bytes read to classify it (to be relayed first), usually none."""
    plan = chooser.plan
    status = upstream.status
    result = status_result(status)
    code: str | None = None
    prefix = b""
    if status == 400 and any(t.target.long_context for t in plan.targets[index + 1 :]):
        prefix = await read_error_body(upstream)
        code = error_code(prefix)
        if code is not None:
            result = AttemptResult.CLIENT_ERROR
    if result is None:
        return prefix
    retry_after = retry_after_s(upstream.headers) if status == 429 else None
    failure = Failure(result, status, retry_after, code)
    retries_here = sum(
        1 for a in record.attempts if a.upstream == attempt.upstream and a.reason == "retry"
    )
    decision = chooser.decide(index, retries_here, failure)
    if decision.step is Step.GIVE_UP:
        return prefix  # the upstream's own answer is the client's
    attempt.end(result, asyncio.get_running_loop().time(), f"upstream answered {status}")
    raise PolicyFailed(failure, UpstreamFailed(f"upstream answered {status}"), decision)


async def read_error_body(upstream: UpstreamResponse) -> bytes:
    body = bytearray()
    while len(body) < ERROR_BODY_CAP:
        chunk = await upstream.read()
        if not chunk:
            break
        body += chunk
    return bytes(body)
