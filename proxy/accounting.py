"""Accounting of one finished request, in three steps; the first two are proxy/seal.py's.

1. `seal(record, exchange)`: the one step at the end of the relay that copies what accounting
   needs from the exchange onto the record. Cheap and bounded.
2. `Facts.complete(record)` (only when needed, after the request ended, bounded in time): what
   takes I/O or real CPU (a compressed body's usage, a prompt count).
3. `Accountant.settle(record)`: a pure function of the record (plus config and the history of
   typical lengths): usage, tokens saved and wasted (`savings.py`) under the upstream's billing
   policy (`billing.py`), and money (`pricing.py`).

Rejected and rate-limited requests (`upstream_rejected`, `rate_limited`) get no tokens and no
cost: providers do not bill what they refuse. Savings are counted for every request the proxy cut
short (client gone, timeout, shutdown); typical completion lengths are learned only from
requests that completed normally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.attempts import RESULT_OK, Attempt
from proxy.billing import policy_for
from proxy.bills import answering_index, attempt_usage, bill_attempts, counts_of, sum_usage
from proxy.config import HangupConfig, RouteOptions
from proxy.outcome import (
    NO_WASTE,
    OUTCOME_COMPLETED,
    AttemptBill,
    BackgroundCancel,
    Cost,
    Outcome,
    RequestRecord,
    Usage,
)
from proxy.pricing import PriceBook, used_usd_at
from proxy.savings import TypicalLengths, estimate_savings
from proxy.seal import (
    _COUNTED_ENDPOINTS,
    _CUT_SHORT,
    _GENERATING,
    _UPSTREAM_HAD_IT,
    _no_answer,
    _refused,
)
from proxy.tokenize import PromptCounter

__all__ = ["Accountant"]

_PER_MTOK: Final = 1_000_000

# The upstream refused the request: nothing was generated or billed.
_NOT_BILLED: Final = frozenset({Outcome.UPSTREAM_REJECTED, Outcome.RATE_LIMITED})


def record_usage(record: RequestRecord) -> Usage:
    """The request's usage from the sealed facts: reported where possible, else tokenized, else
    estimated; nothing for requests the upstream refused or never received."""
    if record.outcome in _NOT_BILLED or not record.sent_upstream or _refused(record):
        return Usage()
    seen = record.seen_usage
    if seen is not None:
        # A copy of the counts as seen; whether a tokenizer counted the prompt is decided below.
        usage = counts_of(seen)
    elif (
        record.outcome in _UPSTREAM_HAD_IT
        and record.endpoint in _COUNTED_ENDPOINTS
        # An upstream error before any answer (unreachable, reset, a 5xx): nothing was billed.
        and not (record.outcome is Outcome.UPSTREAM_ERROR and _no_answer(record))
    ):
        # The upstream got the prompt (and may have generated), but we never saw its figures:
        # an estimate, flagged as one, is closer than zero passed off as reported.
        usage = Usage(
            prompt_tokens=record.prompt_estimate,
            prompt_estimated=True,
            completion_estimated=record.endpoint != "embeddings",
        )
    else:
        return Usage()
    if usage.prompt_estimated and record.prompt_tokenized is not None:
        usage.prompt_tokens = record.prompt_tokenized
        usage.prompt_estimated = False
        usage.prompt_tokenized = True
    return usage


class Accountant:
    def __init__(self, config: HangupConfig) -> None:
        self.typical = TypicalLengths()
        self.prices = PriceBook.from_config(config.prices, config.price_file)
        self.prompts = PromptCounter()
        self._routes: dict[str, RouteOptions] = {
            route.name: options for route, options in config.route_options()
        }
        self._upstreams = dict(config.upstreams)
        # Each upstream's billing policy for both kinds of request: a function of the config
        # (the default one parses the upstream's URL), asked for every attempt.
        self._billing: dict[tuple[str, bool], str] = {
            (name, stream): policy_for(upstream, stream=stream)
            for name, upstream in config.upstreams.items()
            for stream in (False, True)
        }
        if any(
            PromptCounter.uses_offline_tokenizer(u.engine, u.base_url)
            for u in config.upstreams.values()
        ):
            PromptCounter.preload()

    def settle(self, record: RequestRecord) -> None:
        """Usage, savings, waste and cost of a sealed record; a function of the record alone.

        Every attempt the provider bills is priced on its own (proxy/bills.py); the request's
        usage and cost are their sums. Savings of a request cut short are the answering
        attempt's, priced at its model and under its upstream's billing policy."""
        attempts = record.attempts
        if len(attempts) == 1 and self._settle_usual(record, attempts[0]):
            return
        route = self._routes.get(record.route or "")
        model, route_name = record.model, record.route or ""
        answer: int | None
        answering: Attempt | None
        single = len(attempts) == 1 and attempts[0].delivered
        if single:
            # The usual record: one attempt, whose answer the client got.
            answer, answering = 0, attempts[0]
            self._bill_single(record, answering)
        else:
            answer = answering_index(record)
            answering = attempts[answer] if answer is not None else None
            if answering is None:  # a record without attempts: its own usage
                record.usage = record_usage(record)
            else:
                self._bill(record, route)
        upstream_name = answering.upstream if answering is not None else record.upstream or ""
        upstream = self._upstreams.get(upstream_name)
        if route is None or upstream is None or not record.sent_upstream:
            record.cost = self._cost(record, answering)
            return  # rejected before the request was understood: nothing more to account
        if (
            record.outcome in _CUT_SHORT
            and record.endpoint in _GENERATING
            and (record.upstream_status is None or record.upstream_status < 400)
        ):
            billing = self._billing[(upstream_name, record.stream)]
            # The answer so far: a continuation's, plus what the attempts it continues sent.
            generated = record.generated_tokens + sum(
                a.tokens_generated
                for a in record.attempts[: answer if answer is not None else 0]
                if a.delivered
            )
            wasted = 0
            if record.drained or record.client_gone_at is not None:
                wasted = max(0, record.generated_tokens - record.delivered_tokens)
            record.savings = estimate_savings(
                generated=generated,
                wasted=wasted,
                max_tokens=record.max_tokens,
                typical=self.typical.typical(route_name, model),
                route_default=route.expected_completion_tokens,
                # A background job we did not stop (kept, already finished, cancel failed)
                # goes on generating at the provider: hanging up saved nothing there.
                drained=record.drained
                or record.background not in (None, BackgroundCancel.CANCELLED),
                billing=billing,
            )
        elif (
            record.outcome is OUTCOME_COMPLETED
            and record.endpoint in _GENERATING
            and record.upstream_status is not None
            and record.upstream_status < 300
            and (
                attempts[0].reason != "continue"  # one attempt: no generator for `any`
                if single
                else not any(a.reason == "continue" for a in attempts)
            )
        ):
            # The answer's own length (not a hedge loser's); a continued answer's is the sum
            # of parts cut short, not a natural length.
            bill = answering.bill if answering is not None else None
            usage = bill.usage if bill is not None else record.usage
            self.typical.observe(route_name, model, usage.completion_tokens)
        if single and record.savings is None and answering is not None:
            record.cost = self._cost_single(record, answering)
        else:
            record.cost = self._cost(record, answering)

    def _settle_usual(self, record: RequestRecord, attempt: Attempt) -> bool:
        """`settle` of the usual record in one step, or False (nothing done) for any other:
        a completed request whose one attempt answered (`ok`, status < 400: billed) and was
        delivered, with the prompt reported (neither estimated nor tokenized), nothing cut
        (no savings). Its bill is its reported usage as it is (`counts_of` would copy it with
        the same fields, and `_bill_single`'s sum of one bill is that again): the record's
        usage, the attempt's usage and its bill's share one `Usage`, which nothing changes
        after settling. No waste (the shared empty mapping), the typical length learned
        where `settle` learns it, the cost as `_cost_single` makes it.
        tests/test_accounting_single.py checks this against the general way."""
        seen = attempt.usage
        status = attempt.status
        if (
            seen is None
            or seen.prompt_estimated
            or seen.prompt_tokenized
            or status is None
            or status >= 400
            or attempt.result is not RESULT_OK
            or not attempt.delivered
            or record.outcome is not OUTCOME_COMPLETED
            or record.savings is not None
        ):
            return False
        model = attempt.model or record.model
        bill = AttemptBill(seen, self._billing.get((attempt.upstream, record.stream), "full"))
        used = None
        # The model's price looked up once, for the bill and for the cost below.
        price = self.prices.price(model)
        # `total_tokens`, no property
        if price is not None and seen.prompt_tokens + seen.completion_tokens > 0:
            used = bill.used_usd = used_usd_at(price, seen)
        attempt.bill = bill
        record.waste = NO_WASTE
        record.usage = seen
        route_name = record.route or ""
        upstream_status = record.upstream_status
        if (
            upstream_status is not None
            and upstream_status < 300
            and record.endpoint in _GENERATING
            and record.sent_upstream
            and attempt.reason != "continue"
            and route_name in self._routes
            and attempt.upstream in self._upstreams
        ):
            self.typical.observe(route_name, record.model, seen.completion_tokens)
        if used is not None:
            record.cost = Cost(0 + used, 0.0, 0.0)  # 0 +: as `sum` adds
        elif price is None:
            record.cost = Cost()
        else:
            record.cost = Cost(0.0, 0.0, 0.0)
        return True

    def _cost_single(self, record: RequestRecord, answering: Attempt) -> Cost:
        """`_cost` of the usual record (its one attempt delivered, billed by `_bill_single`,
        nothing cut), without its three lists: one bill, which saved nothing (`saved_usd` None).
        tests/test_accounting_single.py checks the two agree."""
        bill = answering.bill
        if bill is None or bill.saved_usd is not None:
            return self._cost(record, answering)
        used = bill.used_usd
        if used is None:
            if self.prices.price(answering.model or record.model) is None:
                return Cost()
            return Cost(used_usd=0.0, saved_usd=0.0, wasted_usd=0.0)
        return Cost(used_usd=0 + used, saved_usd=0.0, wasted_usd=0.0)  # 0 +: as `sum` adds

    def _cost(self, record: RequestRecord, answering: Attempt | None) -> Cost:
        """USD used (every billed attempt), saved and wasted (the answering attempt's cut)."""
        if answering is None:
            return self.prices.cost(record.model, record.usage, record.savings)
        bills = [a.bill for a in record.attempts if a.bill is not None]
        priced = [b.used_usd for b in bills if b.used_usd is not None]
        # Hedge losers closed early: dollars saved where their billing stops (proxy/bills.py).
        losers = [b.saved_usd for b in bills if b.saved_usd is not None]
        model = answering.model or record.model
        if record.savings is None:  # nothing cut: no dollars saved or wasted by the cut
            if not priced and not losers and self.prices.price(model) is None:
                return Cost()
            return Cost(
                used_usd=sum(priced) if priced else 0.0, saved_usd=sum(losers, 0.0), wasted_usd=0.0
            )
        cut = self.prices.cost(model, Usage(), record.savings)
        if not priced and not cut.priced and not losers:
            return Cost()
        return Cost(
            used_usd=sum(priced) if priced else 0.0,
            saved_usd=(cut.saved_usd or 0.0) + sum(losers),
            wasted_usd=cut.wasted_usd if cut.priced else 0.0,
        )

    def _expected(
        self, route_name: str, model: str | None, route: RouteOptions | None, limit: int | None
    ) -> int:
        typical = self.typical.typical(route_name, model)
        expected = (
            typical
            if typical is not None
            else (route.expected_completion_tokens if route is not None else 0)
        )
        return expected if limit is None else min(expected, limit)

    def _policy(self, stream: bool) -> Callable[[Attempt], str]:
        def policy(attempt: Attempt) -> str:
            return self._billing.get((attempt.upstream, stream), "full")

        return policy

    def _bill(self, record: RequestRecord, route: RouteOptions | None) -> None:
        """Bill every attempt (proxy/bills.py); the request's usage is the sum of the bills."""
        model, route_name = record.model, record.route or ""
        bill_attempts(
            record,
            policy=self._policy(record.stream),
            price=lambda a, usage: self.prices.cost(a.model or model, usage).used_usd,
            output_price=lambda a: self._output_price(a.model or model),
            expected_tokens=lambda: self._expected(route_name, model, route, record.max_tokens),
        )
        record.usage = sum_usage([a.bill.usage for a in record.attempts if a.bill is not None])

    def _bill_single(self, record: RequestRecord, attempt: Attempt) -> None:
        """`_bill` of a record whose one attempt was delivered, without the general machinery:
        its output reached the client, so it is no waste and saved nothing by being closed,
        and the sum of one bill is its usage with the estimate flags as `sum_usage` sets them.
        tests/test_accounting_single.py checks the two agree."""
        usage = attempt_usage(record, 0)
        bill = AttemptBill(
            usage=usage, billing=self._billing.get((attempt.upstream, record.stream), "full")
        )
        if usage.prompt_tokens + usage.completion_tokens > 0:  # `total_tokens`, no property
            bill.used_usd = self.prices.used_usd(attempt.model or record.model, usage)
        attempt.bill = bill
        record.waste = {}
        prompt_estimated = usage.prompt_estimated and usage.prompt_tokens > 0
        record.usage = Usage(  # positional: the fields in their order (proxy/outcome.py)
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            prompt_estimated,
            usage.completion_estimated,
            not prompt_estimated and usage.prompt_tokenized,
        )

    def _output_price(self, model: str | None) -> float | None:
        price = self.prices.price(model)
        return None if price is None else price.output_per_mtok / _PER_MTOK
