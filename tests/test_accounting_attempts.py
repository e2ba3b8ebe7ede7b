"""Accounting covers every attempt: a hedge's loser, a failover's failed first try and the cut
half of a continued stream are billed and priced at their own model and billing policy, and the
attempts whose output never reached the client are recorded as waste, by reason, in the record,
the access log and /metrics. Through the production runner against the simulator.

Expected figures come from what each simulator says it received and generated (its request
records: the body it was sent, the completion tokens it sent) and its documented prompt count;
a prompt nobody reported (an attempt closed before its usage chunk) is the documented estimate,
ceil(characters / 4) + 4 per message + 3 (docs/accounting.md), flagged `estimated`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.attempts import AttemptResult
from proxy.config import HangupConfig
from proxy.outcome import Outcome, Usage
from proxy.sim import SimulatedProvider
from proxy.sim import prompt_tokens as sim_prompt_tokens
from proxy.sim.records import RequestRecord as SimRequest
from tests.conftest import StartProxy, chat
from tests.metrics_support import scrape, value
from tests.resilience_support import BACKUP_MODEL, CHAT, post, seen
from tests.support import access_line, config_from, serving

PRIMARY_PRICE = (3.0, 12.0)  # USD per million input / output tokens
BACKUP_PRICE = (1.0, 4.0)
EXPECTED = 100  # the route's expected_completion_tokens (no history yet)
MESSAGE = "Tell me a story."


def documented_estimate(*contents: str) -> int:
    """docs/accounting.md, "Prompt tokens (estimate)", for one user message per content."""
    return sum(math.ceil(len(c) / 4) + 4 for c in contents) + 3


def config(
    primary: SimulatedProvider,
    backup: SimulatedProvider,
    primary_model: str,
    *,
    primary_billing: str = "stops",
    backup_prefix: str = "none",
    **route: Any,
) -> HangupConfig:
    assert primary.base_url is not None and backup.base_url is not None
    return config_from(
        {
            "upstreams": {
                "primary": {"base_url": primary.base_url, "billing": {"stream": primary_billing}},
                "backup": {
                    "base_url": backup.base_url,
                    "billing": {"stream": "stops"},
                    "assistant_prefix": backup_prefix,
                },
            },
            "routes": [
                {
                    "name": "chat",
                    "upstream": "primary",
                    "fallbacks": [{"upstream": "backup", "model": BACKUP_MODEL}],
                    "circuit_failures": 0,
                    "expected_completion_tokens": EXPECTED,
                    **route,
                }
            ],
            "prices": {
                primary_model: price(PRIMARY_PRICE),
                BACKUP_MODEL: price(BACKUP_PRICE),
            },
        }
    )


def price(per_mtok: tuple[float, float]) -> dict[str, float]:
    return {"input_per_mtok": per_mtok[0], "output_per_mtok": per_mtok[1]}


def usd(price: tuple[float, float], prompt: int, completion: int) -> float:
    return (prompt * price[0] + completion * price[1]) / 1_000_000


def only(sim: SimulatedProvider, request_id: str) -> SimRequest:
    received = seen(sim, request_id)
    assert len(received) == 1
    return received[0]


def reported_prompt(rec: SimRequest) -> int:
    """The prompt size the simulator reports for the body it received."""
    assert isinstance(rec.body, dict)
    return sim_prompt_tokens("chat", rec.body)


def pair(usage: Usage) -> tuple[int, str, int, str]:
    return (
        usage.prompt_tokens,
        usage.prompt_source.value,
        usage.completion_tokens,
        usage.completion_source.value,
    )


# --- hedging ---------------------------------------------------------------------------------

# The loser's billing policy -> (tokens it saved by being closed, dollars saved).
HEDGE_SAVINGS = {
    "stops": (EXPECTED, EXPECTED * PRIMARY_PRICE[1] / 1_000_000),
    "full": (0, None),  # the provider generates (and bills) the rest anyway
    "self_hosted": (EXPECTED, 0.0),  # compute saved, no invoice
}


@pytest.mark.parametrize("billing", sorted(HEDGE_SAVINGS))
async def test_a_hedge_losers_prompt_is_billed_as_hedge_waste(
    sim: SimulatedProvider,
    backup: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    billing: str,
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    slow = "slow-first-token:delay=10"
    server, sink = await start_proxy(
        config(sim, backup, slow, primary_billing=billing, hedge_after_s=0.2)
    )
    rid = f"w-hedge-{billing}"
    answer = await post(server.base_url, chat(slow, stream=True), rid)
    assert answer.status == 200 and {e["model"] for e in answer.events()} == {BACKUP_MODEL}
    record = await sink.wait_for(rid)
    loser_sim, winner_sim = only(sim, rid), only(backup, rid)
    await sim.wait_closed(rid, timeout=2.0)
    assert record.outcome is Outcome.COMPLETED
    loser, winner = record.attempts
    assert (loser.error, winner.reason, winner.delivered) == ("hedge loser", "hedge", True)
    # What each simulator generated, and the prompt: the loser never reported its own.
    loser_prompt = documented_estimate(MESSAGE)
    assert loser.bill is not None and winner.bill is not None
    assert pair(loser.bill.usage) == (
        loser_prompt,
        "estimated",
        loser_sim.completion_tokens_sent,
        "estimated",
    )
    assert pair(winner.bill.usage) == (
        reported_prompt(winner_sim),
        "reported",
        winner_sim.completion_tokens_sent,
        "reported",
    )
    assert winner_sim.completion_tokens_sent == 16 and loser_sim.completion_tokens_sent == 0
    assert (loser_prompt, reported_prompt(winner_sim)) == (11, 10)  # docs/accounting.md
    # The request's usage is both attempts; the waste is the loser, at the primary's price.
    total_prompt = loser_prompt + reported_prompt(winner_sim)
    assert pair(record.usage) == (total_prompt, "estimated", 16, "reported")
    waste_usd = usd(PRIMARY_PRICE, loser_prompt, 0)
    used_usd = waste_usd + usd(BACKUP_PRICE, reported_prompt(winner_sim), 16)
    saved_tokens, saved_usd = HEDGE_SAVINGS[billing]
    waste = record.waste["hedge"]
    assert set(record.waste) == {"hedge"}
    assert (waste.attempts, waste.prompt_tokens, waste.completion_tokens) == (1, loser_prompt, 0)
    assert waste.usd == pytest.approx(waste_usd)
    assert waste.tokens_saved == saved_tokens
    assert waste.saved_usd == (None if saved_usd is None else pytest.approx(saved_usd))
    assert record.cost is not None
    assert record.cost.used_usd == pytest.approx(used_usd)
    assert record.cost.saved_usd == pytest.approx(saved_usd or 0.0)

    line = access_line(caplog, rid)
    assert line["tokens"]["prompt"] == total_prompt and line["tokens"]["completion"] == 16
    assert line["waste"]["hedge"]["prompt_tokens"] == loser_prompt
    assert line["waste"]["hedge"]["usd"] == pytest.approx(waste_usd)
    assert line["waste"]["hedge"]["tokens_saved"] == saved_tokens
    assert line["cost_usd"]["used"] == pytest.approx(used_usd)

    s = await scrape(server)
    labels = {"route": "chat", "reason": "hedge"}
    assert value(s, "hangup_attempt_waste_tokens_total", **labels, type="prompt") == loser_prompt
    assert value(s, "hangup_attempt_waste_tokens_total", **labels, type="completion") == 0
    assert value(s, "hangup_attempt_waste_cost_usd_total", **labels) == pytest.approx(waste_usd)
    rm = {"route": "chat", "model": slow}
    assert value(s, "hangup_tokens_total", **rm, type="prompt") == total_prompt
    assert value(s, "hangup_tokens_estimated_total", **rm, type="prompt") == loser_prompt
    assert value(s, "hangup_cost_usd_total", **rm) == pytest.approx(used_usd)
    assert (value(s, "hangup_tokens_saved_total", **rm) or 0) == saved_tokens


# --- failover --------------------------------------------------------------------------------

FAILOVERS: dict[str, tuple[dict[str, Any], AttemptResult]] = {
    # a 500 in band, before any content: the stream broke
    "error:status=500,after=0": ({}, AttemptResult.STREAM_ERROR),
    # a first token later than first_token_s
    "slow-first-token:delay=20": ({"timeouts": {"first_token_s": 0.3}}, AttemptResult.TIMEOUT),
}


@pytest.mark.parametrize("fault", sorted(FAILOVERS))
async def test_a_failed_first_try_is_billed_as_failover_waste(
    sim: SimulatedProvider,
    backup: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    route, result = FAILOVERS[fault]
    server, sink = await start_proxy(config(sim, backup, fault, primary_billing="stops", **route))
    rid = f"w-fail-{result.value}"
    answer = await post(server.base_url, chat(fault, stream=True), rid)
    assert answer.status == 200 and {e["model"] for e in answer.events()} == {BACKUP_MODEL}
    record = await sink.wait_for(rid)
    failed_sim, winner_sim = only(sim, rid), only(backup, rid)
    assert [(a.upstream, a.result) for a in record.attempts] == [
        ("primary", result),
        ("backup", AttemptResult.OK),
    ]
    failed_prompt = documented_estimate(MESSAGE)
    generated = failed_sim.completion_tokens_sent
    assert generated == 0  # it failed before content
    waste = record.waste["failover"]
    assert (waste.prompt_tokens, waste.completion_tokens) == (failed_prompt, generated)
    waste_usd = usd(PRIMARY_PRICE, failed_prompt, generated)
    assert waste.usd == pytest.approx(waste_usd)
    assert waste.tokens_saved == 0  # only a hedge loser is closed to save its tokens
    winner_prompt = reported_prompt(winner_sim)
    assert pair(record.usage) == (
        failed_prompt + winner_prompt,
        "estimated",
        winner_sim.completion_tokens_sent,
        "reported",
    )
    used = waste_usd + usd(BACKUP_PRICE, winner_prompt, winner_sim.completion_tokens_sent)
    assert record.cost is not None and record.cost.used_usd == pytest.approx(used)
    line = access_line(caplog, rid)
    assert line["waste"] == {
        "failover": {
            "attempts": 1,
            "prompt_tokens": failed_prompt,
            "completion_tokens": 0,
            "usd": pytest.approx(waste_usd),
            "tokens_saved": 0,
            "saved_usd": None,
        }
    }
    s = await scrape(server)
    labels = {"route": "chat", "reason": "failover"}
    assert value(s, "hangup_attempt_waste_tokens_total", **labels, type="prompt") == failed_prompt
    assert value(s, "hangup_attempt_waste_cost_usd_total", **labels) == pytest.approx(waste_usd)
    assert (
        value(s, "hangup_attempt_waste_tokens_total", route="chat", reason="hedge", type="prompt")
        == 0
    )


async def test_a_rejected_first_try_is_neither_billed_nor_waste(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A 503 is a refusal: the provider bills nothing for it."""
    fault = "error:status=503"
    server, sink = await start_proxy(config(sim, backup, fault))
    answer = await post(server.base_url, chat(fault, stream=True), "w-503")
    assert answer.status == 200
    record = await sink.wait_for("w-503")
    winner_sim = only(backup, "w-503")
    assert record.waste == {}
    assert pair(record.usage) == (
        reported_prompt(winner_sim),
        "reported",
        winner_sim.completion_tokens_sent,
        "reported",
    )


