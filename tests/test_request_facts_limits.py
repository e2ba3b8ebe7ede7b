"""`inspect_request` reads `max_*_tokens` and `n` with `as_int` inlined: the same facts as
`as_int` gives, for every kind of value a JSON body can hold in those members."""

from __future__ import annotations

import itertools
from typing import Any

from proxy.usage.facts import as_int, inspect_request

LIMIT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
VALUES: tuple[Any, ...] = (None, True, False, 0, -3, 1, 7, 2**70, 7.0, "7", [7], {"n": 7})
ABSENT = object()


def _expected_limit(body: dict[str, Any]) -> int | None:
    """The general path: the first key whose value `as_int` takes for a positive int."""
    for key in LIMIT_KEYS:
        limit = as_int(body.get(key))
        if limit is not None and limit > 0:
            return limit
    return None


def test_limits_and_n_are_as_as_int_reads_them() -> None:
    checked = 0
    for values in itertools.product((ABSENT, *VALUES), repeat=len(LIMIT_KEYS)):
        body: dict[str, Any] = {"model": "m", "messages": []}
        body.update({k: v for k, v in zip(LIMIT_KEYS, values, strict=True) if v is not ABSENT})
        facts = inspect_request("/v1/chat/completions", body)
        assert facts.max_tokens == _expected_limit(body), body
        assert type(facts.max_tokens) is not bool
        checked += 1
    for value in (ABSENT, *VALUES):
        body = {"model": "m", "messages": []} if value is ABSENT else {"n": value}
        n = as_int(body.get("n"))
        facts = inspect_request("/v1/chat/completions", body)
        assert facts.n == (n if n is not None and n >= 1 else 1), body
        assert type(facts.n) is int  # (True == 1: the type tells them apart)
    assert checked == (len(VALUES) + 1) ** len(LIMIT_KEYS)
