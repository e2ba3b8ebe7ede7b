"""Engine aborts directly against the simulator (no intermediary): hangup names the request
(`engine: sglang` or `vllm`), and when the client hangs up or a deadline fires it closes the
socket and then sends the engine's abort: once, for the right id, with the upstream's key,
off the request's path, bounded, recorded. The simulator runs with `ignore_close`, like an
engine that never hears of a closed socket, so a stop can only come from the abort.

The end-to-end test through a buffering nginx is tests/test_nginx_intermediary.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy.engines.aborts
from proxy.outcome import EngineAbort, Outcome, RequestRecord, TimeoutKind
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider, key_fingerprint
from tests.conftest import StartProxy
from tests.support import RawClient, RecordSink, Tee, access_line, config_from

CHAT = "/v1/chat/completions"
UPSTREAM_KEY = "sk-upstream-engine-key"
ABORT_BOUND_S = 0.05  # the bound: hang-up -> the engine receives the abort
LONG = "normal:tokens=100000,rate=500"


def chat(model: str = LONG, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return body | extra


def config(sim: SimulatedProvider, engine: str, **route: Any) -> Any:
    return config_from(
        {
            "upstreams": {
                "eng": {"base_url": sim.base_url, "api_key": UPSTREAM_KEY, "engine": engine}
            },
            "routes": [{"name": "default", "upstream": "eng", **route}],
        }
    )


@pytest.fixture
async def sglang() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(engine="sglang", ignore_close=True, tokens_per_s=500.0) as sim:
        yield sim


async def hang_up_mid_stream(
    server: ProxyServer,
    sim: SimulatedProvider,
    request_id: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> float:
    """A stream through hangup, some content read, then the client's FIN; returns its time."""
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(CHAT, body, {"x-request-id": request_id, **(headers or {})})
    await client.read_until(lambda b: b.count(b'"content":"') >= 3)
    return client.close()


async def metric(server: ProxyServer, name: str) -> dict[tuple[str, ...], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/metrics") as response:
            text = await response.text()
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sample.labels[k] for k in sorted(sample.labels))] = sample.value
    return out


def only_record(sink: RecordSink, request_id: str) -> RequestRecord:
    records = sink.by_id(request_id)
    assert len(records) == 1, records
    return records[0]


# --- the abort is sent, once, for the right id -----------------------------------------------


