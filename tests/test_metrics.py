"""The metrics facade: exact values in the rendered text for hand-built records."""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from proxy import __version__
from proxy.bills import WASTE_REASONS
from proxy.config import MetricsConfig, PriceConfig
from proxy.metrics import SERIES_NAMES, Metrics, authorized, schema, series_bound, summarize
from proxy.metrics.labels import looks_like_secret
from proxy.metrics.summary import bucket_quantile
from proxy.outcome import BackgroundCancel, Cost, Outcome, Savings, TimeoutKind, Usage, Waste
from tests.metrics_support import (
    CONFIGURED_MODELS,
    PRICED_MODEL,
    ROUTES,
    make_record,
    new_metrics,
    parse,
    rendered,
    total,
    value,
)

CHAT = {"route": "chat", "model": PRICED_MODEL}


def test_completed_stream_counts_tokens_cost_and_latencies() -> None:
    m = new_metrics()
    m.request_started()
    m.request_ended()
    m.request_finished(
        make_record(
            usage=Usage(
                prompt_tokens=120, completion_tokens=45, cached_tokens=100, reasoning_tokens=30
            ),
            cost=Cost(used_usd=0.00125),
            first_token_at=1000.4,
            ended_at=1002.5,
            upstream_wait_s=2.4,
            client_wait_s=0.0996,
        )
    )
    s = rendered(m)
    assert value(s, "hangup_requests_total", **CHAT, outcome="completed") == 1
    assert (
        value(
            s,
            "hangup_responses_total",
            route="chat",
            endpoint="chat.completions",
            status_class="2xx",
        )
        == 1
    )
    assert value(s, "hangup_tokens_total", **CHAT, type="prompt") == 120
    assert value(s, "hangup_tokens_total", **CHAT, type="completion") == 45
    assert value(s, "hangup_cached_tokens_total", **CHAT) == 100
    assert value(s, "hangup_reasoning_tokens_total", **CHAT) == 30
    assert value(s, "hangup_cost_usd_total", **CHAT) == pytest.approx(0.00125)
    assert total(s, "hangup_tokens_estimated_total") == 0
    assert total(s, "hangup_tokens_saved_total") == 0
    assert total(s, "hangup_cost_saved_usd_total") == 0
    assert total(s, "hangup_unpriced_requests_total") == 0
    duration = {"route": "chat", "outcome": "completed"}
    assert value(s, "hangup_request_duration_seconds_count", **duration) == 1
    assert value(s, "hangup_request_duration_seconds_sum", **duration) == pytest.approx(2.5)
    assert value(s, "hangup_request_duration_seconds_bucket", **duration, le="2.5") == 1
    assert value(s, "hangup_request_duration_seconds_bucket", **duration, le="1.0") == 0
    assert value(s, "hangup_time_to_first_token_seconds_sum", **CHAT) == pytest.approx(0.4)
    assert value(s, "hangup_time_to_first_token_seconds_bucket", **CHAT, le="0.5") == 1
    assert value(s, "hangup_time_to_first_token_seconds_bucket", **CHAT, le="0.25") == 0
    assert value(s, "hangup_overhead_seconds_sum", route="chat") == pytest.approx(0.0004)
    assert value(s, "hangup_overhead_seconds_bucket", route="chat", le="0.0005") == 1
    assert value(s, "hangup_overhead_seconds_bucket", route="chat", le="0.00025") == 0
    assert total(s, "hangup_cancel_propagation_seconds_count") == 0
    assert value(s, "hangup_requests_in_flight") == 0


