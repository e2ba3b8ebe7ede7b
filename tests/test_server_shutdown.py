"""Graceful shutdown of the real `hangup` process (a subprocess of the test, over real sockets,
in front of the simulated provider running in the test process).

What SIGTERM must do: readiness 503 at once; new requests get an OpenAI-shaped 503; in-flight
requests may finish within `shutdown.grace_s` and arrive intact; the rest are cut at the end
of the grace, their upstream connections closed and each recorded once as `shutdown`; exit 0
within grace + 5 s. A second signal stops at once, still closing the upstreams.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.sim import SimulatedProvider
from tests.cli_support import (
    HangupProcess,
    Line,
    one_per_request,
    sim_config,
    wait_ready,
    write_config,
)

GRACE_S = 2.0


@dataclass
class Stream:
    """One streamed chat completion read by the test, with what and when it received."""

    request_id: str
    model: str
    status: int | None = None
    data: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    ended_at: float | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        }
        headers = {"x-request-id": self.request_id}
        try:
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=headers
            ) as resp:
                self.status = resp.status
                self.started.set()
                async for chunk in resp.content.iter_any():
                    self.data += chunk
        except aiohttp.ClientError as exc:  # the cut: payload incomplete / connection reset
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


@pytest.fixture
def sim_tokens_per_s() -> float:
    return 10.0  # slow streams: some must still be running when the signal arrives


@pytest.fixture
async def procs() -> AsyncIterator[list[HangupProcess]]:
    started: list[HangupProcess] = []
    yield started
    for proc in started:
        await proc.close()


async def start_hangup(
    procs: list[HangupProcess], tmp_path: Path, sim: SimulatedProvider, grace_s: float
) -> tuple[HangupProcess, str]:
    assert sim.base_url is not None
    config = write_config(
        tmp_path / "hangup.yaml", sim_config(sim.base_url, shutdown={"grace_s": grace_s})
    )
    proc = HangupProcess("--config", str(config))
    procs.append(proc)
    await proc.start()
    url = await proc.listening_url()
    await wait_ready(url)
    return proc, url


async def readiness_503_after(url: str, sent_at: float, bound_s: float) -> float:
    """Poll /readyz from `sent_at` until it says 503 draining; seconds it took."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() - sent_at < bound_s:
            async with session.get(url + "/readyz") as resp:
                if resp.status == 503:
                    assert (await resp.json()) == {"status": "draining"}
                    return time.monotonic() - sent_at
    raise AssertionError(f"readiness still 200 {bound_s}s after the signal")