async def test_hang_up_sends_one_abort_for_the_right_rid_and_the_engine_stops(
    sglang: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hangup.access")
    server, sink = await start_proxy(config(sglang, "sglang"))
    client_headers = {"Authorization": "Bearer sk-client", "x-client-note": "not for aborts"}
    closed_at = await hang_up_mid_stream(server, sglang, "sg-1", chat(), client_headers)

    call = await sglang.wait_abort_call(timeout=1.0)
    lag = call.at - closed_at
    assert lag < ABORT_BOUND_S, f"abort arrived {lag * 1000:.1f} ms after the hang-up"
    engine_rec = sglang.request("sg-1")
    assert engine_rec is not None and engine_rec.engine_id is not None
    assert call.ids == [engine_rec.engine_id] and call.stopped == [engine_rec.engine_id]
    assert len(engine_rec.engine_id) == 32 and int(engine_rec.engine_id, 16) >= 0
    # After the socket close, with the upstream's own key.
    assert engine_rec.peer_closed_at is not None and engine_rec.peer_closed_at <= call.at
    (abort_req,) = [r for r in sglang.requests if r.path == "/abort_request"]
    assert abort_req.auth_fingerprint == key_fingerprint(UPSTREAM_KEY)
    assert abort_req.body == {"rid": engine_rec.engine_id}
    assert "x-client-note" in engine_rec.headers and "x-client-note" not in abort_req.headers
    assert abort_req.headers["content-type"] == "application/json"
    # The engine stopped at the abort: no token after it.
    done = await sglang.wait_finished("sg-1")
    assert done.end == "aborted" and done.progress.generated == done.generated_at_abort

    record = await sink.wait_for("sg-1")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.engine_request_id == engine_rec.engine_id
    assert record.engine_abort is EngineAbort.ACKNOWLEDGED
    assert record.engine_abort_s is not None and record.engine_abort_s < ABORT_BOUND_S
    only_record(sink, "sg-1")
    line = access_line(caplog, "sg-1")
    assert line["engine_abort"] == "acknowledged" and line["engine_request_id"] == call.ids[0]
    assert line["engine_abort_ms"] == pytest.approx(record.engine_abort_s * 1000, abs=0.01)
    assert await metric(server, "hangup_engine_aborts_sent_total") == {("eng",): 1.0}
    results = await metric(server, "hangup_engine_aborts_total")
    assert results[("acknowledged", "eng")] == 1.0
    assert sum(results.values()) == 1.0
    assert len(sglang.abort_calls) == 1


async def test_without_the_engine_setting_generation_runs_on(
    sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The control: `engine: generic` (the default) only closes the socket, which this engine
    ignores, so it generates to the end after the hang-up."""
    server, sink = await start_proxy(config(sglang, "generic"))
    await hang_up_mid_stream(server, sglang, "gen-1", chat("normal:tokens=400,rate=1000"))
    done = await sglang.wait_finished("gen-1", timeout=3.0)
    assert done.end == "completed" and done.progress.generated == 400
    after = done.tokens_after_peer_close
    assert after is not None and after > 200, after
    record = await sink.wait_for("gen-1")
    assert record.engine_abort is None and record.engine_request_id is None
    assert sglang.abort_calls == []
    body = done.body
    assert isinstance(body, dict) and "rid" not in body  # generic never touches the body


async def test_non_streamed_hang_up_and_byte_faithful_naming(
    sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A non-streamed request (SGLang polls those only every few seconds): the abort stops
    it. The body reaches the engine as the client wrote it, the rid appended as the last member
    (read on the wire by a Tee between hangup and the engine)."""
    assert sglang.base_url is not None
    port = int(sglang.base_url.rsplit(":", 1)[1].split("/")[0])
    tee = await Tee("127.0.0.1", port).start()
    try:
        server, sink = await start_proxy(
            config_from(
                {
                    "upstreams": {"eng": {"base_url": tee.url, "engine": "sglang"}},
                    "routes": [{"name": "default", "upstream": "eng"}],
                }
            )
        )
        raw = (
            b'{ "model" : "' + LONG.encode() + b'",\n "messages":[{"role":"user",'
            b'"content":"h\\u00e9 {}"}], "n": 1 }\n'
        )
        client = await RawClient.connect("127.0.0.1", server.port)
        client.send_head(
            "POST", CHAT, {"Content-Type": "application/json", "x-request-id": "ns-1"}, len(raw)
        )
        client.writer.write(raw)
        engine_rec = await sglang.wait_request("ns-1")
        while engine_rec.progress.generated < 5:
            await asyncio.wait_for(asyncio.sleep(0.005), 1.0)
        closed_at = client.close()
        call = await sglang.wait_abort_call(timeout=1.0)
        assert call.at - closed_at < ABORT_BOUND_S
        assert engine_rec.engine_id is not None and call.stopped == [engine_rec.engine_id]
        expected = raw[:-2] + f',"rid":"{engine_rec.engine_id}"'.encode() + raw[-2:]
        sent = bytes(tee.requests[0])
        assert sent.endswith(b"\r\n\r\n" + expected), sent[-300:]
        assert engine_rec.body_bytes == len(expected)
        record = await sink.wait_for("ns-1")
        assert record.engine_abort is EngineAbort.ACKNOWLEDGED
        assert (await sglang.wait_finished("ns-1")).end == "aborted"
    finally:
        await tee.stop()


async def test_a_deadline_that_fires_aborts_after_answering_the_client(
    sglang: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """total_s fires on a non-streamed request: the client's 504 comes at the deadline even
    though the engine's abort endpoint never answers; the abort is bounded and recorded."""
    monkeypatch.setattr(proxy.engines.aborts, "ENGINE_ABORT_S", 0.5)
    sglang.abort_fault = "hang"
    timeouts = {"total_s": 0.3, "connect_s": None, "headers_s": None}
    server, sink = await start_proxy(config(sglang, "sglang", timeouts=timeouts))
    sent_at = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat(stream=False),
            headers={"x-request-id": "dl-1"},
        ) as response:
            assert response.status == 504
            await response.read()
    late = time.monotonic() - (sent_at + 0.3)
    assert late < 0.1, f"the 504 came {late * 1000:.0f} ms after the deadline"
    call = await sglang.wait_abort_call(timeout=1.0)
    assert 0.3 <= call.at - sent_at < 0.3 + ABORT_BOUND_S
    record = await sink.wait_for("dl-1", timeout=2.0)
    assert record.outcome is Outcome.TIMEOUT and record.timeout_kind is TimeoutKind.TOTAL
    assert record.engine_abort is EngineAbort.FAILED
    assert record.engine_abort_s is not None and 0.5 <= record.engine_abort_s < 0.7


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "tries", "result"),
    [
        ("500", 1, EngineAbort.FAILED),  # an HTTP answer is final
        ("reset", 2, EngineAbort.FAILED),  # one retry on a transport error
        ("reset-once", 2, EngineAbort.ACKNOWLEDGED),
    ],
)
async def test_abort_failures_are_retried_once_on_transport_errors_only(
    sglang: SimulatedProvider,
    start_proxy: StartProxy,
    fault: str,
    tries: int,
    result: EngineAbort,
) -> None:
    sglang.abort_fault = fault  # type: ignore[assignment]
    server, sink = await start_proxy(config(sglang, "sglang"))
    await hang_up_mid_stream(server, sglang, "f-1", chat())
    record = await sink.wait_for("f-1", timeout=3.0)
    assert record.engine_abort is result
    assert len([r for r in sglang.requests if r.path == "/abort_request"]) == tries
    await asyncio.sleep(0.1)  # nothing keeps trying once the record is written
    assert len([r for r in sglang.requests if r.path == "/abort_request"]) == tries
    results = await metric(server, "hangup_engine_aborts_total")
    assert results[(result.value, "eng")] == 1.0 and sum(results.values()) == 1.0


