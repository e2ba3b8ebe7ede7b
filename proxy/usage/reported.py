"""Usage objects as upstreams report them: chat/completions and Responses shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from proxy.usage.facts import as_int

# An upstream's counts are untrusted input: a negative count or one like 10**4000 (which
# overflowed float conversion in accounting and metrics) is no count at all.
MAX_REPORTED_TOKENS = 10**9


def _count(value: object) -> int | None:
    n = as_int(value)
    return n if n is not None and 0 <= n <= MAX_REPORTED_TOKENS else None


class Reported(NamedTuple):
    prompt: int | None
    completion: int | None
    cached: int | None
    reasoning: int | None


def _detail(usage: Mapping[str, Any], keys: tuple[str, str], field: str) -> int | None:
    for key in keys:
        details = usage.get(key)
        if type(details) is dict or isinstance(details, Mapping):
            value = _count(details.get(field))
            if value is not None:
                return value
    return None


def parse_usage(usage: object) -> Reported | None:
    """Chat/completions (`prompt_tokens`...) and Responses (`input_tokens`...) usage objects."""
    # A parsed answer's objects are dicts: the exact type test skips the ABC's check.
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
