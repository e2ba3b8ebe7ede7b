"""One relayed SSE stream's state from read to read (`StreamState`), a read's output in
pieces (`Pieces`), and the failures that end a stream before its content. Used by the pump in
`proxy.sse_relay`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

from aiohttp.http_writer import StreamWriter

from proxy.admission import Plan
from proxy.attempts import Attempt, AttemptResult
from proxy.errors import UpstreamFailed
from proxy.secrets import StreamScrubber
from proxy.sse_large import LARGE_EVENT, LargeEvent
from proxy.upstream_errors import AttemptFailed
from proxy.usage import StreamUsageTracker
from proxy.usage.skeleton import MIN_RUN
from proxy.watchdog import Watchdog

MAX_SSE_EVENT = 16 * 1024 * 1024  # one event; an upstream that never ends one is broken
# An event that cannot pass through (proxy/sse_large.py passes one huge data line) is completed
# in one step of the loop: at most this large, or the stream fails. Its step costs up to ~6 ms
# of CPU a MiB here (data lines holding a JSON array of numbers; an `event:` line 0.2 ms, text
# 1.4 ms). Only a broken or hostile upstream sends one larger: an `event:`, `id:` or unknown
# field line of megabytes, a block of many data lines, a second huge data line in one block.
MAX_WHOLE_EVENT = 1024 * 1024
_CR = b"\r"
WRITE_PIECE = 1024 * 1024  # a larger output goes to the client in pieces of this size
# Bytes of events held back before the first content token while a switch is possible; an
# upstream that sends more than this without content is broken, and memory stays bounded.
HOLD_CAP = 1024 * 1024


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The loop's clock, read the cheapest way: asyncio's `BaseEventLoop.time` is a Python
    method returning `time.monotonic()`, so on that loop the C function itself (the same
    clock, one frame less per read); any other loop's own `time`."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def held_too_much(upstream: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" sent over {HOLD_CAP // 1024} KiB of events before any content'
        ),
    )


def too_large(upstream: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" sent an SSE event over '
            f"{MAX_SSE_EVENT // (1024 * 1024)} MiB without ending it"
        ),
    )


def too_large_whole(upstream: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" sent an SSE event over '
            f"{MAX_WHOLE_EVENT // (1024 * 1024)} MiB that is not one data line"
        ),
    )


def failed_before_content(upstream: str, tracker: StreamUsageTracker) -> AttemptFailed:
    return AttemptFailed(
        AttemptResult.STREAM_ERROR,
        UpstreamFailed(
            f'upstream "{upstream}" failed the stream before any '
            f"content: {(tracker.error or '')[:200]}"
        ),
    )


def content_text(data: str | None) -> str:
    """The text of choice 0 in a chat chunk (for continuing a cut stream)."""
    try:
        obj = json.loads(data or "")
        delta = obj["choices"][0]["delta"]
        text = delta.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


class StreamState:
    """What one attempt's SSE relay carries from one upstream read to the next."""

    # A huge event's thresholds (class attributes: no bytes per stream; tests subclass): an
    # event line over `large_at` passes through, text stretches of `large_run` characters or
    # more may stand as markers; an event read whole may hold `whole_max` bytes at most.
    large_at = LARGE_EVENT
    large_run = MIN_RUN
    whole_max = MAX_WHOLE_EVENT

    __slots__ = (
        "attempt",
        "before",
        "chunk_filter",
        "clock",
        "collect_text",
        "deadlines",
        "direct",
        "held",
        "held_bytes",
        "large",
        "malformed",
        "pending",
        "plain",
        "raw_mode",
        "steady",
        "watchdog",
    )

    def __init__(
        self, plan: Plan, watchdog: Watchdog, attempt: Attempt, holding: bool, continuing: bool
    ) -> None:
        self.attempt, self.watchdog, self.deadlines = attempt, watchdog, plan.deadlines
        self.chunk_filter = plan.usage_filter
        # Events of this attempt not yet sent: before its first content, while a switch to
        # another target is still possible, nothing but keep-alive comments goes out.
        self.held: list[bytes] | None = [] if holding else None
        self.held_bytes = 0
        self.large: LargeEvent | None = None  # a huge event in progress (proxy/sse_large.py)
        self.malformed = 0
        self.collect_text = plan.route.options.continue_cut_streams
        # Whole plain data events may skip the decoder (`_sse_step`); not when their text is
        # collected for a continuation.
        self.plain = not self.collect_text
        # The last read went whole the plain way (`_sse_step`): the decoder still holds nothing
        # and the plain path's other conditions still hold, so the next read need not ask.
        self.steady = False
        # Nothing to hold, filter or drop: bytes go on as they come, partial events included
        # (a slow event is not delayed until its end). Otherwise the stream is relayed event
        # by event, and malformed events are dropped.
        self.raw_mode = self.chunk_filter is None and not holding and not continuing
        # When the pump's wait for the next read began (the end of its last write or step).
        self.before = 0.0
        # Set once reads may be taken while the pump waits (`SteadyRelay.take_steady`): the
        # client's writer and the loop's clock.
        self.direct: StreamWriter | None = None
        self.clock: Callable[[], float] = time.monotonic
        # The client's bytes of the reads taken so far in the upstream's current read, written
        # at its end (`SteadyRelay.flush_steady`).
        self.pending: bytes | None = None


class Pieces:
    """The client's bytes of one read, left in pieces (one of them huge, or many of a huge
    event) to be written one by one: scrubbed as they are written, none over `WRITE_PIECE`,
    so that no step of the loop handles more than a piece. `len` is the total before
    scrubbing."""

    __slots__ = ("end", "pieces", "scrubber", "size")

    def __init__(self, pieces: list[bytes], scrubber: StreamScrubber, *, end: bool) -> None:
        self.pieces, self.size = pieces, sum(map(len, pieces))
        self.scrubber, self.end = scrubber, end

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        scrubber = self.scrubber
        for piece in self.pieces:
            for start in range(0, len(piece), WRITE_PIECE):
                if part := scrubber.feed(piece[start : start + WRITE_PIECE]):
                    yield part
        if self.end and (rest := scrubber.flush()):
            yield rest

    def join(self) -> bytes:
        return b"".join(self)
