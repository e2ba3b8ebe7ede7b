"""Runs of small array elements in a huge data line, found and checked as the line's text
arrives, so that its skeleton (proxy/usage/skeleton.py) can leave them out as it leaves out the
text of long strings (sans-I/O: text in, positions out; every search is bounded).

A `response.completed` asked for logprobs repeats its output with every token's logprobs and
alternatives: megabytes of small objects in one array, which the skeleton's string markers do
not shorten. Left in, they made the skeleton itself megabytes long, and its stand-in line and
head decode at the line's end one long step (128 ms for 13.7 MiB). Cut out, each read checks
the elements it brought (msgspec validates without building, ~2.5 ms a MiB) and the end of the
line reads a skeleton of a few KiB.

How a run is found (`find_run`): after a comma outside strings (the quotes before it counted,
`Scan`), an object or array followed by two more of them, each followed by a comma and each
under `window` characters, starts a run when msgspec reads on as array elements from there
for `reach` characters (an inner array, e.g. one token's alternatives, ends sooner). The
three elements give the separator to look for (`Run.pattern`: the closers they end with, the
comma and spaces between them, the start they share, e.g. `]}]},{"token"`). How it is cut
(`cut_end`): at the last separator in the text so far whose elements before it read as a
list of JSON values, from the one after the previous cut. A wrong guess (a separator inside
an element or a string) fails that check and the one before is tried. Each check nests the
elements as deep as the brackets opened before them (`Run.depth`, at least as deep as in the
line), so that elements the line's parse cannot read (recursion) fail it and are kept.

Why the skeleton's answer cannot change: the cut stretch, a non-empty list of valid values,
is replaced by the string `\t"\u0000[k]\u0000"` between its two commas. A raw tab is invalid
inside a string (and, unlike a newline, does not end the SSE line) and a string between two
commas in an object is not followed by `:`, so the skeleton parses only if the marker is an
array element; then putting the stretch back gives valid JSON again (the argument of
proxy/array_cut.py, for request bodies). Conversely, in valid JSON a list of values that
begins after a comma outside strings is a run of one array's elements, and replacing them by
one string keeps it valid. So the skeleton parses iff the line does (msgspec accepts no piece
that `json.loads` refuses), with the same members (duplicates included) everywhere but inside
the cut arrays, which accounting reads only where `restore` finds no marker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise
from os.path import commonprefix
from typing import Final

import msgspec

__all__ = ["Run", "Scan", "cut_end", "find_run", "openers", "real_quotes", "run_end"]

_CHECK: Final = msgspec.json.Decoder(msgspec.Raw)  # validates, builds nothing
# msgspec names the byte after a complete value (its index + 1) when more follows.
_TRAILING: Final = re.compile(r"trailing characters \(byte (\d+)\)$")
# Spaces looked at between a candidate's comma and its bracket, at most.
_SPACES_MOST: Final = 64
_WS: Final = " \t\r\n"
_CLOSERS: Final = frozenset("]}")
_HEAD: Final = 8  # characters of the elements' common start in the separator, at most
_MORE: Final = (-1, -1)  # `_element`: the text so far ends before the element does


class Run:
    """One array being cut: where its elements nest and what separates them."""

    __slots__ = ("comma", "depth", "pattern")

    def __init__(self, depth: int, pattern: str, comma: int) -> None:
        # Containers around each element, the array included, or more: the elements are
        # checked nested this deep (`cut_end`), so that ones too deep for the line's parse
        # fail the check and are kept (the skeleton then fails as the line does).
        self.depth = depth
        self.pattern = pattern  # what separates two elements
        self.comma = comma  # the comma's offset in `pattern`


def openers(text: str) -> int:
    """Brackets and braces that open in `text`, strings or not: at least as many as the
    containers open at its end (two counts in C, where telling strings apart takes a regex
    with a match a string, ~30x slower)."""
    return text.count("[") + text.count("{")


def real_quotes(text: str) -> int:
    """Quotes in `text` (which begins on an escape's boundary) that are not escaped: a quote
    after an odd run of backslashes is. Counted with `str.count`: the quotes after at least
    1, 2, 3... backslashes, alternately subtracted and added."""
    quotes = text.count('"')
    if not quotes:
        return 0
    sign, run = -1, "\\"
    while after := text.count(run + '"'):
        quotes += sign * after
        sign, run = -sign, run + "\\"
    return quotes


def _trailing(text: str, error: str) -> int | None:
    """The index in `text` of the first character after its first value (from msgspec's
    message, which counts UTF-8 bytes), or None when the message names none."""
    found = _TRAILING.search(error)
    if found is None:
        return None
    at = int(found.group(1)) - 1
    if not text.isascii():
        at = len(text.encode("utf-8", "surrogatepass")[:at].decode("utf-8", "surrogatepass"))
    return at


def _element(text: str, at: int, window: int) -> tuple[int, int] | None:
    """The element at `at` if it ends within `window` and a comma follows it: (its end, where
    the next element starts); `_MORE` when the text ends before that can be told."""
    part = text[at : at + window]
    short = at + window > len(text)  # the text ends inside the window
    try:
        _CHECK.decode(part)
    except msgspec.DecodeError as exc:
        comma = _trailing(part, str(exc))
        if comma is None and short and "truncated" in str(exc):
            return _MORE
    except RecursionError:
        return None
    else:  # the window holds one value: it may go on past it
        return _MORE if short else None
    if comma is None or part[comma] != ",":
        return None
    end = at + len(part[:comma].rstrip(_WS))
    nxt = at + comma + 1
    while text[nxt : nxt + 1] in (" ", "\t", "\r", "\n"):
        nxt += 1
    return end, nxt


def run_end(text: str, at: int, stop: int | None = None) -> int | None:
    """Where the array whose elements begin at `at` ends (after its `]`), or None while
    `text` (or its first `stop` characters) ends inside it; -1 when the text from `at` is not
    a list of values."""
    try:
        _CHECK.decode("[" + text[at:stop])
    except msgspec.DecodeError as exc:
        if "truncated" in str(exc):
            return None
        end = _trailing(text[at - 1 :], str(exc))  # (`[` for the character before `at`)
        return -1 if end is None else at - 1 + end
    except RecursionError:
        return -1
    return len(text)  # the text ends right after the array


class Scan:
    """How far the search for a run has looked into a text (`at`), and the text's unescaped
    quotes at two places asked about (the search's last candidate, and the text's end when
    last asked), from its start (one if that is inside a string): counted only as far as
    asked, as most of the text is cut out unread. The text may only grow meanwhile."""

    __slots__ = ("at", "counted", "end", "end_quotes", "first", "quotes")

    def __init__(self, in_string: bool) -> None:
        self.at = 0
        self.counted = self.end = 0
        self.first = self.quotes = self.end_quotes = int(in_string)

    def _quotes(self, text: str, at: int) -> int:
        base, quotes = 0, self.first
        for point, count in ((self.counted, self.quotes), (self.end, self.end_quotes)):
            if base < point <= at:
                base, quotes = point, count
        return quotes + real_quotes(text[base:at]) if at > base else quotes

    def in_string(self, text: str, at: int) -> bool:
        """Whether `text[at]` (on an escape's boundary) is inside a string."""
        quotes = self._quotes(text, at)
        if at > self.counted:
            self.counted, self.quotes = at, quotes
        return quotes % 2 == 1

    def ends_in_string(self, text: str) -> bool:
        """Whether `text` ends inside a string."""
        self.end_quotes = self._quotes(text, len(text))
        self.end = len(text)
        return self.end_quotes % 2 == 1


def _starts(text: str, at: int) -> Iterator[tuple[int, int]]:
    """Where a run may start from `at` on: (a comma, the object or array after it and
    spaces), found by memchr; and (-1, bracket) for a bracket after something else, so
    that the caller can bound what it looked at."""
    brace, bracket = text.find("{", at), text.find("[", at)
    while brace >= 0 or bracket >= 0:
        if bracket < 0 or 0 <= brace < bracket:
            first, brace = brace, text.find("{", brace + 1)
        else:
            first, bracket = bracket, text.find("[", bracket + 1)
        before = max(0, first - _SPACES_MOST)
        comma = before + len(text[before:first].rstrip(_WS)) - 1
        yield (comma if comma >= 0 and text[comma] == "," else -1), first


def find_run(
    text: str, scan: Scan, *, window: int, reach: int, tries: int
) -> tuple[int, str, int] | None:
    """The first run of small elements after `scan.at`, looking at `tries` candidates at
    most: (its first element, the separator, the comma's offset in it); None when none was
    found by then, or the text ends before a candidate can be told (`scan.at` then stays
    on it, to go on from there)."""
    looked = 8 * tries  # brackets after anything else: cheaper, so more of them
    for comma, first in _starts(text, scan.at):
        scan.at = first
        if comma < 0:
            looked -= 1
            if looked < 0:
                return None
            continue
        tries -= 1
        if tries < 0:
            return None
        if scan.in_string(text, comma):
            continue
        elements = []
        at = first
        for _ in range(3):
            element = _element(text, at, window)
            if element is _MORE:
                return None  # looked at again once more text came
            if element is None:
                break
            elements.append((at, element[0]))
            at = element[1]
        if len(elements) < 3:
            continue
        if run_end(text, first, first + reach) is not None:
            continue  # an inner array that ends within `reach` (or not one at all)
        seps = {text[e:s] for (_, e), (s, _) in pairwise(elements)}
        if len(seps) != 1:
            continue
        sep = seps.pop()
        ends = [text[s:e] for s, e in elements]
        left = ""
        while len(left) < _HEAD:  # the closers the elements end with, as far as all do
            tails = {x[-len(left) - 1 :] for x in ends}
            tail = tails.pop()
            if tails or len(tail) <= len(left) or tail[0] not in _CLOSERS:
                break
            left = tail
        heads = [text[s : s + _HEAD] for s, _ in elements]
        right = commonprefix(heads)  # noqa: RUF071 (text, not paths: by character is the point)
        return first, left + sep + right, len(left) + sep.index(",")
    scan.at = len(text)
    return None


def cut_end(text: str, start: int, run: Run, tries: int) -> int:
    """The last separator's comma in `text` after `start` such that `text[start:comma]` is a
    list of valid values nested `run.depth` deep (tried from the end, `tries` at most); -1
    when none is."""
    end = len(text)
    wrap = run.depth
    for _ in range(tries):
        at = text.rfind(run.pattern, start, end)
        if at < 0:
            return -1
        comma = at + run.comma
        if comma <= start:
            return -1
        try:
            _CHECK.decode("".join(("[" * wrap, text[start:comma], "]" * wrap)))
        except (msgspec.DecodeError, RecursionError):
            end = at + len(run.pattern) - 1
            continue
        return comma
    return -1