def test_client_cancelled_counts_savings_waste_and_propagation() -> None:
    m = new_metrics()
    m.request_finished(
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            usage=Usage(prompt_tokens=200, completion_tokens=30, completion_estimated=True),
            savings=Savings(tokens_saved=226, tokens_saved_upper=970, tokens_wasted=4),
            cost=Cost(used_usd=0.0002, saved_usd=0.0009, wasted_usd=0.00001),
            client_gone_at=1001.0,
            upstream_closed_at=1001.0007,
        )
    )
    s = rendered(m)
    assert value(s, "hangup_requests_total", **CHAT, outcome="client_cancelled") == 1
    assert value(s, "hangup_tokens_estimated_total", **CHAT, type="completion") == 30
    assert value(s, "hangup_tokens_estimated_total", **CHAT, type="prompt") is None
    assert value(s, "hangup_tokens_saved_total", **CHAT) == 226
    assert value(s, "hangup_tokens_saved_upper_bound_total", **CHAT) == 970
    assert value(s, "hangup_tokens_wasted_total", **CHAT) == 4
    assert value(s, "hangup_cost_saved_usd_total", **CHAT) == pytest.approx(0.0009)
    assert value(s, "hangup_cost_wasted_usd_total", **CHAT) == pytest.approx(0.00001)
    bucket = "hangup_cancel_propagation_seconds_bucket"
    assert value(s, bucket, route="chat", le="0.0005") == 0
    assert value(s, bucket, route="chat", le="0.001") == 1
    assert value(s, "hangup_cancel_propagation_seconds_sum", route="chat") == pytest.approx(
        0.0007, abs=1e-9
    )


def test_every_timeout_phase_is_counted_under_its_own_label() -> None:
    m = new_metrics()
    for kind in TimeoutKind:
        m.request_finished(make_record(outcome=Outcome.TIMEOUT, timeout_kind=kind, status=504))
    s = rendered(m)
    for kind in TimeoutKind:
        assert value(s, "hangup_timeouts_total", route="chat", phase=kind.value) == 1
    assert value(s, "hangup_requests_total", **CHAT, outcome="timeout") == len(TimeoutKind)
    assert value(
        s, "hangup_responses_total", route="chat", endpoint="chat.completions", status_class="5xx"
    ) == len(TimeoutKind)
    # Pre-created at zero for every configured route, so rate() and ratios see the first one.
    assert value(s, "hangup_timeouts_total", route="batch", phase="idle") == 0


def test_every_outcome_has_its_own_series() -> None:
    m = new_metrics()
    for outcome in Outcome:
        m.request_finished(make_record(outcome=outcome))
    m.request_finished(make_record(outcome=None))
    s = rendered(m)
    for outcome in (*Outcome, "unsettled"):
        assert value(s, "hangup_requests_total", **CHAT, outcome=str(outcome)) == 1
    assert total(s, "hangup_requests_total") == len(Outcome) + 1


def test_rejected_before_routing_is_labelled_none() -> None:
    m = new_metrics()
    m.request_finished(
        make_record(
            outcome=Outcome.REJECTED,
            route=None,
            model=None,
            status=401,
            upstream_status=None,
            endpoint="other",
        )
    )
    s = rendered(m)
    assert value(s, "hangup_requests_total", route="none", model="none", outcome="rejected") == 1
    assert (
        value(s, "hangup_responses_total", route="none", endpoint="other", status_class="4xx") == 1
    )
    # No tokens used or saved: not an unpriced request.
    assert total(s, "hangup_unpriced_requests_total") == 0


def test_no_response_sent_is_status_class_none() -> None:
    m = new_metrics()
    m.request_finished(make_record(outcome=Outcome.CLIENT_CANCELLED, status=None))
    s = rendered(m)
    assert (
        value(
            s,
            "hangup_responses_total",
            route="chat",
            endpoint="chat.completions",
            status_class="none",
        )
        == 1
    )


