"""The metrics facade caches labelled children: `labels()` runs once per series, not once per
request, and the exported values are those of the uncached facade."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

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
