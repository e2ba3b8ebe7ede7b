"""Accounting a large answer must not stall the event loop that every other request shares.

A 6 MB embeddings answer goes through the production runner while a probe task timestamps its
own wake-ups and a second client keeps sending small requests. Between the big answer's last
byte (`record.ended_at`) and its record being published (usage found, cost computed), no
wake-up of the probe may come more than 20 ms late, and the small requests that overlapped that
window must not take 20 ms longer than the small requests before it. Parsing the whole answer
on the loop (what `body_usage` did before it learnt to read the tail) took 155 ms here.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import statistics
from typing import Any

import aiohttp
from aiohttp import web

from proxy.outcome import Outcome, RequestRecord
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.support import make_config

LAG_BOUND_S = 0.020
INPUTS = 50_000  # 8 floats an input: a ~6 MB answer
PROBE_INTERVAL_S = 0.002


class Probe:
    """Wakes every PROBE_INTERVAL_S and records how late each wake-up was."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []  # (when it should have woken, lateness)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PROBE_INTERVAL_S
            await asyncio.sleep(PROBE_INTERVAL_S)
            self.wakes.append((due, loop.time() - due))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def stalled_within(self, start: float, end: float) -> float:
        """The longest time inside [start, end] that a pending wake-up waited past its due time:
        how long the loop could not run anything else there."""
        stalls = [
            min(due + lateness, end) - max(due, start)
            for due, lateness in self.wakes
            if due <= end and due + lateness >= start
        ]
        # None pending: the probe's next wake-up was due after the window, so it waited for
        # nothing in it.
        return max(stalls, default=0.0)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


async def test_accounting_a_6mb_answer_does_not_stall_other_requests(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    server, sink = await start_proxy(make_config(sim.base_url))
    loop = asyncio.get_running_loop()
    published: dict[str, float] = {}

    def on_record(record: RequestRecord) -> None:
        published.setdefault(record.request_id, loop.time())

    server.state.listeners.append(on_record)
    url = f"{server.base_url}/v1/embeddings"
    small_body = {"model": "text-embedding-3-small", "input": "hello"}
    big_body = {"model": "text-embedding-3-small", "input": [f"w{i}" for i in range(INPUTS)]}
    small: list[tuple[float, float]] = []  # (sent, answered) of each small request
    big_done = asyncio.Event()

    async with aiohttp.ClientSession() as session:

        async def one_small() -> None:
            sent = loop.time()
            async with session.post(url, json=small_body) as response:
                assert response.status == 200
                await response.read()
            small.append((sent, loop.time()))

        for _ in range(20):  # the baseline: small requests with nothing else going on
            await one_small()
        baseline = statistics.median(answered - sent for sent, answered in small)
        small.clear()

        async def keep_sending() -> None:
            while not big_done.is_set():
                await one_small()

        probe = Probe()
        probe.start()
        sender = loop.create_task(keep_sending())
        async with session.post(url, json=big_body, headers={"x-request-id": "big"}) as response:
            assert response.status == 200
            size = len(await response.read())  # read, never parsed: this loop is the proxy's
        record: RequestRecord = await sink.wait_for("big", timeout=10.0)
        big_done.set()
        await sender
        await probe.stop()

    assert size > 6_000_000
    assert record.outcome is Outcome.COMPLETED and record.ended_at is not None
    # The usage was found (reported, not estimated) without parsing the body.
    assert record.usage.prompt_tokens == INPUTS and not record.usage.prompt_estimated
    # From the answer's last byte to its record: usage found, cost computed, metrics and log.
    window = (record.ended_at, published["big"])
    stall = probe.stalled_within(*window)
    # How long each small request in flight then was held up by that window.
    held = [overlap(window, request) for request in small if overlap(window, request) > 0]
    print(
        f"answer {size / 1e6:.1f} MB; accounted in {(window[1] - window[0]) * 1000:.2f} ms; "
        f"loop stalled {stall * 1000:.2f} ms in it; small requests: baseline "
        f"{baseline * 1000:.2f} ms, {len(held)} in flight during the accounting, held "
        f"{max(held, default=0) * 1000:.2f} ms at most"
    )
    assert stall <= LAG_BOUND_S, f"the loop stalled {stall * 1000:.1f} ms while accounting"
    assert held, "no small request was in flight while the answer was accounted"
    assert max(held) <= LAG_BOUND_S, held


async def test_a_gzip_answer_is_decoded_off_the_loop_and_its_usage_found(
    aiohttp_server: Any, start_proxy: StartProxy
) -> None:
    """Compressed answers must be decoded before their usage can be read: a large one is
    decoded in a worker thread (zlib releases the GIL), then only its tail is read."""
    data = [{"object": "embedding", "index": i, "embedding": [0.123456] * 8} for i in range(INPUTS)]
    answer = {"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": 4242}}
    compressed = gzip.compress(json.dumps(answer).encode())

    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    upstream = await aiohttp_server(app)
    server, sink = await start_proxy(make_config(f"http://127.0.0.1:{upstream.port}/v1"))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            f"{server.base_url}/v1/embeddings",
            json={"model": "m", "input": "hello"},
            headers={"x-request-id": "gz"},
        ) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == compressed  # relayed as it came
    record = await sink.wait_for("gz", timeout=10.0)
    assert len(compressed) > 64 * 1024  # large enough to be decoded in the worker thread
    assert record.usage.prompt_tokens == 4242 and not record.usage.prompt_estimated
    assert record.usage.completion_tokens == 0 and not record.usage.completion_estimated
