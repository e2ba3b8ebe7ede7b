"""The fast path of stream classification: ordinary content chunks without a full JSON parse.

Almost every event of a chat stream is a role or content chunk: one choice, a delta with some
text, no finish reason, no usage, no error. `content_sizes` reads just those fields with a typed
msgspec decoder (~1 µs an event, against ~5-9 µs for `json.loads` building every dict and
string of the chunk) and answers what `StreamUsageTracker._chunk` would conclude from the full
parse: the (choice index, output chars, reasoning chars) of each choice that carried output.

It answers None whenever the event may mean more, and the caller then parses it in full: an
event with usage, an error, a `type` (Responses), tool or function calls, a finish reason, or
any field of an unexpected type (the typed decoder refuses it), or data that is not strict JSON.
So the fast path never has to be right about anything but plain text deltas;
tests/test_usage_fast.py checks that it agrees with the full parse on every event of the
recorded fixtures and on generated ones.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["content_sizes"]

_ABSENT: Final = msgspec.Raw(b"")  # a field the event did not have


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: msgspec.Raw = _ABSENT
    function_call: msgspec.Raw = _ABSENT


class _Choice(msgspec.Struct):
    index: int | None = None
    delta: _Delta | None = None
    text: str | None = None  # legacy completions
    finish_reason: msgspec.Raw = _ABSENT


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: msgspec.Raw = _ABSENT
    error: msgspec.Raw = _ABSENT
    type: msgspec.Raw = _ABSENT


_decode: Final = msgspec.json.Decoder(_Chunk).decode
_NULL: Final = b"null"

Sizes = list[tuple[int, int, int]]


def _absent_or_null(raw: msgspec.Raw) -> bool:
    return raw is _ABSENT or bytes(raw) == _NULL


def content_sizes(data: str) -> Sizes | None:
    """(index, chars, reasoning chars) per choice that carried output (empty: none did), or
    None when the event needs the full parse."""
    try:
        chunk = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not strict JSON, or a field of another type: the full parse decides
    if not (_absent_or_null(chunk.usage) and _absent_or_null(chunk.error)):
        return None
    if chunk.type is not _ABSENT:
        return None
    sizes: Sizes = []
    choices = chunk.choices
    if not choices:
        return sizes
    for choice in choices:
        if not _absent_or_null(choice.finish_reason):
            return None
        delta = choice.delta
        chars = reasoning = 0
        found = False
        if delta is not None:
            if delta.tool_calls is not _ABSENT or delta.function_call is not _ABSENT:
                return None
            for text in (delta.content, delta.refusal):
                if text:
                    chars += len(text)
                    found = True
            for text in (delta.reasoning_content, delta.reasoning):
                if text:
                    reasoning += len(text)
                    found = True
        elif choice.text:
            chars, found = len(choice.text), True
        if found:
            sizes.append((choice.index or 0, chars, reasoning))
    return sizes
