"""What a large request body's bytes say before it is parsed, learnt chunk by chunk as it
arrives, so that no step of the event loop costs more than one chunk does: whether the body is
valid UTF-8, and where its long runs lie.

A run is a stretch of bytes none of which is `"`, `\\` or a control character (< 0x20). Inside a
JSON string every such byte is plain text (the run holds no escape and no end of the string);
outside strings a run can only be digits, commas, brackets and spaces. The long runs of a real
body are its text: base64 images, documents pasted into a prompt. `proxy/request_fields.py`
parses the body with the middle of each long run replaced by a short marker (its cost is then
the body's structure, not its text); a marker outside a string makes that parse fail, and the
original is parsed whole instead.
"""

from __future__ import annotations

import codecs
from typing import Final

# Runs shorter than this are not worth a marker (and a body smaller than it has none).
RUN_MIN: Final = 64 * 1024
_BREAKERS: Final = frozenset(range(0x20)) | {ord('"'), ord("\\")}
# Each byte of a chunk becomes 0 (a breaker) or 1, so that `find(0)` (memchr) finds breakers.
_MARKS: Final = bytes(0 if i in _BREAKERS else 1 for i in range(256))


class BodyScan:
    """Fed every chunk of a body in order (`feed`), then `finish()`; sans-I/O."""

    __slots__ = ("_run_start", "_utf8_tail", "run_min", "runs", "size", "utf8_ok")

    def __init__(self, run_min: int = RUN_MIN) -> None:
        self.run_min = run_min
        self.size = 0
        self.utf8_ok = True
        self.runs: list[tuple[int, int]] = []  # [start, end) of each run of run_min or more
        self._utf8_tail = b""  # an incomplete UTF-8 sequence at the end of the last chunk
        self._run_start = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        base = self.size
        self.size += len(chunk)
        if self.utf8_ok:
            self._check_utf8(chunk)
        marks = chunk.translate(_MARKS)
        first = marks.find(0)
        if first < 0:
            return  # the current run goes on through this chunk
        self._close_run(base + first)
        last = marks.rfind(0)
        # Runs wholly inside this chunk: a run of run_min bytes covers a whole block of
        # run_min / 2 bytes however the blocks fall, so only blocks are tested (memchr each).
        step = max(1, self.run_min // 2)
        start = first + 1  # always just after a breaker
        while start + step <= last:
            if marks.find(0, start, start + step) >= 0:
                start = marks.rfind(0, start, start + step) + 1
                continue
            end = marks.find(0, start + step)
            if end - start >= self.run_min:
                self.runs.append((base + start, base + end))
            start = end + 1
        self._run_start = base + last + 1

    def finish(self) -> None:
        """The end of the body: a sequence cut short is invalid UTF-8."""
        self._close_run(self.size)
        if self.utf8_ok and self._utf8_tail:
            try:
                codecs.utf_8_decode(self._utf8_tail, "strict", True)
            except UnicodeDecodeError:
                self.utf8_ok = False

    def _close_run(self, end: int) -> None:
        if end - self._run_start >= self.run_min:
            self.runs.append((self._run_start, end))

    def _check_utf8(self, chunk: bytes) -> None:
        # As codecs' incremental UTF-8 decoder does it, without keeping the text.
        if not self._utf8_tail and chunk.isascii():
            return
        data = self._utf8_tail + chunk
        try:
            _, used = codecs.utf_8_decode(data, "strict", False)
        except UnicodeDecodeError:
            self.utf8_ok = False
            return
        self._utf8_tail = data[used:]
