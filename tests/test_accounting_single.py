"""`Accountant.settle`'s ways for the usual record (one attempt, delivered: `_bill_single`;
completed with its usage reported: `_settle_usual`) settle it as the general way (`_bill`:
proxy/bills.py `bill_attempts` and `sum_usage`) does.

Two accountants of one config settle the same generated records in the same order (so their
history of typical lengths stays the same); one of them has its single-attempt ways replaced by
the general one. Every field of every record (usage, savings, cost, waste, each attempt's
bill) must come out equal. Records: every outcome, endpoint, status, usage reported or
estimated or tokenized, configured or unknown upstreams and routes, priced or unpriced
models, cut short or not, streamed or not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.accounting import Accountant
from proxy.attempts import Attempt, AttemptResult
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, Savings, Usage
from tests.support import config_from

_CONFIG = config_from(
    {
        "upstreams": {
            "hosted": {"base_url": "https://api.openai.com/v1"},
            "groq": {"base_url": "https://api.groq.com/openai/v1"},
            "gpu": {"base_url": "http://127.0.0.1:8000/v1", "engine": "vllm"},
            "set": {
                "base_url": "https://example.com/v1",
                "billing": {"stream": "stops", "non_stream": "stops"},
            },
        },
        "routes": [
            {"name": name, "upstream": name, "match": {"model": f"{name}-*"}}
            for name in ("hosted", "groq", "gpu", "set")
        ],
        "defaults": {"expected_completion_tokens": 300},
        "prices": {
            "m": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
            "c": {"input_per_mtok": 1.0, "cached_input_per_mtok": 0.5, "output_per_mtok": 4.0},
        },
    }
)

_names = st.sampled_from(["hosted", "groq", "gpu", "set", "unknown", ""])
_models = st.sampled_from(["m", "c", "free", None])
_count = st.integers(0, 3000)
_usage = st.builds(
    Usage,
    prompt_tokens=_count,
    completion_tokens=_count,
    cached_tokens=_count,
    reasoning_tokens=_count,
    prompt_estimated=st.booleans(),
    completion_estimated=st.booleans(),
    prompt_tokenized=st.booleans(),
)
_attempt = st.builds(
    Attempt,
    upstream=_names,
    model=_models,
    started_at=st.just(0.0),
    reason=st.sampled_from(["primary", "retry", "fallback", "hedge", "continue"]),
    status=st.none() | st.sampled_from([200, 206, 400, 429, 500, 503]),
    result=st.none() | st.sampled_from(list(AttemptResult)),
    error=st.none() | st.sampled_from(["hedge loser", "boom"]),
    tokens_generated=_count,
    delivered=st.booleans(),
    usage=st.none() | _usage,
)


@st.composite
def _records(draw: st.DrawFn) -> RequestRecord:
    single = draw(st.booleans())
    attempts = [draw(_attempt)] if single else draw(st.lists(_attempt, max_size=3))
    if single and draw(st.integers(0, 3)):
        attempts[0].delivered = True  # mostly the single-attempt way, sometimes not
    fields: dict[str, Any] = {
        "route": draw(_names),
        "upstream": draw(_names),
        "model": draw(_models),
        "endpoint": draw(
            st.sampled_from(["chat.completions", "completions", "responses", "embeddings", "other"])
        ),
        "stream": draw(st.booleans()),
        "status": draw(st.none() | st.sampled_from([200, 400, 499, 502, 504])),
        "upstream_status": draw(st.none() | st.sampled_from([200, 299, 300, 400, 429, 500])),
        "outcome": draw(st.sampled_from(list(Outcome))),
        "client_gone_at": draw(st.none() | st.just(1.0)),
        "sent_upstream": draw(st.booleans()),
        "max_tokens": draw(st.none() | st.integers(1, 4000)),
        "prompt_estimate": draw(_count),
        "seen_usage": draw(st.none() | _usage),
        "generated_tokens": draw(_count),
        "delivered_tokens": draw(_count),
        "drained": draw(st.booleans()),
        "prompt_tokenized": draw(st.none() | _count),
        "background": draw(st.none() | st.sampled_from(list(BackgroundCancel))),
        "attempts": attempts,
    }
    return _chat_record(**fields)


def _chat_record(**fields: Any) -> RequestRecord:
    """A chat completion's record with `fields` set (the identity fields are fixed)."""
    return RequestRecord(
        request_id="r",
        method="POST",
        path="/v1/chat/completions",
        started_at=0.0,
        wall_started_at=0.0,
        **fields,
    )