def test_unpriced_requests_count_only_when_tokens_were_involved() -> None:
    m = new_metrics()
    m.request_finished(make_record(usage=Usage(prompt_tokens=10, completion_tokens=5)))
    m.request_finished(make_record(cost=Cost(), usage=Usage(prompt_tokens=10)))
    m.request_finished(
        make_record(outcome=Outcome.CLIENT_CANCELLED, savings=Savings(tokens_saved=100))
    )
    m.request_finished(make_record(outcome=Outcome.UPSTREAM_ERROR, status=502))
    s = rendered(m)
    assert value(s, "hangup_unpriced_requests_total", **CHAT) == 3
    assert total(s, "hangup_cost_usd_total") == 0


def test_upper_bound_is_only_added_when_known() -> None:
    m = new_metrics()
    m.request_finished(
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            savings=Savings(tokens_saved=100, tokens_saved_upper=None),
        )
    )
    m.request_finished(
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            savings=Savings(tokens_saved=50, tokens_saved_upper=300),
        )
    )
    s = rendered(m)
    assert value(s, "hangup_tokens_saved_total", **CHAT) == 150
    assert value(s, "hangup_tokens_saved_upper_bound_total", **CHAT) == 300


def test_negative_amounts_are_dropped_rather_than_raised() -> None:
    m = new_metrics()
    m.request_finished(make_record(savings=Savings(tokens_saved=-5)))
    s = rendered(m)
    assert total(s, "hangup_tokens_saved_total") == 0
    assert value(s, "hangup_requests_total", **CHAT, outcome="completed") == 1


def test_sdk_retries_background_cancels_and_connection_gauge() -> None:
    m = new_metrics()
    m.request_finished(make_record(sdk_retry_count=2))
    m.request_finished(make_record(sdk_retry_count=0))
    for result in BackgroundCancel:
        m.request_finished(make_record(endpoint="responses", background=result))
    m.upstream_connection_opened()
    m.upstream_connection_opened()
    m.upstream_connection_closed()
    s = rendered(m)
    assert value(s, "hangup_sdk_retries_total", route="chat") == 1
    assert value(s, "hangup_sdk_retries_total", route="batch") == 0
    for result in BackgroundCancel:
        assert value(s, "hangup_background_cancels_total", route="chat", result=result.value) == 1
    assert value(s, "hangup_upstream_connections") == 1
    assert value(s, "hangup_build_info", version=__version__) == 1


def test_in_flight_gauge_follows_start_and_end_not_the_record() -> None:
    m = new_metrics()
    # Called for every request: the gauge value's own `inc`, no facade frame between.
    assert isinstance(m.request_started, partial) and isinstance(m.request_ended, partial)
    assert m.request_started.func == m.request_ended.func == m._in_flight_count.inc
    for _ in range(3):
        m.request_started()
    assert value(rendered(m), "hangup_requests_in_flight") == 3
    m.request_ended()
    m.request_ended()
    assert value(rendered(m), "hangup_requests_in_flight") == 1
    # A record sealed later (its prompt was being counted) does not move the gauge.
    m.request_finished(make_record())
    assert value(rendered(m), "hangup_requests_in_flight") == 1


def test_model_label_is_capped_and_earned() -> None:
    m = new_metrics(max_models=2, configured_models=["gpt-4o", "o3"])
    for model in ("a-1", "b-2", "c-3", "gpt-4o", "o3"):
        m.request_finished(make_record(model=model, usage=Usage(prompt_tokens=1)))
    m.request_finished(make_record(model=None))
    s = rendered(m)
    by_model = {
        dict(labels)["model"]: v
        for (name, labels), v in s.items()
        if name == "hangup_requests_total"
    }
    # Configured models never use up a slot; the third unknown model falls into "other".
    assert by_model == {"a-1": 1, "b-2": 1, "other": 1, "gpt-4o": 1, "o3": 1, "none": 1}
    assert m.model_label("b-2") == "b-2"
    assert m.model_label("c-3") == "other"
    assert m.model_label(None) == "none"


