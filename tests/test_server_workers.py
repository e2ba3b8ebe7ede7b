"""`hangup --workers 2`: two real worker processes serve one port, and a scrape of either
returns the sum over both (including what the other one served); a killed worker is
replaced and its live gauges leave the sum; SIGTERM drains both and the supervisor exits 0.

Which worker served what is read from the kernel (/proc: which process holds the socket), not
from anything the proxy says about itself.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.sim import SimulatedProvider
from tests.cli_support import (
    HangupProcess,
    Line,
    alive,
    connections_to,
    one_per_request,
    owner_of,
    sim_config,
    wait_ready,
    write_config,
)
from tests.metrics_support import parse, total, value
from tests.test_server_shutdown import Stream

GRACE_S = 1.0
pytestmark = pytest.mark.slow


@pytest.fixture
def sim_tokens_per_s() -> float:
    return 10.0  # slow streams: some must still be running when the signal arrives


def supervisor_dirs(tmp: Path) -> list[Path]:
    """The supervisor's fresh PROMETHEUS_MULTIPROC_DIRs made under TMPDIR=tmp."""
    return list(tmp.glob("hangup-metrics-*"))


async def scrape(url: str, pids: list[int]) -> tuple[int | None, str]:
    """GET /metrics on a new connection; (the pid of the worker that answered, the body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        # The connection is still open: the kernel says which process holds its other end.
        local_port = writer.get_extra_info("sockname")[1]
        return owner_of(int(port), local_port, pids), body.decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def scrape_each_worker(url: str, pids: list[int], attempts: int = 60) -> dict[int, str]:
    """One scrape answered by each worker (new connections until both have answered)."""
    answers: dict[int, str] = {}
    for _ in range(attempts):
        pid, body = await scrape(url, pids)
        if pid is not None:
            answers.setdefault(pid, body)
        if set(answers) == set(pids):
            return answers
    raise AssertionError(f"only workers {sorted(answers)} of {pids} answered {attempts} scrapes")


async def complete(session: aiohttp.ClientSession, url: str, request_id: str) -> None:
    body = {"model": "normal:tokens=3,rate=0", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(
        url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    ) as resp:
        assert resp.status == 200
        await resp.read()


async def test_two_workers_share_the_port_and_the_metrics(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    assert sim.base_url is not None
    sim_port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
    config = write_config(
        tmp_path / "hangup.yaml", sim_config(sim.base_url, shutdown={"grace_s": GRACE_S})
    )
    # TMPDIR: the supervisor's fresh metrics directory is made here, where the test can see it.
    proc = HangupProcess("--config", str(config), "--workers", "2", env={"TMPDIR": str(tmp_path)})
    streams: list[Stream] = []
    tasks: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        await proc.start()
        url = await proc.listening_url()
        # The supervisor's line, then one per worker.
        listening = await proc.wait_events("listening", 3, timeout=20)
        pids = sorted({int(line["pid"]) for line in listening[1:]})
        assert len(pids) == 2 and proc.pid not in pids, listening
        await wait_ready(url)
        metrics_dirs = supervisor_dirs(tmp_path)
        assert len(metrics_dirs) == 1

        # Long streams until both workers hold some (the kernel picks the accepting worker).
        async def open_streams(n: int) -> None:
            batch = [
                Stream(f"long-{len(streams) + i}", "normal:tokens=1000,rate=5") for i in range(n)
            ]
            streams.extend(batch)
            tasks.extend(asyncio.create_task(s.run(session, url)) for s in batch)
            async with asyncio.timeout(10):
                for s in batch:
                    await s.started.wait()

        await open_streams(12)
        while min(connections_to(pid, sim_port) for pid in pids) == 0 and len(streams) < 40:
            await open_streams(4)
        held = {pid: connections_to(pid, sim_port) for pid in pids}
        assert sum(held.values()) == len(streams), held
        assert all(n > 0 for n in held.values()), held

        # Each worker's scrape sums both: the live gauge counts every worker's streams.
        for body in (await scrape_each_worker(url, pids)).values():
            assert value(parse(body), "hangup_requests_in_flight") == len(streams)

        for i in range(8):
            await complete(session, url, f"short-{i}")
        answers = await scrape_each_worker(url, pids)
        for body in answers.values():
            series = parse(body)
            assert total(series, "hangup_requests_total", outcome="completed") == 8
            assert value(series, "hangup_requests_in_flight") == len(streams)

        # Every short request's line is out before the kill: under load a worker writes its
        # lines in batches up to 50 ms apart, and SIGKILL loses what it had not written yet.
        shorts = {f"short-{i}" for i in range(8)}
        await proc.wait_line(
            lambda _: shorts <= {ln.get("request_id") for ln in proc.access_lines()},
            5,
            "the short requests' access lines",
        )

        # Kill one worker: it is replaced, and its live gauges leave the sum.
        victim = pids[0]
        lost = held[victim]
        os.kill(victim, signal.SIGKILL)
        await proc.wait_line(
            lambda ln: ln.get("event") == "worker_exited" and ln.get("worker_pid") == victim,
            10,
            "the supervisor noticing the dead worker",
        )
        started = await proc.wait_line(
            lambda ln: ln.get("event") == "worker_started" and ln.get("worker_pid") not in pids,
            10,
            "a replacement worker",
        )
        replacement = int(started["worker_pid"])
        await proc.wait_line(
            lambda ln: ln.get("event") == "listening" and ln.get("pid") == replacement,
            20,
            "the replacement listening",
        )
        survivors = [pids[1], replacement]
        for body in (await scrape_each_worker(url, survivors)).values():
            series = parse(body)
            assert value(series, "hangup_requests_in_flight") == len(streams) - lost
            # Totals survive the worker that counted them.
            assert total(series, "hangup_requests_total", outcome="completed") == 8

        sent_at = proc.signal(signal.SIGTERM)
        code = await proc.wait_exit(timeout=GRACE_S + 5)
        exit_s = (proc.exited_at or 0) - sent_at
        assert code == 0
        assert exit_s <= GRACE_S + 5
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await proc.close()

    assert not metrics_dirs[0].exists(), "the supervisor left its metrics directory behind"
    assert all(s.error is not None for s in streams), "a long stream was not cut"
    # The survivor's streams were drained and recorded once each as `shutdown`; the killed
    # worker's died with it (no process was left to record them).
    by_id = one_per_request(proc.access_lines())
    outcomes = [by_id[s.request_id]["outcome"] for s in streams if s.request_id in by_id]
    assert outcomes == ["shutdown"] * (len(streams) - lost)
    assert [by_id[f"short-{i}"]["outcome"] for i in range(8)] == ["completed"] * 8
    print(
        f"\n--workers 2: streams per worker {held}; worker {victim} killed and replaced by "
        f"{replacement}; SIGTERM to exit 0 in {exit_s:.3f} s (grace {GRACE_S} s)"
    )


async def test_a_worker_config_error_stops_the_supervisor(tmp_path: Path) -> None:
    """Workers re-read the config file; one that cannot (here: it changed under the
    supervisor) exits 2, and the supervisor gives up with exit 1 instead of restarting it
    forever."""
    config = write_config(tmp_path / "hangup.yaml", sim_config("http://127.0.0.1:9/v1"))
    proc = HangupProcess("--config", str(config), "--workers", "2", env={"TMPDIR": str(tmp_path)})
    try:
        await proc.start()
        url = await proc.listening_url()
        await wait_ready(url)
        worker = int((await proc.wait_events("listening", 3, timeout=20))[1]["pid"])
        config.write_text("listen: {port: nope}\n")
        started = time.monotonic()  # before the kill: the bound covers the whole reaction
        os.kill(worker, signal.SIGKILL)
        assert await proc.wait_exit(timeout=GRACE_S + 7) == 1
        assert time.monotonic() - started < GRACE_S + 7
    finally:
        await proc.close()
    assert "config error" in proc.text
    assert any("giving up" in str(ln.get("msg")) for ln in proc.lines)
    assert not supervisor_dirs(tmp_path)


async def start_workers(
    sim: SimulatedProvider, tmp_path: Path, grace_s: float
) -> tuple[HangupProcess, str, list[int]]:
    assert sim.base_url is not None
    config = write_config(
        tmp_path / "hangup.yaml", sim_config(sim.base_url, shutdown={"grace_s": grace_s})
    )
    proc = HangupProcess("--config", str(config), "--workers", "2", env={"TMPDIR": str(tmp_path)})
    await proc.start()
    url = await proc.listening_url()
    listening = await proc.wait_events("listening", 3, timeout=20)
    await wait_ready(url)
    return proc, url, [int(line["pid"]) for line in listening[1:]]


async def test_second_signal_stops_every_worker_at_once(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    proc, url, _ = await start_workers(sim, tmp_path, grace_s=30.0)
    streams = [Stream(f"s-{i}", "normal:tokens=500,rate=10") for i in range(6)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(s.run(session, url)) for s in streams]
        try:
            async with asyncio.timeout(10):
                for s in streams:
                    await s.started.wait()
            proc.signal(signal.SIGTERM)
            await proc.wait_events("draining", 2, timeout=5)  # both workers
            second_at = proc.signal(signal.SIGTERM)
            assert await proc.wait_exit(timeout=5) == 0
            async with asyncio.timeout(5):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await proc.close()
    exit_s = (proc.exited_at or 0) - second_at
    assert exit_s < 2.0
    closed = [await sim.recorder.wait_closed(s.request_id, timeout=1) - second_at for s in streams]
    assert all(0 <= c < 1.0 for c in closed), closed
    by_id = one_per_request(proc.access_lines())
    assert {by_id[s.request_id]["outcome"] for s in streams} == {"shutdown"}


async def test_workers_drain_when_the_supervisor_is_killed(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    proc, url, pids = await start_workers(sim, tmp_path, grace_s=1.0)
    stream = Stream("orphaned", "normal:tokens=500,rate=10")
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(stream.run(session, url))
        try:
            async with asyncio.timeout(10):
                await stream.started.wait()
            killed_at = proc.signal(signal.SIGKILL)
            await proc.wait_exit(timeout=5)
            # No parent to wait on them: watch /proc, with a bound (grace 1 s + 5 s).
            deadline = killed_at + 1.0 + 5.0
            while any(alive(pid) for pid in pids):
                assert time.monotonic() < deadline, "a worker outlived its supervisor"
                await asyncio.sleep(0.05)
            gone_s = time.monotonic() - killed_at
            async with asyncio.timeout(5):
                await task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            await proc.close()
    assert stream.error is not None  # cut at the end of the grace
    await sim.recorder.wait_closed("orphaned", timeout=1)
    drained = [ln for ln in proc.events("draining") if "supervisor gone" in str(ln.get("msg"))]
    assert len(drained) == 2
    print(f"\nsupervisor SIGKILLed: both workers drained and exited in {gone_s:.2f} s (grace 1 s)")


def _listening_as(line: Line, *, pid: int) -> bool:
    return line.get("event") == "listening" and line.get("pid") == pid


async def test_a_crash_loop_is_not_hidden(sim: SimulatedProvider, tmp_path: Path) -> None:
    """Worker deaths are restarted, up to 5 within 60 s; the 6th makes the supervisor give up:
    exit 1, so the orchestrator sees the failure."""
    proc, _, pids = await start_workers(sim, tmp_path, grace_s=1.0)
    try:
        victim = pids[0]
        for death in range(1, 7):
            os.kill(victim, signal.SIGKILL)
            if death == 6:
                break
            started = await proc.wait_events("worker_started", 2 + death, timeout=10)
            victim = int(started[-1]["worker_pid"])
            await proc.wait_line(
                functools.partial(_listening_as, pid=victim),
                20,
                f"replacement {death} listening",
            )
        assert await proc.wait_exit(timeout=10) == 1
    finally:
        await proc.close()
    assert any("more than 5 worker deaths within 60s" in str(ln.get("msg")) for ln in proc.lines)
    assert not alive(pids[1])
