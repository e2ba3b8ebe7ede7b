"""Hand-built `RequestRecord`s and rendered-text readers for the metrics tests."""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.attempts import Attempt, AttemptResult
from proxy.config import MetricsConfig
from proxy.metrics import Metrics
from proxy.outcome import (
    BackgroundCancel,
    Cost,
    Outcome,
    RequestRecord,
    Savings,
    TimeoutKind,
    Usage,
    Waste,
)
from proxy.server import ProxyServer

ROUTES = ("chat", "batch")
UPSTREAMS = ("primary", "fallback")
PRICED_MODEL = "gpt-4o-mini"
UNPRICED_MODEL = "llama-3.1-8b"
CONFIGURED_MODELS = (PRICED_MODEL,)

_ids = itertools.count()


def make_record(**overrides: Any) -> RequestRecord:
    """A finished streamed chat request on route "chat"; override any field."""
    fields: dict[str, Any] = {
        "request_id": f"req-{next(_ids)}",
        "method": "POST",
        "path": "/v1/chat/completions",
        "started_at": 1000.0,
        "wall_started_at": 1_700_000_000.0,
        "route": "chat",
        "model": PRICED_MODEL,
        "upstream": "openai",
        "endpoint": "chat.completions",
        "stream": True,
        "status": 200,
        "upstream_status": 200,
        "outcome": Outcome.COMPLETED,
        "ended_at": 1002.0,
    }
    fields.update(overrides)
    return RequestRecord(**fields)


def new_metrics(max_models: int = 50, **kwargs: Any) -> Metrics:
    return Metrics(
        MetricsConfig(max_models=max_models),
        routes=kwargs.pop("routes", ROUTES),
        configured_models=kwargs.pop("configured_models", CONFIGURED_MODELS),
        **kwargs,
    )


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample of a rendered scrape, keyed by (sample name, labels)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def rendered(metrics: Metrics) -> Series:
    body, _ = metrics.render()
    return parse(body.decode("utf-8"))


def value(series: Series, name: str, **labels: str) -> float | None:
    """The sample with exactly these labels; without a `client`, the sum over all clients (None
    when there is no such series)."""
    exact = series.get((name, frozenset(labels.items())))
    if exact is not None or "client" in labels:
        return exact
    want = set(labels.items())
    found = [
        v
        for (n, ls), v in series.items()
        if n == name and want <= ls and {k for k, _ in ls} == {*labels, "client"}
    ]
    return sum(found) if found else None


