"""The one generation loop: paced tokens, behaviours, and exact counting.

Every endpoint, streaming or not, in the foreground or as a background job, runs `generate`.
It paces tokens on an absolute schedule (token k is due at ``origin + k / rate``), so a slow
write or a late wake-up never makes the stream drift, and it applies the behaviour that
interrupts a stream (stall, error, reset, malformed) after exactly ``after`` content tokens.

Output goes through a `Sink` (the socket, or a background job's event log) that counts what it
sent in a `Progress`; without an `Output`, tokens are generated (paced and counted) but not
sent, which is what a non-streaming request does until its body is ready.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from proxy.sim.behaviour import Behaviour, Name
from proxy.sim.formats import KEEPALIVE, StreamFormat
from proxy.sim.tokens import Plan


class Kind(enum.IntEnum):
    """What a piece of stream output is, so sinks count tokens without parsing bytes."""

    META = 0  # role, finish, usage, [DONE], empty deltas, errors, malformed events
    CONTENT = 1
    REASONING = 2
    KEEPALIVE = 3


@dataclass(slots=True)
class Progress:
    """What one stream produced; updated live, so a record can be read mid-stream."""

    generated: int = 0  # tokens generated (reasoning + content), sent or not
    chunks: int = 0  # events sent, keep-alive comments excluded
    keepalives: int = 0
    content_tokens: int = 0  # content tokens that went out (in chunks or in a body)
    reasoning_tokens: int = 0
    first_token_at: float | None = None  # first content token sent (time.monotonic())
    last_content_at: float | None = None
    last_sent_at: float | None = None

    def sent(self, kind: Kind, now: float) -> None:
        self.last_sent_at = now
        if kind is Kind.KEEPALIVE:
            self.keepalives += 1
            return
        self.chunks += 1
        if kind is Kind.CONTENT:
            self.content_tokens += 1
            self.last_content_at = now
            if self.first_token_at is None:
                self.first_token_at = now
        elif kind is Kind.REASONING:
            self.reasoning_tokens += 1


Sink = Callable[[bytes, Kind], Awaitable[None]]
End = Literal["completed", "error", "reset", "malformed", "truncated"]


@dataclass(slots=True)
class Output:
    fmt: StreamFormat
    sink: Sink


_INTERRUPTS = frozenset({Name.STALL, Name.ERROR, Name.RESET, Name.MALFORMED, Name.TRUNCATE})
# Unpaced generation (rate=0) yields to the loop this often, so one fast stream cannot starve
# the others.
_YIELD_EVERY = 64


async def generate(plan: Plan, b: Behaviour, progress: Progress, out: Output | None) -> End:
    """Run one generation. Returns how it ended; a stall only ends by cancellation."""
    start = time.monotonic()
    if progress.last_sent_at is None:
        progress.last_sent_at = start
    keepalive = b.keepalive if out is not None else None
    if out is not None:
        for data in out.fmt.head():
            await out.sink(data, Kind.META)
        for _ in range(b.empty_deltas):
            await out.sink(out.fmt.empty(), Kind.META)
    origin = start + plan.first_token_delay
    step = 1.0 / plan.rate if plan.rate > 0 else 0.0
    k = 0  # pacing index over reasoning + content tokens
    for i in range(plan.reasoning_tokens):
        await _wait_until(origin + k * step, k, out, keepalive, progress)
        k += 1
        progress.generated += 1
        if out is not None:
            piece = out.fmt.reasoning(i)
            if piece is not None:
                await out.sink(piece, Kind.REASONING)
            else:  # not streamed (completions, responses) but billed in the usage
                progress.reasoning_tokens += 1
    interrupt_at = None
    if b.name in _INTERRUPTS and b.after is not None:
        interrupt_at = min(b.after, plan.content_tokens)
    malformed = False
    for i in range(plan.content_tokens + 1):
        if i == interrupt_at:
            if b.name is Name.MALFORMED:
                malformed = True
                if out is not None:
                    await out.sink(out.fmt.malformed(), Kind.META)
            else:
                return await _interrupt(b, out, keepalive, progress)
        if i == plan.content_tokens:
            break
        await _wait_until(origin + k * step, k, out, keepalive, progress)
        k += 1
        progress.generated += 1
        if out is not None:
            await out.sink(out.fmt.content(plan.content_offset + i), Kind.CONTENT)
    if out is not None:
        for data in out.fmt.tail():
            await out.sink(data, Kind.META)
    return "malformed" if malformed and out is None else "completed"


async def _interrupt(
    b: Behaviour, out: Output | None, keepalive: float | None, progress: Progress
) -> End:
    if b.name is Name.STALL:
        await _wait_until(float("inf"), 0, out, keepalive, progress)
    if b.name is Name.TRUNCATE:
        return "truncated" if out is not None else "completed"
    if b.name is Name.ERROR:
        if out is not None:
            await out.sink(out.fmt.error(b.status, error_message(b.status)), Kind.META)
        return "error"
    return "reset"


def error_message(status: int) -> str:
    return f"Simulated upstream error (status {status})."


async def _wait_until(
    due: float, k: int, out: Output | None, keepalive: float | None, progress: Progress
) -> None:
    """Sleep until `due` (monotonic), sending keep-alives if asked. inf waits until cancelled."""
    while True:
        now = time.monotonic()
        if now >= due:
            if k and k % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            return
        wake = due
        if keepalive is not None and out is not None:
            last = progress.last_sent_at if progress.last_sent_at is not None else now
            wake = min(due, last + keepalive)
        if wake == float("inf"):
            await asyncio.get_running_loop().create_future()  # only cancellation ends this
        await asyncio.sleep(max(0.0, wake - now))
        if wake < due and out is not None:
            await out.sink(KEEPALIVE, Kind.KEEPALIVE)
