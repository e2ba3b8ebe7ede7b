"""Sans-I/O decoder for `text/event-stream` (WHATWG HTML, "Server-sent events").

`SSEDecoder.feed(chunk)` takes bytes exactly as they came off the socket and returns the blocks
completed by them; `flush()` returns what is left at end of stream. Every block keeps its exact
bytes in `SSEEvent.raw` (terminating blank line included), so that

    b"".join(e.raw for e in decoder.feed(a) + decoder.feed(b) + decoder.flush()) == a + b

for any input. The relay forwards `raw` untouched, which lets it drop one event (the usage chunk
the proxy asked for on the client's behalf) without re-serialising the others.

Events do not depend on how the input was chunked. The one place where that costs something is a
block whose closing line ends in a bare `\\r` that is the last byte of a chunk: it may be the first
half of a `\\r\\n` split across two reads, so the block is emitted when the next byte (or `flush`)
shows which it was. Upstreams that end lines with `\\n` or `\\r\\n` are never delayed by this.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "ends_block"]

_RETRY_DIGITS = 10
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D


# Not frozen: a frozen dataclass builds through object.__setattr__, and one is built per event
# on the hot path. Treat events as read-only all the same.
@dataclass(slots=True)
class SSEEvent:
    """One block of an event stream, ended by a blank line (or by the end of the stream).

    `data` is None when the block had no `data` field (keep-alive comments, stray blank lines);
    `comment` is True when every line of the block was a comment.
    """

    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: bool = False
    raw: bytes = b""


def ends_block(raw: bytes) -> bool:
    """Whether a block that `flush` returned had been ended by its blank line after all.

    A block whose last line ends in a bare `\\r` (CR-only line endings, valid SSE) is held until
    the next byte shows it was not half of a `\\r\\n`; at the end of the stream `flush` returns
    it, complete. Line ends alone (a stray `\\r` after the last block) cut nothing either; a
    block cut before its blank line is the one case that returns False."""
    if not raw.strip(b"\r\n"):
        return True  # only line ends: nothing was cut
    for line_end in (b"\r\n", b"\n", b"\r"):
        if raw.endswith(line_end):
            # The blank line's own end; before it, the end of the block's last line.
            return raw[: -len(line_end)].endswith((b"\n", b"\r"))
    return False


def _joined(data: list[bytes | bytearray]) -> bytes | bytearray:
    return data[0] if len(data) == 1 else b"\n".join(data)


class SSEDecoder:
    """Incremental event-stream parser: `feed(bytes) -> [SSEEvent]`, then `flush()` at the end."""

    __slots__ = (
        "_bom_checked",
        "_buf",
        "_data",
        "_event",
        "_had_comment",
        "_had_field",
        "_id",
        "_pos",
        "_retry",
        "_scanned",
    )

    def __init__(self) -> None:
        # `_buf` holds the raw bytes of the block being read, from its first byte; `_pos` is where
        # its next unparsed line starts and `_scanned` how far we already looked for a line end
        # (so a long line arriving in many small reads is scanned once, not once per read).
        self._buf = bytearray()
        self._pos = 0
        self._scanned = 0
        self._bom_checked = False
        self._reset_block()

    def _reset_block(self) -> None:
        self._data: list[bytes | bytearray] = []
        self._event: bytes | bytearray | None = None
        self._id: bytes | bytearray | None = None
        self._retry: int | None = None
        self._had_comment = False
        self._had_field = False

    @property
    def buffered(self) -> int:
        """Bytes held for the block being read (a caller caps it against endless blocks)."""
        return len(self._buf)

    def at_boundary(self, chunk: bytes) -> bool:
        """Whether `chunk` begins a new block: nothing is held from earlier reads and no
        byte-order mark can begin here. A caller may then take whole blocks from the front of
        `chunk` itself and `feed` only the rest: the events are the same."""
        if self._buf:
            return False
        if not self._bom_checked:
            if not chunk or chunk[0] == _BOM[0]:
                return False
            self._bom_checked = True  # what `_feed` would decide from this first byte
        return True

    def line_in_progress(self) -> int:
        """Bytes of the line being read (0: none, or its end may already be there: a `\r`
        waiting for the next byte)."""
        if self._scanned != len(self._buf):
            return 0
        return len(self._buf) - self._pos

    def line_starts(self, prefixes: tuple[bytes, ...]) -> bool:
        """Whether the line being read begins with one of `prefixes`."""
        return self._buf.startswith(prefixes, self._pos)

    def take_line(self) -> tuple[bytes, bytes]:
        """Hand the line being read to the caller (a huge line, passed through as it comes):
        the bytes of the block before it (its lines already read, a BOM) and the line so
        far. The block's fields read so far stay; `resume_line` gives the line back, when its
        end comes, as a short stand-in for it."""
        buf, pos = self._buf, self._pos
        with memoryview(buf) as view:
            head, line = bytes(view[:pos]), bytes(view[pos:])
        self._buf = bytearray()
        self._pos = self._scanned = 0
        return head, line

    def resume_line(self, stand_in: bytes) -> None:
        """The taken line's stand-in (no line end in it): the caller then feeds the line's
        end and what follows, and the block ends as it would have (its `raw` is the stand-in
        and what followed, not the whole block)."""
        self._buf = bytearray(stand_in)
        self._pos = self._scanned = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if not self._bom_checked and not self._buf and chunk[0] != _BOM[0]:
            self._bom_checked = True  # no BOM: the first read may take the fast path too
        # `_CR` is an int: one memchr (a bytes operand is tried as an int first, and raises)
        if not self._bom_checked or _CR in chunk:
            return self._feed(chunk)
        events: list[SSEEvent] = []
        pos, n = 0, len(chunk)
        buf = self._buf
        if buf:
            # A block in progress (a read ended inside it): the general parser finishes it, up
            # to the first blank line, and the rest of the read goes the fast way again.
            if self._scanned != len(buf):
                return self._feed(chunk)  # a CR at the end of the last read is undecided
            if buf.endswith(b"\n") and chunk.startswith(b"\n"):
                pos = 1
            else:
                pos = chunk.find(b"\n\n") + 2
                if pos == 1:  # none: the block goes on
                    return self._feed(chunk)
            events = self._feed(chunk[:pos])
            if self._buf or pos == n:
                return events + (self._feed(chunk[pos:]) if pos < n else [])
        # Fast path: no block in progress, and the read goes on with whole `data: ...\n\n`
        # blocks (what every upstream sends per token). Each becomes an event straight from
        # `chunk`; the first block of any other shape, and whatever follows it, take the
        # general path.
        while pos < n and chunk.startswith(b"data: ", pos):
            eol = chunk.find(b"\n", pos + 6)
            if eol < 0 or eol + 1 >= n or chunk[eol + 1] != 0x0A:
                break
            data = chunk[pos + 6 : eol].decode("utf-8", "replace")
            events.append(SSEEvent(data=data, raw=chunk[pos : eol + 2]))
            pos = eol + 2
        if pos < n:
            events += self._feed(chunk[pos:] if pos else chunk)
        return events

    def _feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += chunk
        if not self._bom_checked:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []  # could still become a BOM
            self._bom_checked = True
            if buf.startswith(_BOM):
                self._pos = self._scanned = len(_BOM)
        events: list[SSEEvent] = []
        start, pos, n = 0, self._pos, len(buf)
        scan = max(pos, self._scanned)
        while True:
            lf = buf.find(b"\n", scan)
            # a CR before that LF (memchr both ways: a regex scans a megabyte line ~20x slower)
            eol = buf.find(b"\r", scan, n if lf < 0 else lf)
            if eol >= 0:
                end = eol + 2 if eol + 1 < n and buf[eol + 1] == 0x0A else eol + 1
            elif lf >= 0:
                eol, end = lf, lf + 1
            else:
                scan = n
                break
            if end == n and end - eol == 1 and buf[eol] == _CR:
                scan = eol  # a `\r` ending the read may be half of `\r\n`: decide next time
                break
            if eol == pos:
                with memoryview(buf) as view:  # one copy of the block, not two
                    raw = bytes(view[start:end])
                events.append(self._dispatch(raw))
                start = end
            else:
                self._line(buf, pos, eol)
            pos = scan = end
        if start == n:
            self._buf = bytearray()  # drop the old one's capacity: idle streams hold nothing
        elif start:
            del buf[:start]
        self._pos, self._scanned = pos - start, scan - start
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: the unterminated last block (any bytes left count, so `raw` adds up)."""
        buf = self._buf
        if not buf:
            return []
        pos, end = self._pos, len(buf)
        if buf.endswith(b"\r"):
            end -= 1
        if pos < end:
            self._line(buf, pos, end)
        event = self._dispatch(bytes(buf))
        buf.clear()
        self._pos = self._scanned = 0
        return [event]

    def _line(self, buf: bytearray, pos: int, eol: int) -> None:
        """The line `buf[pos:eol]` (not empty). Its value is copied once: a data line can be
        megabytes long."""
        if buf[pos] == 0x3A:  # ":" starts a comment
            self._had_comment = True
            return
        self._had_field = True
        colon = buf.find(b":", pos, eol)
        value: bytes | bytearray
        if colon < 0:
            name, value = bytes(buf[pos:eol]), b""
        else:
            name = bytes(buf[pos:colon])
            start = colon + 2 if colon + 1 < eol and buf[colon + 1] == 0x20 else colon + 1
            value = buf[start:eol]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:  # the spec ignores ids containing NUL
                self._id = value
        elif name == b"retry":
            # int() refuses strings over 4,300 digits (ValueError): an upstream's `retry: 9...9`
            # was an internal_error. No reconnection delay needs more than 10 digits.
            if value.isdigit() and len(value) <= _RETRY_DIGITS:
                self._retry = int(value)
        # other field names are ignored, as the spec says

    def _dispatch(self, raw: bytes) -> SSEEvent:
        data = self._data
        event = SSEEvent(
            event=None if self._event is None else self._event.decode("utf-8", "replace"),
            data=_joined(data).decode("utf-8", "replace") if data else None,
            id=None if self._id is None else self._id.decode("utf-8", "replace"),
            retry=self._retry,
            comment=self._had_comment and not self._had_field,
            raw=raw,
        )
        self._reset_block()
        return event
