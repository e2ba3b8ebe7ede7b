"""The stream tracker's plain reads: whole `data:` blocks read from a read's bytes, without
an `SSEEvent` or the full parse (`feed_plain`), and the one-step read of one block of the last
content chunk's `Shape` (`feed_shaped`): what nearly every read of a generating stream takes.
Also the estimate of a content chunk's tokens (`chunk_tokens`).

`PlainReads` is a mixin of proxy/usage/stream.py's `StreamUsageTracker`, with no slots of its
own: the counts it moves are the tracker's. The general path (`StreamUsageTracker.feed`) and
tests/test_usage_plain.py, which holds the two equal, are there.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from operator import add, itemgetter
from typing import Any, Final, Protocol

from proxy.usage.event_kind import EVENT_CONTENT, EVENT_USAGE_ONLY, EventKind
from proxy.usage.fast import (
    TEXT_BREAK,
    ChunkFields,
    Shape,
    choice_sizes,
    parse_object,
    read_chunk,
    shape_of,
)
from proxy.usage.prompt import CHARS_PER_TOKEN

# Streamed completion estimate: see `chunk_tokens`.
SINGLE_TOKEN_MAX_CHARS: Final = 12
# A stream whose chunks keep changing around their text (a per-chunk timestamp or padding)
# stops looking for a `Shape` after this many misses.
_SHAPE_MISSES: Final = 4
# Each `_shaped_run` goes over the rest of the read: a read tries at most this many (a read
# whose shaped blocks alternate with others, which only a hostile upstream sends, is not
# gone over once a block).
_RUN_TRIES: Final = 4


def chunk_tokens(chars: int) -> int:
    """Completion tokens one content chunk stands for, when the upstream does not say.

    OpenAI, vLLM and llama.cpp send one token per chunk, and a single token is rarely longer than
    12 characters (" Information" is one token); so a chunk counts one token, plus one per further
    4 characters or part when it is longer than that (upstreams that batch several tokens per
    chunk). Chunks are counted, not characters overall, because word-salad and code have long
    tokens: on the llama.cpp completions fixture ceil(chars / 4) says 17 where the truth is 12.
    """
    if chars <= SINGLE_TOKEN_MAX_CHARS:
        return 1
    return 1 + -(-(chars - SINGLE_TOKEN_MAX_CHARS) // CHARS_PER_TOKEN)


# What `feed_plain` took: where it ends, content blocks, the shaped blocks' ends, the spans
# of the usage-only blocks.
PlainRun = tuple[int, int, list[int] | None, list[tuple[int, int]] | None]


def _shaped_run(
    chunk: bytes, pos: int, lead: bytes, trail: bytes, ascii: bool
) -> tuple[list[bytes], list[int]] | None:
    """The run of blocks of one shape (`lead text trail`, each text with no quote,
    backslash or control character, and valid UTF-8) at `pos` of `chunk`, found in a few
    calls over the read rather than a round of `feed_plain`'s block loop each (a busy proxy
    reads several events at once): their texts and the texts' sizes in characters; None
    when the block at `pos` is not one.

    Split where each trail is: a trail ends with LF LF and a lead holds no LF, so a trail
    stands nowhere in a lead, nor in a text (no quote), and each piece but the first is a
    block's lead and text when the block is one. The run ends before the first piece that
    does not begin with the lead, or before the first text the check refuses. Not split
    where `trail + lead` is, as before: for a separator of 100 bytes or more (a lead is
    ~200) in a read over 2,500 bytes, CPython's search prepares its two-way tables again
    for every piece it finds (~8k instructions a block, measured with callgrind)."""
    start = pos + len(lead)
    pieces = chunk[start:].split(trail)
    pieces.pop()  # what follows the last trail: no block of the run
    if not pieces:
        return None
    if len(pieces) > 1:
        texts = list(map(itemgetter(slice(len(lead), None)), pieces))
        texts[0] = pieces[0]
        # Each piece began with the lead when the run's bytes are the texts with their
        # trails and leads between them (a copy and a compare, not a test a piece).
        if not chunk.startswith((trail + lead).join(texts), start):
            for i in range(1, len(pieces)):
                if not pieces[i].startswith(lead):
                    del texts[i:]
                    break
        pieces = texts
    broken = TEXT_BREAK(b"".join(pieces))
    if broken is not None:  # the run ends before the text that holds it
        pieces = pieces[: bisect_right(list(accumulate(map(len, pieces))), broken.start())]
        if not pieces:
            return None
    if ascii:
        return pieces, list(map(len, pieces))
    sizes = []
    for text in pieces:
        try:
            sizes.append(len(text.decode()))
        except UnicodeDecodeError:  # invalid UTF-8: the run ends before it (the parse reads it)
            break
    return (pieces[: len(sizes)], sizes) if sizes else None


def _responses_event(obj: dict[str, Any]) -> bool:
    """A Responses API event (or its error): `feed` reads those its own way."""
    kind = obj.get("type")
    return isinstance(kind, str) and (kind.startswith("response.") or kind == "error")


class _Tracker(Protocol):
    """What a plain read reads and moves: `StreamUsageTracker`'s state."""

    _fast: bool
    _shape: Shape | None
    _shape_misses: int
    _declined: bytes | None
    _others: dict[int, list[int]] | None
    _chunks0: int
    _chars0: int
    _estimated: int
    _estimated_reasoning: int
    _est_since_report: int
    generated: int
    content_chunks: int
    done: bool

    def _tally(self, index: int, chars: int) -> None: ...

    def _chunk(self, obj: dict[str, Any]) -> EventKind: ...

    def _fields(self, chunk: ChunkFields) -> EventKind: ...