def total(series: Series, name: str, **labels: str) -> float:
    """Sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= ls)


def coverage_workload() -> list[RequestRecord]:
    """Records that, between them, create every series a dashboard panel or alert rule reads,
    for route "chat" and model PRICED_MODEL, and trip every alert in deploy/prometheus/alerts.yml
    (slow cancel propagation, many timeouts, upstream errors, rejections and rate limits, a
    request that was never settled)."""
    priced = Cost(used_usd=0.0003, saved_usd=0.0006, wasted_usd=0.00001)
    records = [
        make_record(
            usage=Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=20),
            cost=Cost(used_usd=0.0003),
            first_token_at=1000.3,
            upstream_wait_s=1.999,
            sdk_retry_count=1,
        ),
        make_record(
            # Its primary failed before content; the fallback answered.
            attempts=[
                Attempt("primary", PRICED_MODEL, 1000.0, result=AttemptResult.SERVER_ERROR),
                Attempt("fallback", PRICED_MODEL, 1000.1, "fallback", result=AttemptResult.OK),
            ],
            usage=Usage(prompt_tokens=100, completion_tokens=80, reasoning_tokens=30),
            cost=Cost(used_usd=0.0004),
            first_token_at=1001.0,
            upstream_wait_s=1.998,
        ),
        # A hedge race: the primary lost (its prompt was billed), the hedge answered; and a
        # primary that timed out before content, then the fallback answered.
        make_record(
            attempts=[
                Attempt(
                    "primary",
                    PRICED_MODEL,
                    1000.0,
                    result=AttemptResult.ABANDONED,
                    error="hedge loser",
                ),
                Attempt("fallback", PRICED_MODEL, 1000.2, "hedge", result=AttemptResult.OK),
            ],
            usage=Usage(prompt_tokens=200, completion_tokens=40, prompt_estimated=True),
            waste={
                "hedge": Waste(attempts=1, prompt_tokens=100, usd=0.00002, tokens_saved=200),
                "failover": Waste(attempts=1, prompt_tokens=100, completion_tokens=3, usd=0.00003),
            },
            cost=Cost(used_usd=0.0001, saved_usd=0.0016, wasted_usd=0.0),
            first_token_at=1000.6,
            upstream_wait_s=0.5,
        ),
        # Client went away mid-stream: tokens and money saved; one fast, one slow propagation.
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            usage=Usage(prompt_tokens=100, completion_tokens=10, completion_estimated=True),
            savings=Savings(tokens_saved=200, tokens_saved_upper=900, tokens_wasted=2),
            cost=priced,
            first_token_at=1000.2,
            client_gone_at=1001.0,
            upstream_closed_at=1001.0008,
            upstream_wait_s=1.9,
        ),
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            status=None,
            usage=Usage(prompt_tokens=90, prompt_estimated=True),
            savings=Savings(tokens_saved=256),
            cost=Cost(used_usd=0.0001, saved_usd=0.0002, wasted_usd=0.0),
            client_gone_at=1000.5,
            upstream_closed_at=1000.7,
            upstream_wait_s=1.5,
        ),
        make_record(
            outcome=Outcome.UPSTREAM_ERROR, status=502, upstream_status=502, ended_at=1000.1
        ),
        # A stream the upstream cut without its terminal event.
        make_record(outcome=Outcome.UPSTREAM_ERROR, upstream_status=200, ended_at=1000.3),
        # The upstream refused (bad key, unknown model, bad request) or rate limited: enough of
        # each to trip their alerts.
        *(
            make_record(
                outcome=Outcome.UPSTREAM_REJECTED,
                status=code,
                upstream_status=code,
                ended_at=1000.05,
            )
            for code in (400, 401, 404)
        ),
        *(
            make_record(
                outcome=Outcome.RATE_LIMITED, status=429, upstream_status=429, ended_at=1000.05
            )
            for _ in range(2)
        ),
        # A cut stream whose prompt hangup counted with the model's tokenizer.
        make_record(
            outcome=Outcome.CLIENT_CANCELLED,
            usage=Usage(prompt_tokens=44, completion_tokens=5, prompt_tokenized=True),
            client_gone_at=1001.0,
            upstream_closed_at=1001.0005,
        ),
        make_record(
            outcome=Outcome.REJECTED,
            route=None,
            model=None,
            status=401,
            upstream_status=None,
            ended_at=1000.001,
        ),
        make_record(outcome=Outcome.SHUTDOWN, status=None, ended_at=1030.0),
        make_record(outcome=None, status=500, ended_at=1000.2),  # a relay bug, made visible
        # A model with no configured price, accepted upstream: earns a label slot, is unpriced.
        make_record(
            model=UNPRICED_MODEL,
            usage=Usage(prompt_tokens=40, completion_tokens=8),
            first_token_at=1000.1,
        ),
    ]
    records += [
        make_record(
            outcome=Outcome.TIMEOUT,
            timeout_kind=kind,
            status=504,
            upstream_status=None if kind is TimeoutKind.CONNECT else 200,
            ended_at=1010.0,
        )
        for kind in TimeoutKind
    ]
    records += [
        make_record(
            endpoint="responses",
            background=result,
            outcome=Outcome.CLIENT_CANCELLED,
            background_response_id="resp_abc",
        )
        for result in BackgroundCancel
    ]
    # Whatever outcomes the relay grows, each one appears at least once.
    seen = {r.outcome for r in records}
    records += [make_record(outcome=o) for o in Outcome if o not in seen]
    return records


async def scrape(server: ProxyServer) -> Series:
    """The server's `/metrics`, parsed."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.base_url}/metrics") as response,
    ):
        assert response.status == 200
        return parse(await response.text())
