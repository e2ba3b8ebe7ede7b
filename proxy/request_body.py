"""The type of a request body as hangup holds it from admission to the last resend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeAlias

# `bytes`, or for a large body the `bytearray` it grew in chunk by chunk as it arrived
# (`proxy/edge/body.py`): making one `bytes` of it would be a copy of the whole body (and a
# touch of as much fresh memory) in one step of the event loop, 40-55 ms for 60 MiB.
# Never changed once read: a hedge, a retry or a fallback resends it, accounting and the
# recorder read it after. As the union, mypy refuses item assignment and bytearray's mutating
# methods on it; code that needs a changed body builds a new one (`b"".join`, slices).
RequestBody: TypeAlias = bytes | bytearray

# Freeing a body this large returns its pages to the kernel: ~5-7 ms for 60 MiB (measured in
# bench.looplag), a step of its own.
LARGE_RELEASE_BYTES = 4 * 1024 * 1024


def release_in_turns(loop: asyncio.AbstractEventLoop, bodies: Iterable[RequestBody]) -> None:
    """Hold the large ones of `bodies` (distinct objects) and drop them one per loop
    iteration, so that a request that ends holding two 60 MiB bodies (the client's and a
    fallback's or an engine's copy) does not free both in its last step. Whatever still
    refers to a body elsewhere frees it where it lets go, as before."""
    held = list({id(body): body for body in bodies if len(body) >= LARGE_RELEASE_BYTES}.values())
    if len(held) < 2:
        return

    # As timers, not `call_soon`: a callback queued by the one before would run ahead of the
    # I/O and timers that came due meanwhile, so they would wait for two frees in a row.
    def drop_one() -> None:
        held.pop()
        if held:
            loop.call_later(0.0, drop_one)

    loop.call_later(0.0, drop_one)
