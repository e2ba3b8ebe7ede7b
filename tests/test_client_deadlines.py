"""Client deadlines mean what the SDKs mean, checked with the real SDKs through hangup.

- The Node SDK's `timeout` (sent as x-stainless-timeout) aborts its fetch if response headers
  are late, and never bounds the stream: a healthy 5 s stream read with `timeout: 2000` must
  arrive whole (before, hangup capped the whole request at 2 s and cut it after ~7 tokens).
- A silent upstream: hangup answers 504 with x-should-retry: false just before the SDK would
  give up, so the SDK does not retry it and the upstream is hung up on once.
- A stream whose headers hangup holds (a switch is still possible) sends them in time for the
  SDK's deadline, then still switches invisibly.
- The Python SDK's read timeout (x-stainless-read-timeout) never cuts a healthy stream.

The Node SDK is installed by scripts/test into ${HANGUP_CACHE:-~/.cache/hangup}/node.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.outcome import Outcome
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.resilience_support import BACKUP_MODEL, fallback_config, seen
from tests.support import make_config

NODE_CLIENT = Path(__file__).with_name("node_client.cjs")
NODE_MODULES = (
    Path(os.environ.get("HANGUP_CACHE", Path.home() / ".cache" / "hangup"))
    / "node"
    / "node_modules"
)
HEALTHY_5S = "steady:interval=0.25,tokens=20"  # 20 content chunks over ~5 s


def node_available() -> bool:
    return shutil.which("node") is not None and (NODE_MODULES / "openai").is_dir()


needs_node = pytest.mark.skipif(
    not node_available(), reason=f"node or the openai npm package in {NODE_MODULES} is missing"
)


async def node_stream(base_url: str, model: str, request_id: str, timeout_ms: int) -> Any:
    args = {
        "baseURL": f"{base_url}/v1",
        "model": model,
        "timeout": timeout_ms,
        "maxRetries": 2,  # the SDK's default: our 504 must not be retried
        "requestId": request_id,
    }
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_CLIENT),
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout)


@needs_node
async def test_node_sdk_with_its_own_timeout_reads_a_slow_healthy_stream_whole(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    server, sink = await start_proxy(make_config(sim.base_url))
    got = await node_stream(server.base_url, HEALTHY_5S, "node-healthy", 2000)
    assert got["error"] is None, got
    assert got["chunks"] == 20 and got["elapsed_ms"] > 4000, got
    record = await sink.wait_for("node-healthy")
    assert record.outcome is Outcome.COMPLETED and record.client_deadline_s == 2.0


@needs_node
async def test_node_sdk_gets_a_504_it_does_not_retry_before_its_own_timeout(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    server, _ = await start_proxy(make_config(sim.base_url))
    got = await node_stream(server.base_url, "slow-headers:delay=30", "node-silent", 2000)
    assert got["error"] is not None and got["error"]["status"] == 504, got
    assert "x-stainless-timeout" in got["error"]["message"]
    assert 1500 <= got["elapsed_ms"] < 2000, got  # before the SDK's own abort at 2 s
    assert len(seen(sim, "node-silent")) == 1  # x-should-retry: false was honoured
    await sim.wait_closed("node-silent", timeout=1.0)


@needs_node
async def test_held_stream_headers_reach_the_node_sdk_in_time_and_the_switch_stays_invisible(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    config = fallback_config(sim, backup, timeouts={"first_token_s": 3})
    server, sink = await start_proxy(config)
    got = await node_stream(
        server.base_url, "slow-first-token:delay=20,keepalive=0.2", "node-held", 2000
    )
    # Headers went out at ~1.6 s (the SDK would abort at 2 s); the primary's first token was
    # due at 3 s; the fallback then answered in the same stream.
    assert got["error"] is None, got
    assert got["chunks"] == 16 and got["models"] == [BACKUP_MODEL], got
    await sim.wait_closed("node-held", timeout=1.0)
    record = await sink.wait_for("node-held")
    assert [a.upstream for a in record.attempts] == ["primary", "backup"]


async def test_python_sdk_read_timeout_never_cuts_a_healthy_stream(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    assert sim.base_url is not None
    server, sink = await start_proxy(make_config(sim.base_url))
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="sk-test", timeout=1.0, max_retries=0
    )
    chunks = 0
    async with client:
        stream = await client.chat.completions.create(
            model=HEALTHY_5S,
            messages=[{"role": "user", "content": "Tell me a story."}],
            stream=True,
            extra_headers={"x-request-id": "py-healthy"},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
    assert chunks == 20
    record = await sink.wait_for("py-healthy")
    assert record.outcome is Outcome.COMPLETED and record.client_deadline_s == 1.0
