"""The request path reads the loop's clock as `loop_clock` gives it: `time.monotonic` itself
where `loop.time()` is asyncio's own (the same values, without a frame), the loop's own `time`
anywhere else; the upstream seam decides the same way, once."""

from __future__ import annotations

import asyncio
import time

from multidict import CIMultiDict
from yarl import URL

from proxy.sse_stream import loop_clock
from proxy.upstream import Upstreams


class _OwnClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is not asyncio's: it runs 1,000 s ahead."""

    def time(self) -> float:
        return time.monotonic() + 1000.0


def test_asyncios_clock_is_read_as_time_monotonic() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loop_clock(loop) is time.monotonic
        before = loop.time()
        reading = loop_clock(loop)()
        assert before <= reading <= loop.time()  # the same clock
    finally:
        loop.close()


def test_a_loop_with_its_own_clock_is_read_through_it() -> None:
    loop = _OwnClockLoop()
    try:
        clock = loop_clock(loop)
        assert clock == loop.time
        assert clock() > time.monotonic() + 999.0
    finally:
        loop.close()


def _upstreams_clock(loop: asyncio.AbstractEventLoop) -> float:
    async def started() -> float:
        upstreams = Upstreams()
        await upstreams.start()
        try:
            attempt = upstreams.attempt(
                "u",
                "POST",
                URL("http://127.0.0.1:9/v1/x"),
                headers=CIMultiDict(),
                body=b"",
                on_headers_sent=lambda: None,
            )
            return attempt._hooks.clock()
        finally:
            await upstreams.close()

    try:
        return loop.run_until_complete(started())
    finally:
        loop.close()


def test_an_attempt_reads_its_loops_clock() -> None:
    assert _upstreams_clock(_OwnClockLoop()) > time.monotonic() + 999.0
    assert _upstreams_clock(asyncio.new_event_loop()) <= time.monotonic()
