"""One huge SSE event, passed through as it arrives (sans-I/O; the pump is `Downstream`).

An event whose line in progress grows over `LARGE_EVENT` (256 KiB) would otherwise be
completed in one step of the loop: the decoder's copy of the block, the text decode, the
parse, the usage cut, each over megabytes (~50 ms for a 15 MiB event). From that size on the
line is taken from the decoder
(`SSEDecoder.take_line`) and each read of it costs what the read's bytes cost:

- its bytes are forwarded as they come, except a short tail the usage filter may still have
  to cut: from the first `"usage"` member name on (in practice the event's last 16 bytes,
  `,"usage":null}` and its blank line), and any run of commas and spaces before it;
- its text goes into a `Skeleton` (proxy/usage/skeleton.py), which keeps the JSON around long
  strings and only the length of their text, and leaves out runs of small array elements
  (logprobs) once each read checked them, so the event's kind and token estimate come from a
  small parse at its end, the same as from the whole event's;
- at the line's end the decoder gets a stand-in line (`data: <skeleton>`, or `:` for a
  comment) and reads the rest of the block as usual.

Where the event goes is decided at its end, as for any event. What differs from an event
under the size: its start has gone out before its end was seen. An event that turns out to be
malformed, or a usage-only chunk the client did not ask for, cannot be dropped any more once
part of it went out; it is relayed whole (the usage member it ends with still cut) and
counted (`malformed_events`) as before. While nothing may go out (headers held for a
fallback, a continuation's first chunk), nothing goes out: the event is kept in its pieces
and decided at its end exactly as a smaller one, without joining it.

Not passed through, read whole at their end: a huge `event:`, `id:` or other field line, a
second huge line in one block, many data lines (at most `MAX_WHOLE_EVENT`, 1 MiB, in all: over
it the stream fails, proxy/sse_stream.py), and a skeleton that cannot answer (a marker where
accounting reads a value; a long run of JSON structure outside strings that is not a run of
objects or arrays, e.g. numbers or an object's many members): the whole event is then decoded
and parsed in one step (up to 16 MiB: the one leftover, To do in docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Final

from proxy.sse import SSEDecoder, SSEEvent
from proxy.usage.skeleton import MIN_RUN, Skeleton

__all__ = ["LARGE_EVENT", "LargeEvent", "passable"]

# An event line over this is passed through. Below it, completing an event in one step costs
# under ~1 ms here (copy, decode, parse and cut of 256 KiB); the first step of a pass-through
# handles what the decoder had buffered (this much and one read), ~2 ms. Real events are a
# few KiB: only an odd or hostile upstream sends one this long.
LARGE_EVENT: Final = 256 * 1024
_USAGE_KEY: Final = b'"usage"'
_SPACE_COMMA: Final = b", \t\r\n"
# A run of spaces and commas held back longer than this (only a hostile upstream sends one)
# holds the rest of the event, to be edited at its end in one step.
_HOLD_LIMIT: Final = 64 * 1024


def passable(decoder: SSEDecoder, size: int = LARGE_EVENT) -> bool:
    """Whether the decoder's line in progress can be passed through: one over `size` that is
    a data line or a comment."""
    return decoder.line_in_progress() > size and decoder.line_starts((b"data:", b":"))


class LargeEvent:
    """What one huge event carries from read to read.

    `feed` takes each read while the event lasts and says what may go to the client now and,
    at the block's end, the events the decoder completed (the first is this one, read with
    its stand-in line). `pieces` keeps the event's raw bytes (references to the reads, as the
    decoder's buffer held them before) for the end and for a whole read when the skeleton
    cannot answer."""

    __slots__ = (
        "_line_end",
        "_sealed",
        "_stand_in",
        "_tail",
        "edit",
        "forward",
        "pieces",
        "safe",
        "size",
        "skeleton",
        "skeleton_text",
    )

    def __init__(
        self,
        head: bytes,
        line: bytes,
        *,
        edit: bool,
        forward: bool,
        run: int = MIN_RUN,
        keep_text: bool = False,
    ) -> None:
        self.edit = edit  # a usage filter may cut part of the event: hold its tail
        # Its bytes go to the client as they come (else they are kept, and decided at the
        # end: headers held for a fallback, a continuation's first chunk, or a raw relay that
        # forwards the reads themselves).
        self.forward = forward
        self.pieces: list[bytes] = [head, line] if head else [line]
        self.size = len(head) + len(line)
        self.safe = 0  # bytes from the event's start that are final for the client
        self._sealed = False
        self._tail = b""
        self._line_end = -1  # the event's size when its huge line ended
        self.skeleton: Skeleton | None = None
        self.skeleton_text = ""
        self._stand_in = b":"
        if not line.startswith(b":"):
            value = 6 if line.startswith(b"data: ") else 5
            self.skeleton = Skeleton(run, keep_text=keep_text)
            self.skeleton.feed(line[value:])

    def block_rest(self, decoder: SSEDecoder) -> int:
        """Bytes of the block after the huge line that the decoder holds (0 while the line
        lasts; its stand-in, however long, not counted)."""
        return 0 if self._line_end < 0 else decoder.buffered - len(self._stand_in)

    def start(self) -> bytes:
        """The bytes that may go out at once (the event so far, less its held tail)."""
        pieces = self.pieces
        return self._advance(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def feed(self, chunk: bytes, decoder: SSEDecoder) -> tuple[bytes, list[SSEEvent] | None]:
        """One read: (what may go out now, the completed events or None). With events, the
        bytes of `chunk` past this event's block are the decoder's (in the later events or
        buffered)."""
        start = 0  # where the decoder's part of `chunk` begins
        if self._line_end < 0:
            lf = chunk.find(b"\n")
            cr = chunk.find(b"\r", 0, len(chunk) if lf < 0 else lf)
            end = cr if cr >= 0 else lf
            if end < 0:
                self._take(chunk)
                if self.skeleton is not None:
                    self.skeleton.feed(chunk)
                return self._advance(chunk), None
            self._line_end = self.size + end
            if self.skeleton is not None:
                self.skeleton.feed(chunk[:end], final=True)
                self.skeleton_text = self.skeleton.text()
                self._stand_in = b"data: " + self.skeleton_text.encode("utf-8", "surrogatepass")
            decoder.resume_line(self._stand_in)
            start = end
        # Bytes after the line the decoder had before this read.
        before = self.size - self._line_end + start
        events = decoder.feed(chunk[start:] if start else chunk)
        if not events:
            self._take(chunk)
            return self._advance(chunk), None
        # The first event's raw is the stand-in and every byte of the block after the line.
        part = chunk[: len(events[0].raw) - len(self._stand_in) - before + start]
        self._take(part)
        return self._advance(part), events

    def flush(self, decoder: SSEDecoder) -> list[SSEEvent]:
        """The end of the stream, after the line's end (the caller ends a stream cut inside
        the line itself: `upstream.check_end`)."""
        return decoder.flush()

    @property
    def in_line(self) -> bool:
        return self._line_end < 0

    def _take(self, part: bytes) -> None:
        self.pieces.append(part)
        self.size += len(part)

    def _advance(self, piece: bytes) -> bytes:
        """`piece` (the event's next bytes) less what must stay held; `safe` moves on."""
        if not self.edit:
            self.safe += len(piece)
            return piece
        if self._sealed or not piece:
            return b""
        seg = self._tail + piece if self._tail else piece
        at = seg.find(_USAGE_KEY)
        if at >= 0:
            # Held to the end: the cut may be anywhere from here. Before the first byte went
            # out, all of it: a usage-only chunk may still be dropped whole.
            self._sealed = True
            out = seg[: len(seg[:at].rstrip(_SPACE_COMMA))] if self.safe else b""
            self._tail = b""
        else:
            keep = len(seg[: max(0, len(seg) - len(_USAGE_KEY) + 1)].rstrip(_SPACE_COMMA))
            out, self._tail = seg[:keep], seg[keep:]
            self._sealed = len(self._tail) > _HOLD_LIMIT
        self.safe += len(out)
        return out

    def held(self) -> bytes:
        """At the end: the event's bytes from `safe` on (one join; short but for a hostile
        event whose `"usage"` comes early)."""
        skip, out = self.safe, []
        for piece in self.pieces:
            if skip >= len(piece):
                skip -= len(piece)
                continue
            out.append(piece[skip:] if skip else piece)
            skip = 0
        return b"".join(out)

    def safe_pieces(self) -> list[bytes]:
        """The event's first `safe` bytes, in its pieces (for an event that was kept)."""
        left, out = self.safe, []
        for piece in self.pieces:
            if left <= 0:
                break
            out.append(piece if len(piece) <= left else piece[:left])
            left -= len(piece)
        return out

    def last_safe_byte(self) -> bytes:
        left = self.safe
        for piece in self.pieces:
            if left <= len(piece):
                return piece[left - 1 : left] if left else b""
            left -= len(piece)
        return b""

    def whole(self) -> SSEEvent:
        """The event read whole from its bytes, as the decoder would have (the slow way)."""
        decoder = SSEDecoder()
        events = decoder.feed(b"".join(self.pieces)) or decoder.flush()
        return events[0]
