"""The cuts of a large request body: the markers that stand for the stretches left out of its
parse (`proxy/request_fields.py`'s shortened parse), where its stretches of spaces lie, and
where each marker is found again in a member's span. Sans-I/O: bytes in, positions out; the
searches over megabytes are generators, a bounded piece a step."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Generator

from proxy.request_body import RequestBody

# Where a stretch was left out: a byte that valid UTF-8 never has and the cut's index (8 hex
# digits); for an array's middle (`proxy/array_cut.py`) as a string value.
MARK = b"\xff"
# Where a stretch of spaces outside every string was left out: a carriage return, the cut's
# index in binary as spaces (0) and tabs (1), a carriage return. Whitespace to the parser, and
# found again in a member's span because the shortened body holds no other carriage return
# (checked before one is used: a run never holds one, so the original has none either).
WS_MARK = b"\r"
_WS_BITS = bytes.maketrans(b"01", b" \t")
_WS_BITS_BACK = bytes.maketrans(b" \t", b"01")
MARGIN = 8  # run bytes kept on each side of a marker: no escape (6 bytes at most) is cut
# [from, to) of the original left out, and the marker that stands for it.
Cut = tuple[int, int, bytes]
# msgspec names the offending byte at the end of a malformed document's message.
ERROR_AT = re.compile(r"\(byte (\d+)\)$")
# Spaces compared a step at a time (memcmp) while looking for the end of a stretch of them.
_SPACES = b" " * (4 * 1024 * 1024)
# Stretches of spaces shorter than this stay in the shortened body (they cost the parse next
# to nothing); a run's middle with more stretches than `_STRETCHES_MOST` is parsed whole.
SPACES_MIN = 1024
_STRETCHES_MOST = 256


def _ws_marker(index: int) -> bytes:
    return WS_MARK + b"%s" % format(index, "b").encode().translate(_WS_BITS) + WS_MARK


def numbered(cuts: list[tuple[int, int, bool]]) -> list[Cut]:
    """Each cut's marker, by its index: whitespace, or an 0xFF marker."""
    return [(a, b, _ws_marker(i) if ws else b"\xff%08x" % i) for i, (a, b, ws) in enumerate(cuts)]


def space_stretches(
    body: RequestBody, start: int, end: int, spaces_min: int
) -> Generator[None, None, list[tuple[int, int]] | None]:
    """The stretches of `spaces_min` or more spaces in `body[start:end]`, [from, to) each;
    None past `_STRETCHES_MOST`. Looked for `len(_SPACES)` bytes a step."""
    found: list[tuple[int, int]] = []
    needle = _SPACES[:spaces_min]
    pos = start
    while pos < end:
        window_end = min(end, pos + len(_SPACES))
        at = body.find(needle, pos, min(end, window_end + spaces_min - 1))
        if at < 0:
            pos = window_end  # (a stretch starting before it was found: the search ran on)
            yield
            continue
        stop = yield from _spaces_end(body, at + spaces_min, end)
        found.append((at, stop))
        if len(found) > _STRETCHES_MOST:
            return None
        pos = stop
    return found


def _spaces_end(body: RequestBody, pos: int, end: int) -> Generator[None, None, int]:
    """The first byte at or after `pos` (and before `end`) that is not a space, or `end`:
    whole blocks compared at once, the last one halved down to the byte."""
    spaces = memoryview(_SPACES)
    while pos < end:
        size = min(len(_SPACES), end - pos)
        if body.startswith(spaces[:size], pos):
            pos += size
            yield
            continue
        while size > 1:  # the block holds a non-space: halve it down to that byte
            half = size // 2
            if body.startswith(spaces[:half], pos):
                pos += half
                size -= half
            else:
                size = half
        return pos
    return end


def marker_at(at: list[int], error: str) -> int | None:
    """The cut whose marker the parse stopped at (its first byte), if the error says where."""
    found = ERROR_AT.search(error)
    if found is None:
        return None
    offset = int(found.group(1))
    index = bisect_left(at, offset)
    return index if index < len(at) and at[index] == offset else None


def with_markers(body: RequestBody, cuts: list[Cut]) -> tuple[bytes, list[int]]:
    """The body with each cut's stretch replaced by its marker, and where each marker starts."""
    pieces: list[RequestBody] = []
    at: list[int] = []
    done = size = 0
    for cut_from, cut_to, marker in cuts:
        pieces.append(body[done:cut_from])
        size += cut_from - done
        at.append(size + marker.find(MARK) if marker[0] != WS_MARK[0] else size)
        pieces.append(marker)
        size += len(marker)
        done = cut_to
    pieces.append(body[done:])
    return b"".join(pieces), at


def marks(span: bytes, cuts: list[Cut], spaced: bool) -> list[tuple[int, int, int]]:
    """Each marker in `span`: where it starts and ends, and its cut's index (memchr for 0xFF,
    which the body itself never holds: its UTF-8 was checked; with `spaced`, for a carriage
    return too, which the shortened body then holds in whitespace markers only)."""
    found: list[tuple[int, int, int]] = []
    at = _next_mark(span, 0, spaced)
    while at >= 0:
        if span[at] == WS_MARK[0]:
            end = span.index(WS_MARK, at + 1) + 1
            i = int(span[at + 1 : end - 1].translate(_WS_BITS_BACK), 2)
            found.append((at, end, i))
            at = _next_mark(span, end, spaced)
            continue
        i = int(span[at + 1 : at + 9], 16)
        marker = cuts[i][2]
        start = at - marker.index(MARK)
        found.append((start, start + len(marker), i))
        at = _next_mark(span, start + len(marker), spaced)
    return found


def _next_mark(span: bytes, start: int, spaced: bool) -> int:
    at = span.find(MARK, start)
    if spaced:
        ws = span.find(WS_MARK, start)
        if ws >= 0 and (at < 0 or ws < at):
            return ws
    return at