# --- continuation ----------------------------------------------------------------------------


async def test_a_continued_stream_bills_the_cut_attempt_and_the_continuation(
    sim: SimulatedProvider,
    backup: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    fault = "reset:after=5"
    cfg = config(sim, backup, fault, backup_prefix="prefix", continue_cut_streams=True)
    server, sink = await start_proxy(cfg)
    answer = await post(server.base_url, chat(fault, stream=True), "w-cont")
    assert answer.status == 200 and answer.body.rstrip().endswith(b"data: [DONE]")
    record = await sink.wait_for("w-cont")
    cut_sim, cont_sim = only(sim, "w-cont"), only(backup, "w-cont")
    assert [(a.reason, a.result, a.delivered) for a in record.attempts] == [
        ("primary", AttemptResult.CUT, True),
        ("continue", AttemptResult.OK, True),
    ]
    cut_generated, cont_generated = cut_sim.completion_tokens_sent, cont_sim.completion_tokens_sent
    assert (cut_generated, cont_generated) == (5, 11)
    cut_prompt = documented_estimate(MESSAGE)  # cut before its usage chunk
    cont_prompt = reported_prompt(cont_sim)  # the original plus the assistant prefix
    assert (cut_prompt, cont_prompt) == (11, 18)  # docs/accounting.md
    cut_bill, cont_bill = (a.bill for a in record.attempts)
    assert cut_bill is not None and cont_bill is not None
    assert pair(cut_bill.usage) == (cut_prompt, "estimated", cut_generated, "estimated")
    assert pair(cont_bill.usage) == (cont_prompt, "reported", cont_generated, "reported")
    assert pair(record.usage) == (
        cut_prompt + cont_prompt,
        "estimated",
        cut_generated + cont_generated,
        "estimated",
    )
    assert record.waste == {}  # both halves reached the client
    used = usd(PRIMARY_PRICE, cut_prompt, cut_generated) + usd(
        BACKUP_PRICE, cont_prompt, cont_generated
    )
    assert record.cost is not None and record.cost.used_usd == pytest.approx(used)
    line = access_line(caplog, "w-cont")
    assert (line["tokens"]["prompt"], line["tokens"]["completion"]) == (
        cut_prompt + cont_prompt,
        cut_generated + cont_generated,
    )
    assert "waste" not in line
    s = await scrape(server)
    rm = {"route": "chat", "model": fault}
    assert value(s, "hangup_tokens_total", **rm, type="completion") == 16
    assert value(s, "hangup_tokens_total", **rm, type="prompt") == cut_prompt + cont_prompt
    assert value(s, "hangup_cost_usd_total", **rm) == pytest.approx(used)


# --- the in-flight gauge ---------------------------------------------------------------------


@pytest.fixture
async def slow_tokenizing_upstream() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A llama.cpp-shaped upstream: a stream that never ends, and an /apply-template that
    answers only when released. Yields its base URL, "asked to count", and "release"."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":" hi"}}]}\n\n'
        while True:
            await response.write(chunk)
            await asyncio.sleep(0.05)

    async def apply_template(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.json_response({"prompt": "x"})

    async def tokenize(request: web.Request) -> web.Response:
        return web.json_response({"tokens": [1, 2, 3]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    app.router.add_post("/apply-template", apply_template)
    app.router.add_post("/tokenize", tokenize)
    async with serving(app) as port:
        try:
            yield f"http://127.0.0.1:{port}/v1", asked, release
        finally:
            release.set()


async def test_in_flight_drops_when_the_request_ends_not_when_its_record_is_sealed(
    start_proxy: StartProxy,
    slow_tokenizing_upstream: tuple[str, asyncio.Event, asyncio.Event],
) -> None:
    base_url, asked, release = slow_tokenizing_upstream
    server, sink = await start_proxy(
        config_from(
            {
                "upstreams": {"llama": {"base_url": base_url, "engine": "llamacpp"}},
                "routes": [{"name": "chat", "upstream": "llama"}],
            }
        )
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat("m", stream=True),
            headers={"x-request-id": "w-inflight"},
        ) as response:
            assert response.status == 200
            await response.content.readany()
            s = await scrape(server)
            assert value(s, "hangup_requests_in_flight") == 1
        # The client hung up; the cut stream's prompt is being counted (held at the upstream).
    await asyncio.wait_for(asked.wait(), 5.0)
    s = await scrape(server)
    assert value(s, "hangup_requests_in_flight") == 0
    assert sink.by_id("w-inflight") == []  # the record is not sealed yet
    assert (
        value(s, "hangup_requests_total", route="chat", model="m", outcome="client_cancelled")
        is None
    )
    release.set()
    record = await sink.wait_for("w-inflight")
    assert record.outcome is Outcome.CLIENT_CANCELLED and record.usage.prompt_tokenized
    assert record.usage.prompt_tokens == 3  # the upstream's own count
    s = await scrape(server)
    assert value(s, "hangup_requests_in_flight") == 0
    assert (
        value(s, "hangup_requests_total", route="chat", model="m", outcome="client_cancelled") == 1
    )
