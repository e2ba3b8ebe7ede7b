"""A request's path never looks the event loop up itself: on Python 3.11 every
`asyncio.get_running_loop()`, `asyncio.current_task()` without a loop and
`asyncio.get_event_loop()` is a getpid() syscall (the C lookup checks the loop's process id),
seven of them a completion before hangup passed the loop it already had (`Exchange.loop`, aiohttp's
loop for the request; `Upstreams`' loop, found once at start). callgrind does not see a syscall,
so this guards the count: the lookups made from proxy code (the simulator's excepted) while
the production runner relays a completion and a stream."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

import proxy
from proxy.outcome import Outcome
from proxy.server import ProxyServer
from tests.conftest import chat
from tests.support import RecordSink

PROXY_DIR = str(Path(proxy.__file__).parent)
SIM_DIR = str(Path(proxy.__file__).parent / "sim")
ASYNCIO_DIR = str(Path(asyncio.events.__file__).parent)
LOOKUPS = frozenset({"get_running_loop", "_get_running_loop", "get_event_loop"})


def _caller(frame: FrameType | None) -> str | None:
    """The nearest frame outside asyncio: who asked (`current_task()` asks through asyncio)."""
    while frame is not None and frame.f_code.co_filename.startswith(ASYNCIO_DIR):
        frame = frame.f_back
    return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_code.co_name}"


@contextmanager
def lookups_by_proxy_code() -> Iterator[Counter[str]]:
    seen: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) in LOOKUPS:
            caller = _caller(frame)
            if caller and caller.startswith(PROXY_DIR) and not caller.startswith(SIM_DIR):
                seen[caller] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


async def test_a_completion_and_a_stream_never_look_the_loop_up(
    proxy: tuple[ProxyServer, RecordSink],
) -> None:
    server, sink = proxy
    url = server.base_url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as client:
        # A first request of each kind outside the count: one-time setup is not per request.
        for stream in (False, True):
            async with client.post(url, json=chat("normal:tokens=3", stream=stream)) as answer:
                await answer.read()
        with lookups_by_proxy_code() as seen:
            for stream in (False, True, False):
                body = chat("normal:tokens=3", stream=stream)
                async with client.post(url, json=body) as answer:
                    assert answer.status == 200
                    await answer.read()
            await sink.wait(lambda: len(sink.records) >= 5, 5.0, "five records")
    assert [r.outcome for r in sink.records] == [Outcome.COMPLETED] * 5
    assert seen == Counter()