def test_models_the_upstream_refused_do_not_take_a_slot() -> None:
    m = new_metrics(max_models=1, configured_models=[])
    m.request_finished(make_record(model="made-up", status=404, upstream_status=404))
    m.request_finished(
        make_record(
            model="never-reached", upstream_status=None, status=502, outcome=Outcome.UPSTREAM_ERROR
        )
    )
    m.request_finished(make_record(model="real-model"))
    assert m.model_label("made-up") == "other"
    assert m.model_label("never-reached") == "other"
    assert m.model_label("real-model") == "real-model"
    s = rendered(m)
    assert total(s, "hangup_requests_total", model="other") == 2


def test_endpoint_label_is_capped() -> None:
    m = new_metrics()
    for i in range(schema.MAX_ENDPOINTS + 5):
        m.request_finished(make_record(endpoint=f"ep{i}"))
    s = rendered(m)
    endpoints = {dict(ls)["endpoint"] for (n, ls) in s if n == "hangup_responses_total"}
    assert len(endpoints) == schema.MAX_ENDPOINTS + 1
    assert total(s, "hangup_responses_total", endpoint="other") == 5


PLANTED = "sk-planted-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
RANDOM_TOKEN = "Zq8Xr2Lm4Nv6Bt1Yc3Hd5Kf7Jg9Ps0Wa"  # no prefix, still key-shaped


def test_secrets_in_the_fields_that_feed_labels_never_reach_the_output() -> None:
    """Only route, model and endpoint of a record become label values: a key pasted into any
    of them is exported as "none"/"other", even when the upstream accepted the request."""
    m = new_metrics(configured_models=[])
    for secret in (PLANTED, RANDOM_TOKEN, f"gpt-4o-{RANDOM_TOKEN}"):
        m.request_finished(
            make_record(
                route=secret,
                model=secret,
                endpoint=secret,
                upstream_status=200,  # accepted: a plain model name would take a label slot
                outcome=Outcome.COMPLETED,
            )
        )
    body, _ = m.render()
    text = body.decode()
    for fragment in ("sk-planted", "9f8e7d6c5b4a", RANDOM_TOKEN[:12]):
        assert fragment not in text
    s = parse(text)
    assert value(s, "hangup_requests_total", route="none", model="other", outcome="completed") == 3
    assert (
        value(s, "hangup_responses_total", route="none", endpoint="other", status_class="2xx") == 3
    )
    # No other record field can reach the output: the exported label names are exactly the
    # schema's (a new label fed by another field must come with its own secret check).
    exported = {name for _, labels in s for name, _ in labels}
    assert exported <= {label for spec in schema.ALL for label in spec.labels} | {"le"}


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("gpt-4o-mini", False),
        ("meta-llama/Llama-3.1-70B-Instruct", False),
        ("gpt-4o-2024-08-06", False),
        ("ft:gpt-4o-mini:acme:support:9abcDEF1", False),
        ("llama3:8b-instruct-q4_K_M", False),
        ("sk-proj-abc", True),
        ("hf_abcdef", True),
        ("eyJhbGciOiJIUzI1NiJ9", True),
        (RANDOM_TOKEN, True),
    ],
)
def test_secret_shape_heuristic(text: str, secret: bool) -> None:
    assert looks_like_secret(text) is secret


def test_two_instances_in_one_process_do_not_collide() -> None:
    a, b = new_metrics(), new_metrics()
    a.request_finished(make_record())
    a.request_finished(make_record())
    b.request_finished(make_record())
    assert value(rendered(a), "hangup_requests_total", **CHAT, outcome="completed") == 2
    assert value(rendered(b), "hangup_requests_total", **CHAT, outcome="completed") == 1


def test_an_app_owned_registry_holds_the_metrics() -> None:
    registry = CollectorRegistry()
    m = new_metrics(registry=registry)
    m.request_finished(make_record())
    labels = {**CHAT, "outcome": "completed", "client": "none"}
    assert registry.get_sample_value("hangup_requests_total", labels) == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        new_metrics(registry=registry)


