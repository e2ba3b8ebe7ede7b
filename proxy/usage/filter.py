"""Hiding injected usage from clients that did not ask for it."""

from __future__ import annotations

import re
from typing import Final

from proxy.sse import SSEEvent
from proxy.usage.event_kind import EVENT_USAGE_ONLY, EventKind
from proxy.usage.facts import RequestFacts

_USAGE_KEY: Final = b'"usage"'
# A usage value as OpenAI, vLLM and llama.cpp write it: null, or an object of numbers that may hold
# `*_details` objects one level down. Strings are never part of it, so braces cannot be quoted.
_USAGE_VALUE: Final = re.compile(rb"[ \t]*:[ \t]*(?:null|\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})[ \t]*")
_SPACE: Final = b" \t\r\n"
# How OpenAI-compatible servers end a chunk when include_usage is on: the member last, null.
_NULL_USAGE_END: Final = b',"usage":null}\n\n'
_CLOSED_END: Final = b"}\n\n"
_BLOCK_END: Final = b"\n\n"
_LARGE: Final = 64 * 1024  # an event this big is copied once, not twice
_NULL_USAGE_AT: Final = len(_NULL_USAGE_END) - 1  # where `"usage"` begins, from the end
# `cut_null_usage` of an event under `_LARGE` bytes is `raw[:NULL_USAGE_CUT] + CLOSED_END`:
# public for the pump's shaped read, which does it inline (a frame less a read).
NULL_USAGE_CUT: Final = -len(_NULL_USAGE_END)
CLOSED_END: Final = _CLOSED_END
CUT_INLINE_BELOW: Final = _LARGE


def strip_usage_member(raw: bytes) -> bytes:
    """`raw` without its last top-level-looking `"usage": ...` member, bytes otherwise unchanged.

    A `"usage"` preceded by `,` or `{` is a member name, never text inside a string: in JSON a
    quote inside a string is always escaped. The last match is taken because the chunk's own
    `usage` is serialised after `choices` by every upstream we know.
    """
    end = len(raw)
    while True:
        i = raw.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return raw
        end = i
        before = i - 1
        while before >= 0 and raw[before] in _SPACE:
            before -= 1
        if before < 0 or raw[before] not in b",{":
            continue
        m = _USAGE_VALUE.match(raw, i + len(_USAGE_KEY))
        if m is None:
            continue
        stop = m.end()
        if raw[before] == 0x2C:  # ",": drop from the comma to the end of the value
            return raw[:before] + raw[stop:]
        # first member: drop it and the comma after it (or nothing, if it was the only one)
        if raw[stop : stop + 1] == b",":
            stop += 1
        return raw[: before + 1] + raw[stop:]


