"""A real Prometheus scrapes hangup's /metrics, then every PromQL expression the dashboard and the
alert rules ship with must return data: the dashboard cannot drift from the metric contract.

Two targets. For the exhaustive check, the metrics facade behind a small aiohttp app, fed with
records that cover every series and trip every alert (tests/metrics_support.py
coverage_workload): a real proxy cannot be driven into a shutdown, an internal error or a
background job within a short test. Then the real proxy in front of the simulated provider after
the scripted workload of tests/metrics_workload.py: Prometheus must see its exact numbers, and
every panel whose metrics that workload produces must show data.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from proxy.config import MetricsConfig
from proxy.metrics import Metrics, authorized
from proxy.outcome import EngineAbort
from tests import metrics_workload as w
from tests.metrics_support import UPSTREAMS, coverage_workload, new_metrics
from tests.prometheus_support import (
    ALERTS,
    ALERTS_TEST,
    SCRAPE_EXAMPLE,
    Binaries,
    Prometheus,
    alert_exprs,
    dashboard_exprs,
    find_binaries,
    finite,
    free_port,
    metric_names,
    scrape_config,
    substitute,
    variable_queries,
)

SCRAPE_TOKEN = "scrape-token-for-the-test"

StartPrometheus = Callable[[dict[str, Any]], Prometheus]


@pytest.fixture
def binaries() -> Binaries:
    return find_binaries()


@pytest.fixture
def start_prometheus(binaries: Binaries, tmp_path: Path) -> Iterator[StartPrometheus]:
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = Prometheus(binaries.prometheus, workdir, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def promtool(binaries: Binaries, *args: str) -> None:
    proc = subprocess.run(
        [binaries.promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_pass_promtool_check_and_their_unit_tests(binaries: Binaries) -> None:
    promtool(binaries, "check", "rules", str(ALERTS))
    promtool(binaries, "test", "rules", str(ALERTS_TEST))


def test_scrape_example_is_a_valid_prometheus_config(binaries: Binaries) -> None:
    promtool(binaries, "check", "config", str(SCRAPE_EXAMPLE))


async def _feed(metrics: Metrics) -> None:
    """Keeps every counter moving, so rate() and histogram_quantile() have something to say."""
    while True:
        for record in coverage_workload():
            metrics.request_started()
            metrics.request_ended()
            metrics.request_finished(record)
        metrics.loop_lag(0.002)  # what the app's LoopLagProbe reports (proxy/looplag.py)
        # One engine abort per round, as proxy/engines reports them.
        metrics.engine_abort_sent(UPSTREAMS[0])
        metrics.engine_abort_settled(UPSTREAMS[0], EngineAbort.ACKNOWLEDGED, 0.003)
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def fed_target(aiohttp_server: Any) -> AsyncIterator[int]:
    """A /metrics endpoint (bearer token required) over a continuously fed facade; its port."""
    metrics = new_metrics(upstreams=UPSTREAMS, abort_upstreams=UPSTREAMS[:1])
    config = MetricsConfig(bearer_token=SecretStr(SCRAPE_TOKEN))

    async def scrape(request: web.Request) -> web.Response:
        if not authorized(config, request.headers.get("Authorization")):
            return web.Response(status=401)
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    server = await aiohttp_server(app)
    feeder = asyncio.create_task(_feed(metrics), name="feed-metrics")
    try:
        yield server.port
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


async def test_every_dashboard_and_alert_expression_returns_data(
    aiohttp_server: Any, start_prometheus: StartPrometheus
) -> None:
    async with fed_target(aiohttp_server) as port, aiohttp.ClientSession() as session:
        target = f"127.0.0.1:{port}"
        # A second target nobody listens on: HangupDown (up == 0) must have something to find.
        dead = f"127.0.0.1:{free_port()}"
        prom = start_prometheus(scrape_config([target, dead], bearer_token=SCRAPE_TOKEN))
        await prom.wait_ready(session)
        # up == 1 also proves Prometheus' bearer token got through `authorized`.
        await prom.wait_for(session, f'up{{instance="{target}"}} == 1')
        await prom.wait_for(session, f'up{{instance="{dead}"}} == 0')
        # rate() needs two samples in its window.
        await prom.wait_for(session, "count_over_time(hangup_build_info[1m]) >= 2")

        failures = []
        for where, expr in dashboard_exprs() + alert_exprs():
            query = substitute(expr)
            try:
                result = await prom.query(session, query)
            except AssertionError as exc:
                failures.append(f"{where}: {exc}")
                continue
            if not result:
                failures.append(f"{where}: no data for {query}")
            elif not finite(result):
                failures.append(f"{where}: only NaN/Inf for {query}: {result}")
        for name, selector, label in variable_queries():
            result = await prom.query(session, substitute(selector))
            values = {r["metric"].get(label) for r in result}
            if not {"chat", "gpt-4o-mini"} & values:
                failures.append(f"variable {name}: {selector} gave {label} values {values}")
        assert not failures, "\n".join(failures)


# What the scripted workload cannot produce (no drain, no pricing gaps, no estimates, no
# background jobs, no prompt cache, no reasoning): panels on these may legitimately be empty.
NOT_IN_SCRIPTED_WORKLOAD = frozenset(
    {
        "hangup_cost_wasted_usd_total",
        "hangup_tokens_wasted_total",
        "hangup_unpriced_requests_total",
        "hangup_tokens_estimated_total",
        "hangup_prompt_tokens_tokenized_total",  # a local simulator: no tokenizer applies
        "hangup_background_cancels_total",
        "hangup_cached_tokens_total",
        "hangup_reasoning_tokens_total",
        # Its upstream is `engine: generic` (nothing to abort); the fed facade above and
        # tests/test_engine_aborts.py cover these.
        "hangup_engine_aborts_sent_total",
        "hangup_engine_aborts_total",
        "hangup_engine_abort_seconds_bucket",
    }
)


async def test_prometheus_sees_the_real_proxy_after_a_scripted_workload(
    start_prometheus: StartPrometheus,
) -> None:
    async with w.proxy_and_sim() as (server, sink), aiohttp.ClientSession() as session:
        target = f"127.0.0.1:{server.port}"
        prom = start_prometheus(scrape_config([target]))
        await prom.wait_ready(session)
        await prom.wait_for(session, f'up{{instance="{target}"}} == 1')
        # Twice, with a scrape in between: the first run creates the series, the second moves
        # them, so rate() and increase() have a difference to show.
        for run in (1, 2):
            await w.run_workload(server, sink)
            await prom.wait_for(session, f"sum(hangup_requests_total) == {run * w.REQUESTS}")

        result = await prom.query(session, "sum by (outcome) (hangup_requests_total)")
        seen = {r["metric"]["outcome"]: float(r["value"][1]) for r in result}
        assert seen == {outcome: 2.0 * n for outcome, n in w.OUTCOMES.items()}
        saved = await prom.query(session, "sum(hangup_tokens_saved_total)")
        assert float(saved[0]["value"][1]) == 2 * w.SAVED

        failures = []
        for where, expr in dashboard_exprs():
            if metric_names(expr) & NOT_IN_SCRIPTED_WORKLOAD:
                continue
            query = substitute(expr, route=w.ROUTE, model=w.MODEL)
            result = await prom.query(session, query)
            if not result or not finite(result):
                failures.append(f"{where}: no finite data for {query}: {result}")
        assert not failures, "\n".join(failures)
