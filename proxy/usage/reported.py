"""Usage objects as upstreams report them: chat/completions and Responses shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, NamedTuple, cast

import msgspec

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


# `Reported(a, b, c, d)` runs the NamedTuple's generated Python `__new__`, which calls
# `tuple.__new__(Reported, (a, b, c, d))`: called here directly, the same tuple of the same
# type for a third of the cost (~0.15 us less; once a request).
_reported: Final = cast(
    "Callable[[type[Reported], tuple[int | None, int | None, int | None, int | None]], Reported]",
    tuple.__new__,
)


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
    if type(usage) is not dict:
        return _parse_usage(usage) if isinstance(usage, Mapping) else None
    # The usual chat usage (a stream's last chunk): both counts plain ints in range, each
    # details object a dict with its count. Read here without the dozen calls of `_count`,
    # `as_int` and `_detail`; anything else (a missing or odd count, Responses' names) takes
    # the general way. tests/test_usage_parse.py checks the two agree.
    get = usage.get
    prompt = get("prompt_tokens")
    completion = get("completion_tokens")
    if not (
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= MAX_REPORTED_TOKENS
        and 0 <= completion <= MAX_REPORTED_TOKENS
    ):
        return _parse_usage(usage)
    # Details absent under both names (a stream's usage chunk from many servers): no count,
    # as `_detail` finds, without its walk (`isinstance(None, Mapping)` is an ABC's check,
    # ~0.5k instructions, for each name of each count).
    details = get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    if not (type(cached) is int and 0 <= cached <= MAX_REPORTED_TOKENS):
        cached = (
            None
            if details is None and get("input_tokens_details") is None
            else _detail(usage, _PROMPT_DETAILS, "cached_tokens")
        )
    details = get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if type(details) is dict else None
    if not (type(reasoning) is int and 0 <= reasoning <= MAX_REPORTED_TOKENS):
        reasoning = (
            None
            if details is None and get("output_tokens_details") is None
            else _detail(usage, _COMPLETION_DETAILS, "reasoning_tokens")
        )
    return _reported(Reported, (prompt, completion, cached, reasoning))


_PROMPT_DETAILS: Final = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS: Final = ("completion_tokens_details", "output_tokens_details")


def _parse_usage(usage: Mapping[str, Any]) -> Reported | None:
    """`parse_usage`'s general way, for any mapping."""
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        completion = _count(usage.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    return _reported(
        Reported,
        (
            prompt,
            completion,
            _detail(usage, _PROMPT_DETAILS, "cached_tokens"),
            _detail(usage, _COMPLETION_DETAILS, "reasoning_tokens"),
        ),
    )


# --- the same reading from the object's bytes, without building its dicts ---------------------
# A typed msgspec decode of just the fields `parse_usage` reads, in place: 2.0 us for the
# bench's chat answer against 2.8 us for `json` building the object from a decoded copy and
# `parse_usage` walking it (timeit). Only plain counts in range take this way: a
# count of another type (a float, a bool, a string), details that are not an object, or bytes
# that are not strict JSON make the typed decoder refuse, and the caller reads the object with
# `json` and `parse_usage` instead. What msgspec accepts, `json` reads the same (ints of any
# size, the last of duplicate keys); tests/test_usage_typed.py checks the two agree.


# Counts out of range (negative, past MAX_REPORTED_TOKENS) make the typed decoder refuse, like
# a count of another type: the general way reads them (it treats them as no count).
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPORTED_TOKENS)]


class _Details(msgspec.Struct, gc=False):
    cached_tokens: _Count | None = None
    reasoning_tokens: _Count | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: _Count | None = None
    input_tokens: _Count | None = None
    completion_tokens: _Count | None = None
    output_tokens: _Count | None = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


_decode_usage: Final = msgspec.json.Decoder(_Usage).decode
# The typed usage object, for a decoder of a whole chunk (proxy/usage/fast.py `read_chunk`),
# and `parse_usage` of one (`read_usage`).
UsageFields = _Usage