class PlainReads:
    """`StreamUsageTracker`'s plain reads: a mixin, whose state is the tracker's
    (`_Tracker`)."""

    # Slots are StreamUsageTracker's: an empty tuple here keeps the tracker free of a dict.
    __slots__ = ()

    # The two fields set here whose types the tracker declares (for the type checker).
    _others: dict[int, list[int]] | None
    _declined: bytes | None

    def feed_shaped(self: _Tracker, chunk: bytes) -> Shape | None:
        """`feed_plain` of a read that is one block of the last content chunk's `Shape` with
        some text (the usual read of a generating stream), in one step: its shape, or None
        (nothing fed) when the read is anything else. The caller's conditions are
        `feed_plain`'s."""
        shape = self._shape
        if shape is None:
            return None
        lead, trail = shape.lead, shape.trail  # `data: ` + head, tail + LF LF
        start, stop = len(lead), len(chunk) - len(trail)
        if (
            start >= stop
            or not chunk.startswith(lead)
            or not chunk.endswith(trail)
            or TEXT_BREAK(chunk, start, stop) is not None
        ):
            return None  # (no LF in the text or its shape: one block, ended where it ends)
        if chunk.isascii():
            chars = stop - start
        else:
            try:
                chars = len(chunk[start:stop].decode())
            except UnicodeDecodeError:
                return None  # invalid UTF-8: the full parse reads it
        tokens = 1 if chars <= SINGLE_TOKEN_MAX_CHARS else chunk_tokens(chars)
        self._estimated += tokens
        self._est_since_report += tokens
        self.generated += tokens
        if shape.index:
            self._tally(shape.index, chars)
        else:
            self._chunks0 += 1
            self._chars0 += chars
        self.content_chunks += 1
        return shape

    def feed_plain(self: _Tracker, chunk: bytes) -> PlainRun:
        """`feed` the events at the front of `chunk` that need no `SSEEvent`: whole blocks of
        one `data: ...` line ended by LF LF, whose data is `[DONE]`, a chunk `content_sizes`
        reads, or any other JSON object msgspec reads from the bytes that is not a Responses
        event (the stream's finish and usage chunks: `_chunk` of it, as `feed` would do).
        Returns where they end (0: none taken), how many carried content, when every block
        taken was of the last content chunk's `Shape` with `,"usage":null}` as its one
        `"usage"` (`Shape.null_usage`) where each of them ends (else None: a usage filter
        then cuts there without searching the run, `cut_null_usages`), and the spans of the
        usage-only blocks among them (None: none), which a usage filter may drop.

        The caller passes a read that begins a block (`SSEDecoder.at_boundary`) and holds no
        CR, and gives the decoder only the rest: each block taken here is an event with just
        `data` set (the decoder's fast path), fed exactly as `feed` would take it, without
        decoding its text first. tests/test_usage_plain.py holds the two paths equal."""
        if not self._fast:
            return 0, 0, None, None
        pos, n, contents = 0, len(chunk), 0
        parsed = 0  # blocks of the full parse that carried content (counted by `_chunk`)
        usage_only: list[tuple[int, int]] | None = None
        estimated = estimated_reasoning = 0
        chunks0 = chars0 = 0  # choice 0's, added once at the end
        ascii = chunk.isascii()  # once for the read: then a text's size is its length
        # The shaped blocks' ends (None once a block of any other kind is taken).
        ends: list[int] | None = []
        shape = self._shape
        if shape is not None:  # its fields in locals: read once per read, not per block
            lead, trail, index, cut = shape.lead, shape.trail, shape.index, shape.null_usage
            lead_size, trail_size = len(lead), len(trail)
        run_tries = _RUN_TRIES  # `_shaped_run`s left for this read
        while True:
            if shape is not None and chunk.startswith(lead, pos):
                if run_tries and not index:
                    run_tries -= 1
                    run = _shaped_run(chunk, pos, lead, trail, ascii)
                    if run is not None:
                        run_texts, run_sizes = run
                        blank = run_sizes.count(0)
                        contents += len(run_sizes) - blank
                        chunks0 += len(run_sizes) - blank
                        chars0 += sum(run_sizes)
                        if max(run_sizes) <= SINGLE_TOKEN_MAX_CHARS:
                            estimated += len(run_sizes) - blank
                        else:
                            estimated += sum(map(chunk_tokens, filter(None, run_sizes)))
                        block = lead_size + trail_size
                        # where each block ends: its start, its text, the trail
                        run_ends = map(
                            add,
                            accumulate(map(len, run_texts)),
                            range(pos + block, pos + block * len(run_texts) + 1, block),
                        )
                        if ends is not None:
                            if cut:
                                ends.extend(run_ends)
                                pos = ends[-1]
                            else:
                                ends = None
                        if ends is None:
                            pos += block * len(run_texts) + sum(map(len, run_texts))
                        continue
                # The last content chunk's bytes around a new text: no parse (see `Shape`).
                # The text ends at the first quote, where the trail (`"` + tail + LF LF) must
                # begin; a text with no control character either, and no LF in the lead or
                # the tail: the block is the lead, the text and the trail (what finding the
                # block's end and matching its two ends would say). The quote is found before
                # the next block's lead ends (a lead holds quotes): one pass over a read.
                # (The lead begins with `data: `: no separate test of that here.)
                start = pos + lead_size
                stop = chunk.find(0x22, start)  # `"` as an int: one memchr
                if (
                    stop >= 0
                    and chunk.startswith(trail, stop)
                    and TEXT_BREAK(chunk, start, stop) is None
                ):
                    if ascii:
                        chars = stop - start
                    else:
                        try:
                            chars = len(chunk[start:stop].decode())
                        except UnicodeDecodeError:
                            chars = -1  # invalid UTF-8: the parse below refuses it too
                    if chars > 0:
                        estimated += 1 if chars <= SINGLE_TOKEN_MAX_CHARS else chunk_tokens(chars)
                        if index:
                            self._tally(index, chars)
                        else:
                            chunks0 += 1
                            chars0 += chars
                        contents += 1
                    if chars >= 0:  # (0: an empty text, no output, as `content_sizes` says)
                        pos = stop + trail_size
                        if ends is not None:
                            if cut:
                                ends.append(pos)
                            else:
                                ends = None
                        continue
            elif not chunk.startswith(b"data: ", pos):
                break
            eol = chunk.find(b"\n", pos + 6)
            if eol < 0 or eol + 1 >= n or chunk[eol + 1] != 0x0A:
                break
            data = chunk[pos + 6 : eol]
            if data == b"[DONE]":
                self.done = True
            else:
                # Its typed fields: `content_sizes` of a content chunk, and a finish or usage
                # chunk read by `_fields` (as `_chunk` reads its full parse) in the same step.
                fields = read_chunk(data)
                sizes = (
                    None
                    if fields is None or fields.usage is not None
                    else choice_sizes(fields.choices)
                )
                if sizes is None:
                    obj = None
                    if fields is None:
                        # The full parse, from the bytes: what `feed` would parse from their
                        # text (msgspec reads both alike, and refuses invalid UTF-8).
                        obj = parse_object(data)
                        if obj is None or _responses_event(obj):
                            self._declined = data
                            break  # not a chat chunk, or not JSON: the decoder and `feed` decide
                    if contents:  # the counts so far first: `_chunk` may report usage
                        self._chunks0 += chunks0
                        self._chars0 += chars0
                        self._estimated += estimated
                        self._est_since_report += estimated
                        self.generated += estimated
                        self._estimated_reasoning += estimated_reasoning
                        self.content_chunks += contents
                        parsed += contents
                        contents = estimated = estimated_reasoning = chunks0 = chars0 = 0
                    if obj is not None:
                        kind = self._chunk(obj)
                    else:
                        assert fields is not None  # (read, with a usage or a finish)
                        kind = self._fields(fields)
                    if kind is EVENT_CONTENT:
                        parsed += 1
                    elif kind is EVENT_USAGE_ONLY:
                        if usage_only is None:
                            usage_only = []
                        usage_only.append((pos, eol + 2))
                    pos = eol + 2
                    ends = None
                    continue
                if len(sizes) == 1 and not sizes[0][2] and self._shape_misses < _SHAPE_MISSES:
                    if shape is not None:
                        self._shape_misses += 1
                    assert fields is not None  # (sizes were read from it)
                    shape = self._shape = shape_of(data, fields)
                    if shape is not None:
                        lead, trail, index = shape.lead, shape.trail, shape.index
                        lead_size, trail_size = len(lead), len(trail)
                        cut = shape.null_usage
                if sizes:
                    # `_count` of each, inline (this runs for nearly every event of a stream)
                    for choice, chars, reasoning in sizes:
                        total = chars + reasoning
                        tokens = chunk_tokens(total)
                        estimated += tokens
                        if reasoning and not chars:
                            estimated_reasoning += tokens
                        if choice:
                            self._tally(choice, total)
                        else:
                            chunks0 += 1
                            chars0 += total
                    contents += 1
            pos = eol + 2
            ends = None
        if contents:
            self._chunks0 += chunks0
            self._chars0 += chars0
            self._estimated += estimated
            self._est_since_report += estimated
            self.generated += estimated
            self._estimated_reasoning += estimated_reasoning
            self.content_chunks += contents
        return pos, contents + parsed, ends or None, usage_only

    def _tally(self: _Tracker, index: int, chars: int) -> None:
        """One content chunk of a choice other than 0."""
        others = self._others
        if others is None:
            others = self._others = {}
        counts = others.get(index)
        if counts is None:
            others[index] = [1, chars]
        else:
            counts[0] += 1
            counts[1] += chars
