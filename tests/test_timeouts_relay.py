"""The timeout policy end to end: each phase fires within [deadline, deadline + 250 ms] with the
documented answer, and the upstream connection is closed; healthy slow streams are never cut;
keep-alives never keep a contentless stream alive; SDKs do not retry our 504s."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from proxy.outcome import Outcome, TimeoutKind
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.support import Blackhole, make_config, wait_until

TOLERANCE_S = 0.250
CHAT = "/v1/chat/completions"
OFF = {"connect_s": None, "headers_s": None, "first_token_s": None, "idle_s": None, "total_s": None}


def timeouts(**keys: float | None) -> dict[str, Any]:
    return {"timeouts": {**OFF, **keys}}


async def _post(
    base_url: str, body: dict[str, Any], request_id: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base_url}{CHAT}", json=body, headers={"x-request-id": request_id, **(headers or {})}
        ) as r:
            data = await r.read()
            return r.status, dict(r.headers), data, time.monotonic() - started


def _assert_within(elapsed: float, deadline: float) -> None:
    assert deadline <= elapsed + 0.005, f"fired early: {elapsed:.3f}s < {deadline}s"
    assert elapsed <= deadline + TOLERANCE_S, f"fired late: {elapsed:.3f}s > {deadline}s + 250 ms"


def _assert_504(status: int, headers: dict[str, str], body: bytes, key: str) -> dict[str, Any]:
    assert status == 504
    assert headers.get("x-should-retry") == "false"
    error = json.loads(body)["error"]
    assert error["type"] == "timeout_error"
    assert key in error["message"] and 'route "default"' in error["message"]
    return dict(error)


def _in_band_error(body: bytes, key: str) -> dict[str, Any]:
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: "), body[-200:]
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["type"] == "timeout_error" and key in error["message"]
    return dict(error)


async def test_connect_timeout(start_proxy: StartProxy) -> None:
    hole = Blackhole()
    try:
        server, sink = await start_proxy(make_config(hole.url, **timeouts(connect_s=0.3)))
        status, headers, body, elapsed = await _post(
            server.base_url, chat("m", stream=False), "t-connect"
        )
        _assert_within(elapsed, 0.3)
        _assert_504(status, headers, body, "timeouts.connect_s=0.3")
        record = await sink.wait_for("t-connect")
        assert (record.outcome, record.timeout_kind) == (Outcome.TIMEOUT, TimeoutKind.CONNECT)
        await wait_until(lambda: hole.connecting() == 0, 0.1, "the connect to be abandoned")
    finally:
        hole.close()


async def test_headers_timeout(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    server, sink = await start_proxy(make_config(sim.base_url, **timeouts(headers_s=0.3)))
    status, headers, body, elapsed = await _post(
        server.base_url, chat("slow-headers:delay=30", stream=False), "t-headers"
    )
    _assert_within(elapsed, 0.3)
    _assert_504(status, headers, body, "timeouts.headers_s=0.3")
    await sim.wait_closed("t-headers", timeout=1.0)
    record = await sink.wait_for("t-headers")
    assert record.timeout_kind is TimeoutKind.HEADERS


async def test_headers_timeout_of_a_kept_alive_connections_second_request(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The connection's watchdog timer, left armed by its first request (for that one's
    connect_s), rings before the second request's headers deadline: it re-arms for it, and
    the second request gets its 504 on time."""
    server, sink = await start_proxy(
        make_config(sim.base_url, **timeouts(connect_s=0.3, headers_s=0.6))
    )
    connections_made: list[object] = []

    async def made(
        session: aiohttp.ClientSession,
        context: object,
        params: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        connections_made.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(made)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]
    ) as session:
        for request_id, model in (("t-kept-1", "m"), ("t-kept-2", "slow-headers:delay=30")):
            started = time.monotonic()
            async with session.post(
                f"{server.base_url}{CHAT}",
                json=chat(model, stream=False),
                headers={"x-request-id": request_id},
            ) as r:
                status, headers, body = r.status, dict(r.headers), await r.read()
            elapsed = time.monotonic() - started
    assert len(connections_made) == 1  # one connection: its timer served both requests
    _assert_within(elapsed, 0.6)
    _assert_504(status, headers, body, "timeouts.headers_s=0.6")
    record = await sink.wait_for("t-kept-2")
    assert record.timeout_kind is TimeoutKind.HEADERS


