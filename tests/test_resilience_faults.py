"""One test per upstream fault class, over real sockets: a route "chat" on simulator `sim`
("primary") that falls back to simulator `backup` (asked for "backup-model").

Each test asserts what the client got, how many attempts each upstream saw, and that every
losing attempt was finished or closed (the simulator records the close).
"""

from __future__ import annotations

import time

import aiohttp

from proxy.attempts import Attempt, AttemptResult
from proxy.logs import access_fields
from proxy.outcome import Outcome, TimeoutKind
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.resilience_support import (
    BACKUP_MODEL,
    fallback_config,
    post,
    seen,
)

FAST = {"timeouts": {"headers_s": 0.5, "first_token_s": 0.5, "idle_s": 0.5}}


def results(attempts: list[Attempt]) -> list[tuple[str, AttemptResult | None]]:
    return [(a.upstream, a.result) for a in attempts]


async def test_429_with_a_short_retry_after_is_honoured_then_moves_on(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, retry_after_max_s=1.0))
    started = time.monotonic()
    answer = await post(
        server.base_url, chat("error:status=429,retry_after=0.3", stream=False), "f-429ra"
    )
    assert answer.status == 200
    assert answer.json()["model"] == BACKUP_MODEL  # the client sees the model that answered
    assert time.monotonic() - started >= 0.3  # the Retry-After was waited once
    assert len(seen(sim, "f-429ra")) == 2 and len(seen(backup, "f-429ra")) == 1
    record = await sink.wait_for("f-429ra")
    assert results(record.attempts) == [
        ("primary", AttemptResult.RATE_LIMITED),
        ("primary", AttemptResult.RATE_LIMITED),
        ("backup", AttemptResult.OK),
    ]
    assert record.outcome is Outcome.COMPLETED


