"""A flapping primary (circuit breaking) and one budget: a client that hangs up closes every
attempt in flight within milliseconds, whichever target it is on."""

from __future__ import annotations

import time

from proxy.attempts import AttemptResult
from proxy.outcome import Outcome
from proxy.resilience.circuit import CircuitState
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.resilience_support import (
    BACKUP_MODEL,
    CHAT,
    fallback_config,
    post,
    seen,
)
from tests.support import RawClient

MODEL = "gpt-4o"
COOLDOWN_S = 1.0
CLOSE_BOUND_S = 0.050


async def test_a_flapping_primary_is_skipped_then_serves_again_after_recovery(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    config = fallback_config(
        sim, backup, circuit_failures=2, circuit_cooldown_s=COOLDOWN_S, max_retries=0
    )
    server, sink = await start_proxy(config)
    assert (await post(server.base_url, chat(MODEL, stream=False), "flap-ok")).status == 200
    sim.set_fault(MODEL, "error:status=503")  # the outage begins
    for i in range(6):
        answer = await post(server.base_url, chat(MODEL, stream=True), f"flap-out-{i}")
        assert answer.status == 200, answer.body
        assert {e["model"] for e in answer.events()} == {BACKUP_MODEL}  # the fallback answered
    outage = [sink.by_id(f"flap-out-{i}")[0] for i in range(6)]
    # Two failures open the circuit: later requests skip the primary instead of waiting on it.
    assert [a.result for a in outage[0].attempts] == [AttemptResult.SERVER_ERROR, AttemptResult.OK]
    assert any(r.attempts[0].result is AttemptResult.SKIPPED for r in outage)
    assert sum(len(seen(sim, f"flap-out-{i}")) for i in range(6)) < 6
    assert server.state.circuits.states()["primary"] is CircuitState.OPEN

    sim.set_fault(MODEL, None)  # the primary recovers
    recovered_at = time.monotonic()
    served_by_primary_at: float | None = None
    for i in range(200):
        answer = await post(server.base_url, chat(MODEL, stream=False), f"flap-back-{i}")
        assert answer.status == 200
        if answer.json()["model"] == MODEL:
            served_by_primary_at = time.monotonic()
            break
        await sink.wait_for(f"flap-back-{i}")
    assert served_by_primary_at is not None
    back_after = served_by_primary_at - recovered_at
    # The bound is 30 s; with this cool-down it must be about one cool-down.
    assert back_after < 30.0 and back_after < COOLDOWN_S + 1.0, back_after
    assert server.state.circuits.states()["primary"] is CircuitState.CLOSED
    metrics = (await post_metrics(server.base_url)).decode()
    assert 'hangup_circuit_state{state="closed",upstream="primary"} 1.0' in metrics
    assert 'hangup_fallbacks_total{route="chat"}' in metrics


async def post_metrics(base: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            return await response.read()


async def test_hanging_up_during_a_fallback_closes_the_attempt_in_flight(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    slow = {"upstream": "backup", "model": "slow-headers:delay=30"}
    server, sink = await start_proxy(fallback_config(sim, backup, fallback=slow))
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(CHAT, chat("error:status=503", stream=True), {"x-request-id": "hu-fb"})
    await backup.wait_request("hu-fb", timeout=2.0)  # the primary failed; the fallback waits
    closed_by_client = client.close()
    upstream_closed = await backup.wait_closed("hu-fb", timeout=2.0)
    assert upstream_closed - closed_by_client < CLOSE_BOUND_S
    record = await sink.wait_for("hu-fb")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert [a.result for a in record.attempts] == [
        AttemptResult.SERVER_ERROR,
        AttemptResult.ABANDONED,
    ]
    assert all(a.closed_at is not None for a in record.attempts)


async def test_hanging_up_during_a_retry_after_wait_leaves_nothing_open(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, retry_after_max_s=30))
    client = await RawClient.connect("127.0.0.1", server.port)
    body = chat("error:status=429,retry_after=20", stream=False)
    await client.post_json(CHAT, body, {"x-request-id": "hu-wait"})
    await sim.wait_finished("hu-wait", timeout=2.0)  # the 429 came; the proxy now waits 20 s
    closed_by_client = client.close()
    record = await sink.wait_for("hu-wait", timeout=2.0)
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.ended_at is not None
    assert time.monotonic() - closed_by_client < 1.0  # not 20 s
    assert len(seen(sim, "hu-wait")) == 1 and len(seen(backup, "hu-wait")) == 0