class _Tail(msgspec.Struct, gc=False):
    """An object's members from its `usage` on (`read_last_member`); the rest are skipped."""

    usage: _Usage | None = None


_decode_tail: Final = msgspec.json.Decoder(_Tail).decode
_READ_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def read_last_member(body: bytes | bytearray, at: int) -> _Usage | None:
    """The usage object whose member name `"usage"` opens at `body[at]`, read without looking
    for the object's end, when it is a member of the object that ends the body (the usual
    answer: `...,"usage":{...},"system_fingerprint":"..."}`): then `{` and the body from `at`
    on are one JSON object, decoded in one step (the members after `usage` skipped). None when
    they are not (nested usage, bytes after the object, not strict JSON, a count the typed
    decoder refuses): the caller reads it the general way. The object read is the one
    `read_usage_at(body, at + 8)` reads, by the same typed decoder."""
    try:
        return _decode_tail(b"{" + body[at:]).usage
    except _READ_ERRORS:
        return None


# An object nested deeper than this in a usage object is read by the general way.
_MAX_NESTED: Final = 16
UNREAD: Final = Reported(None, None, None, None)  # `read_usage_at` could not decide


def read_usage_at(body: bytes | bytearray, start: int) -> Reported | None:
    """`parse_usage` of the JSON object that opens at `body[start]` (a `{`), read in place; or
    `UNREAD` (compare with `is`) when this way cannot read it and `json` must.

    The object's end is guessed as the first `}` after which braces balance; the guess needs no
    care about strings, because only a decode of exactly one object from `start` to it is
    accepted, and an object can close at one place only."""
    # The usual usage object (OpenAI's compact one, llama.cpp's) ends with a details object:
    # `...,"completion_tokens_details":{...}}`. Its first `}}` is then the end, guessed in one
    # look instead of the walk below (3 finds and 3 counts); the guess is taken only when the
    # object has a `{` inside, and only a decode of exactly one object accepts it.
    end = body.find(b"}}", start)
    if end > 0 and body.find(b"{", start + 1, end) > 0:
        try:
            usage = _decode_usage(body[start : end + 2])
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # another shape: the walk below decides
        else:
            return _read(usage)
    end = body.find(b"}", start)
    if end < 0:
        return UNREAD
    opened, closed = body.count(b"{", start, end), 0
    while opened != closed + 1:
        closed += 1
        if closed > _MAX_NESTED:
            return UNREAD
        after = body.find(b"}", end + 1)
        if after < 0:
            return UNREAD
        opened += body.count(b"{", end, after)
        end = after
    try:
        # A copy of the object's bytes (a few hundred): msgspec reads a bytes-like slice
        # ~0.1 us sooner than a memoryview of it.
        usage = _decode_usage(body[start : end + 1])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return UNREAD
    return _read(usage)


def _read(usage: _Usage) -> Reported | None:
    """`parse_usage` of a decoded usage object (what `parse_usage` says of the object the
    typed decoder accepted: tests/test_usage_typed.py)."""
    # Every count is in range (`_Count`): the first of each pair that is there wins.
    prompt = usage.prompt_tokens
    if prompt is None:
        prompt = usage.input_tokens
    completion = usage.completion_tokens
    if completion is None:
        completion = usage.output_tokens
    if prompt is None and completion is None:
        return None
    cached, reasoning = detail_counts(usage)
    return _reported(Reported, (prompt, completion, cached, reasoning))


read_usage: Final = _read


def detail_counts(usage: _Usage) -> tuple[int | None, int | None]:
    """The cached prompt and reasoning counts of a decoded usage object: chat's names first,
    then the Responses API's (`_read`'s and proxy/usage/body.py's usual answer's)."""
    details = usage.prompt_tokens_details
    cached = None if details is None else details.cached_tokens
    if cached is None and (details := usage.input_tokens_details) is not None:
        cached = details.cached_tokens
    details = usage.completion_tokens_details
    reasoning = None if details is None else details.reasoning_tokens
    if reasoning is None and (details := usage.output_tokens_details) is not None:
        reasoning = details.reasoning_tokens
    return cached, reasoning
