"""`_needs_prompt_count`'s first look (the prompt reported for the request and each attempt:
no count needed) against a frozen copy of the function before it (`_reference`), on the
records tests/test_accounting_single.py generates (every outcome, endpoint, status, usage
reported or estimated, attempts of every kind)."""

from __future__ import annotations

from hypothesis import given, settings

from proxy.bills import is_billed
from proxy.outcome import Outcome, RequestRecord, Usage
from proxy.seal import (
    _COUNTED_ENDPOINTS,
    _UPSTREAM_HAD_IT,
    _needs_prompt_count,
    _no_answer,
    _refused,
)
from tests.test_accounting_single import _records


def _reference(record: RequestRecord) -> bool:
    """`_needs_prompt_count` before its first look for a reported prompt (round 7)."""
    if not record.sent_upstream or record.outcome not in _UPSTREAM_HAD_IT:
        return False
    if _refused(record) or (record.outcome is Outcome.UPSTREAM_ERROR and _no_answer(record)):
        return False
    if record.endpoint not in _COUNTED_ENDPOINTS:
        return False
    seen = record.seen_usage
    if seen is None or seen.prompt_estimated:
        return True
    # An attempt on the primary target whose prompt was not reported (a hedge loser, a failed
    # first try): the count is for its target (proxy/bills.py applies it there).
    if not record.attempts:
        return False
    primary = record.attempts[0]
    for a in record.attempts:  # the cheapest test first: most attempts have a reported prompt
        if (
            (a.usage is None or a.usage.prompt_estimated)
            and a.reason != "continue"
            and (a.upstream, a.model) == (primary.upstream, primary.model)
            and is_billed(a)
        ):
            return True
    return False


@settings(max_examples=2000, deadline=None)
@given(_records())
def test_the_first_look_decides_as_the_general_way(record: RequestRecord) -> None:
    assert _needs_prompt_count(record) == _reference(record)


def test_a_reported_prompt_needs_no_count_and_an_estimated_one_does() -> None:
    """Not vacuous: both answers occur, on records the first look does and does not decide."""
    from proxy.attempts import Attempt

    attempt = Attempt("hosted", "m", 0.0, status=200, delivered=True)
    record = RequestRecord(
        "r",
        "POST",
        "/v1/chat/completions",
        0.0,
        0.0,
        endpoint="chat.completions",
        upstream_status=200,
        outcome=Outcome.COMPLETED,
        sent_upstream=True,
        seen_usage=Usage(14, 16),
        attempts=[attempt],
    )
    attempt.usage = Usage(14, 16)
    assert _needs_prompt_count(record) is False
    attempt.usage = Usage(14, 16, prompt_estimated=True)
    assert _needs_prompt_count(record) is True
