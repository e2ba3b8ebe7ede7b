"""The headline metrics test: after a scripted workload through the real proxy against the
simulated provider (tests/metrics_workload.py), /metrics says exactly what happened."""

from __future__ import annotations

import aiohttp
import pytest
from pydantic import SecretStr

from proxy.config import MetricsConfig
from proxy.server import ProxyServer
from tests import metrics_workload as w
from tests.metrics_support import scrape, total, value


async def test_metrics_after_a_scripted_workload_are_exact() -> None:
    async with w.proxy_and_sim() as (server, sink):
        await w.run_workload(server, sink)
        s = await scrape(server)

    assert {o: total(s, "hangup_requests_total", outcome=o) for o in w.OUTCOMES} == w.OUTCOMES
    assert total(s, "hangup_requests_total") == w.REQUESTS
    labels = {"route": w.ROUTE, "model": w.MODEL}
    assert value(s, "hangup_requests_total", **labels, outcome="completed") == 3
    assert value(s, "hangup_timeouts_total", route=w.ROUTE, phase="idle") == 2
    assert total(s, "hangup_timeouts_total") == 2
    assert total(s, "hangup_responses_total", status_class="2xx") == 7
    assert total(s, "hangup_responses_total", status_class="4xx") == 1
    assert total(s, "hangup_responses_total", status_class="5xx") == 1

    prompt = w.PROMPTED * w.prompt_tokens()
    assert value(s, "hangup_tokens_total", **labels, type="prompt") == prompt
    assert value(s, "hangup_tokens_total", **labels, type="completion") == w.COMPLETION_TOKENS
    assert total(s, "hangup_tokens_estimated_total") == 0

    assert value(s, "hangup_tokens_saved_total", **labels) == w.SAVED
    assert value(s, "hangup_tokens_saved_upper_bound_total", **labels) == w.SAVED_UPPER
    assert total(s, "hangup_tokens_wasted_total") == 0

    used_usd = (prompt * w.INPUT_PER_MTOK + w.COMPLETION_TOKENS * w.OUTPUT_PER_MTOK) / 1e6
    assert value(s, "hangup_cost_usd_total", **labels) == pytest.approx(used_usd)
    saved_usd = w.SAVED * w.OUTPUT_PER_MTOK / 1e6
    assert value(s, "hangup_cost_saved_usd_total", **labels) == pytest.approx(saved_usd)
    assert total(s, "hangup_unpriced_requests_total") == 0

    assert value(s, "hangup_cancel_propagation_seconds_count", route=w.ROUTE) == 2
    # Both hang-ups reached the upstream within the 50 ms alert threshold.
    assert value(s, "hangup_cancel_propagation_seconds_bucket", route=w.ROUTE, le="0.05") == 2
    assert value(s, "hangup_time_to_first_token_seconds_count", **labels) == 7
    assert value(s, "hangup_requests_in_flight") == 0
    assert value(s, "hangup_upstream_connections") == 0


async def test_metrics_endpoint_requires_the_bearer_token_when_configured() -> None:
    metrics = MetricsConfig(bearer_token=SecretStr("t0k"))
    config = w.proxy_config("http://127.0.0.1:9/v1").model_copy(update={"metrics": metrics})
    server = ProxyServer(config, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{server.base_url}/metrics"
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            async with session.get(url, headers={"Authorization": "Bearer t0k"}) as resp:
                assert resp.status == 200
                assert "hangup_build_info" in await resp.text()
    finally:
        await server.stop_now()
