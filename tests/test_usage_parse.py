"""`parse_usage` (proxy/usage/reported.py) against a frozen copy of its general way
(`_reference`: the function before the usual chat usage was read inline): the same `Reported`
(or None) for any usage object, with counts of every type and range, details that are dicts,
other mappings or anything else, and Responses' names beside chat's. A separate test shows the
inline way really takes the usual usage, so the agreement is not vacuous."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.usage import reported
from proxy.usage.facts import as_int
from proxy.usage.reported import MAX_REPORTED_TOKENS, Reported, parse_usage


def _count(value: object) -> int | None:
    n = as_int(value)
    return n if n is not None and 0 <= n <= MAX_REPORTED_TOKENS else None


def _detail(usage: Mapping[str, Any], keys: tuple[str, str], field: str) -> int | None:
    for key in keys:
        details = usage.get(key)
        if type(details) is dict or isinstance(details, Mapping):
            value = _count(details.get(field))
            if value is not None:
                return value
    return None


def _reference(usage: object) -> Reported | None:
    """`parse_usage` as it was before its inline way (round 8)."""
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        completion = _count(usage.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    return Reported(
        prompt,
        completion,
        _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens"),
        _detail(usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens"),
    )


class _IntLike(int):
    """An int subclass (not bool): `as_int` takes it, the exact type test does not."""


_plain = st.integers(0, 50)
_counts = st.one_of(
    _plain,
    _plain,
    _plain,
    _plain,
    st.integers(-3, -1),
    st.integers(MAX_REPORTED_TOKENS - 1, MAX_REPORTED_TOKENS + 2),
    st.integers(2**63 - 2, 2**70),
    st.booleans(),
    st.floats(allow_nan=False),
    st.just("12"),
    st.builds(_IntLike, st.integers(0, 9)),
)


_details_dict = st.fixed_dictionaries(
    {}, optional={"cached_tokens": _counts, "reasoning_tokens": _counts, "audio_tokens": _counts}
)
_details = st.one_of(
    _details_dict,
    _details_dict,
    _details_dict.map(MappingProxyType),  # a mapping that is not a dict
    st.none(),
    st.just([1]),
    st.just(7),
)
_usage_dict = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": _counts,
        "input_tokens": _counts,
        "completion_tokens": _counts,
        "output_tokens": _counts,
        "total_tokens": _counts,
        "prompt_tokens_details": _details,
        "input_tokens_details": _details,
        "completion_tokens_details": _details,
        "output_tokens_details": _details,
    },
)
# Both counts plain (the inline way's first test passes); the rest varied as above.
_near_usual = st.fixed_dictionaries(
    {"prompt_tokens": _plain, "completion_tokens": _plain},
    optional={
        "input_tokens": _counts,
        "output_tokens": _counts,
        "prompt_tokens_details": _details,
        "input_tokens_details": _details,
        "completion_tokens_details": _details,
        "output_tokens_details": _details,
    },
)
_usage = st.one_of(
    _usage_dict,
    _near_usual,
    _near_usual,
    _usage_dict.map(MappingProxyType),
    st.none(),
    st.just([]),
    st.just("usage"),
    st.integers(),
)


@settings(max_examples=3000, deadline=None)
@given(_usage)
def test_parse_usage_is_its_general_way(usage: Any) -> None:
    assert parse_usage(usage) == _reference(usage)


def test_the_usual_usage_takes_the_inline_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: a chat usage with both details reads without the general way or `_detail`
    (both made to fail here), and a Responses usage still takes the general way."""

    def refused(*args: object) -> None:
        raise AssertionError("the general way was taken")

    usual = {
        "prompt_tokens": 14,
        "completion_tokens": 16,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
    }
    expected = _reference(usual)
    monkeypatch.setattr(reported, "_parse_usage", refused)
    monkeypatch.setattr(reported, "_detail", refused)
    assert parse_usage(usual) == expected == Reported(14, 16, 3, 2)
    # A stream's usage chunk without details (many servers send none): no `_detail` either.
    bare = {"prompt_tokens": 14, "completion_tokens": 16, "total_tokens": 30}
    assert parse_usage(bare) == _reference(bare) == Reported(14, 16, None, None)
    with pytest.raises(AssertionError, match="general way"):
        parse_usage({"input_tokens": 5, "output_tokens": 7})
