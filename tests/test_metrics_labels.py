"""`BoundedLabel` (its `known` set, read by the facade without a call) and `status_class` (a
table) against frozen copies of the previous code: the same labels for any sequence of
`label` and `admit` calls, and for every status."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.metrics.labels import (
    NONE,
    OTHER,
    BoundedLabel,
    model_shaped,
    status_class,
)


class _Reference:
    """A preset of trusted values plus at most `capacity` admitted ones; the rest is "other".

    `label()` only looks up; `admit()` may grow the set. Keeping them apart lets the caller decide
    when a value has earned a slot (for models: only once the upstream accepted the request, so a
    client cannot fill the slots with made-up names that the upstream rejects).
    """

    def __init__(self, preset: Iterable[str], capacity: int, shaped: Callable[[str], bool]) -> None:
        self._preset = frozenset(preset)
        self._seen: set[str] = set()
        self._capacity = capacity
        self._shaped = shaped

    def label(self, value: str | None) -> str:
        if value is None:
            return NONE
        if value in self._preset or value in self._seen:
            return value
        return OTHER

    def admit(self, value: str | None) -> str:
        """The label for `value`, taking a free slot for it if it is well shaped."""
        if value is None:
            return NONE
        if value in self._preset or value in self._seen:
            return value
        if len(self._seen) < self._capacity and self._shaped(value):
            self._seen.add(value)
            return value
        return OTHER

    @property
    def size_bound(self) -> int:
        """How many distinct values `label()` can ever return (preset, admitted, other, none)."""
        return len(self._preset) + self._capacity + 2


def _reference_status_class(status: int | None) -> str:
    """`status_class` before it was a table."""
    if status is None or not 200 <= status <= 599:
        return NONE
    return ("2xx", "3xx", "4xx", "5xx")[status // 100 - 2]


_values = st.none() | st.sampled_from(["gpt-4o", "m1", "m2", "m3", "sk-abcdefabcdefabcdef", ""])


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(["gpt-4o", "m1"]), max_size=2),
    st.integers(0, 3),
    st.lists(st.tuples(st.booleans(), _values), max_size=30),
)
def test_labels_are_the_general_ways(
    preset: list[str], capacity: int, calls: list[tuple[bool, str | None]]
) -> None:
    mine, theirs = (
        BoundedLabel(preset, capacity, model_shaped),
        _Reference(preset, capacity, model_shaped),
    )
    for admit, value in calls:
        if admit:
            assert mine.admit(value) == theirs.admit(value)
        else:
            assert mine.label(value) == theirs.label(value)
        # What the facade reads instead of asking: a known value is its own label both ways.
        for each in ("gpt-4o", "m1", "m2", "m3"):
            assert (each in mine.known) == (theirs.label(each) == each)
    assert mine.size_bound == theirs.size_bound


@given(st.none() | st.integers(-1000, 1000) | st.sampled_from([199, 200, 599, 600]))
def test_status_class_is_the_general_way(status: int | None) -> None:
    assert status_class(status) == _reference_status_class(status)