async def test_first_token_timeout_before_headers_is_a_504(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(
        make_config(sim.base_url, **timeouts(headers_s=10, first_token_s=0.4))
    )
    status, headers, body, elapsed = await _post(
        server.base_url, chat("slow-headers:delay=30", stream=True), "t-ft-504"
    )
    _assert_within(elapsed, 0.4)
    _assert_504(status, headers, body, "timeouts.first_token_s=0.4")
    await sim.wait_closed("t-ft-504", timeout=1.0)


async def test_first_token_timeout_ignores_keepalives_and_ends_the_stream_in_band(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(make_config(sim.base_url, **timeouts(first_token_s=0.6)))
    status, _, body, elapsed = await _post(
        server.base_url, chat("slow-first-token:delay=30,keepalive=0.05", stream=True), "t-ft-sse"
    )
    assert status == 200  # headers were already sent when it fired
    assert body.count(b": keep-alive") >= 5  # the keep-alives did flow, and did not help
    _assert_within(elapsed, 0.6)
    _in_band_error(body, "timeouts.first_token_s=0.6")
    await sim.wait_closed("t-ft-sse", timeout=1.0)
    record = await sink.wait_for("t-ft-sse")
    assert (record.outcome, record.timeout_kind) == (Outcome.TIMEOUT, TimeoutKind.FIRST_TOKEN)


async def test_idle_timeout_mid_stream_even_with_keepalives(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(make_config(sim.base_url, **timeouts(idle_s=0.3)))
    last_content = ended = 0.0
    keepalives, body = 0, b""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat("stall:after=3,keepalive=0.05", stream=True),
            headers={"x-request-id": "t-idle"},
        ) as response:
            assert response.status == 200
            async for line in response.content:
                body += line
                if b'"content":"' in line and b'"content":""' not in line:
                    last_content = time.monotonic()
                keepalives += line.startswith(b": keep-alive")
            ended = time.monotonic()
    assert keepalives >= 3  # keep-alives flowed during the stall and did not reset idle
    _assert_within(ended - last_content, 0.3)
    _in_band_error(body, "timeouts.idle_s=0.3")
    await sim.wait_closed("t-idle", timeout=1.0)
    request = await sim.wait_request("t-idle", timeout=1.0)
    assert request.content_tokens_sent == 3
    record = await sink.wait_for("t-idle")
    assert (record.outcome, record.timeout_kind) == (Outcome.TIMEOUT, TimeoutKind.IDLE)


async def test_total_timeout(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    server, sink = await start_proxy(make_config(sim.base_url, **timeouts(total_s=0.5)))
    status, _, body, elapsed = await _post(
        server.base_url, chat("normal:tokens=100000,rate=50", stream=True), "t-total"
    )
    assert status == 200
    _assert_within(elapsed, 0.5)
    _in_band_error(body, "timeouts.total_s=0.5")
    await sim.wait_closed("t-total", timeout=1.0)
    assert (await sink.wait_for("t-total")).timeout_kind is TimeoutKind.TOTAL


async def test_client_deadline_caps_total(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    server, _ = await start_proxy(make_config(sim.base_url, **timeouts(total_s=60)))
    status, headers, body, elapsed = await _post(
        server.base_url,
        chat("slow-headers:delay=30", stream=False),
        "t-client",
        {"x-hangup-timeout": "0.4"},
    )
    _assert_within(elapsed, 0.4)
    error = _assert_504(status, headers, body, "x-hangup-timeout")
    assert "client deadline of 0.4s" in error["message"]
    # The client's deadline header is ours to read, not the upstream's.
    request = await sim.wait_request("t-client", timeout=1.0)
    assert "x-hangup-timeout" not in {k.lower() for k in request.headers}


async def test_a_slow_steady_stream_is_never_cut(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(
        make_config(sim.base_url, **timeouts(first_token_s=0.8, idle_s=0.8))
    )
    # Content every 0.5 s for 4 s: longer than first_token_s + idle_s, never a 0.8 s gap.
    status, _, body, elapsed = await _post(
        server.base_url, chat("steady:interval=0.5,tokens=8", stream=True), "t-steady"
    )
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert elapsed >= 3.5
    record = await sink.wait_for("t-steady")
    assert record.outcome is Outcome.COMPLETED and record.content_chunks == 8


async def test_sdk_makes_one_attempt_on_a_gateway_timeout(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(make_config(sim.base_url, **timeouts(headers_s=0.2)))
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test")
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="slow-headers:delay=30",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "t-sdk"},
        )
    await client.close()
    assert caught.value.status_code == 504
    assert "timeouts.headers_s=0.2" in str(caught.value)
    await sim.wait_closed("t-sdk", timeout=1.0)
    assert len([r for r in sim.requests if r.request_id == "t-sdk"]) == 1


async def test_sdk_retries_when_the_route_allows_it(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(
        make_config(sim.base_url, sdk_retry=True, **timeouts(headers_s=0.2))
    )
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=1)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="slow-headers:delay=30",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "t-sdk-retry"},
        )
    await client.close()
    assert len([r for r in sim.requests if r.request_id == "t-sdk-retry"]) == 2
