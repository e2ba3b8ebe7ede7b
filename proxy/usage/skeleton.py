"""The text of a huge SSE data line, kept small: what accounting needs of it without holding,
decoding and parsing megabytes in one step.

A data line over 1 MiB is passed through as it arrives (proxy/sse_large.py). Its bytes come
in pieces (the upstream's reads); `Skeleton.feed` decodes each piece as the whole line would
be decoded (UTF-8, invalid bytes replaced, one incremental decoder across pieces) and keeps
the decoded text of a piece unless the piece is *plain string text*: then it keeps only its
length in characters, and the skeleton gets a marker instead (`\\u0000<n>\\u0000`, valid JSON
string text). At the end of the line `text()` is small (the JSON around the long strings) and
parses to the same structure as the whole line would; `restore` gives every string that holds
markers the length the whole string has (a `str` whose `len` is that length), which is all
`StreamUsageTracker` reads of such strings.

A piece is plain string text when, decoded, it holds no quote, backslash or control character
other than inside a valid JSON escape, begins and ends on an escape's boundary (no surrogate
pair split around it), and has a character that cannot appear outside a string (a letter other
than those of `true`, `false`, `null`, any non-ASCII character, or an escape). So if the line
is valid JSON, every such piece lies inside one string, and the marker stands for it; if the
line is not valid JSON, the skeleton is not either (a marker outside a string is a stray
backslash). tests/test_sse_pass.py holds it to the whole line's parse.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, Final

__all__ = ["MIN_RUN", "Skeleton", "restore"]

# Pieces shorter than this are kept as they are (cheap to parse, not worth a marker).
MIN_RUN: Final = 4096
# A JSON escape; a surrogate pair first, so that it counts as one character (as both parsers
# read it) and the scan stays aligned (an escaped backslash is consumed as a unit).
_ESCAPE: Final = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r'|\\u[0-9a-fA-F]{4}|\\["\\/bfnrt]'
)
_NOT_CONTROL: Final = bytes(range(0x20, 0x100))
_LOW_SURROGATE_FIRST: Final = re.compile(r"\\u[dD][c-fC-F]").match
_HIGH_SURROGATE_LAST: Final = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$").search
# Bytes JSON has outside strings: a piece made only of these may be structure, not text.
_OUTSIDE: Final = b" \t\r\n0123456789+-.eE,:[]{}truefalsn"
_MARK: Final = "\\u0000"
_MARKER: Final = re.compile("\x00([0-9]+)\x00")


class Skeleton:
    """One data line's text, fed in pieces; `text()` at its end."""

    __slots__ = ("_decoder", "_kept_end", "_min_run", "_parts", "_run_last", "_runs")

    def __init__(self, min_run: int = MIN_RUN) -> None:
        self._min_run = min_run
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[str] = []
        self._runs: list[int] = []  # characters each marker stands for
        self._run_last = False  # the last part is a marker (its run may grow)
        self._kept_end = ""  # the last characters kept since the last marker

    @property
    def runs(self) -> list[int]:
        return self._runs

    def feed(self, piece: bytes, *, final: bool = False) -> None:
        text = self._decoder.decode(piece, final)
        if not text:
            return
        if len(text) >= self._min_run:
            chars = self._plain(piece, text)
            if chars is None:
                # The JSON around a long string (the line's head) ends in that string's text:
                # the part after the last quote may be plain text all the same.
                quote = text.rfind('"') + 1
                if 0 < quote <= len(text) - self._min_run:
                    self._keep(text[:quote])
                    tail = text[quote:]
                    chars = self._plain(tail.encode(), tail)
                    text = tail
            if chars is not None:
                if self._run_last:
                    self._runs[-1] += chars
                else:
                    self._parts.append(f"{_MARK}{len(self._runs)}{_MARK}")
                    self._runs.append(chars)
                    self._run_last = True
                self._kept_end = ""
                return
        self._keep(text)

    def _keep(self, text: str) -> None:
        self._parts.append(text)
        self._run_last = False
        self._kept_end = (self._kept_end + text[-5:])[-5:]

    def _plain(self, piece: bytes, text: str) -> int | None:
        """Characters of `text` when it is plain string text (module docstring), else None.
        (memchr and `bytes.translate` here: a regex character class scans ~8x slower.)"""
        if "\\" in self._kept_end:
            return None  # the kept text before may end inside an escape
        if piece.translate(None, _NOT_CONTROL):
            return None  # a control character: not valid in a string
        if b'"' not in piece and b"\\" not in piece:
            if not piece.strip(_OUTSIDE):
                return None  # could be structure (digits, spaces, `true`...)
            return len(text)
        if b"\\" not in piece:
            return None  # a quote, not an escaped one
        stripped, escapes = _ESCAPE.subn("", text)
        if '"' in stripped or "\\" in stripped:
            return None  # a quote, a stray or cut escape
        if _LOW_SURROGATE_FIRST(text) or _HIGH_SURROGATE_LAST(text):
            return None  # a surrogate pair may be split around this piece
        return len(stripped) + escapes

    def text(self) -> str:
        """The skeleton, after the last `feed(..., final=True)`; "" when it cannot stand for
        the line (its kept text holds a `\\u0000` escape of its own, which a marker would be
        confused with: the caller then reads the whole line)."""
        text = "".join(self._parts)
        if text.count(_MARK) != 2 * len(self._runs):
            return ""
        return text


class _Sized(str):
    """A string read from a skeleton: its text holds markers, its `len` (and truth) is the
    whole string's."""

    size: int

    def __len__(self) -> int:
        return self.size


def _sized(text: str, runs: list[int]) -> str:
    if "\x00" not in text:
        return text
    size = len(text)
    for m in _MARKER.finditer(text):
        size += runs[int(m.group(1))] - len(m.group(0))
    out = _Sized(text)
    out.size = size
    return out


def _has_marker(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_marker(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_marker(v) for v in value)
    return False


class _KeyMarked(Exception):
    """A member name holds a marker (a name of thousands of characters): the skeleton cannot
    say which member it is."""


def _restore(value: Any, runs: list[int]) -> Any:
    if isinstance(value, str):
        return _sized(value, runs)
    if isinstance(value, dict):
        if any("\x00" in k for k in value):
            raise _KeyMarked
        return {k: _restore(v, runs) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, runs) for v in value]
    return value


# Members whose value (not only its length) accounting reads: a marker there means the
# skeleton cannot answer, and the caller reads the whole line.
_READ_MEMBERS: Final = ("model", "type", "error", "usage")
_READ_IN_RESPONSE: Final = ("id", "usage", "error")


def restore(obj: dict[str, Any], runs: list[int]) -> dict[str, Any] | None:
    """The parsed skeleton with the whole strings' lengths, or None when a marker sits where
    accounting reads a value (a model name, an error message, a finish reason, usage) or in a
    member name."""
    if not runs:
        return obj
    if any(_has_marker(obj.get(key)) for key in _READ_MEMBERS):
        return None
    response = obj.get("response")
    if isinstance(response, dict) and any(
        _has_marker(response.get(key)) for key in _READ_IN_RESPONSE
    ):
        return None
    choices = obj.get("choices")
    if isinstance(choices, list) and any(
        isinstance(c, dict) and _has_marker(c.get("finish_reason")) for c in choices
    ):
        return None
    try:
        restored: dict[str, Any] = _restore(obj, runs)
    except _KeyMarked:
        return None
    return restored
