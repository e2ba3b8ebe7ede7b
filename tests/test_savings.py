from __future__ import annotations

from collections import OrderedDict, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.outcome import Savings
from proxy.savings import TypicalLengths, estimate_savings


def test_typical_needs_min_samples() -> None:
    lengths = TypicalLengths(window=10, min_samples=3)
    lengths.observe("chat", "m", 50)
    lengths.observe("chat", "m", 10)
    assert lengths.typical("chat", "m") is None
    lengths.observe("chat", "m", 30)
    assert lengths.typical("chat", "m") == 30  # sorted 10, 30, 50
    lengths.observe("chat", "m", 40)
    assert lengths.typical("chat", "m") == 30  # sorted 10, 30, 40, 50: the lower middle one
    assert lengths.typical("chat", "other-model") is None
    assert lengths.typical("other-route", "m") is None


def test_typical_ignores_outliers_a_mean_would_follow() -> None:
    lengths = TypicalLengths(window=20, min_samples=20)
    for _ in range(18):
        lengths.observe("r", None, 100)
    lengths.observe("r", None, 4096)  # two answers that ran to a large max_tokens
    lengths.observe("r", None, 4096)
    # the mean would be (18 * 100 + 2 * 4096) / 20 = 499.6
    assert lengths.typical("r", None) == 100


def test_window_slides() -> None:
    lengths = TypicalLengths(window=3, min_samples=3)
    for n in (10, 10, 10, 500, 600):
        lengths.observe("r", "m", n)
    assert lengths.typical("r", "m") == 500  # the window holds 10, 500, 600


def test_keys_are_bounded_least_recently_used_first() -> None:
    lengths = TypicalLengths(window=5, min_samples=1, max_keys=2)
    lengths.observe("r", "a", 1)
    lengths.observe("r", "b", 2)
    assert lengths.typical("r", "a") == 1  # touching "a" makes "b" the oldest
    lengths.observe("r", "c", 3)
    assert len(lengths) == 2
    assert (lengths.typical("r", "a"), lengths.typical("r", "b")) == (1, None)
    assert lengths.typical("r", "c") == 3


def test_negative_lengths_are_ignored_and_bad_settings_refused() -> None:
    lengths = TypicalLengths(window=5, min_samples=1)
    lengths.observe("r", "m", -1)
    assert lengths.typical("r", "m") is None
    with pytest.raises(ValueError, match="min_samples"):
        TypicalLengths(window=5, min_samples=6)


def test_worked_example_of_the_docs() -> None:
    # docs/accounting.md: typical 300, max_tokens 500, 120 tokens delivered when the client left
    # and 3 more before the upstream connection closed.
    assert estimate_savings(
        generated=123, wasted=3, max_tokens=500, typical=300, route_default=256, drained=False
    ) == Savings(
        tokens_saved=177,  # 300 - 123
        tokens_saved_upper=377,  # 500 - 123
        tokens_wasted=3,
        expected_tokens=300,
        basis="history",
    )
    # with a typical length above the request's own limit, the limit is what is expected
    clipped = estimate_savings(
        generated=123, wasted=3, max_tokens=500, typical=600, route_default=256, drained=False
    )
    assert (clipped.expected_tokens, clipped.tokens_saved) == (500, 377)


def test_savings_from_route_default_without_limit() -> None:
    assert estimate_savings(
        generated=56, wasted=0, max_tokens=None, typical=None, route_default=256, drained=False
    ) == Savings(
        tokens_saved=200,
        tokens_saved_upper=None,
        tokens_wasted=0,
        expected_tokens=256,
        basis="route_default",
    )


def test_longer_than_expected_saves_nothing() -> None:
    savings = estimate_savings(
        generated=900, wasted=1, max_tokens=1000, typical=300, route_default=256, drained=False
    )
    assert (savings.tokens_saved, savings.tokens_saved_upper) == (0, 100)


def test_drained_saves_nothing_and_wastes_what_came_after() -> None:
    savings = estimate_savings(
        generated=400, wasted=280, max_tokens=None, typical=300, route_default=256, drained=True
    )
    assert (savings.tokens_saved, savings.tokens_wasted, savings.expected_tokens) == (0, 280, 300)


@settings(max_examples=200, deadline=None)
@given(
    generated=st.integers(min_value=-5, max_value=10_000),
    wasted=st.integers(min_value=-5, max_value=100),
    max_tokens=st.none() | st.integers(min_value=1, max_value=10_000),
    typical=st.none() | st.integers(min_value=0, max_value=10_000),
    route_default=st.integers(min_value=1, max_value=10_000),
    drained=st.booleans(),
)
def test_savings_bounds(
    generated: int,
    wasted: int,
    max_tokens: int | None,
    typical: int | None,
    route_default: int,
    drained: bool,
) -> None:
    s = estimate_savings(
        generated=generated,
        wasted=wasted,
        max_tokens=max_tokens,
        typical=typical,
        route_default=route_default,
        drained=drained,
    )
    assert 0 <= s.tokens_saved <= s.expected_tokens
    assert s.tokens_wasted >= 0
    if max_tokens is not None:
        assert s.expected_tokens <= max_tokens
        assert s.tokens_saved_upper is not None and s.tokens_saved <= s.tokens_saved_upper
    if drained:
        assert s.tokens_saved == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 9)),
        max_size=60,
    ),
    st.integers(1, 3),
)
def test_keys_kept_as_a_plain_least_recently_used_order_keeps_them(
    ops: list[tuple[bool, str, int]], max_keys: int
) -> None:
    """`observe` skips `move_to_end` for the key already last (the usual request's): the
    keys kept, and their figures, are those of an order where every use moves its key."""
    lengths = TypicalLengths(window=3, min_samples=1, max_keys=max_keys)
    model: OrderedDict[tuple[str, str | None], deque[int]] = OrderedDict()
    for observe, name, n in ops:
        key = ("r", name)
        if observe:
            lengths.observe("r", name, n)
            if key in model:
                model.move_to_end(key)
            else:
                model[key] = deque(maxlen=3)
                if len(model) > max_keys:
                    model.popitem(last=False)
            model[key].append(n)
        else:
            got = lengths.typical("r", name)
            want = None
            if key in model:
                model.move_to_end(key)
                want = sorted(model[key])[(len(model[key]) - 1) // 2]
            assert got == want
    assert list(lengths._lengths.items()) == list(model.items())
