"""The series a finished request always writes are kept together per label set
(proxy/metrics/finished.py `_Finished`): the scrape is the one the facade gives when it keeps
no label set (each request's series looked up anew), for any sequence of records. That
comparison catches a kept set shared by requests it does not belong to; what a set's lazily
taken series must do (appear with their first write, each under its own labels) is pinned by
the explicit tests below, since both ways share that code."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.attempts import Attempt, AttemptResult
from proxy.metrics import Metrics
from proxy.metrics.loopvalue import LoopBuckets
from proxy.outcome import Cost, Outcome, RequestRecord, TimeoutKind, Usage
from tests.metrics_support import make_record, new_metrics

_record = st.builds(
    make_record,
    route=st.sampled_from(["chat", "batch", "unknown", None]),
    model=st.sampled_from(["gpt-4o-mini", "llama-3.1-8b", "m3", None]),
    client=st.sampled_from(["alice", "anonymous", "stranger", None]),
    endpoint=st.sampled_from(["chat.completions", "completions", "embeddings", "other"]),
    status=st.none() | st.sampled_from([200, 204, 302, 400, 429, 499, 502, 504, 700]),
    upstream_status=st.none() | st.sampled_from([200, 400, 500]),
    outcome=st.none() | st.sampled_from(list(Outcome)),
    timeout_kind=st.none() | st.sampled_from(list(TimeoutKind)),
    ended_at=st.none() | st.floats(1000.0, 1100.0),
    upstream_wait_s=st.floats(0.0, 5.0),
    first_token_at=st.none() | st.floats(1000.0, 1001.0),
    usage=st.builds(
        Usage,
        prompt_tokens=st.integers(0, 50),
        completion_tokens=st.integers(0, 50),
        cached_tokens=st.integers(0, 5),
    ),
)


def _scrape(metrics: Metrics, records: list[RequestRecord]) -> bytes:
    for record in records:
        metrics.request_started()
        metrics.request_finished(record)
        metrics.request_ended()
    return metrics.render()[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(_record, max_size=40), st.integers(0, 3))
def test_kept_series_scrape_as_series_looked_up_one_by_one(
    records: list[RequestRecord], kept: int
) -> None:
    looked_up = new_metrics(max_models=2)
    looked_up._max_finished = 0
    kept_together = new_metrics(max_models=2)
    if kept:  # also with the bound reached part of the way
        kept_together._max_finished = kept
    assert _scrape(kept_together, records) == _scrape(looked_up, records)


def test_a_request_without_a_duration_adds_no_duration_series() -> None:
    """A kept label set's histograms appear with their first observation, not before."""
    metrics = new_metrics()
    fields: dict[str, Any] = {"route": "chat", "outcome": Outcome.COMPLETED}
    text = _scrape(metrics, [make_record(ended_at=None, **fields)] * 2).decode()
    assert "hangup_request_duration_seconds_count{" not in text
    assert "hangup_overhead_seconds_count{" not in text
    text = _scrape(metrics, [make_record(**fields)]).decode()
    assert 'hangup_request_duration_seconds_count{outcome="completed",route="chat"} 1.0' in text
    assert 'hangup_overhead_seconds_count{route="chat"} 1.0' in text
    assert 'hangup_requests_total{client="none",model="gpt-4o-mini"' in text


def test_a_kept_label_sets_token_series_appear_with_their_first_tokens() -> None:
    """Tokens of each type go to their own series, which a zero count does not create (the
    facade without kept label sets does the same: this pins what both must do)."""
    for kept in (0, 10):
        metrics = new_metrics()
        metrics._max_finished = kept
        tokens = 'hangup_tokens_total{client="none",model="gpt-4o-mini",route="chat",type='
        text = _scrape(metrics, [make_record(usage=Usage(0, 5))] * 2).decode()
        assert f'{tokens}"prompt"}}' not in text
        assert f'{tokens}"completion"}} 10.0' in text
        text = _scrape(metrics, [make_record(usage=Usage(7, 0))]).decode()
        assert f'{tokens}"prompt"}} 7.0' in text
        assert f'{tokens}"completion"}} 10.0' in text


_attempt = st.builds(
    Attempt,
    upstream=st.sampled_from(["openai", "local", "unconfigured"]),
    model=st.none(),
    started_at=st.just(1000.0),
    reason=st.sampled_from(["primary", "primary", "fallback", "hedge", "retry"]),
    result=st.none() | st.sampled_from([AttemptResult.OK, AttemptResult.OK, AttemptResult.CUT]),
    delivered=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["chat", "batch"]), st.lists(_attempt, max_size=2)),
        max_size=30,
    )
)
def test_attempts_counted_from_a_kept_set_as_looked_up_one_by_one(
    requests: list[tuple[str, list[Attempt]]],
) -> None:
    """A label set keeps its last single primary attempt's count (upstream and result): any
    mix of upstreams, results and reasons under one label set counts each attempt where a
    fresh lookup for every request counts it."""
    looked_up = new_metrics(upstreams=["openai", "local"])
    looked_up._max_finished = 0
    kept_together = new_metrics(upstreams=["openai", "local"])

    def records() -> list[RequestRecord]:
        return [
            make_record(route=route, attempts=[copy.copy(a) for a in attempts])
            for route, attempts in requests
        ]

    assert _scrape(kept_together, records()) == _scrape(looked_up, records())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(1000.0, 1400.0) | st.sampled_from([1000.0, 1000.005, 1001.0, 1030.0]),
            st.floats(0.0, 400.0),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_durations_of_one_label_set_fall_in_their_own_buckets(
    ends: list[tuple[float, float]],
) -> None:
    """A kept label set tries its last duration's and overhead's buckets first: whatever the
    order of the amounts (up, down, on a bound), each lands where `bisect` puts it. The
    reference observes each amount through `LoopBuckets.observe` (its buckets of a subclass,
    which `request_finished` does not observe inline)."""
    looked_up = new_metrics()
    looked_up._max_finished = 0
    taken = looked_up._buckets_of

    def observed_by_bisect(histogram: Any, labels: tuple[str, ...]) -> Any:
        buckets = taken(histogram, labels)
        if type(buckets) is LoopBuckets:
            buckets.__class__ = _BisectBuckets
        return buckets

    looked_up._buckets_of = observed_by_bisect  # type: ignore[method-assign]
    kept_together = new_metrics()

    def records() -> list[RequestRecord]:
        return [make_record(ended_at=end, upstream_wait_s=wait) for end, wait in ends]

    assert _scrape(kept_together, records()) == _scrape(looked_up, records())


class _BisectBuckets(LoopBuckets):
    """`LoopBuckets.observe` itself: the reference for the inline observation."""

    __slots__ = ()


class _CountedValue:
    """A value that is not a `LoopValue` (multiprocess storage's), its additions kept."""

    def __init__(self) -> None:
        self.added: list[float] = []

    def inc(self, amount: float) -> None:
        self.added.append(amount)


def test_a_kept_label_sets_cost_adds_to_its_value() -> None:
    """The USD a priced request used goes to its label set's kept cost value: added in place
    to a `LoopValue` (the scrape's counter grows by it), through `inc` to any other value."""
    metrics = new_metrics()
    record = make_record(cost=Cost(used_usd=0.25, saved_usd=0.0, wasted_usd=0.0))
    series = 'hangup_cost_usd_total{client="none",model="gpt-4o-mini",route="chat"}'
    assert f"{series} 0.5" in _scrape(metrics, [record, record]).decode()
    (common,) = metrics._finished.values()
    other = common.cost = _CountedValue()  # type: ignore[assignment]
    _scrape(metrics, [record])
    assert other.added == [0.25]
