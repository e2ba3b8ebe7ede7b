"""Tokens saved by hanging up: an estimate of what the upstream would still have generated.

Nobody can know how long an answer that was cut would have become. We estimate it from what
answers to the same route and model usually come to (`TypicalLengths`), fall back to the route's
configured `expected_completion_tokens`, and never claim more than the request's `max_tokens`
allowed. docs/accounting.md walks through the estimator, a worked example and its known errors.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from proxy.outcome import Savings

__all__ = ["TypicalLengths", "estimate_savings"]


class TypicalLengths:
    """Per (route, model): the median completion length of the last `window` completed requests.

    The median, not the mean or an EWMA: completion lengths are skewed (most answers short, a few
    hitting max_tokens), and a handful of very long answers would drag a mean or EWMA up and make
    every cancellation look like a large saving. The median of a sliding window ignores them, and
    the window lets it follow a changed workload within `window` requests. It is the "low" median
    (an element of the window, never an average of two), so it is always a real observed length.

    Memory is bounded: `window` ints per key and at most `max_keys` keys, the least recently used
    evicted first (model names come from clients, so the key set must not grow without limit).
    """

    __slots__ = ("_last", "_lengths", "max_keys", "min_samples", "window")

    def __init__(self, window: int = 200, min_samples: int = 20, max_keys: int = 1000) -> None:
        if not 1 <= min_samples <= window or max_keys < 1:
            raise ValueError("need 1 <= min_samples <= window and max_keys >= 1")
        self.window, self.min_samples, self.max_keys = window, min_samples, max_keys
        self._lengths: OrderedDict[tuple[str, str | None], deque[int]] = OrderedDict()
        # The last key of `_lengths` while it is there: the usual request's key, which needs
        # no `move_to_end` (an OrderedDict's, ~0.6k instructions) when it is already last.
        self._last: tuple[str, str | None] | None = None

    def observe(self, route: str, model: str | None, completion_tokens: int) -> None:
        """Learn from a request that completed (never from cancelled ones: they are the cut
        lengths we are trying to extend, and would bias the figure down)."""
        if completion_tokens < 0:
            return
        key = (route, model)
        lengths = self._lengths.get(key)
        if lengths is None:
            lengths = self._lengths[key] = deque(maxlen=self.window)
            self._last = key
            if len(self._lengths) > self.max_keys:
                self._lengths.popitem(last=False)
        elif key != self._last:
            self._lengths.move_to_end(key)
            self._last = key
        lengths.append(completion_tokens)

    def typical(self, route: str, model: str | None) -> int | None:
        """The typical completion length, or None until `min_samples` completions were seen."""
        lengths = self._lengths.get((route, model))
        if lengths is None or len(lengths) < self.min_samples:
            return None
        key = self._last = (route, model)
        self._lengths.move_to_end(key)
        return sorted(lengths)[(len(lengths) - 1) // 2]

    def __len__(self) -> int:
        return len(self._lengths)


def estimate_savings(
    *,
    generated: int,
    wasted: int,
    max_tokens: int | None,
    typical: int | None,
    route_default: int,
    drained: bool,
    billing: str = "stops",
) -> Savings:
    """What hanging up avoided, for a request whose client left (or that timed out).

    generated: completion tokens the upstream produced in all (delivered plus `wasted`).
    wasted: tokens that arrived after the client had left (the cancel latency, or the drain).
    expected = `typical` if known, else `route_default`, clipped to `max_tokens`;
    saved = max(0, expected - generated); the upper bound is max(0, max_tokens - generated).
    When the proxy drained the answer after the client left nothing was saved: the upstream was
    allowed to finish, and everything it produced after the client left is `wasted`, exactly.
    Nor when the upstream bills the full answer of a cancelled request (`billing` "full"): it
    generates the rest anyway. `billing` is kept on the result: dollars follow tokens saved only
    where it is "stops" (see proxy/billing.py).
    """
    generated, wasted = max(0, generated), max(0, wasted)
    expected, basis = (
        (typical, "history") if typical is not None else (route_default, "route_default")
    )
    if max_tokens is not None:
        expected = min(expected, max_tokens)
    nothing_saved = drained or billing == "full"
    upper = None if max_tokens is None else max(0, max_tokens - generated)
    if nothing_saved and upper is not None:
        upper = 0
    saved = 0 if nothing_saved else max(0, expected - generated)
    return Savings(
        tokens_saved=saved,
        tokens_saved_upper=upper,
        tokens_wasted=wasted,
        expected_tokens=expected,
        basis=basis,
        billing=billing,
    )
