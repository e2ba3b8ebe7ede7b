"""Disconnect propagation in every window of a request, over real loopback sockets, through the
production runner. The simulated provider records when it saw each connection close; the
client records when it hung up; the bound is 50 ms.

Each window has a control: the same request without the hang-up completes normally.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from proxy.outcome import Outcome
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.support import (
    Blackhole,
    RawClient,
    RecordSink,
    Tee,
    held_by_this_process,
    http_body,
    make_config,
    socket_inodes_toward,
    wait_until,
)

CLOSE_BOUND_S = 0.050
CHAT = "/v1/chat/completions"


async def _hang_up(
    sim: SimulatedProvider, sink: RecordSink, client: RawClient, request_id: str
) -> float:
    """Close the client; return how long until the simulator saw the upstream closed."""
    closed_by_client = client.close()
    upstream_closed = await sim.wait_closed(request_id, timeout=2.0)
    record = await sink.wait_for(request_id)
    assert record.outcome is Outcome.CLIENT_CANCELLED, record
    assert len(sink.by_id(request_id)) == 1  # recorded exactly once
    lag = upstream_closed - closed_by_client
    assert lag < CLOSE_BOUND_S, f"upstream closed {lag * 1000:.1f} ms after the client"
    return lag


async def _start(
    proxy: tuple[ProxyServer, RecordSink], body: dict[str, object], request_id: str
) -> RawClient:
    server, _ = proxy
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(CHAT, body, {"x-request-id": request_id})
    return client


def test_the_production_runner_cancels_handlers(proxy: tuple[ProxyServer, RecordSink]) -> None:
    server, _ = proxy
    # aiohttp's default is False; pytest-aiohttp forces True and would hide a regression.
    assert server.runner.server is not None
    assert server.runner.server.handler_cancellation is True


async def test_while_waiting_for_response_headers(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    client = await _start(proxy, chat("slow-headers:delay=30", stream=True), "w-headers")
    await sim.wait_request("w-headers", timeout=2.0)
    await _hang_up(sim, proxy[1], client, "w-headers")


async def test_non_streaming_while_generating(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    body = chat("normal:tokens=100000,rate=200", stream=False)
    client = await _start(proxy, body, "w-nonstream")
    await sim.wait_request("w-nonstream", timeout=2.0)
    await _hang_up(sim, proxy[1], client, "w-nonstream")


async def test_before_first_token_while_upstream_sends_keepalives(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    body = chat("slow-first-token:delay=30,keepalive=0.05", stream=True)
    client = await _start(proxy, body, "w-keepalive")
    await client.read_until(lambda b: b.count(b": keep-alive") >= 2)
    await _hang_up(sim, proxy[1], client, "w-keepalive")


async def test_mid_stream(sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]) -> None:
    body = chat("normal:tokens=100000,rate=200", stream=True)
    client = await _start(proxy, body, "w-mid")
    await client.read_until(lambda b: b.count(b"data: ") >= 6)
    await _hang_up(sim, proxy[1], client, "w-mid")
    record = proxy[1].by_id("w-mid")[0]
    assert record.cancel_propagation_s is not None and record.cancel_propagation_s < 0.05


async def test_during_a_stall(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    client = await _start(proxy, chat("stall:after=3", stream=True), "w-stall")
    await client.read_until(lambda b: b.count(b"data: ") >= 4)  # role chunk + 3 tokens
    request = await sim.wait_request("w-stall", timeout=2.0)
    assert request.content_tokens_sent == 3
    await _hang_up(sim, proxy[1], client, "w-stall")


async def test_while_the_request_body_is_still_being_sent_upstream(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    """A 4 MiB prompt that the upstream reads at 256 KiB/s: the proxy is still sending it.

    On hang-up the proxy resets its upstream socket (SO_LINGER 0) instead of closing it
    gracefully, which would hold the socket open to flush the rest of the body. What the
    upstream then sees depends on how fast it reads: Linux delivers the bytes already queued
    in its receive buffer before the reset, so this deliberately slow reader learns only after
    draining them; an upstream reading at network speed learns at once.
    """
    assert sim.base_url is not None
    sim_port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    body = chat("slow-body:rate=262144", stream=True)
    body["messages"] = [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]
    client = await _start(proxy, body, "w-body")
    request = await sim.wait_request("w-body", timeout=5.0)
    upstream_sockets = socket_inodes_toward(sim_port, "01")  # the proxy's side
    assert len(held_by_this_process(upstream_sockets)) == 1
    closed_at = client.close()
    await wait_until(
        lambda: not held_by_this_process(upstream_sockets),
        CLOSE_BOUND_S,
        "the proxy to drop its upstream socket",
    )
    assert time.monotonic() - closed_at < CLOSE_BOUND_S
    record = await proxy[1].wait_for("w-body")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    # The proxy sent no more: the upstream never receives the whole body, and it does see the
    # connection end once it has read what was already delivered to it.
    await sim.wait_closed("w-body", timeout=30.0)
    assert request.body_bytes < 4 * 1024 * 1024


async def test_while_the_client_is_still_uploading(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    client = await RawClient.connect("127.0.0.1", server.port)
    client.send_head(
        "POST",
        CHAT,
        {"Content-Type": "application/json", "x-request-id": "w-upload"},
        content_length=100_000,
    )
    client.writer.write(b'{"model": "normal", "messages": [')
    await client.writer.drain()
    closed_at = client.close()
    record = await sink.wait_for("w-upload")
    assert record.outcome is Outcome.CLIENT_CANCELLED  # not a 400 for the truncated body
    assert record.status is None  # nobody left to answer
    assert record.ended_at is not None
    assert time.monotonic() - closed_at < 1.0
    # Nothing reached the upstream. True by construction today (admission reads the whole body
    # before a request is built): this guards a future streamed upload, it proves no window.
    assert not [r for r in sim.requests if r.request_id == "w-upload"]


async def test_while_connecting(start_proxy: StartProxy) -> None:
    hole = Blackhole()
    try:
        server, sink = await start_proxy(make_config(hole.url))
        before = socket_inodes_toward(hole.port, "02")
        client = await RawClient.connect("127.0.0.1", server.port)
        await client.post_json(CHAT, chat("m", stream=True), {"x-request-id": "w-connect"})
        await wait_until(lambda: hole.connecting() >= 1, 2.0, "the proxy's SYN_SENT socket")
        connecting = socket_inodes_toward(hole.port, "02") - before
        assert held_by_this_process(connecting) == connecting != set()
        closed_at = client.close()
        # No event tells when a connecting socket is dropped: watch our own fd table, bounded.
        await wait_until(
            lambda: not held_by_this_process(connecting),
            CLOSE_BOUND_S,
            "the proxy to abandon its connect",
        )
        assert time.monotonic() - closed_at < CLOSE_BOUND_S
        record = await sink.wait_for("w-connect")
        assert record.outcome is Outcome.CLIENT_CANCELLED
    finally:
        hole.close()


async def test_during_a_retry_backoff(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    """A client that leaves during the backoff before a retry: no retry is ever sent.

    The retry would be sent by a timer, so "never" needs a witness that the moment has passed:
    a control request with the same backoff, started after the hang-up, whose retry is due
    after the abandoned one's would have been. Once the control's retry has been answered, the
    abandoned request's retry, had it been sent, would have reached the simulator too."""
    server, sink = await start_proxy(make_config(sim.base_url, max_retries=1, retry_backoff_s=0.3))
    body = chat("error:status=503", stream=True)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(CHAT, body, {"x-request-id": "w-backoff"})
    first = await sim.wait_finished("w-backoff", timeout=2.0)
    assert first.status == 503  # attempt 1 answered: the proxy is now backing off
    closed_at = client.close()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}", json=body, headers={"x-request-id": "w-control"}
        ) as response:
            assert response.status == 503  # after its own retry
    assert len([r for r in sim.requests if r.request_id == "w-control"]) == 2  # it did retry
    assert len([r for r in sim.requests if r.request_id == "w-backoff"]) == 1  # no retry sent
    record = await sink.wait_for("w-backoff", timeout=2.0)
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.ended_at is not None
    assert time.monotonic() - closed_at < 1.0


