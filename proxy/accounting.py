"""Puts the pure accounting pieces together for one finished request: usage (already on the
record), tokens saved and wasted (`savings.py`), and money (`pricing.py`).

Savings are counted for every request the proxy cut short (client gone, timeout, shutdown);
typical completion lengths are learned only from requests that completed normally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config import HangupConfig
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, Usage
from proxy.pricing import PriceBook
from proxy.savings import TypicalLengths, estimate_savings
from proxy.usage import body_usage

if TYPE_CHECKING:
    from proxy.relay import Exchange

# Endpoints whose requests generate completion tokens (savings make sense for them).
_GENERATING = frozenset({"chat.completions", "completions", "responses"})
_CUT_SHORT = frozenset({Outcome.CLIENT_CANCELLED, Outcome.TIMEOUT, Outcome.SHUTDOWN})
# Outcomes after which the upstream may have processed the prompt without our seeing usage.
_UPSTREAM_HAD_IT = _CUT_SHORT | {Outcome.COMPLETED}


def usage_inputs(exchange: Exchange) -> tuple[int, int]:
    """(generated completion tokens, tokens that arrived after the client was gone)."""
    if exchange.tracker is None:
        if exchange.drained:  # a plain body read after the client left: none of it delivered
            generated = exchange.record.usage.completion_tokens
            return generated, generated
        return 0, 0
    generated = exchange.tracker.generated_tokens
    wasted = 0
    if exchange.record.client_gone_at is not None:
        wasted = max(0, generated - exchange.delivered_tokens)
    return generated, wasted


def record_usage(exchange: Exchange) -> None:
    """Fill `record.usage` from what was seen (reported where possible)."""
    facts = exchange.facts
    if facts is None:
        return
    record = exchange.record
    if exchange.tracker is not None:
        record.usage = exchange.tracker.usage()
    elif exchange.json_body is not None and (
        record.outcome is Outcome.COMPLETED or exchange.drained
    ):
        record.usage = body_usage(bytes(exchange.json_body), facts, exchange.content_encoding)
    elif exchange.plan is not None and record.outcome in _UPSTREAM_HAD_IT:
        # The upstream got the prompt (and may have generated), but we never saw its
        # figures: an estimate, flagged as one, is closer than zero passed off as reported.
        record.usage = Usage(
            prompt_tokens=facts.prompt_tokens_estimate,
            prompt_estimated=True,
            completion_estimated=facts.endpoint != "embeddings",
        )


class Accountant:
    def __init__(self, config: HangupConfig) -> None:
        self.typical = TypicalLengths()
        self.prices = PriceBook.from_config(config.prices, config.price_file)

    def settle(self, record: RequestRecord, exchange: Exchange) -> None:
        record_usage(exchange)
        facts, route = exchange.facts, exchange.route
        if facts is None or route is None:
            return  # rejected before the request was understood: nothing to account
        model = facts.model
        route_name = route.name
        if record.outcome in _CUT_SHORT and facts.endpoint in _GENERATING:
            generated, wasted = usage_inputs(exchange)
            record.savings = estimate_savings(
                generated=generated,
                wasted=wasted,
                max_tokens=facts.max_tokens,
                typical=self.typical.typical(route_name, model),
                route_default=route.options.expected_completion_tokens,
                # A background job we did not stop (kept, already finished, cancel failed)
                # goes on generating at the provider: hanging up saved nothing there.
                drained=exchange.drained
                or record.background not in (None, BackgroundCancel.CANCELLED),
            )
        elif (
            record.outcome is Outcome.COMPLETED
            and facts.endpoint in _GENERATING
            and record.upstream_status is not None
            and record.upstream_status < 300
        ):
            self.typical.observe(route_name, model, record.usage.completion_tokens)
        record.cost = self.prices.cost(model, record.usage, record.savings)
