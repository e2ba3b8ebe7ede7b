"""`Metrics.request_finished` against a frozen copy of its general way (`_reference`: the
method before the usual record was spared its lists, zero adds and recomputed timings): the
same scrape for any sequence of records, with every timing, usage, bill, waste, savings and
cost field varied."""

from __future__ import annotations

import logging
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.attempts import Attempt, AttemptResult
from proxy.metrics import Metrics, schema
from proxy.metrics.finished import _Finished
from proxy.metrics.labels import NONE, status_class
from proxy.outcome import (
    AttemptBill,
    BackgroundCancel,
    Cost,
    Outcome,
    RequestRecord,
    Savings,
    Usage,
    Waste,
)
from tests.metrics_support import make_record, new_metrics

log = logging.getLogger("proxy.metrics.facade")


def _reference(self: Metrics, record: RequestRecord) -> None:
    """`Metrics.request_finished` as it was before its usual-record shortcuts (round 7)."""
    route = record.route if record.route in self._routes else NONE
    model = self._model_for(record)
    rm = (route, model)
    client = record.client if record.client in self._clients else NONE
    rmc = (*rm, client)
    if record.outcome is None:
        log.error("request %s finished without an outcome", record.request_id)
        outcome = schema.UNSETTLED
    else:
        # `_value_`, not `.value`: the same string without enum's property (~0.3 us).
        outcome = record.outcome._value_
    count = self._count
    endpoint = self._endpoints.admit(record.endpoint)
    status = status_class(record.status)
    key = (route, model, outcome, client, endpoint, status)
    common = self._finished.get(key)
    if common is None:
        common = _Finished(
            count(self._requests, (route, model, outcome, client)),
            count(self._responses, (route, endpoint, status)),
        )
        if len(self._finished) < self._max_finished:
            self._finished[key] = common
    common.requests.inc(1)
    common.responses.inc(1)
    if record.timeout_kind is not None:
        count(self._timeouts, (route, record.timeout_kind.value)).inc(1)
    if record.sdk_retry_count > 0:
        count(self._sdk_retries, (route,)).inc(1)
    if record.background is not None:
        count(self._background, (route, record.background.value)).inc(1)
    for attempt in record.attempts:
        # Configured upstream names only: a closed label set.
        if attempt.result is not None and attempt.upstream in self._upstreams:
            count(self._attempts, (attempt.upstream, attempt.result._value_)).inc(1)
        if route not in self._routes:
            continue
        if attempt.reason == "fallback":
            count(self._fallbacks, (route,)).inc(1)
        elif attempt.reason == "hedge":
            count(self._hedges, (route, "started")).inc(1)
            if attempt.delivered:
                count(self._hedges, (route, "won")).inc(1)

    usage = record.usage
    if usage.prompt_tokens > 0:  # as `_add`: a zero creates no series
        if common.prompt is None:
            common.prompt = count(self._tokens, (*rm, "prompt", client))
        common.prompt.inc(usage.prompt_tokens)
    if usage.completion_tokens > 0:
        if common.completion is None:
            common.completion = count(self._tokens, (*rm, "completion", client))
        common.completion.inc(usage.completion_tokens)
    # Each attempt's counts say how they were obtained: the estimated and tokenized parts
    # are summed over attempts (a reported answer beside an estimated hedge loser).
    parts = [a.bill.usage for a in record.attempts if a.bill is not None] or [usage]
    for part in parts:
        if part.prompt_estimated:
            self._add(self._tokens_estimated, (*rm, "prompt"), part.prompt_tokens)
        if part.completion_estimated:
            self._add(self._tokens_estimated, (*rm, "completion"), part.completion_tokens)
        if part.prompt_tokenized:
            self._add(self._tokens_tokenized, rm, part.prompt_tokens)
    if route in self._routes:
        for reason, waste in record.waste.items():
            self._add(self._waste_tokens, (route, reason, "prompt"), waste.prompt_tokens)
            self._add(self._waste_tokens, (route, reason, "completion"), waste.completion_tokens)
            self._add(self._waste_cost, (route, reason), waste.usd)
            # A hedge loser closed early saved what it did not generate (proxy/bills.py).
            self._add(self._saved, rmc, waste.tokens_saved)
    self._add(self._cached, rm, usage.cached_tokens)
    self._add(self._reasoning, rm, usage.reasoning_tokens)

    savings = record.savings
    if savings is not None:
        self._add(self._saved, rmc, savings.tokens_saved)
        if savings.tokens_saved_upper is not None:
            self._add(self._saved_upper, rm, savings.tokens_saved_upper)
        self._add(self._wasted, rm, savings.tokens_wasted)
    cost = record.cost
    if cost is not None and cost.priced:
        self._add(self._cost, rmc, cost.used_usd)
        self._add(self._cost_saved, rmc, cost.saved_usd)
        self._add(self._cost_wasted, rm, cost.wasted_usd)
    elif usage.total_tokens > 0 or (savings is not None and savings.tokens_saved > 0):
        count(self._unpriced, rm).inc(1)

    duration = record.duration_s
    if duration is not None:
        if common.duration is None:
            common.duration = self._buckets_of(self._duration, (route, outcome))
        common.duration.observe(duration)
    self._observe(self._ttft, rm, record.ttft_s)
    overhead = record.overhead_s
    if overhead is not None:
        if common.overhead is None:
            common.overhead = self._buckets_of(self._overhead, (route,))
        common.overhead.observe(overhead)
    self._observe(self._cancel_propagation, (route,), record.cancel_propagation_s)


