"""A few lines for humans (`hangup demo`), computed from the same text a scrape returns.

Working from the rendered text rather than from metric objects means the summary is right in
multiprocess mode too, where only the rendered sum knows all workers' numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from proxy.config import PriceConfig

from . import schema

if TYPE_CHECKING:
    from .facade import Metrics

_PROPAGATION_BUCKET = f"{schema.CANCEL_PROPAGATION.name}_bucket"


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Estimate a quantile from cumulative bucket counts, as PromQL's histogram_quantile does:
    linear interpolation inside the bucket the rank falls in, 0 as the first bucket's lower
    bound, and the highest finite bound when the rank falls in +Inf. None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def bucket_bound(q: float, buckets: dict[float, float]) -> float | None:
    """The upper bound of the bucket the q-quantile falls in: what a histogram can honestly say
    (an interpolated value inside a bucket, or below its first bound, is not a measurement).
    inf when it falls in +Inf; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    for upper in bounds:
        if buckets[upper] >= rank:
            return upper
    return bounds[-1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2g} ms" if seconds < 0.1 else f"{seconds * 1000:,.0f} ms"


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank quantile of measured values (each reported value was measured)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarize_text(
    text: str,
    *,
    cancel_close_s: Sequence[float] | None = None,
    prices: Mapping[str, PriceConfig] | None = None,
) -> str:
    """Requests by outcome, tokens used and saved, money and the prices behind it, and how fast
    hang-ups reached the upstream: from `cancel_close_s` when the caller measured them (the
    demo does, at the upstream), else as histogram bucket bounds."""
    total: dict[str, float] = defaultdict(float)
    outcomes: dict[str, float] = defaultdict(float)
    tokens: dict[str, float] = defaultdict(float)
    propagation: dict[float, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == schema.REQUESTS.name:
                outcomes[sample.labels["outcome"]] += sample.value
            elif sample.name == schema.TOKENS.name:
                tokens[sample.labels["type"]] += sample.value
            elif sample.name == _PROPAGATION_BUCKET:
                propagation[float(sample.labels["le"])] += sample.value
            total[sample.name] += sample.value

    n = sum(outcomes.values())
    parts = ", ".join(f"{o} {outcomes[o]:,.0f}" for o in schema.OUTCOMES if outcomes[o])
    used = tokens["prompt"] + tokens["completion"]
    lines = [
        f"requests        {n:,.0f}" + (f": {parts}" if parts else ""),
        f"tokens used     {used:,.0f} (prompt {tokens['prompt']:,.0f}, "
        f"completion {tokens['completion']:,.0f}); "
        f"{total[schema.TOKENS_ESTIMATED.name]:,.0f} of them estimated",
        f"tokens saved    ~{total[schema.TOKENS_SAVED.name]:,.0f} "
        f"(upper bound {total[schema.TOKENS_SAVED_UPPER.name]:,.0f}); "
        f"{total[schema.TOKENS_WASTED.name]:,.0f} wasted after disconnect",
        f"cost            ${total[schema.COST.name]:,.4f} used, "
        f"~${total[schema.COST_SAVED.name]:,.4f} saved by hanging up, "
        f"${total[schema.COST_WASTED.name]:,.4f} wasted; "
        f"unpriced requests: {total[schema.UNPRICED.name]:,.0f}",
    ]
    for model, price in sorted((prices or {}).items()):
        cached = (
            ""
            if price.cached_input_per_mtok is None
            else f", cached input ${price.cached_input_per_mtok:,.2f}"
        )
        lines.append(
            f"price           {model}: input ${price.input_per_mtok:,.2f}{cached}, output "
            f"${price.output_per_mtok:,.2f} per million tokens"
        )
    if cancel_close_s:
        measured = sorted(cancel_close_s)
        lines.append(
            f"cancel -> close p50 {_ms(_quantile(measured, 0.5))}, max {_ms(measured[-1])} over "
            f"{len(measured)} hang-ups (measured at the upstream, as above)"
        )
        return "\n".join(lines)
    p50 = bucket_bound(0.5, propagation)
    p99 = bucket_bound(0.99, propagation)
    if p50 is None or p99 is None:
        lines.append("cancel -> close no client went away mid-request")
    else:
        cancels = total[f"{schema.CANCEL_PROPAGATION.name}_count"]
        worst = "over the largest bucket" if math.isinf(p99) else f"<= {_ms(p99)}"
        lines.append(
            f"cancel -> close p50 <= {_ms(p50)}, p99 {worst} over {cancels:,.0f} disconnects "
            f"(histogram bucket bounds)"
        )
    return "\n".join(lines)


def summarize(
    metrics: Metrics,
    *,
    cancel_close_s: Sequence[float] | None = None,
    prices: Mapping[str, PriceConfig] | None = None,
) -> str:
    body, _ = metrics.render()
    return summarize_text(body.decode("utf-8"), cancel_close_s=cancel_close_s, prices=prices)