async def test_sigterm_drains_twenty_streams(
    sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    proc, url = await start_hangup(procs, tmp_path, sim, GRACE_S)
    # Ten streams that end within the grace (0.25-1.0 s at 12 tokens/s) and ten that cannot
    # (10-19 s at 10 tokens/s), all different lengths.
    short = [Stream(f"short-{i}", f"normal:tokens={3 + i},rate=12") for i in range(10)]
    long = [Stream(f"long-{i}", f"normal:tokens={100 + 10 * i},rate=10") for i in range(10)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(s.run(session, url)) for s in (*short, *long)]
        try:
            async with asyncio.timeout(10):
                for s in (*short, *long):
                    await s.started.wait()
            assert all(s.status == 200 for s in (*short, *long))
            assert not any(s.ended_at for s in short), "a short stream ended before SIGTERM"

            sent_at = proc.signal(signal.SIGTERM)
            readiness_s = await readiness_503_after(url, sent_at, bound_s=0.5)

            # A new request during the drain: an OpenAI-shaped 503 that SDKs retry elsewhere.
            refused = {"model": "normal", "messages": [{"role": "user", "content": "hi"}]}
            async with aiohttp.ClientSession() as fresh:
                async with fresh.post(
                    url + "/v1/chat/completions", json=refused, headers={"x-request-id": "late"}
                ) as resp:
                    assert resp.status == 503
                    error = (await resp.json())["error"]
                    assert error["type"] == "service_unavailable_error"
                    assert error["code"] == "shutting_down"
                    assert resp.headers["x-should-retry"] == "true"
                    assert resp.headers["connection"].lower() == "close"
                # Every response during the drain asks its client to close, not only refusals.
                async with fresh.get(url + "/healthz") as resp:
                    assert resp.status == 200
                    assert resp.headers["connection"].lower() == "close"

            async with asyncio.timeout(GRACE_S + 5):
                await asyncio.gather(*tasks)
            code = await proc.wait_exit(timeout=GRACE_S + 5)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    exit_s = (proc.exited_at or 0) - sent_at
    assert code == 0
    assert exit_s <= GRACE_S + 5

    # Short streams: complete and byte-identical to what the provider sent.
    for s in short:
        assert s.error is None, (s.request_id, s.error)
        assert s.ended_at is not None and s.ended_at - sent_at < GRACE_S
        sent = await sim.recorder.wait_sent_bytes(s.request_id, timeout=1)
        assert bytes(s.data) == sent
        assert s.data.endswith(b"data: [DONE]\n\n")
        assert sim.request(s.request_id).end == "completed"  # type: ignore[union-attr]

    # Long streams: cut at the end of the grace, their upstream connections closed then.
    cut_at, closed_at = [], []
    for s in long:
        assert s.error is not None, f"{s.request_id} was not cut"
        assert b"[DONE]" not in s.data
        assert s.ended_at is not None
        cut_at.append(s.ended_at - sent_at)
        closed = await sim.recorder.wait_closed(s.request_id, timeout=1)
        closed_at.append(closed - sent_at)
        record = sim.request(s.request_id)
        assert record is not None and record.end == "peer_closed"
        # What the client got is exactly the start of what the provider sent.
        sent = await sim.recorder.wait_sent_bytes(s.request_id, timeout=1)
        assert sent.startswith(bytes(s.data))
    assert all(GRACE_S - 0.05 <= t <= GRACE_S + 1.0 for t in cut_at), cut_at
    assert all(GRACE_S - 0.05 <= t <= GRACE_S + 1.0 for t in closed_at), closed_at

    # Each request is in the access log exactly once, with the outcome it ended in.
    by_id = one_per_request(proc.access_lines())
    assert {rid: line["outcome"] for rid, line in by_id.items()} == {
        **{s.request_id: "completed" for s in short},
        **{s.request_id: "shutdown" for s in long},
        "late": "rejected",
    }
    assert by_id["late"]["status"] == 503
    assert not [ln for ln in proc.access_lines() if ln.get("path") == "/readyz"]
    stopped: Line = proc.events("stopped")[-1]
    assert stopped["ended_while_stopping"] == {"completed": 10, "shutdown": 10, "rejected": 1}
    print(
        f"\nSIGTERM drain: readiness 503 after {readiness_s * 1000:.1f} ms; long streams cut at "
        f"{min(cut_at):.3f}-{max(cut_at):.3f} s, upstreams closed at "
        f"{min(closed_at):.3f}-{max(closed_at):.3f} s; exit 0 at {exit_s:.3f} s "
        f"(grace {GRACE_S} s)"
    )


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
async def test_second_signal_stops_at_once(
    first: signal.Signals, sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    proc, url = await start_hangup(procs, tmp_path, sim, grace_s=30.0)
    streams = [Stream(f"long-{i}", "normal:tokens=500,rate=10") for i in range(5)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(s.run(session, url)) for s in streams]
        try:
            async with asyncio.timeout(10):
                for s in streams:
                    await s.started.wait()
            first_at = proc.signal(first)
            await readiness_503_after(url, first_at, bound_s=0.5)
            second_at = proc.signal(signal.SIGTERM)
            code = await proc.wait_exit(timeout=5)
            async with asyncio.timeout(5):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    exit_s = (proc.exited_at or 0) - second_at
    assert code == 0
    assert exit_s < 2.0, f"exit took {exit_s:.3f}s after the second signal"
    closed = [await sim.recorder.wait_closed(s.request_id, timeout=1) - second_at for s in streams]
    assert all(0 <= c < 0.5 for c in closed), closed
    assert all(s.error is not None for s in streams)
    by_id = one_per_request(proc.access_lines())
    assert {rid: line["outcome"] for rid, line in by_id.items()} == {
        s.request_id: "shutdown" for s in streams
    }
    print(
        f"\nsecond {first.name}->SIGTERM: upstreams closed {min(closed) * 1000:.1f}-"
        f"{max(closed) * 1000:.1f} ms after it, exit 0 after {exit_s * 1000:.0f} ms"
    )


async def test_idle_sigterm_exits_promptly(
    sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    proc, _ = await start_hangup(procs, tmp_path, sim, grace_s=30.0)
    sent_at = proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(timeout=5) == 0
    # Nothing in flight: the 30 s grace is not waited out.
    assert (proc.exited_at or 0) - sent_at < 2.0
