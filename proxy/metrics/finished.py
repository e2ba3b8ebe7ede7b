"""The metrics of a finished request: everything `Metrics` exports from one sealed
`RequestRecord` (`request_finished`, which `Metrics` takes as its method of that name), apart
from the rest of the facade because it is the one part run for every request, with its own
per-label-set series cache (`_Finished`)."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy.attempts import Attempt, AttemptResult
from proxy.outcome import RequestRecord, Usage

from . import schema
from .labels import CLASS_OF_STATUS, NONE
from .loopvalue import LoopBuckets, LoopValue

if TYPE_CHECKING:
    from .facade import Metrics
    from .loopvalue import Buckets, Value

log = logging.getLogger("proxy.metrics.facade")  # the facade's logger, as before the split

# Label sets of finished requests whose series are kept together (`_Finished`); past this
# many, a new label set's series are looked up one by one, as any other series.
_MAX_FINISHED = 4096


class _Finished:
    """The series every finished request with one (route, model, outcome, client, endpoint,
    status class) writes: its request and response counts, and (once written, so that a
    series never written stays out of the scrape) its prompt and completion tokens and its
    duration and overhead. One lookup for six, on every request; the values are the ones
    `_count` and `_buckets_of` hold."""

    __slots__ = (
        "attempt_result",
        "attempt_upstream",
        "attempt_value",
        "completion",
        "cost",
        "duration",
        "duration_at",
        "inplace",
        "overhead",
        "overhead_at",
        "prompt",
        "requests",
        "responses",
        "ttft",
        "unpriced",
    )

    def __init__(self, requests: Value, responses: Value) -> None:
        self.requests, self.responses = requests, responses
        # Every count kept here so far is a `LoopValue` (single-process storage): the usual
        # ones are added to in place, without a call to `LoopValue.inc` each.
        self.inplace = type(requests) is LoopValue and type(responses) is LoopValue
        self.prompt: Value | None = None
        self.completion: Value | None = None
        self.cost: Value | None = None  # USD used, by (route, model, client)
        self.unpriced: Value | None = None  # requests without a price, by (route, model)
        self.ttft: Buckets | None = None  # by (route, model)
        self.duration: Buckets | None = None
        self.overhead: Buckets | None = None
        # The bucket each of the two last observed amounts fell in (a guess, checked).
        self.duration_at = self.overhead_at = 0
        # The last single primary attempt's (upstream, result) and its count's value: the
        # usual record counts its attempt without the key's tuple and lookup.
        self.attempt_upstream: str | None = None
        self.attempt_result: AttemptResult | None = None
        self.attempt_value: Value | None = None


def _observe_far(buckets: LoopBuckets, value: float, at: int) -> int:
    """A `LoopBuckets`' `observe` of `value` once bucket `at` (the label set's last) is not
    its bucket (the sum already added): the first bucket whose bound is >= the value (none
    for NaN); returns the bucket to try next time."""
    bounds = buckets._bounds
    i = bisect_left(bounds, value)
    if i < len(bounds) and value <= bounds[i]:
        buckets._buckets[i]._value += 1.0
        return i
    return at


def request_finished(metrics: Metrics, record: RequestRecord) -> None:
    """Account one finished request from its sealed record (after accounting)."""
    route = record.route if record.route in metrics._routes else NONE
    # A known model is its own label (`BoundedLabel.known`): no `_model_for` to ask.
    model = record.model
    if model not in metrics._models.known:
        model = metrics._model_for(record)
    client = record.client if record.client in metrics._clients else NONE
    # The (route, model) and (route, model, client) keys are built where a series is looked
    # up (a label set's first request, or a rare member): the usual record builds neither.
    if record.outcome is None:
        log.error("request %s finished without an outcome", record.request_id)
        outcome = schema.UNSETTLED
    else:
        # `_value_`, not `.value`: the same string without enum's property (~0.3 us).
        outcome = record.outcome._value_
    count = metrics._count
    endpoint = record.endpoint
    if endpoint not in metrics._endpoints.known:
        endpoint = metrics._endpoints.admit(endpoint)
    status = CLASS_OF_STATUS.get(record.status, NONE)  # `status_class`, inline
    key = (route, model, outcome, client, endpoint, status)
    common = metrics._finished.get(key)
    if common is None:
        common = _Finished(
            count(metrics._requests, (route, model, outcome, client)),
            count(metrics._responses, (route, endpoint, status)),
        )
        if len(metrics._finished) < metrics._max_finished:
            metrics._finished[key] = common
    inplace = common.inplace
    if inplace:
        common.requests._value += 1.0  # type: ignore[attr-defined]  # LoopValue.inc, inline
        common.responses._value += 1.0  # type: ignore[attr-defined]
    else:
        common.requests.inc(1)
        common.responses.inc(1)
    if record.timeout_kind is not None:
        count(metrics._timeouts, (route, record.timeout_kind.value)).inc(1)
    if record.sdk_retry_count > 0:
        count(metrics._sdk_retries, (route,)).inc(1)
    if record.background is not None:
        count(metrics._background, (route, record.background.value)).inc(1)
    attempts: Sequence[Attempt] = record.attempts
    if (
        len(attempts) == 1
        and (attempt := attempts[0]).result is common.attempt_result
        and attempt.reason == "primary"
        and attempt.upstream == common.attempt_upstream
    ):
        # The usual record: its label set's last single attempt had this upstream and
        # result (so a configured upstream, counted by `_attempt_counts`' value kept below).
        value = common.attempt_value
        if type(value) is LoopValue:
            value._value += 1.0  # LoopValue.inc, inline
        elif value is not None:  # (always: kept with the upstream)
            value.inc(1)
        attempts = ()
    for attempt in attempts:
        # Configured upstream names only: a closed label set.
        if attempt.result is not None and attempt.upstream in metrics._upstreams:
            # `count(metrics._attempts, ...)`'s value, kept by (upstream, result): no key of
            # the counter's id and labels built, no call (bounded as both label sets).
            per = (attempt.upstream, attempt.result)
            value = metrics._attempt_counts.get(per)
            if value is None:
                value = metrics._attempt_counts[per] = count(
                    metrics._attempts, (attempt.upstream, attempt.result._value_)
                )
            if type(value) is LoopValue:
                value._value += 1.0  # LoopValue.inc, inline
            else:
                value.inc(1)
            if len(record.attempts) == 1 and attempt.reason == "primary":
                common.attempt_upstream = attempt.upstream
                common.attempt_result = attempt.result
                common.attempt_value = value
        if route not in metrics._routes:
            continue
        if attempt.reason == "fallback":
            count(metrics._fallbacks, (route,)).inc(1)
        elif attempt.reason == "hedge":
            count(metrics._hedges, (route, "started")).inc(1)
            if attempt.delivered:
                count(metrics._hedges, (route, "won")).inc(1)

    usage = record.usage
    attempts = record.attempts
    if usage.prompt_tokens > 0:  # as `_add`: a zero creates no series
        if common.prompt is None:
            common.prompt = count(metrics._tokens, (route, model, "prompt", client))
            inplace = common.inplace = inplace and type(common.prompt) is LoopValue
        if inplace:
            common.prompt._value += usage.prompt_tokens  # type: ignore[attr-defined]
        else:
            common.prompt.inc(usage.prompt_tokens)
    if usage.completion_tokens > 0:
        if common.completion is None:
            common.completion = count(metrics._tokens, (route, model, "completion", client))
            inplace = common.inplace = inplace and type(common.completion) is LoopValue
        if inplace:
            common.completion._value += usage.completion_tokens  # type: ignore[attr-defined]
        else:
            common.completion.inc(usage.completion_tokens)
    # Each attempt's counts say how they were obtained: the estimated and tokenized parts
    # are summed over attempts (a reported answer beside an estimated hedge loser).
    parts: Sequence[Usage]
    if len(attempts) == 1 and attempts[0].bill is not None:  # the usual record: no list
        part = attempts[0].bill.usage
        # A reported usage (the usual one) adds to none of the three: no loop.
        estimated = part.prompt_estimated or part.completion_estimated or part.prompt_tokenized
        parts = (part,) if estimated else ()
    else:
        parts = [a.bill.usage for a in attempts if a.bill is not None] or [usage]
    for part in parts:
        if part.prompt_estimated:
            metrics._add(metrics._tokens_estimated, (route, model, "prompt"), part.prompt_tokens)
        if part.completion_estimated:
            metrics._add(
                metrics._tokens_estimated, (route, model, "completion"), part.completion_tokens
            )
        if part.prompt_tokenized:
            metrics._add(metrics._tokens_tokenized, (route, model), part.prompt_tokens)
    if record.waste and route in metrics._routes:  # most records have no waste: no `items`
        for reason, waste in record.waste.items():
            metrics._add(metrics._waste_tokens, (route, reason, "prompt"), waste.prompt_tokens)
            metrics._add(
                metrics._waste_tokens, (route, reason, "completion"), waste.completion_tokens
            )
            metrics._add(metrics._waste_cost, (route, reason), waste.usd)
            # A hedge loser closed early saved what it did not generate (proxy/bills.py).
            metrics._add(metrics._saved, (route, model, client), waste.tokens_saved)
    # `_add`'s test first: most answers have neither (no call for nothing).
    if usage.cached_tokens > 0:
        metrics._add(metrics._cached, (route, model), usage.cached_tokens)
    if usage.reasoning_tokens > 0:
        metrics._add(metrics._reasoning, (route, model), usage.reasoning_tokens)

    savings = record.savings
    if savings is not None:
        metrics._add(metrics._saved, (route, model, client), savings.tokens_saved)
        if savings.tokens_saved_upper is not None:
            metrics._add(metrics._saved_upper, (route, model), savings.tokens_saved_upper)
        metrics._add(metrics._wasted, (route, model), savings.tokens_wasted)
    cost = record.cost
    # `cost.priced` and `usage.total_tokens` without their properties (a call each).
    if cost is not None and (used := cost.used_usd) is not None:
        if used > 0:  # as `_add`, from the label set's own series
            value = common.cost
            if value is None:
                value = common.cost = count(metrics._cost, (route, model, client))
            if type(value) is LoopValue:
                value._value += used  # LoopValue.inc, inline
            else:
                value.inc(used)
        if cost.saved_usd:
            metrics._add(metrics._cost_saved, (route, model, client), cost.saved_usd)
        if cost.wasted_usd:
            metrics._add(metrics._cost_wasted, (route, model), cost.wasted_usd)
    elif usage.prompt_tokens + usage.completion_tokens > 0 or (
        savings is not None and savings.tokens_saved > 0
    ):
        if common.unpriced is None:
            common.unpriced = count(metrics._unpriced, (route, model))
        if inplace and type(common.unpriced) is LoopValue:
            common.unpriced._value += 1.0  # LoopValue.inc, inline
        else:
            common.unpriced.inc(1)

    # The record's `duration_s`, `overhead_s`, `ttft_s` and `cancel_propagation_s`, each
    # worked out here once (the same arithmetic: tests/test_metrics_finished.py).
    # A `LoopBuckets`' `observe`, inline: the same sum and the same bucket (the first whose
    # bound is >= the amount; none for NaN). The label set's last bucket is tried first: it
    # is that bucket when the amount is within its bound and above the one below (no
    # `bisect_left`, ~0.7k instructions, most requests; else `_observe_far`).
    ended = record.ended_at
    if ended is not None:
        duration = ended - record.started_at
        buckets = common.duration
        if buckets is None:
            buckets = common.duration = metrics._buckets_of(metrics._duration, (route, outcome))
        if type(buckets) is LoopBuckets:
            buckets._sum._value += duration  # a LoopValue (buckets_of)
            bounds, at = buckets._bounds, common.duration_at
            if duration <= bounds[at] and (at == 0 or bounds[at - 1] < duration):
                buckets._buckets[at]._value += 1.0
            else:
                common.duration_at = _observe_far(buckets, duration, at)
        else:
            buckets.observe(duration)
        overhead = duration - record.upstream_wait_s - record.client_wait_s - record.backoff_wait_s
        # `max(0.0, overhead)` without the call (~1k instructions: `min_max` parses its
        # arguments): the same value for NaN and -0.0 too (both give 0.0).
        if not overhead > 0.0:
            overhead = 0.0
        buckets = common.overhead
        if buckets is None:
            buckets = common.overhead = metrics._buckets_of(metrics._overhead, (route,))
        if type(buckets) is LoopBuckets:
            buckets._sum._value += overhead
            bounds, at = buckets._bounds, common.overhead_at
            if overhead <= bounds[at] and (at == 0 or bounds[at - 1] < overhead):
                buckets._buckets[at]._value += 1.0
            else:
                common.overhead_at = _observe_far(buckets, overhead, at)
        else:
            buckets.observe(overhead)
    if record.first_token_at is not None:
        if common.ttft is None:
            common.ttft = metrics._buckets_of(metrics._ttft, (route, model))
        common.ttft.observe(record.first_token_at - record.started_at)
    if record.client_gone_at is not None and record.upstream_closed_at is not None:
        metrics._observe(metrics._cancel_propagation, (route,), record.cancel_propagation_s)
