"""The black-box fault suite (bench/fault_cases.py) against the production runner, with 1 s
deadlines: a fault-injecting upstream on raw sockets (resets, broken chunk framing, malformed
SSE, silence) as primary, a second one as the fallback, the OpenAI Python SDK as client.

Every case must pass (the right answer, or the right error when the error is the answer; no
duplicate to an upstream that may have started, every failed attempt closed), except the
streams cut after content, which end with a clear in-band error ("safe") unless the route
continues cut streams, when they pass too. `python -m bench.faultsuite` prints the same cases
as a scorecard through the `hangup` command.
"""

from __future__ import annotations

import pytest

from bench.fault_cases import (
    BACKUP_MODEL,
    PRIMARY_MODEL,
    Case,
    Timing,
    cases,
    hangup_config,
    run_case,
    sdk_call,
)
from bench.fault_upstream import WORDS, FaultUpstream
from proxy.config import HangupConfig
from tests.conftest import StartProxy

TIMING = Timing(headers_s=1, first_token_s=1, idle_s=1, late_s=3, hang_bound_s=8)
CASES = {case.name: case for case in cases(TIMING)}
CUT_AFTER_CONTENT = {name for name in CASES if "mid-way" in name}
# Cut after content with no target left to continue on: a clear in-band error is all there is.
SAFE = CUT_AFTER_CONTENT | {"silent primary, fallback stalls after content"}


async def _run(case: Case, start_proxy: StartProxy, **route: object) -> list[tuple[str, str]]:
    primary, backup = FaultUpstream("primary"), FaultUpstream("backup")
    await primary.start()
    await backup.start()
    try:
        config = HangupConfig.model_validate(hangup_config(primary, backup, TIMING, **route))
        server, _ = await start_proxy(config)
        results = await run_case(case, f"{server.base_url}/v1", primary, backup, TIMING)
    finally:
        await primary.stop()
        await backup.stop()
    return [(f"{r.mode}: {r.score}", r.detail) for r in results]


@pytest.mark.parametrize(
    "name",
    list(CASES),
)
async def test_fault(name: str, start_proxy: StartProxy) -> None:
    case = CASES[name]
    want = "safe" if name in SAFE else "pass"
    got = await _run(case, start_proxy)
    assert [score for score, _ in got] == [f"{m}: {want}" for m in case.modes], got


@pytest.mark.parametrize("name", sorted(CUT_AFTER_CONTENT))
async def test_cut_stream_continued(name: str, start_proxy: StartProxy) -> None:
    """With continue_cut_streams and a fallback that accepts an assistant prefix, the client
    gets the whole answer, once, spliced."""
    got = await _run(CASES[name], start_proxy, continue_cut_streams=True)
    assert [score for score, _ in got] == ["stream: pass"], got


async def test_broken_chunk_framing_ends_the_stream_at_once(start_proxy: StartProxy) -> None:
    """A broken chunk-size line after content: aiohttp's C parser closes the connection but
    never fails the body, so without hangup's watch the client would wait for idle_s (30 s
    here). The stream must end at once, with the cut-off error in band."""
    case = CASES["stream bad chunk mid-way"]
    slow_idle = Timing(headers_s=1, first_token_s=1, idle_s=30, hang_bound_s=8)
    primary, backup = FaultUpstream("primary"), FaultUpstream("backup")
    await primary.start()
    await backup.start()
    try:
        config = HangupConfig.model_validate(hangup_config(primary, backup, slow_idle))
        server, _ = await start_proxy(config)
        results = await run_case(case, f"{server.base_url}/v1", primary, backup, slow_idle)
    finally:
        await primary.stop()
        await backup.stop()
    [result] = results
    assert result.score == "safe" and "cut off" in result.detail, result


@pytest.mark.parametrize("stream", [True, False])
async def test_a_fallback_answer_is_priced_as_the_model_that_answered(
    stream: bool, start_proxy: StartProxy
) -> None:
    """The primary (gpt-4o) answers 503, the fallback renamed to backup-model answers: the
    client's usage and the record's cost are the fallback's, at the fallback model's price,
    and the failed attempt costs nothing."""
    case = CASES["fallback accounting (usage)"]
    primary, backup = FaultUpstream("primary"), FaultUpstream("backup")
    await primary.start()
    await backup.start()
    prices = {
        PRIMARY_MODEL: {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0},
        BACKUP_MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    try:
        data = {**hangup_config(primary, backup, TIMING), "prices": prices}
        server, sink = await start_proxy(HangupConfig.model_validate(data))
        rid = f"priced-{stream}"
        primary.behaviours[rid], backup.behaviours[rid] = case.primary, case.backup
        got = await sdk_call(f"{server.base_url}/v1", rid, stream, case.extra, 8)
        record = await sink.wait_for(rid)
    finally:
        await primary.stop()
        await backup.stop()
    assert got.error is None and got.model == BACKUP_MODEL, got
    assert got.usage is not None and got.usage["completion_tokens"] == WORDS
    assert [(a.upstream, a.model) for a in record.attempts] == [
        ("primary", PRIMARY_MODEL),
        ("backup", BACKUP_MODEL),
    ]
    assert record.usage.prompt_tokens == 7 and record.usage.completion_tokens == WORDS
    assert record.cost is not None
    assert record.cost.used_usd == pytest.approx((7 * 1.0 + WORDS * 2.0) / 1e6)
