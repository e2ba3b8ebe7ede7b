"""What each upstream attempt of a request costs, and which of it was waste.

A request may make several attempts (retries, fallbacks, a hedge raced beside a slow first
token, the continuation of a cut stream). Each attempt the provider bills is priced on its own:
its prompt (reported, tokenized or estimated) plus the completion tokens it generated, at the
price of the model sent to its target, under its upstream's billing policy (proxy/billing.py).
The request's usage and cost are the sums. Attempts whose output never reached the client are
waste, by reason: a hedge race's loser (`hedge`), an attempt that failed before content and
was followed by another target (`failover`). Pure functions of the finished record; see
docs/accounting.md, "Attempts: usage, waste and what hanging up on a loser saves".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.attempts import Attempt, AttemptResult
from proxy.outcome import AttemptBill, Outcome, RequestRecord, Usage, Waste

__all__ = [
    "WASTE_REASONS",
    "answering_index",
    "attempt_usage",
    "counts_of",
    "is_billed",
    "sum_usage",
]

WASTE_REASONS: Final = ("hedge", "failover")  # a metric label: a closed set
HEDGE_LOSER: Final = "hedge loser"  # the error `race` abandons a loser with (proxy/hedging.py)

# Never reached the upstream: nothing to bill.
_NOT_SENT: Final = frozenset({AttemptResult.SKIPPED, AttemptResult.CONNECT_ERROR})
# Closed before any response byte or with no HTTP answer: the upstream answered nothing, and
# nothing is billed (the same rule as a request that ends `upstream_error` before an answer).
_NO_ANSWER: Final = frozenset({AttemptResult.RESET, AttemptResult.INVALID_RESPONSE})
# Failed before its content reached the client, after the upstream took the request.
_FAILED_EARLY: Final = frozenset({AttemptResult.TIMEOUT, AttemptResult.STREAM_ERROR})
_COUNTED_ENDPOINTS: Final = frozenset(
    {"chat.completions", "completions", "responses", "embeddings"}
)


def is_billed(attempt: Attempt) -> bool:
    """The provider may bill this attempt: it took the request and did not refuse it. An error
    status (4xx, 5xx) is not billed, nor an attempt that never got an answer's first byte
    because the connection failed; a timeout or an attempt hangup abandoned is (the upstream
    had the prompt and may have been generating)."""
    if attempt.result in _NOT_SENT:
        return False
    if attempt.status is not None:
        return attempt.status < 400
    return attempt.result not in _NO_ANSWER


def waste_reason(record: RequestRecord, index: int) -> str | None:
    """Why attempt `index`'s output never reached the client, or None if it is not waste."""
    attempt = record.attempts[index]
    if attempt.delivered or not is_billed(attempt):
        return None
    if attempt.error == HEDGE_LOSER:
        return "hedge"
    if attempt.result in _FAILED_EARLY and any(
        a.result not in _NOT_SENT for a in record.attempts[index + 1 :]
    ):
        return "failover"
    return None


def answering_index(record: RequestRecord) -> int | None:
    """The attempt whose answer the client got (or was getting): the last one whose content
    was delivered, else the last one that did not lose a hedge race."""
    attempts = record.attempts
    for i in range(len(attempts) - 1, -1, -1):
        if attempts[i].delivered:
            return i
    for i in range(len(attempts) - 1, -1, -1):
        if attempts[i].error != HEDGE_LOSER:
            return i
    return None


def attempt_usage(record: RequestRecord, index: int) -> Usage:
    """The tokens the provider bills for one attempt: its own counts where its answer had them,
    else the prompt estimate (a continuation's prompt also holds the text it continues) and
    the completion tokens it was seen to generate; the prompt counted by a tokenizer applies to
    attempts that sent the original body to the target it was counted for."""
    attempt = record.attempts[index]
    if not is_billed(attempt):
        return Usage()
    seen = attempt.usage
    if seen is not None:
        # A copy of the counts as seen; whether a tokenizer counted the prompt is decided below.
        usage = counts_of(seen)
    elif record.outcome is not Outcome.INTERNAL_ERROR and record.endpoint in _COUNTED_ENDPOINTS:
        usage = Usage(
            prompt_tokens=record.prompt_estimate,
            completion_tokens=attempt.tokens_generated,
            prompt_estimated=True,
            completion_estimated=record.endpoint != "embeddings",
        )
    else:
        return Usage()
    if usage.prompt_estimated and attempt.reason == "continue":
        # The continuation's request is the original plus the assistant text it continues.
        usage.prompt_tokens += sum(
            a.tokens_generated for a in record.attempts[:index] if a.delivered
        )
    elif usage.prompt_estimated and record.prompt_tokenized is not None:
        primary = record.attempts[0]
        if (attempt.upstream, attempt.model) == (primary.upstream, primary.model):
            usage.prompt_tokens = record.prompt_tokenized
            usage.prompt_estimated, usage.prompt_tokenized = False, True
    return usage


