"""Metric values written without a lock: every write comes from the event loop.

prometheus_client keeps each value of a single-process registry in a `MutexValue`, a float
behind a `threading.Lock`, because any thread may write it; every `inc` takes and releases the
lock, and a counter's `inc` and a histogram's `observe` check their arguments in Python first.
A finished request makes about a dozen such writes (`Metrics.request_finished`, the in-flight
and connection gauges). In hangup one thread writes them, the event loop's (the facade is
called from the relay only), and one other thread reads them, the scrape's
(`Metrics.render` runs in a worker thread). With one writer no increment can be lost, and a
reader sees each float either before or after a write (a float attribute is read and stored
whole under the GIL); a scrape never saw two values of a series at once, since each value had
its own lock. So the series the facade writes on the request path get a `LoopValue` instead.

Multiprocess storage (`PROMETHEUS_MULTIPROC_DIR`) keeps its own values (an mmap'd file each,
written under prometheus_client's lock): `Count` and `Buckets` write those as they are.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.values import MutexValue


class Value(Protocol):
    """What prometheus_client calls on a value (`values.MutexValue`, `MmapedValue`)."""

    def inc(self, amount: float) -> None: ...

    def get(self) -> float: ...


class LoopValue:
    """`MutexValue` without its lock, for a value only the event loop writes."""

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, value: float = 0.0, exemplar: Any = None) -> None:
        self._value = value
        self._exemplar = exemplar

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def _unlocked(value: Any) -> Any:
    """A `LoopValue` holding `value`'s figure if it is a `MutexValue`; else `value` itself
    (multiprocess storage, or anything this module does not know)."""
    if type(value) is not MutexValue:
        return value
    # prometheus_client leaves its value classes unannotated.
    return LoopValue(value.get(), value.get_exemplar())  # type: ignore[no-untyped-call]


def count_of(child: Counter | Gauge) -> Value:
    """The value behind a labelled counter or gauge child (an unlabelled gauge is its own
    child), made lock-free in single-process storage. `inc` on it is the child's own `inc`
    for the amounts the facade adds (positive, no exemplar): the child's argument checks are
    the facade's."""
    value: Value = _unlocked(child._value)
    child._value = value
    return value


class Buckets:
    """A histogram child's `observe`, on its values (made lock-free in single-process
    storage): the same sum and the same bucket (the first whose bound is >= the amount; none
    for NaN, as prometheus_client's own loop finds none)."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        child._sum = self._sum = _unlocked(child._sum)
        child._buckets = self._buckets = [_unlocked(b) for b in child._buckets]
        self._bounds: list[float] = list(child._upper_bounds)

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        bounds = self._bounds
        i = bisect_left(bounds, amount)
        if i < len(bounds) and amount <= bounds[i]:
            self._buckets[i].inc(1)


class LoopBuckets(Buckets):
    """`Buckets` whose values are all `LoopValue`s (single-process storage): `observe` adds
    to their floats in place, without a call to each value's `inc` (two calls less an
    observation, three observations a streamed request)."""

    __slots__ = ()

    def observe(self, amount: float) -> None:
        self._sum._value += amount  # a LoopValue (buckets_of)
        bounds = self._bounds
        i = bisect_left(bounds, amount)
        if i < len(bounds) and amount <= bounds[i]:
            self._buckets[i]._value += 1.0


def buckets_of(child: Histogram) -> Buckets:
    """A histogram child's `Buckets`; a `LoopBuckets` when all its values are lock-free."""
    buckets = Buckets(child)
    if type(buckets._sum) is LoopValue and all(type(b) is LoopValue for b in buckets._buckets):
        buckets.__class__ = LoopBuckets
    return buckets
