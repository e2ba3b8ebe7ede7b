"""The event-loop lag probe (proxy/looplag.py) and its histogram on /metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from proxy.looplag import YOUNG_COLLECTION_AT, LoopLagProbe
from proxy.metrics import Metrics
from tests.conftest import StartProxy
from tests.support import make_config


def _block(seconds: float) -> None:
    time.sleep(seconds)  # a callback that holds the loop, on purpose


async def test_probe_sees_a_callback_that_held_the_loop() -> None:
    samples: list[float] = []
    seen, warm = asyncio.Event(), asyncio.Event()

    def observe(lag: float) -> None:
        samples.append(lag)
        if len(samples) >= 3:
            warm.set()
        if lag >= 0.03:
            seen.set()

    probe = LoopLagProbe(observe, interval=0.005)
    probe.start()
    try:
        async with asyncio.timeout(5):
            await warm.wait()  # a few healthy ticks first
            asyncio.get_running_loop().call_soon(_block, 0.05)
            await seen.wait()
    finally:
        probe.stop()
    assert 0.03 <= max(samples) < 1.0
    count = len(samples)
    await asyncio.sleep(0.03)
    assert len(samples) == count  # stopped means stopped


def _lag_buckets(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hangup_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


async def test_metrics_export_the_lag_of_a_blocked_loop(start_proxy: StartProxy) -> None:
    server, _ = await start_proxy(make_config("http://127.0.0.1:9/v1"))
    async with aiohttp.ClientSession() as session:

        async def slow_samples() -> float:
            async with session.get(f"{server.base_url}/metrics") as resp:
                buckets = _lag_buckets(await resp.text())
            return buckets["+Inf"] - buckets["0.025"]

        before = await slow_samples()
        async with asyncio.timeout(5):
            while True:
                # This test shares the proxy's loop: hold it for 200 ms. The probe's timer is due
                # at most 50 ms after its last tick, so the lag it sees is at least 150 ms, over
                # the 25 ms bucket whatever the phase (a 60 ms hold could show as 10 ms).
                _block(0.2)
                await asyncio.sleep(0.06)
                if await slow_samples() > before:
                    break


async def test_metrics_are_rendered_off_the_event_loop(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape at the label bound renders for ~100 ms of pure Python: not on the loop."""
    threads: list[str] = []
    real = Metrics.render

    def spy(self: Metrics) -> tuple[bytes, str]:
        threads.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(Metrics, "render", spy)
    server, _ = await start_proxy(make_config("http://127.0.0.1:9/v1"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/metrics") as resp:
            assert resp.status == 200
            assert "hangup_event_loop_lag_seconds_count" in await resp.text()
    assert threads and threading.main_thread().name not in threads


def test_freeze_startup_heap_leaves_full_collections_little_to_walk() -> None:
    """In a fresh process (freezing is for good): after the CLI's imports, freezing moves the
    startup objects out of generation 2, which a full collection walks; young collections wait
    for YOUNG_COLLECTION_AT objects, the older generations keep their thresholds."""
    code = (
        "import gc, proxy.server, proxy.app\n"
        "from proxy.looplag import freeze_startup_heap\n"
        "gc.collect(); before = len(gc.get_objects(generation=2)); old = gc.get_threshold()\n"
        "freeze_startup_heap()\n"
        "print(before, len(gc.get_objects(generation=2)), gc.get_freeze_count(), *old,"
        " *gc.get_threshold())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, after, frozen, *thresholds = (int(x) for x in out)
    assert before > 20_000 and after < before // 100 and frozen > before * 0.9
    assert thresholds[3:] == [YOUNG_COLLECTION_AT, *thresholds[1:3]]
    assert thresholds[0] < YOUNG_COLLECTION_AT
