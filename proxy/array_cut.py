"""Checking a large array of small values a piece at a time, so that a body whose bulk is one
array (hundreds of thousands of short messages, content parts or token ids) is not parsed in
one step of the event loop (sans-I/O: a generator, one piece a step).

A cheap walk (`json`'s `raw_decode` on 64 KiB windows) descends from the top of the body
along the values too large for a window until it reaches an array whose first elements are
small, and learns what separates them (e.g. `}, {"role":`). The array's middle is then cut at
that separator about every `PIECE_BYTES`: each cut is a guess, and each piece is checked with
msgspec, as a JSON array nested as deep as the original (so that nesting is refused
alike). What is left, the body with the checked middle replaced by a marker value, is parsed
as before (`proxy/request_fields.py`).

Why the answer cannot change: the marker is `\\n"\\xffNNNNNNNN"` between two commas. A raw
newline is invalid inside a string, and after a comma in an object a string must be followed
by `:`, so the shortened body parses only if the marker is an element of an array; putting
back in place of that one element the pieces, each a non-empty list of valid values, gives
valid JSON again. So the original is valid whenever the shortened body and every piece are;
when a guess is wrong (the separator inside a string, or inside a deeper array) its piece
fails and the cut ends before it, and when anything else fails the original is parsed whole,
with the same answer (and error message) as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Final

import msgspec

from proxy.request_body import RequestBody

PIECE_BYTES: Final = 2 * 1024 * 1024  # ~1-2 ms of msgspec for an array of short messages
WINDOW: Final = 64 * 1024  # a value longer than this is walked into rather than decoded
_WALK_STEPS: Final = 64  # members and levels the walk looks at before it gives up
_RETRIES: Final = 3  # wrong guesses tolerated at one cut before the cut ends there
_NOT_WS: Final = re.compile(rb"[^ \t\r\n]")
_BOM: Final = b"\xef\xbb\xbf"
_JSON: Final = json.JSONDecoder()
_CHECK: Final = msgspec.json.Decoder(msgspec.Raw)  # validates, builds nothing


@dataclass(slots=True)
class ArrayCut:
    """The checked middle of one array: `body[start:end]`, a run of whole elements between
    two of its separating commas (at `start - 1` and `end`), all checked."""

    start: int
    end: int
    pieces: int = 0
    wrong_guesses: int = 0


def _skip_ws(body: RequestBody, pos: int, limit: int = WINDOW) -> int:
    """The first byte at or after `pos` that is not whitespace, looking at `limit` bytes at
    most: past a longer run (only an odd or hostile client pads a body so) the position
    returned is still whitespace, where every caller expects a value or a delimiter, so the
    walk gives up and the body is parsed whole (msgspec skips whitespace in C). A byte-by-byte
    loop here took ~4 s of one loop step for a body padded with 40 MiB of spaces."""
    found = _NOT_WS.search(body, pos, pos + limit)
    return found.start() if found is not None else min(pos + limit, len(body))


def _value_end(body: RequestBody, pos: int, window: int) -> int | None:
    """Where the JSON value at `pos` ends, if it ends inside a window; else None."""
    text = bytes(body[pos : pos + window]).decode("latin-1")  # one char a byte: same offsets
    try:
        _, end = _JSON.raw_decode(text)
    except ValueError:
        return None
    if end >= len(text) and pos + end < len(body):
        return None  # a number may go on past the window
    return pos + end


def find_array(body: RequestBody, window: int = WINDOW) -> tuple[int, int] | None:
    """The first element of the array the body's bulk is in, and its depth (the containers
    around its elements, the array included); None when the walk finds no such array."""
    pos = _skip_ws(body, len(_BOM) if body.startswith(_BOM) else 0)
    depth = 0
    for _ in range(_WALK_STEPS):
        opener = body[pos : pos + 1]
        if opener == b"[":
            depth += 1
            pos = _skip_ws(body, pos + 1)
            if _value_end(body, pos, window) is not None:
                return pos, depth
            continue  # the first element is large itself: walk into it
        if opener != b"{":
            return None
        depth += 1
        pos = _skip_ws(body, pos + 1)
        for _ in range(_WALK_STEPS):
            key_end = _value_end(body, pos, window)
            if key_end is None or body[pos : pos + 1] != b'"':
                return None
            pos = _skip_ws(body, key_end)
            if body[pos : pos + 1] != b":":
                return None
            pos = _skip_ws(body, pos + 1)
            end = _value_end(body, pos, window)
            if end is None:
                break  # the large member: walk into it
            pos = _skip_ws(body, end)
            if body[pos : pos + 1] != b",":
                return None
            pos = _skip_ws(body, pos + 1)
        else:
            return None
    return None


def _separator(body: RequestBody, first: int, window: int) -> tuple[int, bytes, int] | None:
    """After the first element: the comma that ends it, and the bytes that separate the first
    three elements (the comma's offset in them), e.g. `}, {"role":`."""
    starts, ends = [first], []
    for _ in range(3):
        end = _value_end(body, starts[-1], window)
        if end is None:
            return None
        ends.append(end)
        nxt = _skip_ws(body, end)
        if body[nxt : nxt + 1] != b",":
            return None
        starts.append(_skip_ws(body, nxt + 1))
    seps = [bytes(body[ends[i] : starts[i + 1]]) for i in range(3)]
    if len(set(seps)) != 1:
        return None
    last = {body[e - 1] for e in ends}
    left = bytes([last.pop()]) if len(last) == 1 else b""
    heads = [bytes(body[s : s + 8]) for s in starts[:3]]
    right = b""
    while len(right) < 8 and len({h[: len(right) + 1] for h in heads}) == 1:
        if len(heads[0]) <= len(right):
            break
        right = heads[0][: len(right) + 1]
    comma = ends[0] + seps[0].index(b",")
    return comma, left + seps[0] + right, len(left) + seps[0].index(b",")


def _piece_ok(body: RequestBody, start: int, end: int, depth: int) -> bool:
    """Whether `body[start:end]` is a non-empty list of valid values (one copy of it)."""
    if _NOT_WS.search(body, start, end) is None:
        return False  # `[ ]` parses, but an empty element between two commas does not
    try:
        _CHECK.decode(b"".join((b"[" * depth, memoryview(body)[start:end], b"]" * depth)))
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _next_guess(body: RequestBody, sep: bytes, start: int, piece_bytes: int) -> int:
    """The separator about `piece_bytes` after `start`; near the end, the last one (so that
    what is left to parse whole is small); -1 when there is none after `start`."""
    guess = body.find(sep, start + piece_bytes)
    if guess < 0:
        guess = body.rfind(sep, start)
    return guess


def check_array(
    body: RequestBody, *, piece_bytes: int = PIECE_BYTES, window: int = WINDOW
) -> Generator[None, None, ArrayCut | None]:
    """Check the middle of the body's large array piece by piece, yielding after each piece;
    returns what was checked, or None (no such array, or nothing of it checked)."""
    found = find_array(body, window)
    if found is None:
        return None
    first, depth = found
    separated = _separator(body, first, window)
    if separated is None:
        return None
    comma, sep, comma_at = separated
    cut = ArrayCut(comma + 1, comma + 1)  # `end`: where the next piece starts
    guess = _next_guess(body, sep, cut.end, piece_bytes)
    wrong_here = 0
    while guess >= 0 and wrong_here <= _RETRIES:
        yield  # one piece a step
        end = guess + comma_at
        if _piece_ok(body, cut.end, end, depth):
            cut.end, cut.pieces, wrong_here = end + 1, cut.pieces + 1, 0
            guess = _next_guess(body, sep, cut.end, piece_bytes)
        else:
            cut.wrong_guesses += 1
            wrong_here += 1
            guess = body.find(sep, guess + 1)
    if not cut.pieces:
        return None
    cut.end -= 1  # the comma after the last piece stays in the body
    return cut