_times = st.none() | st.floats(1000.0, 1100.0)
_usd = st.none() | st.sampled_from([0.0, 0.25, 1e-6, -0.0])
_usage = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 50),
    completion_tokens=st.integers(0, 50),
    cached_tokens=st.integers(0, 5),
    reasoning_tokens=st.integers(0, 5),
    prompt_estimated=st.booleans(),
    completion_estimated=st.booleans(),
    prompt_tokenized=st.booleans(),
)


@st.composite
def _attempt(draw: st.DrawFn) -> Attempt:
    attempt = Attempt(
        draw(st.sampled_from(["primary", "fallback", "elsewhere"])),
        "gpt-4o-mini",
        1000.0,
        reason=draw(st.sampled_from(["primary", "retry", "fallback", "hedge", "continue"])),
        result=draw(st.none() | st.sampled_from(list(AttemptResult))),
        delivered=draw(st.booleans()),
    )
    if draw(st.booleans()):
        attempt.bill = AttemptBill(usage=draw(_usage), billing="stops")
    return attempt


_record = st.builds(
    make_record,
    route=st.sampled_from(["chat", "batch", "unknown", None]),
    model=st.sampled_from(["gpt-4o-mini", "llama-3.1-8b", None]),
    client=st.sampled_from(["alice", "anonymous", None]),
    status=st.none() | st.sampled_from([200, 429, 502]),
    upstream_status=st.none() | st.sampled_from([200, 400]),
    outcome=st.none() | st.sampled_from(list(Outcome)),
    ended_at=_times,
    first_token_at=_times,
    client_gone_at=_times,
    upstream_closed_at=_times,
    upstream_wait_s=st.floats(0.0, 5.0),
    client_wait_s=st.floats(0.0, 5.0),
    backoff_wait_s=st.floats(0.0, 5.0),
    sdk_retry_count=st.integers(0, 2),
    background=st.none() | st.sampled_from(list(BackgroundCancel)),
    usage=_usage,
    attempts=st.lists(_attempt(), max_size=3),
    waste=st.dictionaries(
        st.sampled_from(["hedge", "failover"]),
        st.builds(Waste, prompt_tokens=st.integers(0, 9), usd=_usd, tokens_saved=st.integers(0, 9)),
    ),
    savings=st.none() | st.builds(Savings, tokens_saved=st.integers(0, 9)),
    cost=st.none() | st.builds(Cost, used_usd=_usd, saved_usd=_usd, wasted_usd=_usd),
)


def _scrape(records: list[RequestRecord], finished: Any) -> bytes:
    metrics = new_metrics(max_models=2, upstreams=("primary", "fallback"))
    for record in records:
        finished(metrics, record)
    return metrics.render()[0]


@settings(max_examples=400, deadline=None)
@given(st.lists(_record, max_size=30))
def test_request_finished_scrapes_as_its_general_way(records: list[RequestRecord]) -> None:
    assert _scrape(records, Metrics.request_finished) == _scrape(records, _reference)


def test_the_usual_record_is_among_the_compared() -> None:
    """Not vacuous: a record with one billed attempt, cached tokens and a priced cost writes
    the same series both ways, and writes them at all."""
    attempt = Attempt("primary", "gpt-4o-mini", 1000.0, result=AttemptResult.OK, delivered=True)
    attempt.bill = AttemptBill(usage=Usage(14, 16, 2), billing="stops")
    record = make_record(
        usage=Usage(14, 16, 2), attempts=[attempt], cost=Cost(0.5, 0.0, 0.0), stream=False
    )
    text = _scrape([record], Metrics.request_finished)
    assert text == _scrape([record], _reference)
    assert b"hangup_cost_usd_total{" in text and b"hangup_cached_tokens_total{" in text


def test_durations_on_the_bucket_bounds_scrape_as_the_general_way() -> None:
    """The duration and overhead histograms' inline observation (`LoopBuckets.observe`, done in
    `request_finished`) puts an amount equal to a bound in that bound's bucket, and NaN in
    none, as the method does: durations and overheads exactly on every bound (generated
    floats never are)."""
    amounts = [*schema.DURATION_BUCKETS, *schema.OVERHEAD_BUCKETS, 0.0, -0.0, float("inf")]
    amounts.append(float("nan"))
    records = [
        make_record(started_at=0.0, ended_at=amount, upstream_wait_s=0.0, client_wait_s=0.0)
        for amount in amounts
    ]
    text = _scrape(records, Metrics.request_finished)
    assert text == _scrape(records, _reference)
    # 0.0001 itself, 0.0, -0.0 and NaN's overhead (0.0, as `max(0.0, nan)`)
    assert b'hangup_overhead_seconds_bucket{le="0.0001",route="chat"} 4.0' in text
