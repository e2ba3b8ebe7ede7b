"""Engine aborts for attempts given up while the request goes on: a hedge loser, and a primary
whose per-attempt deadline (first_token_s) fired before the fallback answered. Each is named at
its engine like any attempt and aborted through the relay's one `_abandon`.

The primary is the simulator in SGLang mode with `ignore_close` (it generates on after the
socket close, so only an abort stops it); the fallback is a plain simulator that answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.attempts import AttemptResult
from proxy.outcome import EngineAbort, Outcome
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.support import RecordSink, access_line, config_from
from tests.test_engine_aborts import ABORT_BOUND_S, chat, hang_up_mid_stream, metric

CHAT = "/v1/chat/completions"
PRIMARY_KEY = "sk-primary-engine-key"
SLOW = "slow-first-token:delay=10"  # the primary: headers at once, its first token in 10 s
BACKUP_TOKENS = 30
BACKUP_MODEL = f"normal:tokens={BACKUP_TOKENS},rate=1000"


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    primary = SimulatedProvider(engine="sglang", ignore_close=True, tokens_per_s=500.0)
    backup = SimulatedProvider()
    await primary.start()
    await backup.start()
    try:
        yield primary, backup
    finally:
        await primary.stop()
        await backup.stop()


def config(primary: SimulatedProvider, backup: SimulatedProvider, **route: Any) -> Any:
    return config_from(
        {
            "upstreams": {
                "primary": {
                    "base_url": primary.base_url,
                    "api_key": PRIMARY_KEY,
                    "engine": "sglang",
                },
                "backup": {"base_url": backup.base_url},
            },
            "routes": [
                {
                    "name": "chat",
                    "upstream": "primary",
                    "fallbacks": [{"upstream": "backup", "model": BACKUP_MODEL}],
                    "circuit_failures": 0,
                    **route,
                }
            ],
        }
    )


async def stream(server: ProxyServer, request_id: str) -> str:
    """A streamed chat request answered in full; returns the content the client received."""
    body = {"model": SLOW, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}", json=body, headers={"x-request-id": request_id}
        ) as response:
            assert response.status == 200
            raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    text = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def check_primary_aborted(
    server: ProxyServer,
    primary: SimulatedProvider,
    sink: RecordSink,
    caplog: pytest.LogCaptureFixture,
    request_id: str,
) -> None:
    """The primary got exactly one abort, for its own rid, and stopped there; the record and
    the access line name that rid and the abort's result."""
    call = await primary.wait_abort_call(timeout=2.0)
    engine_rec = await primary.wait_finished(request_id, timeout=2.0)
    assert engine_rec.engine_id is not None and len(engine_rec.engine_id) == 32
    assert call.ids == [engine_rec.engine_id] == call.stopped
    assert engine_rec.end == "aborted"
    assert engine_rec.peer_closed_at is not None and engine_rec.peer_closed_at <= call.at
    (abort_req,) = [r for r in primary.requests if r.path == "/abort_request"]
    assert abort_req.body == {"rid": engine_rec.engine_id}
    record = await sink.wait_for(request_id)
    assert record.outcome is Outcome.COMPLETED
    assert record.engine_abort is EngineAbort.ACKNOWLEDGED
    assert record.engine_request_id == engine_rec.engine_id
    line = access_line(caplog, request_id)
    assert line["engine_abort"] == "acknowledged"
    assert line["engine_request_id"] == engine_rec.engine_id
    assert await metric(server, "hangup_engine_aborts_sent_total") == {("primary",): 1.0}
    assert len(primary.abort_calls) == 1


async def test_a_hedge_loser_is_aborted_at_its_engine(
    sims: tuple[SimulatedProvider, SimulatedProvider],
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hedge_after_s: the primary has no token after 0.2 s, the backup is raced and wins; the
    primary (the loser) is aborted at its engine, and the client gets the backup's answer."""
    primary, backup = sims
    caplog.set_level(logging.INFO, logger="hangup.access")
    server, sink = await start_proxy(config(primary, backup, hedge_after_s=0.2))
    text = await stream(server, "hedge-1")
    done = await backup.wait_finished("hedge-1")
    assert done.end == "completed" and done.progress.generated == BACKUP_TOKENS
    assert text and len(text.split()) == BACKUP_TOKENS  # the whole of the backup's answer
    await check_primary_aborted(server, primary, sink, caplog, "hedge-1")
    record = await sink.wait_for("hedge-1")
    assert [(a.upstream, a.reason, a.result) for a in record.attempts] == [
        ("primary", "primary", AttemptResult.ABANDONED),
        ("backup", "hedge", AttemptResult.OK),
    ]
    assert record.attempts[0].error == "hedge loser"


async def test_a_primary_past_its_first_token_deadline_is_aborted_before_the_fallback(
    sims: tuple[SimulatedProvider, SimulatedProvider],
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """first_token_s fires on the primary and the request moves to the fallback, which answers
    in full; the primary, which would generate on, is aborted at its engine."""
    primary, backup = sims
    caplog.set_level(logging.INFO, logger="hangup.access")
    timeouts = {"first_token_s": 0.3}
    server, sink = await start_proxy(config(primary, backup, timeouts=timeouts))
    text = await stream(server, "ft-1")
    done = await backup.wait_finished("ft-1")
    assert done.end == "completed" and done.progress.generated == BACKUP_TOKENS
    assert text and len(text.split()) == BACKUP_TOKENS
    await check_primary_aborted(server, primary, sink, caplog, "ft-1")
    record = await sink.wait_for("ft-1")
    assert [(a.upstream, a.reason, a.result) for a in record.attempts] == [
        ("primary", "primary", AttemptResult.TIMEOUT),  # a timeout to the circuit, as before
        ("backup", "fallback", AttemptResult.OK),
    ]
    assert record.attempts[0].error == "first_token deadline"


async def test_a_hang_up_on_a_hedging_route_aborts_the_attempt_relayed(
    sims: tuple[SimulatedProvider, SimulatedProvider],
    start_proxy: StartProxy,
) -> None:
    """On a hedging route every stream runs as a racer, also when no hedge is ever started (its
    first token came in time): the client hanging up mid-stream aborts it like any attempt."""
    primary, backup = sims
    server, sink = await start_proxy(config(primary, backup, hedge_after_s=5.0))
    closed_at = await hang_up_mid_stream(server, primary, "hr-1", chat())
    call = await primary.wait_abort_call(timeout=1.0)
    assert call.at - closed_at < ABORT_BOUND_S
    engine_rec = await primary.wait_finished("hr-1", timeout=2.0)
    assert call.ids == [engine_rec.engine_id] == call.stopped and engine_rec.end == "aborted"
    record = await sink.wait_for("hr-1")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.engine_abort is EngineAbort.ACKNOWLEDGED
    assert record.engine_request_id == engine_rec.engine_id
    assert [(a.upstream, a.reason) for a in record.attempts] == [("primary", "primary")]
    assert backup.requests == [] and len(primary.abort_calls) == 1
