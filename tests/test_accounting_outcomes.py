"""True outcomes and true overhead, through the production runner against the simulator.

Each test checks the record, the access-log line and /metrics of one request, on a fresh proxy:
an upstream 400 or 401 is `upstream_rejected` and a 429 `rate_limited` (no tokens, no cost); a
stream that ends without its terminal event is an `upstream_error` (truncated) that stays out of
the typical-length history; and waits that end in a deadline, a hang-up or a retry backoff are
not counted as hangup's overhead.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import HangupConfig
from proxy.outcome import Outcome, RequestRecord
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from proxy.tokenize import openai as offline
from tests.conftest import StartProxy
from tests.metrics_support import scrape, value
from tests.support import RawClient, access_line, config_from

CHAT = "/v1/chat/completions"
COOKBOOK: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "openai" / "prompt-token-counts.json").read_text()
)
MODEL = "gpt-4o-mini"
PRICES = {MODEL: {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}
# hangup's own work on one request is a few milliseconds; the waits this file provokes are
# hundreds of milliseconds to seconds, so a bound in between tells them apart on a busy machine.
OWN_TIME_BOUND_S = 0.1


def config(base_url: str | None, **route: Any) -> HangupConfig:
    assert base_url is not None, "the simulator is not started"
    return config_from(
        {
            "upstreams": {"sim": {"base_url": base_url, "billing": {"stream": "stops"}}},
            "routes": [{"name": "default", "upstream": "sim", **route}],
            "prices": PRICES,
        }
    )


BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a story about seven birds."}],
}


async def post(
    server: ProxyServer, behaviour: str, request_id: str, *, stream: bool, **extra: Any
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}{CHAT}",
            json={**BODY, "stream": stream, **extra},
            headers={"x-request-id": request_id, "x-sim-behaviour": behaviour},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response,
    ):
        return response.status, await response.read()


async def check_overhead(server: ProxyServer, record: RequestRecord, line: dict[str, Any]) -> None:
    """Overhead is hangup's own time in the record, the log and the histogram alike."""
    overhead = record.overhead_s
    assert overhead is not None and overhead < OWN_TIME_BOUND_S, (overhead, record)
    print(
        f"{record.request_id}: {record.outcome}, duration {record.duration_s or 0:.3f} s, "
        f"overhead {overhead * 1000:.2f} ms"
    )
    assert line["overhead_ms"] == pytest.approx(overhead * 1000, abs=0.001)
    s = await scrape(server)
    assert value(s, "hangup_overhead_seconds_count", route="default") == 1
    assert value(s, "hangup_overhead_seconds_sum", route="default") == pytest.approx(overhead)


@pytest.mark.parametrize(
    ("status", "stream"), [(400, False), (400, True), (401, False), (401, True)]
)
async def test_an_upstream_rejection_is_its_own_outcome_without_tokens_or_cost(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    status: int,
    stream: bool,
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url))
    rid = f"rejected-{status}-{stream}"
    got, _ = await post(server, f"error:status={status}", rid, stream=stream)
    assert got == status
    record = await sink.wait_for(rid)
    assert record.outcome is Outcome.UPSTREAM_REJECTED
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (0, 0)
    assert record.savings is None
    assert record.cost is not None and record.cost.used_usd == 0.0
    line = access_line(caplog, rid)
    assert line["outcome"] == "upstream_rejected" and line["upstream_status"] == status
    assert line["tokens"]["prompt"] == 0 and line["tokens"]["completion"] == 0
    assert line["tokens"]["estimated"] is False
    s = await scrape(server)
    labels = {"route": "default", "model": MODEL}  # priced: a configured label
    assert value(s, "hangup_requests_total", **labels, outcome="upstream_rejected") == 1
    assert value(s, "hangup_requests_total", **labels, outcome="completed") is None
    assert not any(n.startswith("hangup_tokens_total") for n, _ in s)
    assert not any(n.startswith("hangup_cost_usd_total") for n, _ in s)
    await check_overhead(server, record, line)


async def test_a_429_is_rate_limited_without_tokens_or_cost(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url))
    got, _ = await post(server, "error:status=429", "limited", stream=True)
    assert got == 429
    record = await sink.wait_for("limited")
    assert record.outcome is Outcome.RATE_LIMITED
    assert record.usage.total_tokens == 0 and record.cost is not None
    assert record.cost.used_usd == 0.0
    line = access_line(caplog, "limited")
    assert line["outcome"] == "rate_limited" and line["tokens"]["prompt"] == 0
    s = await scrape(server)
    assert value(s, "hangup_requests_total", route="default", model=MODEL, outcome="rate_limited")
    assert not any(n.startswith("hangup_tokens_total") for n, _ in s)
    await check_overhead(server, record, line)