def test_render_is_prometheus_text_without_created_samples() -> None:
    m = new_metrics()
    m.request_finished(make_record(usage=Usage(prompt_tokens=1)))
    body, content_type = m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {name for name, _ in parse(body.decode())}
    assert names <= SERIES_NAMES
    assert not any(n.endswith("_created") for n in names)


def test_setting_the_multiprocess_variable_too_late_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before the hangup process starts"):
        new_metrics()


def test_saturating_every_label_reaches_exactly_the_documented_bound() -> None:
    max_models = 3
    m = new_metrics(max_models=max_models, clients=("anonymous",))
    routes = [*ROUTES, None]
    models = [*CONFIGURED_MODELS, *(f"seen-{i}" for i in range(max_models + 1)), None]
    outcomes = [*Outcome, None]
    clients = ["anonymous", "not-configured", None]
    # The first loop admitted "chat.completions"; 15 more fill the slots, the last is "other".
    endpoints = ["chat.completions", *(f"ep{i}" for i in range(schema.MAX_ENDPOINTS))]
    statuses = [200, 301, 404, 503, None]
    cycle = itertools.count()
    for route, model, outcome, client in itertools.product(routes, models, outcomes, clients):
        i = next(cycle)
        m.request_finished(
            make_record(
                route=route,
                model=model,
                outcome=outcome,
                client=client,
                timeout_kind=list(TimeoutKind)[i % len(TimeoutKind)],
                background=list(BackgroundCancel)[i % len(BackgroundCancel)],
                sdk_retry_count=1,
                usage=Usage(
                    prompt_tokens=5,
                    completion_tokens=5,
                    cached_tokens=1,
                    reasoning_tokens=1,
                    # Every other request's prompt was tokenized: both prompt series fill.
                    prompt_estimated=i % 2 == 0,
                    prompt_tokenized=i % 2 == 1,
                    completion_estimated=True,
                ),
                savings=Savings(tokens_saved=1, tokens_saved_upper=2, tokens_wasted=1),
                cost=Cost(1.0, 1.0, 1.0) if i % 2 else None,
                waste={r: Waste(1, 1, 1, 1.0) for r in WASTE_REASONS},
                first_token_at=1000.5,
                client_gone_at=1001.0,
                upstream_closed_at=1001.001,
            )
        )
    for route, endpoint, status in itertools.product(routes, endpoints, statuses):
        m.request_finished(make_record(route=route, endpoint=endpoint, status=status))
    s = rendered(m)
    expected = series_bound(len(ROUTES), len(CONFIGURED_MODELS), max_models)
    # Gauges without labels: in-flight, upstream connections (build_info is counted in the bound).
    assert len(s) == expected


def test_summary_for_humans() -> None:
    m = new_metrics()
    m.request_finished(
        make_record(
            usage=Usage(prompt_tokens=1000, completion_tokens=500), cost=Cost(used_usd=0.0015)
        )
    )
    for gone in (0.0004, 0.0012, 0.003):
        m.request_finished(
            make_record(
                outcome=Outcome.CLIENT_CANCELLED,
                usage=Usage(prompt_tokens=100, completion_tokens=20, completion_estimated=True),
                savings=Savings(tokens_saved=300, tokens_saved_upper=1000, tokens_wasted=1),
                cost=Cost(used_usd=0.0001, saved_usd=0.0005, wasted_usd=0.0),
                client_gone_at=1001.0,
                upstream_closed_at=1001.0 + gone,
            )
        )
    m.request_finished(make_record(model="llama-3.1-8b", usage=Usage(prompt_tokens=7)))
    assert summarize(m).splitlines() == [
        "requests        5: completed 2, client_cancelled 3",
        "tokens used     1,867 (prompt 1,307, completion 560); 60 of them estimated",
        "tokens saved    ~900 (upper bound 3,000); 3 wasted after disconnect",
        "cost            $0.0018 used, ~$0.0015 saved by hanging up, $0.0000 wasted; "
        "unpriced requests: 1",
        "cancel -> close p50 <= 2 ms, p99 <= 5 ms over 3 disconnects (histogram bucket bounds)",
    ]