def _delivered(usage: Usage, *, reason: str = "primary", **fields: Any) -> RequestRecord:
    """The usual record: a completed chat completion of the "hosted" route, its one attempt
    answered 200 `ok` with `usage` and delivered; `fields` set besides."""
    attempt = Attempt("hosted", "m", 0.0, reason=reason, status=200, delivered=True)
    attempt.result, attempt.usage = AttemptResult.OK, usage
    return _chat_record(
        route="hosted",
        model="m",
        endpoint="chat.completions",
        upstream_status=200,
        outcome=Outcome.COMPLETED,
        sent_upstream=True,
        attempts=[attempt],
        **fields,
    )


def _usage_copy(usage: Usage) -> Usage:
    return msgspec.structs.replace(usage)


def _copy(record: RequestRecord) -> RequestRecord:
    """A copy sharing nothing settle writes to or reads from another record."""
    return msgspec.structs.replace(
        record,
        seen_usage=None if record.seen_usage is None else _usage_copy(record.seen_usage),
        attempts=[
            replace(a, usage=None if a.usage is None else _usage_copy(a.usage))
            for a in record.attempts
        ],
    )


def _general() -> Accountant:
    accountant = Accountant(_CONFIG)

    def general(record: RequestRecord, attempt: Attempt) -> None:
        accountant._bill(record, accountant._routes.get(record.route or ""))

    def not_usual(record: RequestRecord, attempt: Attempt) -> bool:
        return False

    accountant._bill_single = general  # type: ignore[method-assign]
    accountant._cost_single = accountant._cost  # type: ignore[method-assign]
    accountant._settle_usual = not_usual  # type: ignore[method-assign]
    return accountant


def _settled_alike(records: list[RequestRecord]) -> None:
    """Copies of `records` settled in turn, by an accountant as shipped and by one with only
    the general way, come out equal."""
    fast, general = Accountant(_CONFIG), _general()
    for record in records:
        mine, theirs = _copy(record), _copy(record)
        fast.settle(mine)
        general.settle(theirs)
        assert mine == theirs
    # The typical lengths learned (read only once 20 answers of one route and model are in).
    assert fast.typical._lengths == general.typical._lengths


@settings(max_examples=600, deadline=None)
@given(st.lists(_records(), min_size=1, max_size=30))
def test_the_single_attempt_way_settles_as_the_general_one(records: list[RequestRecord]) -> None:
    _settled_alike(records)


def test_the_usual_record_takes_the_single_attempt_way() -> None:
    """Not vacuous: a delivered single attempt does not go through `_bill`."""
    accountant = Accountant(_CONFIG)

    def no_general(record: RequestRecord, route: object) -> None:
        raise AssertionError("the general way was taken")

    accountant._bill = no_general  # type: ignore[method-assign]
    accountant._cost = no_general  # type: ignore[assignment]
    usage = Usage(prompt_tokens=14, completion_tokens=16)
    record = _delivered(usage, upstream="hosted", status=200, seen_usage=usage)
    accountant.settle(record)
    assert record.usage == usage and record.cost is not None and record.cost.priced


def test_a_continued_answer_teaches_no_typical_length_either_way() -> None:
    """The single-attempt way's own test for a continuation (rare in the generated records):
    a continued answer's length is not a natural one, so neither way learns it."""
    for accountant in (Accountant(_CONFIG), _general()):
        for reason in ("continue", "primary"):
            accountant.settle(_delivered(Usage(14, 16), reason=reason))
        assert list(accountant.typical._lengths.items()) == [(("hosted", "m"), deque([16]))]


