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

import json
import re
from typing import Any, Final

import msgspec

from proxy.usage.reported import UsageFields

__all__ = [
    "ChunkFields",
    "Shape",
    "choice_sizes",
    "content_sizes",
    "parse_json",
    "parse_object",
    "read_chunk",
    "shape_of",
]

# A field typed `None` may be absent or null; any other value fails the typed decode, and the
# event goes to the full parse: that is how usage, errors, Responses types and tool calls leave
# the fast path without being looked at here. `gc=False`: these hold no cycles, so they need
# not be tracked by the collector (cheaper to make and to free).


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: None = None
    function_call: None = None


class _Choice(msgspec.Struct, gc=False):
    index: int | None = None
    delta: _Delta | None = None
    text: str | None = None  # legacy completions
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: None = None
    error: None = None
    type: None = None


class ChunkFields(msgspec.Struct, gc=False):
    """A chat chunk's fields that `StreamUsageTracker._chunk` reads, typed: `_Chunk` with its
    usage object (typed as `parse_usage`'s typed reading has it) and its model. A stream's
    finish and usage chunks are read with it in one step (`read_chunk`), where a dict of
    every member was built and walked (`parse_object`, `_chunk`, `delta_chars`,
    `parse_usage`). What it refuses (an error, a Responses `type`, tool calls, a count out of
    range or of another type, a model that is not a string...) goes to that full parse."""

    choices: list[_Choice] | None = None
    usage: UsageFields | None = None
    model: str | None = None
    error: None = None
    type: None = None


_decode: Final = msgspec.json.Decoder(_Chunk).decode
_decode_fields: Final = msgspec.json.Decoder(ChunkFields).decode
_decode_any: Final = msgspec.json.Decoder().decode


def parse_json(data: str) -> Any:
    """`json.loads(data)`, through msgspec's decoder where that one accepts the text (~3x
    faster on a chunk). What it accepts it reads as `json.loads` does (last of duplicate keys,
    ints of any size, the same floats); what it refuses - NaN and Infinity, numbers beyond a
    float, lone surrogates, broken JSON - goes to `json.loads`, which decides (a value, or its
    ValueError). Nesting too deep raises RecursionError from either. tests/test_usage_fast.py
    compares a tracker using this with one using `json.loads` on generated events."""
    try:
        return _decode_any(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return json.loads(data)


def parse_object(data: bytes) -> dict[str, Any] | None:
    """`parse_json` of the text of `data` when msgspec's decoder reads the bytes (strict JSON
    in valid UTF-8: then the text is read alike) and they hold an object; None otherwise,
    whatever `parse_json` would say (the caller's general path then decides)."""
    try:
        obj = _decode_any(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return obj if type(obj) is dict else None


Sizes = list[tuple[int, int, int]]


def content_sizes(data: str | bytes) -> Sizes | None:
    """(index, chars, reasoning chars) per choice that carried output (empty: none did), or
    None when the event needs the full parse.

    `data` may be the event's raw bytes: msgspec refuses invalid UTF-8 in them (the full
    parse then reads the text as decoded with replacement characters), and what it accepts it
    reads exactly as the decoded text."""
    try:
        chunk = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not strict JSON, or a field of another type: the full parse decides
    return choice_sizes(chunk.choices)


def read_chunk(data: bytes) -> ChunkFields | None:
    """The chunk's typed fields (`ChunkFields`), or None when the typed decoder refuses it
    (not strict JSON in valid UTF-8, not an object, a field of another type)."""
    try:
        return _decode_fields(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def choice_sizes(choices: list[_Choice] | None) -> Sizes | None:
    """`content_sizes` of a chunk with these choices and no usage (a `ChunkFields`' whose
    `usage` is None: then the chunk is one `content_sizes` reads, and alike)."""
    sizes: Sizes = []
    if not choices:
        return sizes
    for choice in choices:
        if choice.finish_reason is not None:
            return None  # a finish: parsed in full
        delta = choice.delta
        if delta is not None:
            content, refusal = delta.content, delta.refusal
            thought, reasoning = delta.reasoning_content, delta.reasoning
            if content or refusal or thought or reasoning:
                sizes.append(
                    (
                        choice.index or 0,
                        (len(content) if content else 0) + (len(refusal) if refusal else 0),
                        (len(thought) if thought else 0) + (len(reasoning) if reasoning else 0),
                    )
                )
        elif choice.text:
            sizes.append((choice.index or 0, len(choice.text), 0))
    return sizes


# Bytes a JSON string cannot hold as they are: its end, an escape, control characters.
TEXT_BREAK: Final = re.compile(rb'[\x00-\x1f"\\]').search
_CONTENT_KEY: Final = b'"content":"'
_USAGE_KEY: Final = b'"usage"'
_NULL_USAGE_TAIL: Final = b',"usage":null}'


class Shape:
    """The bytes around the text of a plain content chunk.

    Consecutive chunks of one stream differ in their text only: same id, model, choice index.
    An event that is `head + text + tail`, where `text` holds no quote, backslash or control
    character and is valid UTF-8, is the same JSON as the chunk this shape came from with that
    text as its content: its sizes are `[(index, len(text), 0)]` (`[]` when empty), no parse
    needed. `shape_of` makes one only from a chunk without any backslash (so every key is
    written as it reads) whose `"content":"<text>"` occurs once: that occurrence is its
    delta's content (the quote before it is a delimiter, so it cannot be inside a string).

    Kept as the SSE block's bytes around the text: `lead` is `data: ` and the head, `trail`
    the tail and the blank line's LF LF, so that a read is matched with one `startswith` and
    one `endswith` (each call of them parses its arguments: the cost is the call).
    """

    __slots__ = ("index", "lead", "null_usage", "trail")

    def __init__(self, head: bytes, tail: bytes, index: int) -> None:
        self.lead, self.trail, self.index = b"data: " + head, tail + b"\n\n", index
        # What a usage filter does to an event of this shape, known once: None, it has no
        # `"usage"` (left as it is); True, its one `"usage"` is the closing `,"usage":null}`
        # (cut); False, another one (the filter searches).
        usages = head.count(_USAGE_KEY) + tail.count(_USAGE_KEY)
        self.null_usage: bool | None = (
            None if not usages else usages == 1 and tail.endswith(_NULL_USAGE_TAIL)
        )


def shape_of(data: bytes, chunk: ChunkFields) -> Shape | None:
    """The shape of a chunk `choice_sizes` read as one choice with content text only (`chunk`,
    its fields), or None when it has none."""
    if 0x5C in data:  # a backslash (an int operand: one memchr; a bytes one raises first)
        return None
    choices = chunk.choices
    if not choices or len(choices) != 1:
        return None
    choice = choices[0]
    delta = choice.delta
    if choice.finish_reason is not None or delta is None:
        return None
    text = delta.content
    if not text or delta.refusal or delta.reasoning_content or delta.reasoning:
        return None
    needle = _CONTENT_KEY + text.encode() + b'"'
    at = data.find(needle)
    if at < 0 or data.find(needle, at + 1) >= 0:
        return None
    start, end = at + len(_CONTENT_KEY), at + len(needle) - 1  # the text, its closing quote
    return Shape(data[:start], data[end:], choice.index or 0)
