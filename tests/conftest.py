"""Shared fixtures: the simulated provider as upstream, and proxies built by the production
runner (`ProxyServer`, handler_cancellation=True), each with a sink of outcome records."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from proxy.config import HangupConfig
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from proxy.upstream import Upstreams
from tests.hostile_support import ScriptedUpstream, ScriptedUpstreams, Witness, answer_ok
from tests.real_upstream import LlamaServer
from tests.real_upstream import require as require_real_upstream
from tests.support import RecordSink, make_config
from tests.upstream_support import upstream_seam

# The coverage run of scripts/test (`--hypothesis-profile=coverage`) draws the same examples
# every time and replays none an earlier run kept, so the pure modules' measured coverage, and
# the floor it is held to, do not depend on the draw.
settings.register_profile("coverage", derandomize=True, database=None)

StartProxy = Callable[..., Awaitable[tuple[ProxyServer, RecordSink]]]


@pytest.fixture
def sim_tokens_per_s() -> float:
    """The simulator's token rate; a module overrides this fixture to slow its streams down."""
    return 200.0


@pytest.fixture
async def sim(sim_tokens_per_s: float) -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(tokens_per_s=sim_tokens_per_s, default_tokens=16) as provider:
        yield provider


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstreams]:
    """Scripted upstreams (tests/hostile_support.py): `await scripted.start(reply)`; stopped
    after the test."""
    started = ScriptedUpstreams()
    yield started
    await started.stop()


@pytest.fixture
async def upstream(scripted: ScriptedUpstreams) -> ScriptedUpstream:
    """A scripted upstream that answers every request with a small 200 chat completion."""
    return await scripted.start(answer_ok)


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """The production upstream seam alone (tests/upstream_support.py), closed after the test."""
    async with upstream_seam() as seam:
        yield seam


@pytest.fixture
async def big_sim() -> AsyncIterator[SimulatedProvider]:
    """A fast simulator that takes request bodies up to 64 MiB (the proxy's own limit)."""
    async with SimulatedProvider(
        tokens_per_s=1000.0, default_tokens=4, body_limit=64 << 20
    ) as provider:
        yield provider


@pytest.fixture
async def backup() -> AsyncIterator[SimulatedProvider]:
    """A second simulated provider: the fallback target of the resilience tests."""
    async with SimulatedProvider(tokens_per_s=200.0, default_tokens=16) as provider:
        yield provider


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    started: list[ProxyServer] = []

    async def start(config: HangupConfig) -> tuple[ProxyServer, RecordSink]:
        server = ProxyServer(config, host="127.0.0.1", port=0)
        sink = RecordSink()
        server.state.listeners.append(sink)
        await server.start()
        started.append(server)
        return server, sink

    yield start
    for server in started:
        await server.stop_now()


@pytest.fixture
async def proxy(sim: SimulatedProvider, start_proxy: StartProxy) -> tuple[ProxyServer, RecordSink]:
    """The proxy in front of the simulator, default route options."""
    return await start_proxy(make_config(sim.base_url))


def chat(model: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        **extra,
    }


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """The real llama.cpp server, one per test module (its tests skip when it is not built here,
    and fail on CI)."""
    require_real_upstream()
    server = LlamaServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def llama_proxy(
    llama: LlamaServer, start_proxy: StartProxy
) -> tuple[ProxyServer, RecordSink]:
    """The production runner in front of the real llama.cpp server."""
    return await start_proxy(make_config(llama.base_url))


@pytest.fixture
async def witness() -> AsyncIterator[Witness]:
    """A listener on another loopback port that records any connection: where nothing may go."""
    server = await Witness().start()
    yield server
    await server.stop()
