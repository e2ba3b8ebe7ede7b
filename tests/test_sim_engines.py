"""The simulator as an engine that names requests and stops them by abort (proxy.sim.aborts),
and as an engine that does not notice a closed socket (`ignore_close`). Over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.sim import SimulatedProvider
from tests.support import RawClient

LONG = "normal:tokens=100000,rate=200"


def chat(model: str = LONG, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]} | (
        extra
    )


def root(sim: SimulatedProvider) -> str:
    assert sim.base_url is not None
    return sim.base_url.removesuffix("/v1")


async def started(
    sim: SimulatedProvider, body: dict[str, Any], request_id: str, **headers: str
) -> RawClient:
    """A request in flight at the simulator, its first content token sent."""
    assert sim.base_url is not None
    port = int(sim.base_url.split(":")[2].split("/")[0])
    client = await RawClient.connect("127.0.0.1", port)
    await client.post_json("/v1/chat/completions", body, {"x-request-id": request_id, **headers})
    rec = await sim.wait_request(request_id)
    while rec.progress.generated == 0:  # bounded by the wait below
        await asyncio.wait_for(asyncio.sleep(0.005), 1.0)
    return client


@pytest.fixture
async def sglang() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(engine="sglang", tokens_per_s=200.0) as sim:
        yield sim


async def post_abort(sim: SimulatedProvider, path: str, payload: Any) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(root(sim) + path, json=payload) as response:
            return response.status, await response.read()


async def test_sglang_rid_from_the_body_and_abort_by_prefix(sglang: SimulatedProvider) -> None:
    a = await started(sglang, chat(rid="abc123-one"), "a")
    b = await started(sglang, chat(rid="zzz-two"), "b")
    rec_a = sglang.request("a")
    assert rec_a is not None and rec_a.engine_id == "abc123-one"

    status, body = await post_abort(sglang, "/abort_request", {"rid": "abc123"})
    assert (status, body) == (200, b"")
    call = await sglang.wait_abort_call()
    assert call.ids == ["abc123"] and call.stopped == ["abc123-one"]
    await sglang.wait_finished("a")
    assert rec_a.end == "aborted" and rec_a.aborted_at is not None
    assert rec_a.progress.generated == rec_a.generated_at_abort  # not one token after
    raw = await a.read_until(lambda got: b"data: [DONE]" in got)
    assert b'"finish_reason":"abort"' in raw
    a.close()
    rec_b = sglang.request("b")
    assert rec_b is not None and rec_b.end is None  # another rid runs on

    # Unknown and empty rids: 200, nothing stopped (SGLang's answer does not say).
    assert (await post_abort(sglang, "/abort_request", {"rid": "nope"}))[0] == 200
    assert (await post_abort(sglang, "/abort_request", {"rid": ""}))[0] == 200
    assert [c.stopped for c in sglang.abort_calls[1:]] == [[], []]
    assert rec_b.end is None
    assert (await post_abort(sglang, "/abort_request", {"abort_all": True}))[0] == 200
    assert (await sglang.wait_finished("b")).end == "aborted"
    b.close()


async def test_sglang_without_rid_gets_a_fresh_one(sglang: SimulatedProvider) -> None:
    client = await started(sglang, chat(), "fresh")
    rec = sglang.request("fresh")
    assert rec is not None and rec.engine_id is not None and len(rec.engine_id) == 32
    client.close()
    assert (await sglang.wait_finished("fresh")).end == "peer_closed"  # the default: a close stops


async def test_non_streamed_abort_answers_what_was_generated(sglang: SimulatedProvider) -> None:
    assert sglang.base_url is not None
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(
                sglang.base_url + "/chat/completions",
                json=chat(stream=False, rid="nonstream"),
                headers={"x-request-id": "ns"},
            )
        )
        rec = await sglang.wait_request("ns")
        while rec.progress.generated < 3:
            await asyncio.wait_for(asyncio.sleep(0.005), 1.0)
        await post_abort(sglang, "/abort_request", {"rid": "nonstream"})
        response = await asyncio.wait_for(pending, 2.0)
        payload = json.loads(await response.read())
    assert payload["choices"][0]["finish_reason"] == "abort"
    assert rec.end == "aborted"
    assert payload["usage"]["completion_tokens"] == rec.generated_at_abort


async def test_vllm_ids_and_the_endpoint_only_in_its_modes() -> None:
    plain = SimulatedProvider(engine="vllm")
    await plain.start()
    try:
        status, _ = await post_abort(plain, "/abort_requests", {"request_ids": ["x"]})
        assert status == 404  # plain `vllm serve` has no abort endpoint
    finally:
        await plain.stop()
    sim = SimulatedProvider(engine="vllm", vllm_abort_endpoint=True, tokens_per_s=200.0)
    await sim.start()
    try:
        client = await started(sim, chat(), "v1")
        rec = sim.request("v1")
        assert rec is not None and rec.engine_id == "chatcmpl-v1"
        status, body = await post_abort(sim, "/abort_requests", {"request_ids": ["chatcmpl-v"]})
        assert (status, json.loads(body)) == (200, {"cancelled_request_ids": []})  # exact ids
        status, body = await post_abort(sim, "/abort_requests", {"request_ids": ["chatcmpl-v1"]})
        assert json.loads(body) == {"cancelled_request_ids": ["chatcmpl-v1"]}
        assert (await sim.wait_finished("v1")).end == "aborted"
        client.close()
    finally:
        await sim.stop()


async def test_ignore_close_generates_on_after_the_peer_left() -> None:
    """Like an engine behind a buffering proxy: the close stops nothing, only an abort does."""
    sim = SimulatedProvider(engine="sglang", ignore_close=True, tokens_per_s=1000.0)
    await sim.start()
    try:
        finite = await started(sim, chat("normal:tokens=300,rate=1000"), "runs-on")
        finite.close()
        rec = await sim.wait_finished("runs-on", timeout=3.0)
        assert rec.end == "completed" and rec.peer_closed_at is not None
        assert rec.progress.generated == 300
        after = rec.tokens_after_peer_close
        assert after is not None and after > 100, after  # ~0.3 s of tokens, all after the close

        long = await started(sim, chat("normal:tokens=100000,rate=1000", rid="stop-me"), "stop")
        long.close()
        await sim.wait_closed("stop")
        await post_abort(sim, "/abort_request", {"rid": "stop-me"})
        rec = await sim.wait_finished("stop")
        assert rec.end == "aborted" and rec.generated_at_abort == rec.progress.generated
        assert rec.aborted_at is not None and rec.peer_closed_at is not None
        assert rec.aborted_at > rec.peer_closed_at
    finally:
        await sim.stop()


@pytest.mark.parametrize("fault", ["404", "405", "500"])
async def test_abort_endpoint_faults(sglang: SimulatedProvider, fault: str) -> None:
    sglang.abort_fault = fault  # type: ignore[assignment]
    status, _ = await post_abort(sglang, "/abort_request", {"rid": "x"})
    assert status == int(fault)
    (call,) = sglang.abort_calls
    assert call.fault == fault and call.stopped == []  # a faulty endpoint stopped nothing
