"""The real `hangup` process under attack: descriptor exhaustion, and a decompression bomb.

Runs the CLI in a subprocess (so its CPU time, descriptors and log are its own) with small
connection deadlines; every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.sim import SimulatedProvider
from tests.cli_support import HangupProcess, Line, sim_config, write_config
from tests.connection_support import (
    BODY_JSON,
    Conn,
    big_bomb,
    cpu_seconds,
    head,
)

pytestmark = pytest.mark.slow

DEADLINES = {"header_timeout_s": 1.0, "keepalive_timeout_s": 1.0, "body_timeout_s": 1.0}


class LimitedHangup(HangupProcess):
    """`hangup` started through `prlimit --nofile=N`, optionally inheriting `held` extra
    descriptors (something else in the process using them up)."""

    def __init__(self, *args: str, nofile: int, held: list[int] | None = None) -> None:
        super().__init__(*args)
        self.nofile = nofile
        self.held = held or []

    async def start(self) -> LimitedHangup:
        self.proc = await asyncio.create_subprocess_exec(
            "prlimit",
            f"--nofile={self.nofile}:{self.nofile}",
            "--",
            sys.executable,
            "-m",
            "proxy",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=self.held,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stderr), name="hangup-stderr"),
            asyncio.create_task(self._read(self.proc.stdout), name="hangup-stdout"),
        ]
        return self


@pytest.fixture
async def procs() -> AsyncIterator[list[HangupProcess]]:
    started: list[HangupProcess] = []
    yield started
    for proc in started:
        await proc.close()
    await Conn.close_all()


async def launch(
    procs: list[HangupProcess],
    tmp_path: Path,
    sim: SimulatedProvider,
    *,
    nofile: int | None = None,
    held: list[int] | None = None,
    **top: Any,
) -> tuple[HangupProcess, int]:
    assert sim.base_url is not None
    config = write_config(tmp_path / "hangup.yaml", sim_config(sim.base_url, **top))
    proc: HangupProcess
    if nofile is None:
        proc = HangupProcess("--config", str(config))
    else:
        proc = LimitedHangup("--config", str(config), nofile=nofile, held=held)
    procs.append(proc)
    await proc.start()
    url = await proc.listening_url()
    return proc, int(url.rsplit(":", 1)[1])


async def healthz(port: int, timeout: float = 2.0) -> float:
    """One probe on a new connection, as a kubelet sends it; its round-trip time."""
    began = time.monotonic()
    conn = await Conn.open(port)
    await conn.send(head("/healthz", method="GET"))
    response = await conn.response(timeout)
    assert response.status == 200, response.head
    conn.close()
    return time.monotonic() - began


def errors(lines: list[Line]) -> list[Line]:
    return [line for line in lines if line.get("level") in ("error", "critical") or line.get("raw")]


async def closed_by_server(conn: Conn, timeout: float) -> bytes:
    """What the server sent before it closed the connection (EOF or reset)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await conn.reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_descriptor_exhaustion_is_survived(
    sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    """300 hostile sockets against a 256-descriptor process: idle, slow-head and slow-body
    ones. Every one is closed by its deadline (or at once, over the cap); /healthz answers
    throughout; the log stays a handful of lines."""
    proc, port = await launch(procs, tmp_path, sim, nofile=256, connections=DEADLINES)
    fitted = await proc.wait_line(
        lambda ln: "descriptor limit" in str(ln.get("msg")), 5, "the cap fitted to ulimit"
    )
    assert fitted["level"] == "warning"
    lines_before = len(proc.lines)
    attackers: list[tuple[str, Conn, float]] = []
    for i in range(300):
        kind = ("idle", "slow-head", "slow-body")[i % 3]
        conn = await Conn.open(port)
        if kind == "slow-head":
            conn.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        elif kind == "slow-body":
            conn.writer.write(head(length=len(BODY_JSON)) + BODY_JSON[:5])
        attackers.append((kind, conn, time.monotonic()))
    # Probes while the attackers hold their sockets, until their deadlines have passed.
    probe_times = []
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        probe_times.append(await healthz(port))
        await asyncio.sleep(0.05)
    # Every attacker was closed by the server within its deadline (1 s) plus slack.
    outcomes: dict[str, set[str]] = {}
    requests_made = 0  # answers with an x-request-id came from a request that has a record
    for kind, conn, opened in attackers:
        data = await closed_by_server(conn, timeout=max(0.1, opened + 2.5 - time.monotonic()))
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
        outcomes.setdefault(kind, set()).add(status)
        requests_made += b"x-request-id:" in data.lower()
    # "closed": reclaimed to make room (nothing of a request read yet) or idle past its
    # deadline; 503: over the cap; 408: a deadline with part of a request read.
    assert outcomes["idle"] <= {"closed", "503"}
    assert outcomes["slow-head"] <= {"408", "503", "closed"} and "408" in outcomes["slow-head"]
    assert outcomes["slow-body"] <= {"408", "503", "closed"} and "408" in outcomes["slow-body"]
    # Served normally again.
    conn = await Conn.open(port)
    await conn.send(head(length=len(BODY_JSON)) + BODY_JSON)
    assert (await conn.response()).status == 200
    assert len(probe_times) >= 10 and max(probe_times) < 1.0, probe_times
    await proc.wait_line(
        lambda ln: ln.get("logger") == "hangup.access" and ln.get("status") == 200, 5, "200 line"
    )
    attack_lines = proc.lines[lines_before:]
    assert errors(attack_lines) == []
    access = [ln for ln in attack_lines if ln.get("logger") == "hangup.access"]
    others = [ln for ln in attack_lines if ln.get("logger") != "hangup.access"]
    # One access line per request that was made (slow bodies: 408 or 503; the last: 200).
    assert len(access) == requests_made + 1
    assert {ln["status"] for ln in access} <= {408, 503, 200}
    assert len(others) <= 12, others  # rate-limited: one line per kind per 10 s
    # The cap acted before descriptors ran out: accept() never failed.
    assert proc.events("accept_out_of_descriptors") == []


async def test_accept_out_of_descriptors_is_one_warning_not_an_error_flood(
    sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    """Descriptors used up by something else (here: 180 inherited ones) so that accept()
    fails with EMFILE: one warning per 10 s instead of asyncio's ERROR per attempt, and the
    proxy serves again once its deadlines free descriptors."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(180)]
    try:
        proc, port = await launch(
            procs, tmp_path, sim, nofile=256, held=held, connections=DEADLINES
        )
    finally:
        for fd in held:
            os.close(fd)
    lines_before = len(proc.lines)
    conns = [await Conn.open(port) for _ in range(150)]  # the kernel accepts into the backlog
    warned = await proc.wait_line(
        lambda ln: ln.get("event") == "accept_out_of_descriptors", 5, "the EMFILE warning"
    )
    assert warned["level"] == "warning"
    for conn in conns:
        await closed_by_server(conn, timeout=6.0)
    await healthz(port, timeout=3.0)
    attack_lines = proc.lines[lines_before:]
    assert errors(attack_lines) == []
    assert len(proc.events("accept_out_of_descriptors")) <= 2
    assert len(attack_lines) <= 12, attack_lines


async def stalls_while(port: int, work: asyncio.Task[None]) -> list[float]:
    """Round-trip times of back-to-back /healthz requests on one keep-alive connection for as
    long as `work` runs (and at least 20 of them)."""
    conn = await Conn.open(port)
    times: list[float] = []
    while not work.done() or len(times) < 20:
        began = time.monotonic()
        await conn.send(head("/healthz", method="GET"))
        assert (await conn.response()).status == 200
        times.append(time.monotonic() - began)
    conn.close()
    return times


@pytest.mark.parametrize("accepted", [False, True], ids=["refused-415", "inflated-413"])
async def test_a_decompression_bomb_costs_little_and_stalls_nothing(
    accepted: bool, sim: SimulatedProvider, procs: list[HangupProcess], tmp_path: Path
) -> None:
    """4 MiB of deflate that would inflate to 4 GiB: under 100 ms of hangup's CPU, and no
    other request waits over 50 ms meanwhile (aiohttp alone: ~10 s of CPU, 3.5 s stalls)."""
    defaults = {"include_usage": False, "request_encodings": ["deflate"] if accepted else []}
    proc, port = await launch(procs, tmp_path, sim, defaults=defaults)
    bomb = big_bomb(4096)
    assert 3 * 2**20 < len(bomb) < 6 * 2**20
    await healthz(port)  # warm: the first request pays for imports and caches

    async def send_bomb() -> None:
        conn = await Conn.open(port)
        extra = {"Content-Encoding": "deflate"}
        conn.writer.write(head(length=len(bomb), extra=extra) + bomb)
        try:
            # Bounded: a server that answers early and then neither reads nor closes leaves
            # this send blocked on a full socket buffer (it once did, and hit pytest's 120 s).
            async with asyncio.timeout(10):
                await conn.writer.drain()
        except ConnectionError:
            pass  # closed after its answer, before we finished sending: expected
        except TimeoutError:
            pytest.fail("the bomb's send never finished: hangup neither read it nor closed")
        data = await closed_by_server(conn, timeout=10)
        expected = b"HTTP/1.1 413 " if accepted else b"HTTP/1.1 415 "
        assert data.startswith(expected), data[:200]

    cpu_before = cpu_seconds(proc.pid)
    await send_bomb()
    cpu_used = cpu_seconds(proc.pid) - cpu_before
    assert cpu_used < 0.1, f"the bomb cost {cpu_used * 1000:.0f} ms of CPU"
    # Again, with another client's requests measured while it is sent and refused. A round
    # trip also includes scheduling the test and hangup on a shared 2-core machine, which
    # alone can exceed 50 ms now and then; a stall of hangup's loop (inflating on it took
    # seconds) shows in every attempt. So: up to three attempts, one must stay under 50 ms.
    worst: list[float] = []
    for _ in range(3):
        bomb_task = asyncio.create_task(send_bomb())
        stalls = await stalls_while(port, bomb_task)
        await bomb_task
        worst.append(max(stalls))
        if worst[-1] < 0.05:
            break
    assert min(worst) < 0.05, f"worst /healthz round trips {[round(w * 1000) for w in worst]} ms"
    status = 413 if accepted else 415
    bombs = 1 + len(worst)
    await proc.wait_line(
        lambda _: len(proc.access_lines()) >= bombs, 5, "an access line for each bomb"
    )
    assert [ln["status"] for ln in proc.access_lines()] == [status] * bombs
    assert errors(proc.lines) == []
