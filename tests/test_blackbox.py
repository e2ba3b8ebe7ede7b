"""Black-box: the real `hangup` CLI as a subprocess on a free port, driven over sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.sim import SimulatedProvider
from tests.conftest import chat
from tests.support import RawClient

CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(base: str, proc: asyncio.subprocess.Process, within: float) -> None:
    async with asyncio.timeout(within), aiohttp.ClientSession() as session:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"hangup exited early with {proc.returncode}")
            try:
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # the process gives no event while it starts


@pytest.fixture
async def cli(sim: SimulatedProvider) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = _free_port()
    assert sim.base_url is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--upstream",
        sim.base_url,
        "--port",
        str(port),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HANGUP_CONFIG": ""},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base, proc, 15.0)
        yield base, proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_cli_relays_hangs_up_and_stops_cleanly(
    sim: SimulatedProvider, cli: tuple[str, asyncio.subprocess.Process]
) -> None:
    base, proc = cli
    port = int(base.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}{CHAT}",
            json=chat("normal:tokens=5", stream=True),
            headers={"x-request-id": "bb-ok"},
        ) as response:
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        async with session.get(f"{base}/v2/nothing") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
    client = await RawClient.connect("127.0.0.1", port)
    await client.post_json(
        CHAT, chat("normal:tokens=100000,rate=200", stream=True), {"x-request-id": "bb-cut"}
    )
    await client.read_until(lambda b: b.count(b"data: ") >= 5)
    left = client.close()
    closed = await sim.wait_closed("bb-cut", timeout=2.0)
    assert closed - left < 0.050
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await proc.wait() == 0
    assert proc.stderr is not None
    lines = [
        json.loads(line)
        for line in (await proc.stderr.read()).splitlines()
        if line.startswith(b"{")
    ]
    access = {line["request_id"]: line for line in lines if line["logger"] == "hangup.access"}
    assert access["bb-ok"]["outcome"] == "completed"
    assert access["bb-cut"]["outcome"] == "client_cancelled"
    assert access["bb-cut"]["level"] == "info" and "exc" not in access["bb-cut"]


async def test_demo_runs_and_summarises() -> None:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--exit",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert "requests        16: completed 6, client_cancelled 8, timeout 2" in text
    assert text.count("saw its connection closed") == 8
    # The summary is computed from those same eight measurements, and shows its prices.
    assert "over 8 hang-ups (measured at the upstream, as above)" in text
    assert "price           demo-model: input $2.50" in text
    assert "timeouts.idle_s=1.5 exceeded" in text and "timeouts.first_token_s=2 exceeded" in text
    # Every model the demo uses is priced: a newcomer should not meet an "unpriced" request.
    assert "unpriced requests: 0" in text
    assert time.monotonic() - started < 90