async def test_429_without_retry_after_moves_on_at_once(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(
        server.base_url, chat("error:status=429,retry_after=none", stream=True), "f-429"
    )
    assert answer.status == 200 and answer.text()
    assert {e["model"] for e in answer.events()} == {BACKUP_MODEL}
    assert len(seen(sim, "f-429")) == 1 and len(seen(backup, "f-429")) == 1
    record = await sink.wait_for("f-429")
    assert results(record.attempts) == [
        ("primary", AttemptResult.RATE_LIMITED),
        ("backup", AttemptResult.OK),
    ]


async def test_429_asking_for_longer_than_the_bound_moves_on_at_once(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(fallback_config(sim, backup, retry_after_max_s=1.0))
    started = time.monotonic()
    answer = await post(
        server.base_url, chat("error:status=429,retry_after=30", stream=False), "f-429long"
    )
    assert answer.status == 200 and time.monotonic() - started < 1.0
    assert len(seen(sim, "f-429long")) == 1 and len(seen(backup, "f-429long")) == 1


async def test_429_with_nowhere_to_go_is_passed_on_with_its_retry_after(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    from tests.support import make_config

    server, _ = await start_proxy(make_config(sim.base_url, retry_after_max_s=0.5))
    answer = await post(
        server.base_url, chat("error:status=429,retry_after=30", stream=False), "f-429only"
    )
    assert answer.status == 429 and answer.headers.get("retry-after") == "30"
    assert len(seen(sim, "f-429only")) == 1


async def test_500_goes_to_the_fallback_never_again_to_the_same_target(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _sink = await start_proxy(fallback_config(sim, backup, max_retries=2))
    answer = await post(server.base_url, chat("error:status=500", stream=False), "f-500")
    assert answer.status == 200 and answer.json()["model"] == BACKUP_MODEL
    # A 500 may follow work done: it is not retried on the same target even with retries on.
    assert len(seen(sim, "f-500")) == 1 and len(seen(backup, "f-500")) == 1
    assert seen(sim, "f-500")[0].end == "error"  # finished by the upstream itself


async def test_503_forever_every_request_answered_by_the_fallback(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    for i in range(3):
        answer = await post(server.base_url, chat("error:status=503", stream=True), f"f-503-{i}")
        assert answer.status == 200 and answer.text()
        assert len(seen(backup, f"f-503-{i}")) == 1
    record = await sink.wait_for("f-503-2")
    assert record.upstream == "backup" and record.upstream_status == 200


async def test_reset_before_headers_goes_to_the_fallback(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("reset:after=0", stream=False), "f-reset")
    assert answer.status == 200 and answer.json()["model"] == BACKUP_MODEL
    assert len(seen(sim, "f-reset")) == 1 and seen(sim, "f-reset")[0].end == "reset"
    record = await sink.wait_for("f-reset")
    assert results(record.attempts) == [
        ("primary", AttemptResult.RESET),
        ("backup", AttemptResult.OK),
    ]


async def test_a_silent_upstream_is_left_after_headers_s(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, **FAST))
    started = time.monotonic()
    answer = await post(server.base_url, chat("slow-headers:delay=60", stream=False), "f-silent")
    elapsed = time.monotonic() - started
    assert answer.status == 200 and answer.json()["model"] == BACKUP_MODEL
    assert 0.5 <= elapsed < 2.0  # headers_s, then the fallback's own answer
    await sim.wait_closed("f-silent", timeout=1.0)  # the silent attempt was hung up on
    record = await sink.wait_for("f-silent")
    assert results(record.attempts) == [
        ("primary", AttemptResult.TIMEOUT),
        ("backup", AttemptResult.OK),
    ]


async def test_a_late_first_token_switches_invisibly(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, **FAST))
    answer = await post(
        server.base_url,
        chat("slow-first-token:delay=20,keepalive=0.05", stream=True),
        "f-ttft",
    )
    assert answer.status == 200 and answer.text()
    # The primary's headers, role chunk and keep-alives never reached the client: one answer,
    # one model, one role chunk.
    events = answer.events()
    assert {e["model"] for e in events} == {BACKUP_MODEL}
    roles = [e for e in events if (e["choices"] or [{}])[0].get("delta", {}).get("role")]
    assert len(roles) == 1
    await sim.wait_closed("f-ttft", timeout=1.0)
    record = await sink.wait_for("f-ttft")
    assert results(record.attempts) == [
        ("primary", AttemptResult.TIMEOUT),
        ("backup", AttemptResult.OK),
    ]
    assert record.attempts[0].status == 200 and record.attempts[0].first_token_at is None


async def test_an_in_band_error_before_content_switches_invisibly(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("error:status=500,after=0", stream=True), "f-ib")
    assert answer.status == 200 and answer.text()
    assert b'"error"' not in answer.body
    assert {e["model"] for e in answer.events()} == {BACKUP_MODEL}
    assert len(seen(backup, "f-ib")) == 1


async def test_a_stream_cut_after_content_is_never_restarted(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("reset:after=3", stream=True), "f-cut")
    assert answer.status == 200
    assert answer.body.rstrip().endswith(b"}")  # an in-band error event, no [DONE]
    assert answer.events()[-1]["error"]["code"] == "upstream_failed"
    assert len(seen(backup, "f-cut")) == 0  # content had reached the client: no restart
    record = await sink.wait_for("f-cut")
    assert results(record.attempts) == [("primary", AttemptResult.CUT)]
    assert record.outcome is Outcome.UPSTREAM_ERROR


async def test_a_stream_stalled_after_content_ends_in_band(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup, **FAST))
    answer = await post(server.base_url, chat("stall:after=3", stream=True), "f-stall")
    assert answer.status == 200
    assert answer.events()[-1]["error"]["code"] == "idle_timeout"
    assert len(seen(backup, "f-stall")) == 0
    await sim.wait_closed("f-stall", timeout=1.0)
    record = await sink.wait_for("f-stall")
    assert (record.outcome, record.timeout_kind) == (Outcome.TIMEOUT, TimeoutKind.IDLE)
    assert results(record.attempts) == [("primary", AttemptResult.ABANDONED)]


async def test_malformed_events_are_dropped_and_the_stream_stays_whole(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("malformed:after=2", stream=True), "f-bad")
    assert answer.status == 200
    assert b"{not json" not in answer.body
    assert answer.events()  # every data event parses (events() raises otherwise)
    assert answer.body.rstrip().endswith(b"data: [DONE]")
    assert len(seen(backup, "f-bad")) == 0
    record = await sink.wait_for("f-bad")
    assert record.outcome is Outcome.COMPLETED


async def test_context_length_goes_only_to_a_fallback_marked_for_it(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    refused = chat("error:status=400,code=context_length_exceeded", stream=False)
    marked = {"upstream": "backup", "model": BACKUP_MODEL, "long_context": True}
    server, sink = await start_proxy(fallback_config(sim, backup, fallback=marked))
    answer = await post(server.base_url, refused, "f-ctx")
    assert answer.status == 200 and answer.json()["model"] == BACKUP_MODEL
    assert len(seen(sim, "f-ctx")) == 1 and len(seen(backup, "f-ctx")) == 1
    record = await sink.wait_for("f-ctx")
    assert results(record.attempts) == [
        ("primary", AttemptResult.CLIENT_ERROR),
        ("backup", AttemptResult.OK),
    ]
    # An unmarked fallback never gets it: the 400 is the answer, as the upstream gave it.
    server2, _ = await start_proxy(fallback_config(sim, backup))
    answer = await post(server2.base_url, refused, "f-ctx2")
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert len(seen(sim, "f-ctx2")) == 1 and len(seen(backup, "f-ctx2")) == 0


async def test_a_content_policy_400_is_the_answer(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    marked = {"upstream": "backup", "model": BACKUP_MODEL, "long_context": True}
    server, _ = await start_proxy(fallback_config(sim, backup, fallback=marked, max_retries=3))
    answer = await post(
        server.base_url,
        chat("error:status=400,code=content_policy_violation", stream=False),
        "f-policy",
    )
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "content_policy_violation"
    assert len(seen(sim, "f-policy")) == 1 and len(seen(backup, "f-policy")) == 0


async def test_a_plain_400_is_never_retried(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(fallback_config(sim, backup, max_retries=3))
    answer = await post(server.base_url, chat("error:status=400", stream=True), "f-400")
    assert answer.status == 400
    assert len(seen(sim, "f-400")) == 1 and len(seen(backup, "f-400")) == 0


async def test_when_every_target_fails_the_client_gets_the_last_answer(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    broken = {"upstream": "backup", "model": "error:status=503"}
    server, sink = await start_proxy(fallback_config(sim, backup, fallback=broken))
    answer = await post(server.base_url, chat("error:status=502", stream=True), "f-all")
    assert answer.status == 503  # the last target's own answer, relayed
    assert len(seen(sim, "f-all")) == 1 and len(seen(backup, "f-all")) == 1
    record = await sink.wait_for("f-all")
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert results(record.attempts) == [
        ("primary", AttemptResult.SERVER_ERROR),
        ("backup", AttemptResult.SERVER_ERROR),
    ]


async def test_fallback_accounting_keeps_the_losers_tokens_apart(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("error:status=500,after=0", stream=True), "f-acct")
    assert answer.status == 200
    record = await sink.wait_for("f-acct")
    winner = record.attempts[-1]
    assert winner.delivered and winner.model == BACKUP_MODEL
    assert winner.tokens_generated == record.usage.completion_tokens > 0
    assert [a.delivered for a in record.attempts] == [False, True]


async def test_an_upstream_that_says_nothing_for_a_megabyte_is_left(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """Held events are bounded: 10,000 empty deltas (> 1 MiB) before any content is a broken
    stream, and the fallback answers."""
    server, sink = await start_proxy(fallback_config(sim, backup))
    body = chat("empty-deltas:count=10000,rate=0", stream=True)
    answer = await post(server.base_url, body, "f-mega")
    assert answer.status == 200 and {e["model"] for e in answer.events()} == {BACKUP_MODEL}
    record = await sink.wait_for("f-mega")
    assert results(record.attempts) == [
        ("primary", AttemptResult.STREAM_ERROR),
        ("backup", AttemptResult.OK),
    ]
    assert "before any content" in (record.attempts[0].error or "")


async def test_the_access_log_shows_the_attempt_chain(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(fallback_config(sim, backup))
    answer = await post(server.base_url, chat("error:status=503", stream=False), "f-log")
    assert answer.status == 200
    fields = access_fields(await sink.wait_for("f-log"))
    assert fields["attempts"] == (
        "primary/error:status=503:server_error[503] > backup/backup-model:ok[200]"
    )
    assert fields["upstream"] == "backup"


async def test_faults_per_model_are_set_over_http_and_bad_ones_refused(
    sim: SimulatedProvider,
) -> None:
    assert sim.base_url is not None
    control = sim.base_url.removesuffix("/v1") + "/_sim/faults"
    async with aiohttp.ClientSession() as session:
        async with session.post(control, json={"model": "m", "behaviour": "error:status=503"}) as r:
            assert r.status == 200
        async with session.post(
            f"{sim.base_url}/chat/completions", json=chat("m", stream=False)
        ) as r:
            assert r.status == 503
        async with session.post(control, json={"model": "m", "behaviour": None}) as r:
            assert r.status == 200
        async with session.post(
            f"{sim.base_url}/chat/completions", json=chat("m", stream=False)
        ) as r:
            assert r.status == 200
        async with session.post(control, json={"model": "m", "behaviour": "error:status=7"}) as r:
            assert r.status == 400
        async with session.post(control, data=b"not json") as r:
            assert r.status == 400