def test_the_summary_never_claims_a_value_below_the_histograms_resolution() -> None:
    """The demo once said "p50 ~0.05 ms" (interpolated inside the first bucket) while each of
    its clients had measured 0.4-0.7 ms: a histogram only knows bucket bounds."""
    m = new_metrics()
    for _ in range(5):
        m.request_finished(
            make_record(
                outcome=Outcome.CLIENT_CANCELLED,
                client_gone_at=1001.0,
                upstream_closed_at=1001.00005,
            )
        )
    line = summarize(m).splitlines()[-1]
    assert line == (
        "cancel -> close p50 <= 0.1 ms, p99 <= 0.1 ms over 5 disconnects (histogram bucket bounds)"
    )


def test_the_summary_reports_measured_hang_ups_and_the_prices_behind_the_dollars() -> None:
    m = new_metrics()
    measured = [0.0004, 0.0007, 0.0005, 0.0006]
    prices = {"demo-model": PriceConfig(input_per_mtok=2.5, output_per_mtok=10.0)}
    lines = summarize(m, cancel_close_s=measured, prices=prices).splitlines()
    assert lines[-2:] == [
        "price           demo-model: input $2.50, output $10.00 per million tokens",
        "cancel -> close p50 0.5 ms, max 0.7 ms over 4 hang-ups (measured at the upstream, "
        "as above)",
    ]


def test_summary_without_cancellations() -> None:
    assert "no client went away" in summarize(new_metrics())


def test_bucket_quantile_matches_promql_interpolation() -> None:
    buckets = {0.001: 2.0, 0.005: 6.0, 0.01: 10.0, math.inf: 10.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001 + 0.004 * 3 / 4)
    assert bucket_quantile(0.1, buckets) == pytest.approx(0.0005)
    assert bucket_quantile(0.99, {0.1: 0.0, math.inf: 4.0}) == 0.1
    assert bucket_quantile(0.5, {math.inf: 0.0}) is None


def test_authorized_without_a_token_lets_everyone_scrape() -> None:
    assert authorized(MetricsConfig(), None)
    assert authorized(MetricsConfig(), "Bearer anything")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cret-token", True),
        ("bearer s3cret-token", True),
        ("  Bearer   s3cret-token ", True),
        ("Bearer s3cret-tokeN", False),
        ("Bearer s3cret-token-and-more", False),
        ("Bearer ", False),
        ("Basic s3cret-token", False),
        ("s3cret-token", False),
        ("Bearer ünïcode", False),
        (None, False),
    ],
)
def test_authorized_with_a_token(header: str | None, ok: bool) -> None:
    config = MetricsConfig(bearer_token=SecretStr("s3cret-token"))
    assert authorized(config, header) is ok


def test_metrics_accepts_the_documented_constructor() -> None:
    """routes and configured_models may be one-shot iterators (they are read once): route "r"
    is a label, configured model "x" keeps its label even with every admitted slot taken."""
    m = Metrics(MetricsConfig(max_models=2), routes=iter(["r"]), configured_models=iter(["x"]))
    assert not m.multiprocess
    for model in ("seen-1", "seen-2", "seen-3", "x"):
        m.request_finished(make_record(route="r", model=model, upstream_status=200))
    assert [m.model_label(x) for x in ("x", "seen-1", "seen-2", "seen-3")] == [
        "x",
        "seen-1",
        "seen-2",
        "other",
    ]
    s = rendered(m)
    assert value(s, "hangup_requests_total", route="r", model="x", outcome="completed") == 1
    assert value(s, "hangup_requests_total", route="r", model="other", outcome="completed") == 1