# --- controls: the same requests, nobody hangs up --------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "normal:tokens=30",
        "slow-headers:delay=0.2",
        "slow-first-token:delay=0.3,keepalive=0.05",
        "slow-body:rate=1000000",
        "reasoning:tokens=5",
        "tool-call",
        "empty-deltas:count=3",
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_controls_complete_byte_identical(
    sim: SimulatedProvider, start_proxy: StartProxy, model: str, stream: bool
) -> None:
    # A recording tee between proxy and simulator witnesses the bytes the upstream sent.
    assert sim.base_url is not None
    port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    tee = await Tee("127.0.0.1", port).start()
    server, sink = await start_proxy(make_config(tee.url))
    request_id = f"control-{model}-{stream}"
    # include_usage asked by the client, so nothing needs hiding: the bytes must be the same.
    body = (
        chat(model, stream=stream, stream_options={"include_usage": True})
        if stream
        else chat(model, stream=False)
    )
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            f"{server.base_url}{CHAT}", json=body, headers={"x-request-id": request_id}
        ) as response:
            assert response.status == 200
            relayed = await response.read()
    record = await sink.wait_for(request_id)
    await tee.stop()
    assert len(tee.responses) == 1
    assert relayed == http_body(bytes(tee.responses[0]))
    assert record.outcome is Outcome.COMPLETED
    if stream:
        assert relayed.endswith(b"data: [DONE]\n\n")
    else:
        json.loads(relayed)


async def test_a_hang_up_does_not_disturb_other_streams(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    quitter = await _start(proxy, chat("normal:tokens=100000,rate=200", stream=True), "quit")

    async def full(i: int) -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.base_url}{CHAT}",
                json=chat("normal:tokens=40,rate=400", stream=True),
                headers={"x-request-id": f"stay-{i}"},
            ) as response:
                return await response.read()

    stayers = [asyncio.create_task(full(i)) for i in range(5)]
    await quitter.read_until(lambda b: b.count(b"data: ") >= 3)
    await _hang_up(sim, sink, quitter, "quit")
    for body in await asyncio.gather(*stayers):
        assert body.count(b'"content":"') >= 40 and body.endswith(b"data: [DONE]\n\n")
