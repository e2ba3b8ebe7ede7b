"""A few lines for humans (`hangup demo`), computed from the same text a scrape returns.

Working from the rendered text rather than from metric objects means the summary is right in
multiprocess mode too, where only the rendered sum knows all workers' numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

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


def summarize_text(text: str) -> str:
    """Requests by outcome, tokens used and saved, money, and cancel propagation p50/p99."""
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
    p50 = bucket_quantile(0.5, propagation)
    p99 = bucket_quantile(0.99, propagation)
    if p50 is None or p99 is None:
        lines.append("cancel -> close no client went away mid-request")
    else:
        cancels = total[f"{schema.CANCEL_PROPAGATION.name}_count"]
        lines.append(
            f"cancel -> close p50 ~{p50 * 1000:.2g} ms, p99 ~{p99 * 1000:.2g} ms over "
            f"{cancels:,.0f} disconnects (estimated from histogram buckets)"
        )
    return "\n".join(lines)


def summarize(metrics: Metrics) -> str:
    body, _ = metrics.render()
    return summarize_text(body.decode("utf-8"))