class UsageChunkFilter:
    """Makes an injected-usage stream look to the client like the stream it asked for.

    Every data event loses its `usage` member (OpenAI's `"usage":null` on each chunk, vLLM's
    per-chunk objects); with `drop_usage_chunk` the usage-only chunk goes too. Bytes are edited,
    never re-encoded. `UsageChunkFilter.needed` says which filter, if any, a request needs.
    """

    __slots__ = ("_drop_usage_chunk",)

    def __init__(self, *, drop_usage_chunk: bool = True) -> None:
        self._drop_usage_chunk = drop_usage_chunk

    @property
    def drops_usage_chunk(self) -> bool:
        return self._drop_usage_chunk

    @classmethod
    def needed(cls, facts: RequestFacts, *, continuous: bool) -> UsageChunkFilter | None:
        """The filter for a stream whose body `inject_stream_usage(..., continuous)` changed.

        The client asked for no usage: hide it all. It asked for the final usage chunk but not
        for the per-chunk stats we added: hide only those. It asked for everything: None.
        """
        if not facts.include_usage_requested:
            return cls(drop_usage_chunk=True)
        if continuous and not facts.continuous_usage_requested:
            return cls(drop_usage_chunk=False)
        return None

    def client_bytes(self, event: SSEEvent, kind: EventKind) -> bytes:
        if kind is EVENT_USAGE_ONLY:
            return b"" if self._drop_usage_chunk else event.raw
        if event.data is None:
            return event.raw
        return _data_bytes(event.raw)

    @staticmethod
    def plain_bytes(run: bytes) -> bytes:
        """`client_bytes` of each event of `run`, joined: whole blocks of one `data:` line
        ended by LF LF (what `StreamUsageTracker.feed_plain` took), none usage-only.

        One `replace` over the run when every `"usage"` in it is an event's closing
        `,"usage":null}` (each block ends at its first LF LF, so that ending can only be a
        block's own); otherwise event by event."""
        first = run.find(_USAGE_KEY)
        if first < 0:
            return run
        if first == len(run) - _NULL_USAGE_AT and run.endswith(_NULL_USAGE_END):
            # the one `"usage"` is the last block's closing null (one event a read, usually)
            return _cut_null_usage(run)
        # Every `"usage"` was a closing null's when none is left once those are cut: each
        # `,"usage":null}` LF LF holds one, none overlaps another, and `}` LF LF makes none
        # with its neighbours. One search over the result where two counts over the run were
        # (each a pass over a read's bytes: a busy proxy's reads hold several events).
        cut = _CLOSED_END.join(run.split(_NULL_USAGE_END))  # (`replace`: see `cut_null_usages`)
        if cut.find(_USAGE_KEY) < 0:
            return cut
        blocks = run.split(_BLOCK_END)
        blocks.pop()  # the run ends with a block's end: the last piece is empty
        return b"".join([_data_bytes(block + _BLOCK_END) for block in blocks])

    def plain_bytes_around(self, run: bytes, usage_only: list[tuple[int, int]]) -> bytes:
        """`client_bytes` of each event of `run` (what `StreamUsageTracker.feed_plain` took),
        joined, where the blocks at the spans `usage_only` are usage-only chunks: those
        dropped or left as they are, the others as `plain_bytes` edits them."""
        parts, at = [], 0
        for start, end in usage_only:
            parts.append(self.plain_bytes(run[at:start]))
            if not self._drop_usage_chunk:
                parts.append(run[start:end])
            at = end
        parts.append(self.plain_bytes(run[at:]))
        return b"".join(parts)


def _data_bytes(raw: bytes) -> bytes:
    """A data event without its usage member."""
    if raw.endswith(_NULL_USAGE_END):  # what strip_usage_member would do, without a search
        return _cut_null_usage(raw)
    if raw.find(_USAGE_KEY) >= 0:  # (`in` tries the key as an int first: a raised TypeError)
        return strip_usage_member(raw)
    return raw


def _cut_null_usage(raw: bytes) -> bytes:
    """`raw`, which ends with `,"usage":null}` and its blank line, without that member."""
    if len(raw) < _LARGE:
        return raw[:NULL_USAGE_CUT] + _CLOSED_END
    with memoryview(raw) as view:  # one copy of a large event, not two (slice, then concat)
        return b"".join((view[: -len(_NULL_USAGE_END)], _CLOSED_END))


def cut_null_usages(run: bytes, ends: list[int]) -> bytes:
    """`UsageChunkFilter.plain_bytes(run)` of a run of blocks ending at `ends` (its last
    one is the run's end), each of which has `,"usage":null}` as its one `"usage"`, known
    from its `Shape` (`StreamUsageTracker.feed_plain`): each block cut where it ends, without
    the searches and counts over the whole run that `plain_bytes` needs to know that."""
    # Every `,"usage":null}` LF LF of the run is one of those ends (a block ends at its first
    # LF LF, and each block's one `"usage"` is that member), so cutting each such ending cuts
    # them all. `split` and `join` rather than `replace`, which goes over the run twice (it
    # counts first), and CPython's search steps a byte at a time over much of a JSON text (its
    # skip table takes most of the needle's letters, quotes and commas): a pass saved, ~25 %.
    return _CLOSED_END.join(run.split(_NULL_USAGE_END))


# `client_bytes` of a data event whose one `"usage"` is its closing `,"usage":null}` (known
# from its `Shape`: no search). The same function, not a wrapper: one call less per read.
cut_null_usage = _cut_null_usage
