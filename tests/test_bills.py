"""proxy/bills.py: which attempts are billed, which are waste, and how their usage adds up."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from proxy.attempts import Attempt, AttemptResult
from proxy.bills import (
    answering_index,
    attempt_usage,
    counts_of,
    is_billed,
    sum_usage,
    waste_reason,
)
from proxy.outcome import Outcome, RequestRecord, Usage


def attempt(
    result: AttemptResult,
    status: int | None = None,
    *,
    reason: str = "primary",
    error: str | None = None,
    delivered: bool = False,
    generated: int = 0,
    usage: Usage | None = None,
) -> Attempt:
    a = Attempt("up", "m", 0.0, reason, status=status, result=result, error=error)
    a.delivered, a.tokens_generated, a.usage = delivered, generated, usage
    return a


def record(*attempts: Attempt, outcome: Outcome = Outcome.COMPLETED) -> RequestRecord:
    rec = RequestRecord("r", "POST", "/v1/chat/completions", 0.0, 0.0)
    rec.endpoint, rec.outcome, rec.prompt_estimate = "chat.completions", outcome, 11
    rec.sent_upstream = True
    rec.attempts = list(attempts)
    return rec


@pytest.mark.parametrize(
    ("result", "status", "billed"),
    [
        (AttemptResult.OK, 200, True),
        (AttemptResult.CUT, 200, True),
        (AttemptResult.STREAM_ERROR, 200, True),
        (AttemptResult.TIMEOUT, None, True),  # the upstream had the prompt
        (AttemptResult.TIMEOUT, 200, True),
        (AttemptResult.ABANDONED, None, True),
        (AttemptResult.SKIPPED, None, False),
        (AttemptResult.CONNECT_ERROR, None, False),
        (AttemptResult.RESET, None, False),
        (AttemptResult.INVALID_RESPONSE, None, False),
        (AttemptResult.RATE_LIMITED, 429, False),
        (AttemptResult.SERVER_ERROR, 500, False),
        (AttemptResult.CLIENT_ERROR, 400, False),
        (AttemptResult.OK, 401, False),  # a refusal passed on as the answer
    ],
)
def test_billed_attempts(result: AttemptResult, status: int | None, billed: bool) -> None:
    assert is_billed(attempt(result, status)) is billed


def test_waste_reasons() -> None:
    loser = attempt(AttemptResult.ABANDONED, None, error="hedge loser")
    failed = attempt(AttemptResult.TIMEOUT, 200)
    winner = attempt(AttemptResult.OK, 200, reason="fallback", delivered=True)
    rec = record(loser, failed, winner)
    assert [waste_reason(rec, i) for i in range(3)] == ["hedge", "failover", None]
    # A timeout with nothing after it is the request's own end, not failover waste; nor is an
    # attempt abandoned because the client left.
    assert waste_reason(record(attempt(AttemptResult.TIMEOUT, 200)), 0) is None
    gone = record(attempt(AttemptResult.ABANDONED, 200, error="client gone"))
    assert waste_reason(gone, 0) is None
    # Nothing is waste that was not billed.
    refused = record(attempt(AttemptResult.SERVER_ERROR, 503), winner)
    assert waste_reason(refused, 0) is None


def test_answering_attempt_is_the_last_delivered_else_the_last_not_a_hedge_loser() -> None:
    cut = attempt(AttemptResult.CUT, 200, delivered=True)
    refused = attempt(AttemptResult.CLIENT_ERROR, 400, reason="continue")
    assert answering_index(record(cut, refused)) == 0
    primary_won = attempt(AttemptResult.ABANDONED, None, reason="primary")
    loser = attempt(AttemptResult.ABANDONED, None, reason="hedge", error="hedge loser")
    assert answering_index(record(primary_won, loser)) == 0
    assert answering_index(record()) is None


def test_a_continuations_estimated_prompt_holds_the_text_it_continues() -> None:
    cut = attempt(AttemptResult.CUT, 200, delivered=True, generated=5)
    cont = attempt(AttemptResult.CUT, 200, reason="continue", delivered=True, generated=3)
    rec = record(cut, cont, outcome=Outcome.UPSTREAM_ERROR)
    assert attempt_usage(rec, 0) == Usage(11, 5, prompt_estimated=True, completion_estimated=True)
    assert attempt_usage(rec, 1) == Usage(16, 3, prompt_estimated=True, completion_estimated=True)


def test_a_tokenized_prompt_applies_to_the_target_it_was_counted_for() -> None:
    primary = attempt(AttemptResult.ABANDONED, None, error="hedge loser")
    other = Attempt("backup", "b", 0.0, "hedge", status=200, result=AttemptResult.ABANDONED)
    rec = record(primary, other, outcome=Outcome.CLIENT_CANCELLED)
    rec.prompt_tokenized = 9
    assert attempt_usage(rec, 0).prompt_source.value == "tokenized"
    assert attempt_usage(rec, 0).prompt_tokens == 9
    assert attempt_usage(rec, 1).prompt_source.value == "estimated"


def test_sum_flags_a_figure_estimated_only_where_an_estimated_part_holds_tokens() -> None:
    reported = Usage(10, 16)
    loser = Usage(11, 0, prompt_estimated=True, completion_estimated=True)
    total = sum_usage([loser, reported])
    assert (total.prompt_tokens, total.completion_tokens) == (21, 16)
    assert (total.prompt_source.value, total.completion_source.value) == ("estimated", "reported")
    tokenized = Usage(9, 0, prompt_tokenized=True)
    assert sum_usage([tokenized, reported]).prompt_source.value == "tokenized"
    nothing = Usage(0, 0, prompt_estimated=True, completion_estimated=True)
    assert sum_usage([nothing]).completion_source.value == "estimated"


def test_counts_of_is_replace_without_tokenized() -> None:
    """`counts_of` copies every field of `Usage` but `prompt_tokenized` (a field added to
    `Usage` and not copied fails here)."""
    for flag in (False, True):
        values: dict[str, object] = {
            f.name: (flag if isinstance(f.default, bool) else i + 1)
            for i, f in enumerate(msgspec.structs.fields(Usage))
        }
        seen = Usage(**values)  # type: ignore[arg-type]
        copy = counts_of(seen)
        assert copy == msgspec.structs.replace(seen, prompt_tokenized=False)
        assert copy is not seen


def _sum_usage_by_definition(parts: list[Usage]) -> Usage:
    total = Usage(
        prompt_tokens=sum(u.prompt_tokens for u in parts),
        completion_tokens=sum(u.completion_tokens for u in parts),
        cached_tokens=sum(u.cached_tokens for u in parts),
        reasoning_tokens=sum(u.reasoning_tokens for u in parts),
    )
    total.prompt_estimated = any(u.prompt_estimated and u.prompt_tokens > 0 for u in parts)
    total.prompt_tokenized = not total.prompt_estimated and any(u.prompt_tokenized for u in parts)
    total.completion_estimated = any(
        u.completion_estimated and u.completion_tokens > 0 for u in parts
    ) or all(u.completion_estimated for u in parts)
    return total


def test_sum_usage_flags_every_combination() -> None:
    """The flags of a sum, over every combination of up to three parts with and without
    tokens, each flag on or off, as its docstring defines them."""
    kinds = [
        Usage(
            prompt_tokens=p,
            completion_tokens=c,
            cached_tokens=p // 2,
            reasoning_tokens=c // 3,
            prompt_estimated=pe,
            completion_estimated=ce,
            prompt_tokenized=pt,
        )
        for p, c in itertools.product((0, 4), (0, 3))
        for pe, ce, pt in itertools.product((False, True), repeat=3)
    ]
    for n in range(4):
        for parts in itertools.product(kinds, repeat=n):
            assert sum_usage(list(parts)) == _sum_usage_by_definition(list(parts)), parts
