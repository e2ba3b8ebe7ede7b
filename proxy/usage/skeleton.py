"""The text of a huge SSE data line, kept small: what accounting needs of it without holding,
decoding and parsing megabytes in one step.

A data line over 256 KiB is passed through as it arrives (proxy/sse_large.py). Its bytes come
in pieces (the upstream's reads); `Skeleton.feed` decodes each piece as the whole line would
be decoded (UTF-8, invalid bytes replaced, one incremental decoder across pieces), holds back
an escape (or a surrogate pair's first half) the piece's end cuts, so that every stretch looked
at begins and ends on an escape's boundary, and keeps the text of a stretch unless it is
*plain string text*: then it keeps only its length in characters (msgspec reads its escapes),
and the skeleton gets a marker instead (`\\u0000<n>\\u0000`, valid JSON string text). At the
end of the line `text()` is small (the JSON around the long strings) and parses to the same
structure as the whole line would; `restore` gives every string that holds markers the length
the whole string has (a `str` whose `len` is that length), which is all `StreamUsageTracker`
reads of such strings.

A stretch is plain string text when it holds no control character, no quote or backslash
other than inside valid JSON escapes, and is known to lie inside a string: the text kept
before it ends inside one (the parity of its unescaped quotes), or it holds an escape or a
character JSON has nowhere outside strings. So if the line is valid JSON, every marker stands
for text inside one string; if it is not, the skeleton is not either (a marker outside a string
is a stray backslash). tests/test_sse_pass.py holds it to the whole line's parse.

The kept text is rid of runs of small array elements too (a `response.completed` with
logprobs is megabytes of small objects, not long strings): once a read, the kept text since
the last marker is searched for such a run, or the run found is cut up to its last whole
element so far, each piece checked by msgspec as it arrives (proxy/usage/array_runs.py, which
says why the skeleton still parses exactly when the line does). A string `\u0000[k]\u0000`
stands for each run; `restore` refuses one anywhere accounting may read (anywhere but in a
`logprobs` member), and the caller then reads the line whole. tests/test_skeleton_runs.py
holds it to the whole line's parse.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Final

import msgspec

from proxy.usage.array_runs import Run, Scan, cut_end, find_run, openers, real_quotes, run_end

__all__ = ["MIN_RUN", "Skeleton", "restore"]

# Pieces shorter than this are kept as they are (cheap to parse, not worth a marker).
MIN_RUN: Final = 4096
_NOT_CONTROL: Final = bytes(range(0x20, 0x100))
_decode_string: Final = msgspec.json.Decoder(str).decode
# A whole escape at a place, and a surrogate pair's first half (`_aligned_end`).
_COMPLETE: Final = re.compile(r'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])')
_HIGH: Final = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")
# Backslashes before one, counted to tell an escape's start from an escaped backslash.
_MAX_BACKSLASHES: Final = 64
# A read's text is looked at in stretches of this many characters at most.
_BLOCK: Final = 64 * 1024
# Bytes JSON has outside strings: a piece made only of these may be structure, not text
# (with `NaN` and `Infinity`, which the parse reads as `json.loads` does).
_OUTSIDE: Final = b" \t\r\n0123456789+-.eE,:[]{}truefalsnNIiy"
_MARK: Final = "\\u0000"
_MARKER: Final = re.compile("\x00([0-9]+)\x00")
# Candidate starts of a run of small array elements looked at per read, and tries at its cut
# (proxy/usage/array_runs.py): each a msgspec check, bounded so a read's step stays short
# whatever the line holds.
_FIND_TRIES: Final = 32
_CUT_TRIES: Final = 2


class Skeleton:
    """One data line's text, fed in pieces; `text()` at its end."""

    __slots__ = (
        "_array",
        "_carry",
        "_cut_min",
        "_cuts",
        "_decoder",
        "_depth",
        "_depth_parts",
        "_lost",
        "_marked",
        "_min_run",
        "_open",
        "_open_len",
        "_open_most",
        "_parts",
        "_piece_at",
        "_run_last",
        "_runs",
        "_scan",
        "_texts",
        "_window",
    )

    def __init__(self, min_run: int = MIN_RUN, *, keep_text: bool = False) -> None:
        self._min_run = min_run
        # The strings the markers stand for, when the caller needs the text itself (`text_of`:
        # a continuation collects what was delivered).
        self._texts: list[list[str]] | None = [] if keep_text else None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[str] = []
        self._runs: list[int] = []  # characters each marker stands for
        self._run_last = False  # the last part is a marker (its run may grow)
        # An escape (or a surrogate pair) cut by the end of a piece, held for the next, so
        # that every piece looked at begins and ends on an escape's boundary.
        self._carry = ""
        self._lost = False  # a run of backslashes too long to align on: keep all from here
        # The kept text since the last marker (`_parts[_open:]`, `_open_len` characters), where
        # runs of small array elements are looked for and cut out (`_cut`); how far that
        # search has looked and the quotes counted so far (whether a string is open: a
        # string marker stands for text inside one); the brackets opened in the kept text
        # before (a bound on the containers open there: `Run.depth`), counted up to part
        # `_depth_parts` (only when a run is found); the run being cut and where its next
        # piece starts.
        self._open = 0
        self._open_len = 0
        self._scan = Scan(False)
        self._depth = 0
        self._depth_parts = 0
        self._array: Run | None = None
        self._piece_at = 0
        self._marked = False  # the run being cut has its marker (the last before `_open`)
        self._cuts = 0  # markers of cut runs (`\u0000[k]\u0000`)
        # A run is looked for once this much text is kept; its elements are under `_window`
        # characters; it is cut when it goes on for `_cut_min` characters at least.
        self._cut_min = 4 * min_run
        self._window = min(16 * min_run, 16 * 1024)
        # Kept text looked at longer than this without a cut is left as it is: a run whose
        # separators stopped matching, or a search that fell behind.
        self._open_most = 8 * self._cut_min

    @property
    def runs(self) -> list[int]:
        return self._runs

    def feed(self, piece: bytes, *, final: bool = False) -> None:
        text = self._decoder.decode(piece, final)
        if self._carry:
            text, self._carry = self._carry + text, ""
        if not final:
            # An escape (or a pair's first half) its end cuts goes with the next piece.
            end = _aligned_end(text, len(text))
            if end is None:
                self._lost = True
            elif end < len(text):
                text, self._carry = text[:end], text[end:]
        if not text:
            return
        if len(text) <= _BLOCK:
            self._text(text, piece)
        else:
            # A large read: in stretches, so that its start can still be text (each ending on
            # an escape's boundary).
            start = 0
            while start < len(text):
                end = _aligned_end(text, min(start + _BLOCK, len(text))) if not self._lost else None
                if end is None or end <= start:
                    end = len(text)
                self._text(text[start:end], b"")
                start = end
        if self._open_len >= self._cut_min and not self._lost:
            # Once a read, over what it brought and what the last left: each of its checks
            # reads that text (`_open_most` and a read at most), a few of them at most.
            self._cut()

    def _text(self, text: str, piece: bytes) -> None:
        """One aligned stretch of the line (`piece`: its bytes when they are the same text,
        for byte-level checks; else it is encoded for them)."""
        if len(piece) < len(text):
            piece = text.encode("utf-8", "surrogatepass")
        if len(text) >= self._min_run and not self._lost:
            plain = self._plain(piece, text)
            if plain is None:
                # The JSON around a long string (the line's head) ends in that string's text:
                # the part after the last quote may be plain text all the same.
                quote = text.rfind('"') + 1
                if 0 < quote <= len(text) - self._min_run:
                    self._keep(text[:quote])
                    tail = text[quote:]
                    plain = self._plain(tail.encode(), tail)
                    text = tail
            if plain is not None:
                if not self._run_last:
                    self._settle()
                    self._parts.append(f"{_MARK}{len(self._runs)}{_MARK}")
                    self._open = len(self._parts)
                    self._runs.append(0)
                    if self._texts is not None:
                        self._texts.append([])
                    self._run_last = True
                self._runs[-1] += len(plain)
                if self._texts is not None:
                    self._texts[-1].append(plain)
                return
        self._keep(text)

    def _keep(self, text: str) -> None:
        self._parts.append(text)
        self._run_last = False
        self._open_len += len(text)

    def _open_text(self) -> str:
        """The kept text since the last marker, as one part."""
        parts, start = self._parts, self._open
        text = parts[start] if len(parts) == start + 1 else "".join(parts[start:])
        parts[start:] = [text]
        return text

    def _ends_in_string(self) -> bool:
        """Whether the kept text ends inside a string. Its quotes are counted only when asked
        (`_plain`, `_settle`): most of it is cut out first, in valid elements, whose quotes
        pair up."""
        return self._scan.ends_in_string(self._open_text() if self._open_len else "")

    def _settle(self) -> None:
        """The text kept since the last marker stays as it is: the next looked at follows."""
        self._scan = Scan(self._ends_in_string())
        self._open, self._open_len = len(self._parts), 0
        self._array = None

    def _cut(self) -> None:
        """Look for a run of small array elements in the kept text since the last marker, or
        cut the one found up to its last whole element so far (proxy/usage/array_runs.py)."""
        parts, start = self._parts, self._open
        text = self._open_text()
        array = self._array
        if array is None:
            found = find_run(
                text, self._scan, window=self._window, reach=self._cut_min, tries=_FIND_TRIES
            )
            if found is None:
                if len(text) > self._open_most:
                    self._settle()  # (a search that fell behind starts afresh)
                return
            first, pattern, comma = found
            for part in parts[self._depth_parts : start]:
                self._depth += openers(part)
            self._depth_parts = start
            array = self._array = Run(self._depth + openers(text[:first]), pattern, comma)
            self._piece_at, self._marked = first, False
        at = self._piece_at
        end = cut_end(text, at, array, _CUT_TRIES)
        if end >= 0:
            if not self._marked:  # the run's first cut: its marker, after the comma before it
                parts[start:] = [text[:at], f'\t"{_MARK}[{self._cuts}]{_MARK}"', text[end:]]
                self._cuts += 1
                self._open = self._depth_parts = start + 2
                self._depth = array.depth
                self._piece_at, self._marked = 1, True  # (after the comma before the piece)
            else:
                parts[start] = text[end:]
            self._open_len = len(text) - end
            self._scan = Scan(False)  # (from the comma after the piece)
            return
        stop = run_end(text, at)
        if stop is None:
            if len(text) > self._open_most:
                self._settle()  # separators that stopped matching: kept as they are
            return
        if stop < 0:
            self._settle()  # not a list of values: the line is broken, or the guess wrong
            return
        # The array ended: what follows it is looked at afresh.
        self._scan = Scan(self._scan.ends_in_string(text[:stop]))
        parts[start:] = [text[:stop], text[stop:]]
        self._open, self._open_len = start + 1, len(text) - stop
        self._array = None

    def _plain(self, piece: bytes, text: str) -> str | None:
        """The string `text` stands for (its characters once its escapes are read) when it is
        plain string text (module docstring), else None. (memchr and `bytes.translate` here:
        a regex character class scans ~8x slower.)"""
        if piece.translate(None, _NOT_CONTROL):
            return None  # a control character: not valid in a string
        if '"' not in text and "\\" not in text:
            if not piece.strip(_OUTSIDE) and not self._ends_in_string():
                return None  # could be structure (digits, spaces, `true`...)
            return text
        if "\\" not in text or (b'"' in piece and real_quotes(text)):
            return None  # a quote, not an escaped one
        quoted = f'"{text}"'
        try:  # msgspec reads the escapes (~20x faster than a regex here), as the parse would
            return _decode_string(quoted)
        except msgspec.DecodeError:
            pass
        try:  # a lone surrogate: msgspec refuses it, `json.loads` reads it (as `parse_json`)
            value = json.loads(quoted)
        except ValueError:
            return None  # an invalid escape, a quote
        return value if isinstance(value, str) else None

    def text_of(self, value: str) -> list[str]:
        """The whole string a string of the parsed skeleton stands for, in parts (its markers
        replaced by the text they stand for); needs `keep_text`."""
        texts = self._texts
        assert texts is not None
        parts, pos = [], 0
        for m in _MARKER.finditer(value):
            parts.append(value[pos : m.start()])
            parts.extend(texts[int(m.group(1))])
            pos = m.end()
        parts.append(value[pos:])
        return parts

    def restore(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """`restore` of the parsed skeleton (or of what is read of it)."""
        return restore(obj, self._runs, self._cuts)

    def text(self) -> str:
        """The skeleton, after the last `feed(..., final=True)`; "" when it cannot stand for
        the line (its kept text holds a `\\u0000` escape of its own, which a marker would be
        confused with: the caller then reads the whole line)."""
        text = "".join(self._parts)
        if text.count(_MARK) != 2 * (len(self._runs) + self._cuts):
            return ""
        return text


def _aligned_end(text: str, end: int) -> int | None:
    """The last place at or before `end` where no escape of `text` (which begins on an
    escape's boundary) is cut and no surrogate pair split; None when it cannot be told (a run
    of backslashes too long to count here)."""
    cut = text.rfind("\\", max(0, end - 12), end)
    if cut < 0:
        return end
    starts = _escape_starts(text, cut)
    if starts is None:
        return None
    if not starts:  # the second of an escaped backslash: nothing is cut
        return end
    whole = _COMPLETE.match(text, cut, end)
    if whole is not None:
        if whole.end() < end or not _HIGH.fullmatch(text, cut, whole.end()):
            return end  # whole, and not a pair's first half right at the end
    elif cut >= 6 and _HIGH.fullmatch(text, cut - 6, cut) and _escape_starts(text, cut - 6):
        return cut - 6  # a cut second half: its first half goes with it
    return cut


def _escape_starts(text: str, at: int) -> bool | None:
    """Whether the backslash at `at` begins an escape (an even run of backslashes before it),
    or None when the run is too long to count here."""
    start = max(0, at - _MAX_BACKSLASHES)
    run = at - len(text[start:at].rstrip("\\")) - start
    if run == at - start and start > 0:
        return None
    return run % 2 == 0


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
    say which member it is; or a cut run of array elements stands where accounting reads."""


def _restore(value: Any, runs: list[int], unread: bool = False) -> Any:
    """`unread`: inside a `logprobs` member, which accounting never reads (a chunk's or a
    delta's): a cut run may stand there."""
    if isinstance(value, str):
        if value.startswith("\x00[") and not unread:  # a cut run (not a string's marker)
            raise _KeyMarked
        return _sized(value, runs)
    if isinstance(value, dict):
        if any("\x00" in k for k in value):
            raise _KeyMarked
        return {k: _restore(v, runs, unread or k == "logprobs") for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, runs, unread) for v in value]
    return value


# Members whose value (not only its length) accounting reads: a marker there means the
# skeleton cannot answer, and the caller reads the whole line.
_READ_MEMBERS: Final = ("model", "type", "error", "usage")
_READ_IN_RESPONSE: Final = ("id", "usage", "error")


def restore(obj: dict[str, Any], runs: list[int], cuts: int = 0) -> dict[str, Any] | None:
    """The parsed skeleton with the whole strings' lengths, or None when a marker sits where
    accounting reads a value (a model name, an error message, a finish reason, usage) or in a
    member name, or a cut run of array elements (`cuts` of them) is anywhere it may be read:
    anywhere but in a `logprobs` member (a lifecycle event's head, all that is read of it,
    holds none unless it is read there)."""
    if not runs and not cuts:
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