def sum_usage(parts: list[Usage]) -> Usage:
    """The request's usage: the sum of its attempts'. A figure is flagged estimated if a part of
    it that holds tokens was (or every part was), tokenized if none was estimated and some part
    was tokenized. A hedge loser's estimated 0 beside a reported answer leaves it reported."""
    total = Usage()
    tokenized = False
    completion_estimated = True  # every part's was (or there is none)
    for u in parts:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.cached_tokens += u.cached_tokens
        total.reasoning_tokens += u.reasoning_tokens
        if u.prompt_estimated and u.prompt_tokens > 0:
            total.prompt_estimated = True
        if u.completion_estimated and u.completion_tokens > 0:
            total.completion_estimated = True
        tokenized = tokenized or u.prompt_tokenized
        completion_estimated = completion_estimated and u.completion_estimated
    total.prompt_tokenized = not total.prompt_estimated and tokenized
    total.completion_estimated = total.completion_estimated or completion_estimated
    return total


def counts_of(usage: Usage) -> Usage:
    """A copy of `usage`'s counts and estimate flags, not tokenized (`dataclasses.replace`
    with `prompt_tokenized=False`, without its per-call walk over the fields: ~2 us a
    request; tests/test_bills.py checks the two agree on every field). Positional: keyword
    arguments to a dataclass's `__init__` cost ~0.5 us more."""
    return Usage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_tokens,
        usage.reasoning_tokens,
        usage.prompt_estimated,
        usage.completion_estimated,
    )


def add_waste(wastes: dict[str, Waste], reason: str, bill: AttemptBill) -> None:
    waste = wastes.setdefault(reason, Waste())
    waste.attempts += 1
    waste.prompt_tokens += bill.usage.prompt_tokens
    waste.completion_tokens += bill.usage.completion_tokens
    waste.tokens_saved += bill.tokens_saved
    waste.usd = _add(waste.usd, bill.used_usd)
    waste.saved_usd = _add(waste.saved_usd, bill.saved_usd)


def _add(total: float | None, amount: float | None) -> float | None:
    if amount is None:
        return total
    return amount if total is None else total + amount


def bill_attempts(
    record: RequestRecord,
    *,
    policy: Callable[[Attempt], str],
    price: Callable[[Attempt, Usage], float | None],
    output_price: Callable[[Attempt], float | None],
    expected_tokens: Callable[[], int],
) -> None:
    """Put an `AttemptBill` on every attempt and the waste by reason on the record.

    policy: the attempt's upstream's billing policy; price: USD of a usage at the attempt's
    model price (None: unpriced); output_price: USD per completion token of its model;
    expected_tokens: how long an answer is expected to be (the savings estimator's figure),
    for what a hedge loser did not generate; asked only when there is one (it sorts history)."""
    wastes: dict[str, Waste] = {}
    record.waste = wastes
    for i, attempt in enumerate(record.attempts):
        usage = attempt_usage(record, i)
        billing = policy(attempt)
        bill = AttemptBill(usage=usage, billing=billing)
        if usage.total_tokens > 0:
            bill.used_usd = price(attempt, usage)
        bill.waste = waste_reason(record, i)
        if bill.waste == "hedge" and billing != "full":
            # Closed before it generated the rest: compute saved everywhere, dollars only
            # where its bill stops. Under "full" the provider generates (and bills) it anyway.
            bill.tokens_saved = max(0, expected_tokens() - attempt.tokens_generated)
            per_token = output_price(attempt)
            if per_token is not None:
                bill.saved_usd = bill.tokens_saved * per_token if billing == "stops" else 0.0
        attempt.bill = bill
        if bill.waste is not None:
            add_waste(wastes, bill.waste, bill)
