"""Hedging (opt-in per route, streams): a second target is raced when the first is slow to
its first content token; the first content token wins; the loser is closed at once."""

from __future__ import annotations

import aiohttp

from proxy.attempts import AttemptResult
from proxy.outcome import Outcome
from proxy.sim import SimulatedProvider
from proxy.sim.records import RequestRecord as SimRequest
from tests.conftest import StartProxy, chat
from tests.resilience_support import BACKUP_MODEL, CHAT, ThreadedSim, fallback_config, post, seen
from tests.support import RawClient

# The bound, measured at the simulator: winner's first token sent -> loser's close seen.
LOSER_CLOSE_BOUND_S = 0.005
CLOSE_BOUND_S = 0.050  # client hang-up -> upstream close, as in test_relay_windows.py


def closed_at(rec: SimRequest) -> float | None:
    return None if rec.connection is None else rec.connection.closed_at


async def loser_close_lag(winner: ThreadedSim, loser: ThreadedSim, request_id: str) -> float:
    """Seconds from the winner's first token leaving the winner to the loser's connection
    closing, both as their own simulator loops saw them."""
    won = await winner.wait(request_id, lambda r: r.first_token_at is not None, "a first token")
    lost = await loser.wait(request_id, lambda r: closed_at(r) is not None, "the loser's close")
    assert won.first_token_at is not None
    closed = closed_at(lost)
    assert closed is not None
    return closed - won.first_token_at


async def test_a_slow_first_token_is_hedged_and_the_loser_closed_at_once(
    start_proxy: StartProxy,
) -> None:
    with ThreadedSim() as primary, ThreadedSim() as backup:
        server, sink = await start_proxy(
            fallback_config(primary.sim, backup.sim, hedge_after_s=0.2)
        )
        answer = await post(server.base_url, chat("slow-first-token:delay=10", stream=True), "h-1")
        assert answer.status == 200 and answer.text()
        assert {e["model"] for e in answer.events()} == {BACKUP_MODEL}
        lag = await loser_close_lag(backup, primary, "h-1")
        assert lag < LOSER_CLOSE_BOUND_S, f"loser closed {lag * 1000:.2f} ms after the token"
        record = await sink.wait_for("h-1")
        assert record.outcome is Outcome.COMPLETED
        assert [(a.upstream, a.reason, a.result, a.delivered) for a in record.attempts] == [
            ("primary", "primary", AttemptResult.ABANDONED, False),
            ("backup", "hedge", AttemptResult.OK, True),
        ]
        assert record.attempts[0].error == "hedge loser"
        loser = primary.record("h-1")
        assert loser is not None
        # The waste on the record is what the loser sent before it was closed (here: nothing).
        assert record.attempt_waste_tokens == loser.content_tokens_sent == 0
        metrics = await scrape(server.base_url)
        assert 'hangup_hedges_total{event="started",route="chat"} 1.0' in metrics
        assert 'hangup_hedges_total{event="won",route="chat"} 1.0' in metrics


async def test_the_first_target_still_wins_when_its_token_comes_first(
    start_proxy: StartProxy,
) -> None:
    with ThreadedSim() as primary, ThreadedSim() as backup:
        slow_backup = {"upstream": "backup", "model": "slow-first-token:delay=10"}
        config = fallback_config(primary.sim, backup.sim, fallback=slow_backup, hedge_after_s=0.2)
        server, sink = await start_proxy(config)
        answer = await post(server.base_url, chat("slow-first-token:delay=0.5", stream=True), "h-2")
        assert answer.status == 200
        assert {e["model"] for e in answer.events()} == {"slow-first-token:delay=0.5"}
        lag = await loser_close_lag(primary, backup, "h-2")
        assert lag < LOSER_CLOSE_BOUND_S, f"hedge closed {lag * 1000:.2f} ms after the token"
        record = await sink.wait_for("h-2")
        assert [(a.reason, a.result) for a in record.attempts] == [
            ("primary", AttemptResult.OK),
            ("hedge", AttemptResult.ABANDONED),
        ]


async def test_no_hedge_when_the_first_token_is_prompt(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, hedge_after_s=1.0))
    answer = await post(server.base_url, chat("normal", stream=True), "h-3")
    assert answer.status == 200 and answer.text()
    assert len(seen(backup, "h-3")) == 0
    record = await sink.wait_for("h-3")
    assert [a.reason for a in record.attempts] == ["primary"]


async def test_a_client_hang_up_during_the_race_closes_both(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    slow_backup = {"upstream": "backup", "model": "slow-first-token:delay=10"}
    config = fallback_config(sim, backup, fallback=slow_backup, hedge_after_s=0.1)
    server, sink = await start_proxy(config)
    client = await RawClient.connect("127.0.0.1", server.port)
    body = chat("slow-first-token:delay=10", stream=True)
    await client.post_json(CHAT, body, {"x-request-id": "h-4"})
    await backup.wait_request("h-4", timeout=2.0)  # the race is on; headers are held
    closed_by_client = client.close()
    for upstream in (sim, backup):
        closed = await upstream.wait_closed("h-4", timeout=1.0)
        assert closed - closed_by_client < CLOSE_BOUND_S
    record = await sink.wait_for("h-4")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert [a.result for a in record.attempts] == [AttemptResult.ABANDONED] * 2


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            return await response.text()
