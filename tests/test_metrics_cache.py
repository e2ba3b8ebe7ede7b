"""The metrics facade caches labelled children: `labels()` runs once per series, not once per
request, and the exported values are those of the uncached facade."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics.loopvalue import Buckets, LoopBuckets, buckets_of, count_of
from proxy.outcome import Outcome, Usage
from tests.metrics_support import make_record, new_metrics


def test_labels_are_looked_up_once_per_series(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = new_metrics()
    calls: list[tuple[str, ...]] = []
    real = MetricWrapperBase.labels

    def counting(self: MetricWrapperBase, *values: Any, **kw: Any) -> Any:
        calls.append(tuple(str(v) for v in values))
        return real(self, *values, **kw)

    monkeypatch.setattr(MetricWrapperBase, "labels", counting)
    usage = Usage(prompt_tokens=10, completion_tokens=5)
    metrics.request_started()
    metrics.request_finished(make_record(usage=usage))
    first = len(calls)
    assert first > 5  # requests, responses, tokens, histograms ...
    for _ in range(50):
        metrics.request_started()
        metrics.request_finished(make_record(usage=usage))
    assert len(calls) == first
    metrics.request_started()
    metrics.request_finished(make_record(usage=usage, outcome=Outcome.CLIENT_CANCELLED))
    assert len(calls) > first  # a new series is looked up (once)
    text = metrics.render()[0].decode()
    assert (
        'hangup_requests_total{client="none",model="gpt-4o-mini",outcome="completed",route="chat"}'
        " 51.0" in text
    )


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def test_lock_free_values_export_what_prometheus_client_would() -> None:
    """A histogram observed through `Buckets` and a counter and gauge written through their
    lock-free values render the same samples as prometheus_client's own `observe`, `inc` and
    `dec`, bucket edges, infinities, NaN and negatives included."""
    amounts = [0.0, 0.005, 0.0050001, 0.1, 2.5, 10.0, 11.0, math.inf, -math.inf, -1.0, math.nan]
    registries = []
    for lock_free in (False, True, "in place"):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", ["route"], registry=registry).labels("chat")
        counter = Counter("c", "c", ["route"], registry=registry).labels("chat")
        gauge = Gauge("g", "g", registry=registry)
        counter.inc(2)  # before the value is made lock-free: it keeps the figure
        if lock_free:
            # `buckets_of` gives the `LoopBuckets` the facade uses (observe in place).
            buckets = buckets_of(histogram) if lock_free == "in place" else Buckets(histogram)
            assert (type(buckets) is LoopBuckets) is (lock_free == "in place")
            count, level = count_of(counter), count_of(gauge)
            for amount in amounts:
                buckets.observe(amount)
                count.inc(3.5)
                level.inc(1)
            level.inc(-1)
        else:
            for amount in amounts:
                histogram.observe(amount)
                counter.inc(3.5)
                gauge.inc()
            gauge.dec()
        registries.append(registry)
    locked, *lock_free_ways = (_samples(r) for r in registries)
    for lock_free_samples in lock_free_ways:
        assert [s[:2] for s in locked] == [s[:2] for s in lock_free_samples]
        for (name, labels, want), (_, _, got) in zip(locked, lock_free_samples, strict=True):
            assert want == got or (math.isnan(want) and math.isnan(got)), (name, labels)