@pytest.mark.parametrize("status", ["404", "405"])
async def test_no_abort_endpoint_turns_it_off_with_one_warning(
    sglang: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    status: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="hangup.engines")
    sglang.abort_fault = status  # type: ignore[assignment]
    server, sink = await start_proxy(config(sglang, "sglang"))
    for i in range(3):
        await hang_up_mid_stream(server, sglang, f"nf-{i}", chat())
        record = await sink.wait_for(f"nf-{i}", timeout=3.0)
        assert record.engine_abort is EngineAbort.UNSUPPORTED
    assert len([r for r in sglang.requests if r.path == "/abort_request"]) == 1
    warnings = [r for r in caplog.records if r.name == "hangup.engines"]
    assert len(warnings) == 1 and "no abort endpoint" in warnings[0].getMessage()
    assert UPSTREAM_KEY not in warnings[0].getMessage()
    assert await metric(server, "hangup_engine_aborts_sent_total") == {("eng",): 1.0}
    assert (await metric(server, "hangup_engine_aborts_total"))[("unsupported", "eng")] == 3.0


async def test_other_requests_are_not_slowed_while_aborts_hang(
    sglang: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten aborts stuck on an endpoint that never answers (their bound raised to a minute, so
    they are still in flight however slow the machine); meanwhile eight streams through the
    same proxy take about as long as before. Were the aborts holding the loop, or a connection
    pool the streams need, the streams would wait on them for the minute."""
    monkeypatch.setattr(proxy.engines.aborts, "ENGINE_ABORT_S", 60.0)
    sglang.abort_fault = "hang"
    server, sink = await start_proxy(config(sglang, "sglang"))

    async def others(tag: str) -> list[float]:
        async def one(i: int) -> float:
            started = time.monotonic()
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{server.base_url}{CHAT}",
                    json=chat("normal:tokens=50,rate=500"),
                    headers={"x-request-id": f"{tag}-{i}"},
                ) as response:
                    body = await response.read()
            assert response.status == 200 and body.endswith(b"data: [DONE]\n\n")
            return time.monotonic() - started

        return list(await asyncio.gather(*(one(i) for i in range(8))))

    baseline = await others("before")
    for i in range(10):
        await hang_up_mid_stream(server, sglang, f"hang-{i}", chat())
    await sglang.wait_abort_call(10, timeout=5.0)
    during = await others("during")
    assert server.state.aborts.in_flight == 10  # still hanging while the others ran
    assert all(sink.by_id(f"hang-{i}") == [] for i in range(10))
    assert max(during) < max(baseline) + 0.5, (baseline, during)
    await server.state.aborts.close(0)  # what shutdown does past its wait
    for i in range(10):
        record = await sink.wait_for(f"hang-{i}", timeout=1.0)
        assert record.engine_abort is EngineAbort.SENT


async def test_shutdown_is_not_held_beyond_the_bound_by_a_hanging_abort(
    sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    sglang.abort_fault = "hang"
    server, sink = await start_proxy(config(sglang, "sglang"))
    await hang_up_mid_stream(server, sglang, "sd-1", chat())
    await sglang.wait_abort_call(timeout=1.0)
    started = time.monotonic()
    await server.shutdown(grace_s=0)
    took = time.monotonic() - started
    assert took < proxy.engines.aborts.SHUTDOWN_WAIT_S + 1.0, took
    record = await sink.wait_for("sd-1", timeout=1.0)
    assert record.engine_abort is EngineAbort.SENT  # on the wire, answer unknown


# --- what is not aborted -------------------------------------------------------------------------


async def test_a_client_rid_is_kept_and_never_aborted_by(
    sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """SGLang matches aborts by rid prefix: aborting by an id a client chose could stop other
    requests, so hangup leaves such a request alone (as SGLang's own router does)."""
    server, sink = await start_proxy(config(sglang, "sglang"))
    await hang_up_mid_stream(
        server, sglang, "own-rid", chat("normal:tokens=200,rate=1000", rid="r")
    )
    done = await sglang.wait_finished("own-rid", timeout=3.0)
    assert done.engine_id == "r" and done.end == "completed"
    record = await sink.wait_for("own-rid")
    assert record.engine_request_id is None and record.engine_abort is None
    assert sglang.abort_calls == []


async def test_a_completed_request_is_not_aborted(
    sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(config(sglang, "sglang"))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat("normal:tokens=5"),
            headers={"x-request-id": "done-1"},
        ) as response:
            await response.read()
    record = await sink.wait_for("done-1")
    assert record.outcome is Outcome.COMPLETED and record.engine_request_id is not None
    assert record.engine_abort is None and sglang.abort_calls == []


# --- vLLM ----------------------------------------------------------------------------------------


async def test_vllm_names_by_header_and_aborts_where_the_endpoint_exists(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hangup.engines")
    dev = SimulatedProvider(
        engine="vllm", vllm_abort_endpoint=True, ignore_close=True, tokens_per_s=500.0
    )
    plain = SimulatedProvider(engine="vllm", ignore_close=True, tokens_per_s=500.0)
    await dev.start()
    await plain.start()
    try:
        server, sink = await start_proxy(config(dev, "vllm"))
        closed_at = await hang_up_mid_stream(server, dev, "client-id", chat())
        call = await dev.wait_abort_call(timeout=1.0)
        assert call.at - closed_at < ABORT_BOUND_S
        (engine_rec,) = [r for r in dev.requests if r.path == "/v1/chat/completions"]
        # hangup's own id, not the client's: unique at the engine.
        sent_id = engine_rec.headers["x-request-id"]
        assert sent_id != "client-id" and len(sent_id) == 32
        assert call.ids == [f"chatcmpl-{sent_id}"] == call.stopped
        record = await sink.wait_for("client-id")
        assert record.engine_request_id == f"chatcmpl-{sent_id}"
        assert record.engine_abort is EngineAbort.ACKNOWLEDGED

        # Plain `vllm serve`: 404 once, then hangup relies on the close (which vLLM heeds).
        server, sink = await start_proxy(config(plain, "vllm"))
        for i in range(2):
            await hang_up_mid_stream(server, plain, f"plain-{i}", chat())
            record = await sink.wait_for(f"plain-{i}", timeout=2.0)
            assert record.engine_abort is EngineAbort.UNSUPPORTED
        assert len([r for r in plain.requests if r.path == "/abort_requests"]) == 1
        assert len([r for r in caplog.records if r.name == "hangup.engines"]) == 1
    finally:
        await dev.stop()
        await plain.stop()
