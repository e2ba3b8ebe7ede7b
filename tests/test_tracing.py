"""OpenTelemetry traces end to end: the production runner in front of the simulator, exporting
over OTLP/HTTP to an in-process receiver that decodes what it gets with opentelemetry-proto.

Each request must give one SERVER span (parented under the client's traceparent when it sent
one) and one CLIENT span per upstream attempt, whose id is the parent the upstream was told in
its own traceparent header.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from proxy.tracing.otel import EXPORTER_LOGGER, CollectorTrouble, OtelTracing, PendingTrace
from tests.conftest import StartProxy, chat
from tests.otlp_receiver import CLIENT, SERVER, STATUS_ERROR, OtlpReceiver
from tests.support import Blackhole, RawClient, RecordSink, config_from

CLIENT_KEY = "sk-team-search-0123456789abcdef"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


def traceparent(trace_id: int = TRACE_ID, span_id: int = CLIENT_SPAN, flags: int = 1) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean OTEL_* environment; batches leave every 20 ms instead of every 5 s."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")


@pytest.fixture
async def receiver(otel_env: None) -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    try:
        yield r
    finally:
        await r.stop()


def traced_config(upstream: str | None, endpoint: str, **route: Any) -> dict[str, Any]:
    assert upstream is not None, "the simulator is not started"
    return {
        "upstreams": {"sim": {"base_url": upstream}},
        "routes": [{"name": "default", "upstream": "sim", **route}],
        "auth": {"keys": [{"name": "team-search", "key": CLIENT_KEY}]},
        "prices": {"gpt-4o-mini": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}},
        "tracing": {"enabled": True, "endpoint": endpoint},
    }


async def traced_proxy(
    start_proxy: StartProxy, sim: SimulatedProvider, receiver: OtlpReceiver, **route: Any
) -> tuple[ProxyServer, RecordSink]:
    return await start_proxy(config_from(traced_config(sim.base_url, receiver.url, **route)))


def headers(request_id: str, parent: str | None = traceparent()) -> dict[str, str]:
    out = {"authorization": f"Bearer {CLIENT_KEY}", "x-request-id": request_id}
    if parent is not None:
        out["traceparent"] = parent
    return out


def upstream_parents(sim: SimulatedProvider, request_id: str) -> list[str]:
    return [r.headers["traceparent"] for r in sim.requests if r.request_id == request_id]


async def test_streamed_request_continues_the_clients_trace_and_passes_it_upstream(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, sink = await traced_proxy(start_proxy, sim, receiver)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat("gpt-4o-mini", stream=True, stream_options={"include_usage": True}),
            headers=headers("trace-stream"),
        ) as response,
    ):
        assert response.status == 200
        await response.read()
    record = await sink.wait_for("trace-stream")
    span, attempts = await receiver.wait_request("trace-stream", spans=2)

    assert span.kind == SERVER and span.trace_id == TRACE_ID
    assert span.parent_span_id == CLIENT_SPAN
    assert span.span.name == "chat gpt-4o-mini"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] == record.usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == record.usage.completion_tokens == 16
    assert a["gen_ai.request.stream"] is True
    assert a["hangup.outcome"] == "completed"
    assert a["hangup.client"] == "team-search"
    assert a["hangup.cost_usd"] == pytest.approx(record.cost.used_usd if record.cost else -1)
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a
    assert span.resource["service.name"] == "hangup"

    (attempt,) = attempts
    assert attempt.kind == CLIENT and attempt.parent_span_id == span.span_id
    assert attempt.trace_id == TRACE_ID
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["http.response.status_code"] == 200
    assert span.span.start_time_unix_nano <= attempt.span.start_time_unix_nano
    assert attempt.span.end_time_unix_nano <= span.span.end_time_unix_nano
    # The upstream was told hangup's attempt span as its parent, in the client's trace.
    assert upstream_parents(sim, "trace-stream") == [traceparent(TRACE_ID, attempt.span_id)]
    # Named, never keyed: the client key is in no exported byte.
    assert not any(CLIENT_KEY.encode() in body for body in receiver.bodies)


async def test_cancelled_request_has_error_type_and_propagation(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, sink = await traced_proxy(start_proxy, sim, receiver)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions",
        chat("gpt-4o-mini:rate=50,tokens=2000", stream=True, max_tokens=2000),
        headers("trace-cancel"),
    )
    await client.read_until(lambda b: b.count(b"data: ") >= 3)
    client.close()
    record = await sink.wait_for("trace-cancel")
    span, (attempt,) = await receiver.wait_request("trace-cancel", spans=2)
    a = span.attributes
    assert a["hangup.outcome"] == "client_cancelled"
    assert a["error.type"] == "client_cancelled"
    assert span.span.status.code == STATUS_ERROR
    assert a["hangup.cancel_propagation_ms"] == pytest.approx(
        (record.cancel_propagation_s or -1) * 1000, abs=0.001
    )
    assert a["hangup.tokens_saved"] == (record.savings.tokens_saved if record.savings else -1) > 0
    assert "hangup.client_gone" in span.event_names
    assert attempt.attributes["error.type"] == "client_cancelled"
    assert upstream_parents(sim, "trace-cancel") == [traceparent(TRACE_ID, attempt.span_id)]


async def test_timed_out_request_names_the_phase(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, _ = await traced_proxy(start_proxy, sim, receiver, timeouts={"idle_s": 0.3})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat("stall:after=2", stream=True),
            headers=headers("trace-timeout"),
        ) as response,
    ):
        await response.read()
    span, (attempt,) = await receiver.wait_request("trace-timeout", spans=2)
    a = span.attributes
    assert (a["hangup.outcome"], a["error.type"]) == ("timeout", "timeout")
    assert (a["hangup.timeout_phase"], a["hangup.timeout_key"]) == ("idle", "timeouts.idle_s")
    assert attempt.attributes["error.type"] == "timeout"


async def test_retried_request_has_one_client_span_per_attempt(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, sink = await traced_proxy(
        start_proxy, sim, receiver, max_retries=1, retry_backoff_s=0.01
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat("error:status=503", stream=False),
            headers=headers("trace-retry"),
        ) as response,
    ):
        assert response.status == 503
    record = await sink.wait_for("trace-retry")
    assert record.upstream_attempts == 2
    span, attempts = await receiver.wait_request("trace-retry", spans=3)
    assert span.attributes["hangup.upstream_attempts"] == 2
    assert span.attributes["error.type"] == "upstream_error"
    first, second = attempts
    assert {first.parent_span_id, second.parent_span_id} == {span.span_id}
    assert first.span_id != second.span_id
    assert first.attributes["hangup.attempt.reason"] == "primary"
    assert first.attributes["hangup.attempt.result"] == "server_error"
    assert first.attributes["error.type"] == "server_error"
    assert first.attributes["http.response.status_code"] == 503
    assert second.attributes["hangup.attempt.reason"] == "retry"
    assert second.attributes["http.response.status_code"] == 503
    assert second.attributes["error.type"] in ("503", "server_error")
    # Each span has its attempt's own times.
    assert [s.span.start_time_unix_nano for s in attempts] == sorted(
        s.span.start_time_unix_nano for s in attempts
    )
    assert first.span.end_time_unix_nano <= second.span.start_time_unix_nano
    # Each attempt told the upstream its own span id.
    assert upstream_parents(sim, "trace-retry") == [
        traceparent(TRACE_ID, first.span_id),
        traceparent(TRACE_ID, second.span_id),
    ]


async def test_without_a_traceparent_a_new_trace_starts_and_reaches_the_upstream(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, _ = await traced_proxy(start_proxy, sim, receiver)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/embeddings",
            json={"model": "gpt-4o-mini", "input": "hello"},
            headers=headers("trace-new", parent="00-garbage"),
        ) as response,
    ):
        await response.read()
    span, (attempt,) = await receiver.wait_request("trace-new", spans=2)
    assert span.parent_span_id is None and span.trace_id != TRACE_ID
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert upstream_parents(sim, "trace-new") == [traceparent(span.trace_id, attempt.span_id)]


async def test_an_unsampled_parent_exports_nothing_but_is_passed_on(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    server, _ = await traced_proxy(start_proxy, sim, receiver)
    async with aiohttp.ClientSession() as session:
        for request_id, flags in (("trace-unsampled", 0), ("trace-sampled", 1)):
            async with session.post(
                f"{server.base_url}/v1/chat/completions",
                json=chat("gpt-4o-mini", stream=False),
                headers=headers(request_id, parent=traceparent(flags=flags)),
            ) as response:
                await response.read()
    # The sampled request was sent second: once its spans are in, the first one's would be.
    span, _ = await receiver.wait_request("trace-sampled", spans=2)
    # A whole (non-streamed) answer names its model and finish reason too.
    assert span.attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert span.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert receiver.for_request("trace-unsampled") == []
    (sent,) = upstream_parents(sim, "trace-unsampled")
    assert sent.startswith(f"00-{TRACE_ID:032x}-") and sent.endswith("-00")


# --- a collector that is down ---------------------------------------------------------------

REQUESTS = 300
QUEUE = 64
BATCH = 16


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1/traces"


def _live_traces() -> tuple[int, int]:
    """(requests waiting for export, spans built) alive in this process now."""
    gc.collect()
    objects = gc.get_objects()
    return (
        sum(1 for o in objects if isinstance(o, PendingTrace)),
        sum(1 for o in objects if isinstance(o, ReadableSpan)),
    )


@pytest.mark.parametrize("collector", ["closed-port", "blackhole"])
async def test_a_dead_collector_neither_blocks_requests_nor_grows_memory(
    collector: str,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    otel_env: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An export to a blackhole hangs for the whole export timeout: 30 s. If any request waited on
    # an export, the requests below could not all finish inside that bound.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "30")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(BATCH))
    blackhole = Blackhole() if collector == "blackhole" else None
    endpoint = _closed_port() if blackhole is None else f"{blackhole.url}/traces"
    data = traced_config(sim.base_url, endpoint)
    data["tracing"]["max_queued_requests"] = QUEUE
    server, sink = await start_proxy(config_from(data))
    assert isinstance(server.state.tracing, OtelTracing)
    for log_filter in logging.getLogger(EXPORTER_LOGGER).filters:
        if isinstance(log_filter, CollectorTrouble):
            log_filter.reset()  # an earlier test's outage must not use up this test's line
    pending_before, spans_before = _live_traces()
    body = json.dumps(chat("gpt-4o-mini:rate=0", stream=False)).encode()
    try:
        async with asyncio.timeout(25), aiohttp.ClientSession() as session:
            for i in range(REQUESTS):
                async with session.post(
                    f"{server.base_url}/v1/chat/completions",
                    data=body,
                    headers={**headers(f"dead-{i}"), "content-type": "application/json"},
                ) as response:
                    assert response.status == 200
                    await response.read()
            await sink.wait(lambda: len(sink.records) >= REQUESTS, 5, "every record")
        if blackhole is not None:
            # The exporter was stuck connecting the whole time.
            assert blackhole.syn_sent() > blackhole.baseline
        # 300 requests finished; at most a full queue and one batch in export are alive, and
        # the spans of at most that one batch.
        pending, spans = _live_traces()
        assert pending - pending_before <= QUEUE + BATCH
        assert spans - spans_before <= 2 * BATCH
        # The outage is a warning (ERROR lines are for hangup's bugs), and not one a second.
        exporter = [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
        assert all(r.levelno == logging.WARNING for r in exporter), exporter
        assert len(exporter) <= 1, [r.getMessage() for r in exporter]
        if blackhole is None:  # refused at once: the outage is reported, once
            assert len(exporter) == 1 and "trace export: " in exporter[0].getMessage()
    finally:
        if blackhole is not None:
            blackhole.close()


async def test_with_tracing_off_the_clients_traceparent_passes_through_unchanged(
    sim: SimulatedProvider, start_proxy: StartProxy, otel_env: None
) -> None:
    data = traced_config(sim.base_url, "http://127.0.0.1:9/v1/traces")
    data["tracing"] = {"enabled": False}
    server, sink = await start_proxy(config_from(data))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat("gpt-4o-mini", stream=False),
            headers={**headers("trace-off"), "tracestate": "vendor=1"},
        ) as response,
    ):
        await response.read()
    record = await sink.wait_for("trace-off")
    assert record.trace is None
    (upstream,) = [r for r in sim.requests if r.request_id == "trace-off"]
    assert upstream.headers["traceparent"] == traceparent()
    assert upstream.headers["tracestate"] == "vendor=1"


async def test_a_tracing_failure_never_fails_the_request(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, sink = await traced_proxy(start_proxy, sim, receiver)
    tracing = server.state.tracing

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in tracing")

    for hook in ("arrived", "attempt", "finished"):
        monkeypatch.setattr(tracing, hook, broken)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.base_url}/v1/chat/completions",
                json=chat("gpt-4o-mini", stream=True),
                headers=headers(f"broken-{hook}"),
            ) as response,
        ):
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        record = await sink.wait_for(f"broken-{hook}")
        assert record.outcome is not None and record.outcome.value == "completed"
        monkeypatch.undo()


async def test_a_configured_secret_never_reaches_a_span(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    """A configured secret that no pattern recognises, sent back in the model field (as an
    upstream echoing it, or a client pasting it, would), is masked by exact value."""
    secret = "org-7f3a9c2e51d84b60"
    data = traced_config(sim.base_url, receiver.url)
    data["upstreams"]["sim"]["headers"] = {"openai-organization": secret}
    server, _ = await start_proxy(config_from(data))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat(secret, stream=True),
            headers=headers("trace-secret"),
        ) as response,
    ):
        await response.read()
    span, _ = await receiver.wait_request("trace-secret", spans=2)
    assert span.attributes["gen_ai.request.model"] == "*" * len(secret)
    assert span.span.name == "chat " + "*" * len(secret)
    assert not any(secret.encode() in body for body in receiver.bodies)


async def test_a_fallback_and_a_hedge_each_get_their_own_client_span(
    sim: SimulatedProvider, start_proxy: StartProxy, receiver: OtlpReceiver
) -> None:
    """Resilience's attempts: a primary that cannot be reached falls back to the simulator; a
    slow primary is hedged by a fast target running in parallel. Every attempt is a CLIENT
    span with its own target, reason, result and times, and every upstream request carried its
    own attempt's span as parent."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    data = traced_config(sim.base_url, receiver.url)
    data["upstreams"] = {
        "down": {"base_url": down},
        "slow": {"base_url": sim.base_url},
        "sim": {"base_url": sim.base_url},
    }
    data["routes"] = [
        {
            "name": "fallback",
            "match": {"model": "fb-*"},
            "upstream": "down",
            "fallbacks": [{"upstream": "sim", "model": "gpt-4o-mini"}],
        },
        {
            "name": "hedged",
            "upstream": "slow",
            "hedge_after_s": 0.2,
            "fallbacks": [{"upstream": "sim", "model": "gpt-4o-mini"}],
        },
    ]
    server, _ = await start_proxy(config_from(data))
    async with aiohttp.ClientSession() as session:
        for request_id, model in (
            ("trace-fallback", "fb-model"),
            ("trace-hedge", "slow-first-token:delay=2"),
        ):
            async with session.post(
                f"{server.base_url}/v1/chat/completions",
                json=chat(model, stream=True),
                headers=headers(request_id),
            ) as response:
                assert response.status == 200
                await response.read()

    span, (first, second) = await receiver.wait_request("trace-fallback", spans=3)
    assert first.attributes["hangup.upstream"] == "down"
    assert first.attributes["hangup.attempt.result"] == "connect_error"
    assert first.attributes["error.type"] == "connect_error"
    assert first.attributes["server.port"] == int(down.rsplit(":", 1)[1].split("/")[0])
    assert second.attributes["hangup.upstream"] == "sim"
    assert second.attributes["hangup.attempt.reason"] == "fallback"
    assert second.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert "error.type" not in second.attributes and "error.type" not in span.attributes
    assert upstream_parents(sim, "trace-fallback") == [traceparent(TRACE_ID, second.span_id)]

    span, (primary, hedge) = await receiver.wait_request("trace-hedge", spans=3)
    assert primary.attributes["hangup.upstream"] == "slow"
    assert hedge.attributes["hangup.attempt.reason"] == "hedge"
    assert hedge.attributes["hangup.attempt.result"] == "ok"
    assert primary.attributes["error.type"] == "abandoned"  # the loser, closed by hangup
    # They ran in parallel: the hedge began before the primary ended.
    assert hedge.span.start_time_unix_nano < primary.span.end_time_unix_nano
    sent = sorted(upstream_parents(sim, "trace-hedge"))
    assert sent == sorted(traceparent(TRACE_ID, s.span_id) for s in (primary, hedge))
