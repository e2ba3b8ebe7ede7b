"""`Accountant.settle` is a function of the sealed record (plus config and history): the same
record gives the same usage, savings and cost, and the upstream's billing policy decides
whether tokens saved are dollars saved."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.accounting import Accountant
from proxy.outcome import Outcome, RequestRecord, Usage
from tests.support import config_from

PRICE = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}


def accountant() -> Accountant:
    return Accountant(
        config_from(
            {
                "upstreams": {
                    "hosted": {"base_url": "https://api.openai.com/v1"},
                    "groq": {"base_url": "https://api.groq.com/openai/v1"},
                    "gpu": {"base_url": "http://127.0.0.1:8000/v1", "engine": "vllm"},
                },
                "routes": [
                    {"name": name, "upstream": name, "match": {"model": f"{name}-*"}}
                    for name in ("hosted", "groq", "gpu")
                ],
                "defaults": {"expected_completion_tokens": 300},
                "prices": {"m": PRICE},
            }
        )
    )


def cut_stream(upstream: str, **fields: Any) -> RequestRecord:
    """A sealed record: a stream the client left after 20 of 1000 tokens."""
    record = RequestRecord(
        request_id="r",
        method="POST",
        path="/v1/chat/completions",
        started_at=0.0,
        wall_started_at=0.0,
        route=upstream,
        upstream=upstream,
        model="m",
        endpoint="chat.completions",
        stream=True,
        status=200,
        upstream_status=200,
        client_gone_at=1.0,
        sent_upstream=True,
        max_tokens=1000,
        prompt_estimate=11,
        seen_usage=Usage(prompt_tokens=11, completion_tokens=20, prompt_estimated=True),
        generated_tokens=20,
        delivered_tokens=18,
        stream_terminated=False,
    )
    record.settle(Outcome.CLIENT_CANCELLED)
    for key, value in fields.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize(
    ("upstream", "billing", "saved", "saved_usd", "wasted_usd"),
    [
        ("hosted", "stops", 280, 280 * 10.0 / 1e6, 2 * 10.0 / 1e6),
        ("groq", "full", 0, 0.0, 2 * 10.0 / 1e6),  # generated and billed anyway
        ("gpu", "self_hosted", 280, 0.0, 0.0),  # compute saved, no invoice
    ],
)
def test_dollars_are_saved_only_where_billing_stops(
    upstream: str, billing: str, saved: int, saved_usd: float, wasted_usd: float
) -> None:
    record = cut_stream(upstream)
    accountant().settle(record)
    assert record.savings is not None and record.savings.billing == billing
    assert record.savings.tokens_saved == saved and record.savings.tokens_wasted == 2
    assert record.cost is not None
    assert record.cost.saved_usd == pytest.approx(saved_usd)
    assert record.cost.wasted_usd == pytest.approx(wasted_usd)
    assert record.cost.used_usd == pytest.approx((11 * 2.5 + 20 * 10.0) / 1e6)


def test_settle_reads_only_the_record_and_a_tokenized_prompt_wins_over_the_estimate() -> None:
    a = accountant()
    first, second = cut_stream("gpu", prompt_tokenized=44, tokenizer="vllm"), cut_stream("gpu")
    a.settle(first)
    a.settle(second)
    assert first.usage.prompt_tokens == 44 and first.usage.prompt_source == "tokenized"
    assert second.usage.prompt_tokens == 11 and second.usage.prompt_source == "estimated"
    again = cut_stream("gpu", prompt_tokenized=44, tokenizer="vllm")
    a.settle(again)
    assert (again.usage, again.savings, again.cost) == (first.usage, first.savings, first.cost)


@pytest.mark.parametrize("outcome", [Outcome.UPSTREAM_REJECTED, Outcome.RATE_LIMITED])
def test_refused_requests_have_no_usage_even_with_an_estimate_on_the_record(
    outcome: Outcome,
) -> None:
    record = cut_stream("hosted", outcome=outcome, upstream_status=401, client_gone_at=None)
    accountant().settle(record)
    assert record.usage == Usage() and record.savings is None
    assert record.cost is not None and record.cost.used_usd == 0.0


def test_a_client_leaving_while_reading_an_error_answer_is_not_billed() -> None:
    record = cut_stream("hosted", upstream_status=401, seen_usage=None, generated_tokens=0)
    accountant().settle(record)
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.usage == Usage() and record.savings is None