async def test_a_stream_without_its_terminal_event_is_a_truncated_upstream_failure(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url))
    got, raw = await post(server, "truncate:after=5", "cut", stream=True, max_tokens=50)
    assert got == 200 and b"[DONE]" not in raw and b'finish_reason":"' not in raw
    assert (await sim.wait_finished("cut")).content_tokens_sent == 5
    record = await sink.wait_for("cut")
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert record.error_type == "upstream_truncated"
    assert record.stream_terminated is False
    # What arrived was generated and is billed: 5 chunks counted, the prompt estimated.
    usage = record.usage
    assert usage.completion_tokens == 5 and usage.completion_estimated
    assert usage.prompt_estimated and usage.prompt_tokens == record.prompt_estimate > 0
    assert record.savings is None  # the upstream cut it, not hangup
    assert record.cost is not None and record.cost.used_usd == pytest.approx(
        (usage.prompt_tokens * 0.15 + 5 * 0.6) / 1e6
    )
    # A cut answer is not a typical length: nothing was learned.
    assert len(server.state.accountant.typical) == 0
    line = access_line(caplog, "cut")
    assert line["outcome"] == "upstream_error" and line["tokens"]["completion"] == 5
    assert line["tokens"]["completion_source"] == "estimated"
    s = await scrape(server)
    labels = {"route": "default", "model": MODEL}
    assert value(s, "hangup_requests_total", **labels, outcome="upstream_error") == 1
    assert value(s, "hangup_tokens_total", **labels, type="completion") == 5
    assert value(s, "hangup_tokens_estimated_total", **labels, type="completion") == 5
    await check_overhead(server, record, line)


async def test_a_complete_stream_is_learned_and_a_truncated_one_is_not(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The counterpart of the test above: the history does learn from a whole stream, so its
    empty history there is the truncation's doing."""
    server, sink = await start_proxy(config(sim.base_url))
    await post(server, "normal", "whole", stream=True, max_tokens=5)
    record = await sink.wait_for("whole")
    assert record.outcome is Outcome.COMPLETED and record.stream_terminated is True
    assert len(server.state.accountant.typical) == 1


# --- overhead: waits that end badly are not hangup's time ---------------------------------------


async def test_a_header_timeout_is_not_overhead(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url, timeouts={"headers_s": 0.5}))
    got, _ = await post(server, "slow-headers:delay=30", "slow-headers", stream=False)
    assert got == 504
    record = await sink.wait_for("slow-headers")
    assert record.outcome is Outcome.TIMEOUT and record.duration_s is not None
    assert record.duration_s >= 0.5
    await check_overhead(server, record, access_line(caplog, "slow-headers"))


async def test_a_silent_upstream_is_not_overhead(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url, timeouts={"idle_s": 0.5}))
    got, _ = await post(server, "stall:after=2", "silent", stream=True, max_tokens=50)
    assert got == 200
    record = await sink.wait_for("silent")
    assert record.outcome is Outcome.TIMEOUT and record.duration_s is not None
    assert record.duration_s >= 0.5
    await check_overhead(server, record, access_line(caplog, "silent"))


async def test_a_client_hanging_up_during_the_header_wait_is_not_overhead(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(sim.base_url))
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        CHAT,
        BODY,
        {"x-request-id": "gone", "x-sim-behaviour": "slow-headers:delay=30"},
    )
    await sim.wait_request("gone")
    await asyncio.sleep(0.4)  # the client waits for headers a while, then gives up
    client.close()
    record = await sink.wait_for("gone")
    assert record.outcome is Outcome.CLIENT_CANCELLED and record.duration_s is not None
    assert record.duration_s >= 0.4
    await check_overhead(server, record, access_line(caplog, "gone"))


async def test_retry_backoff_is_not_overhead(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    with socket.socket() as s:  # a port nobody listens on: every connect is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, sink = await start_proxy(
        config(f"http://127.0.0.1:{port}/v1", max_retries=2, retry_backoff_s=0.2)
    )
    got, _ = await post(server, "normal", "refused", stream=False)
    assert got == 502
    record = await sink.wait_for("refused")
    assert record.outcome is Outcome.UPSTREAM_ERROR and record.duration_s is not None
    assert record.backoff_wait_s >= 0.6 - 0.01  # 0.2 + 0.4
    assert record.usage.total_tokens == 0  # never reached: nothing billed
    await check_overhead(server, record, access_line(caplog, "refused"))


@pytest.mark.skipif(not offline.available(), reason="the tokenizers extra is not installed")
async def test_a_cut_stream_on_an_openai_upstream_records_the_prompt_openai_reported(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The simulator stands in for OpenAI (`engine: openai`); the request is the cookbook's, for
    which OpenAI's API reported prompt_tokens 124 on gpt-4o. The stream is cut before its usage
    chunk, so hangup counts the prompt itself, offline, after the hang-up."""
    caplog.set_level("INFO", logger="hangup.access")
    case = COOKBOOK["cases"][0]
    assert sim.base_url is not None
    server, sink = await start_proxy(
        config_from(
            {
                "upstreams": {"openai": {"base_url": sim.base_url, "engine": "openai"}},
                "routes": [{"name": "default", "upstream": "openai"}],
            }
        )
    )
    client = await RawClient.connect("127.0.0.1", server.port)
    body = {"model": "gpt-4o", "stream": True, "max_tokens": 500, **case["request"]}
    await client.post_json(CHAT, body, {"x-request-id": "oa", "x-sim-behaviour": "stall:after=3"})
    await client.read_until(lambda b: b.count(b'"content":" ') >= 3)
    client.close()
    record = await sink.wait_for("oa", timeout=10.0)
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.usage.prompt_tokens == case["reported"]["gpt-4o"] == 124
    assert record.usage.prompt_source == "tokenized" and record.tokenizer == "o200k_base"
    line = access_line(caplog, "oa")
    assert line["tokens"]["prompt"] == 124 and line["tokens"]["prompt_source"] == "tokenized"
    s = await scrape(server)
    assert value(s, "hangup_prompt_tokens_tokenized_total", route="default", model="gpt-4o") == 124
