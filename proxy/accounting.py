"""Puts the pure accounting pieces together for one finished request: usage (already on the
record), tokens saved and wasted (`savings.py`), and money (`pricing.py`).

Savings are counted for every request the proxy cut short (client gone, timeout, shutdown);
typical completion lengths are learned only from requests that completed normally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config import HangupConfig
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord
from proxy.pricing import PriceBook
from proxy.savings import TypicalLengths, estimate_savings

if TYPE_CHECKING:
    from proxy.relay import Exchange

# Endpoints whose requests generate completion tokens (savings make sense for them).
_GENERATING = frozenset({"chat.completions", "completions", "responses"})
_CUT_SHORT = frozenset({Outcome.CLIENT_CANCELLED, Outcome.TIMEOUT, Outcome.SHUTDOWN})


class Accountant:
    def __init__(self, config: HangupConfig) -> None:
        self.typical = TypicalLengths()
        self.prices = PriceBook.from_config(config.prices, config.price_file)

    def settle(self, record: RequestRecord, exchange: Exchange) -> None:
        facts, route = exchange.facts, exchange.route
        if facts is None or route is None:
            return  # rejected before the request was understood: nothing to account
        model = facts.model
        route_name = route.name
        if record.outcome in _CUT_SHORT and facts.endpoint in _GENERATING:
            generated, wasted = exchange.usage_inputs()
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