# Records close to the usual one (`_settle_usual`'s): completed, one attempt, delivered, `ok`,
# status < 400, its usage reported, nothing cut: each mostly so (about one record in ten has
# all of them) and each sometimes otherwise, with everything else varied.
_known = st.sampled_from(["hosted", "hosted", "groq", "gpu", "set", "unknown", ""])
_usual_attempt = st.builds(
    Attempt,
    upstream=_known,
    model=_models,
    started_at=st.just(0.0),
    reason=st.sampled_from(["primary", "primary", "retry", "fallback", "continue", "continue"]),
    status=st.sampled_from([200] * 6 + [206, 299, 300, 399, 400, 404, 500, None]),
    result=st.sampled_from([AttemptResult.OK] * 20 + [*AttemptResult, None]),
    tokens_generated=_count,
    delivered=st.sampled_from([True] * 4 + [False]),
    usage=st.sampled_from([True] * 7 + [False]).flatmap(
        lambda reported: (
            st.builds(
                Usage,
                prompt_tokens=_count | st.just(0),
                completion_tokens=_count | st.just(0),
                cached_tokens=_count,
                reasoning_tokens=_count,
                prompt_estimated=st.sampled_from([False] * 4 + [True]),
                completion_estimated=st.booleans(),
                prompt_tokenized=st.sampled_from([False] * 4 + [True]),
            )
            if reported
            else st.none()
        )
    ),
)


@st.composite
def _usual_records(draw: st.DrawFn) -> RequestRecord:
    attempt = draw(_usual_attempt)
    return _chat_record(
        route=draw(_known),
        upstream=draw(_names),
        model=draw(_models),
        endpoint=draw(
            st.sampled_from(["chat.completions"] * 3 + ["responses", "embeddings", "other"])
        ),
        stream=draw(st.booleans()),
        status=draw(st.sampled_from([200, 502, None])),
        upstream_status=draw(st.sampled_from([200, 200, 200, 299, 300, 400, 500, None])),
        outcome=draw(st.sampled_from([Outcome.COMPLETED] * 10 + list(Outcome))),
        sent_upstream=draw(st.sampled_from([True] * 4 + [False])),
        max_tokens=draw(st.none() | st.integers(1, 4000)),
        prompt_estimate=draw(_count),
        seen_usage=attempt.usage,
        generated_tokens=draw(_count),
        prompt_tokenized=draw(st.none() | _count),
        savings=draw(st.sampled_from([None] * 4 + [Savings(tokens_saved=5)])),
        attempts=[attempt],
    )


@settings(max_examples=500, deadline=None)
@given(st.lists(_usual_records(), min_size=1, max_size=30))
def test_the_usual_way_settles_as_the_general_one(records: list[RequestRecord]) -> None:
    _settled_alike(records)


def test_the_usual_record_is_settled_in_one_step() -> None:
    """Not vacuous: the usual completion takes `_settle_usual` (no `_bill_single`), and its
    record's usage is the attempt's reported one, shared."""
    accountant = Accountant(_CONFIG)

    def no_single(record: RequestRecord, attempt: Attempt) -> None:
        raise AssertionError("the single-attempt way was taken")

    accountant._bill_single = no_single  # type: ignore[method-assign]
    usage = Usage(prompt_tokens=14, completion_tokens=16)
    record = _delivered(usage, seen_usage=usage)
    (attempt,) = record.attempts
    accountant.settle(record)
    assert record.usage is usage and attempt.bill is not None and attempt.bill.usage is usage
    assert record.cost is not None and record.cost.used_usd == (14 * 2.5 + 16 * 10.0) / 1e6
    assert list(accountant.typical._lengths.items()) == [(("hosted", "m"), deque([16]))]
