"""A scripted workload through the real proxy against the simulated provider, and the numbers
/metrics must show after it (tests/test_metrics_e2e.py, tests/test_metrics_prometheus.py).

1 rejected (invalid JSON), 3 completed streams, 2 streams whose client hangs up after 3 tokens,
2 streams that stall after 2 tokens into the idle timeout, 1 upstream error. The route asks the
simulator for running usage on every chunk (continuous_usage_stats), so even the cut streams
have exact, reported token counts, and every expected number is arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import HangupConfig
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from proxy.sim import prompt_tokens as sim_prompt_tokens
from tests.support import RawClient, RecordSink, config_from

MODEL = "gpt-4o-mini"
ROUTE = "default"
INPUT_PER_MTOK, OUTPUT_PER_MTOK = 2.0, 8.0
EXPECTED_COMPLETION = 100  # the route's default until 20 completions were seen
MAX_TOKENS = 200
CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {
    "model": MODEL,
    "stream": True,
    "messages": [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
}
REQUESTS = 9
OUTCOMES = {"completed": 3, "client_cancelled": 2, "timeout": 2, "upstream_error": 1, "rejected": 1}
COMPLETION_TOKENS = 3 * 20 + 2 * 3 + 2 * 2  # completed, hung up after 3, stalled after 2
PROMPTED = 7  # requests that reached a generation and reported their prompt
SAVED = 2 * (EXPECTED_COMPLETION - 3) + 2 * (EXPECTED_COMPLETION - 2)
SAVED_UPPER = 2 * (MAX_TOKENS - 3) + 2 * (MAX_TOKENS - 2)


def prompt_tokens() -> int:
    """What the simulator reports as the prompt size of BODY."""
    return sim_prompt_tokens("chat", BODY)


def proxy_config(base_url: str) -> HangupConfig:
    return config_from(
        {
            # The simulator plays OpenAI: its streams stop billing at a hang-up.
            "upstreams": {"sim": {"base_url": base_url, "billing": {"stream": "stops"}}},
            "routes": [
                {
                    "name": ROUTE,
                    "upstream": "sim",
                    "continuous_usage_stats": True,
                    "expected_completion_tokens": EXPECTED_COMPLETION,
                    # connect_s only bounds loopback connects to the simulator here.
                    "timeouts": {"idle_s": 0.3, "connect_s": 1.0},
                }
            ],
            "prices": {
                MODEL: {"input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK}
            },
        }
    )


@contextlib.asynccontextmanager
async def proxy_and_sim() -> AsyncIterator[tuple[ProxyServer, RecordSink]]:
    """The production runner in front of a fresh simulator; both stopped on exit."""
    provider = SimulatedProvider(tokens_per_s=200.0, default_tokens=16)
    base_url = await provider.start(host="127.0.0.1", port=0)
    try:
        server = ProxyServer(proxy_config(base_url), host="127.0.0.1", port=0)
        sink = RecordSink()
        server.state.listeners.append(sink)
        await server.start()
        try:
            yield server, sink
        finally:
            await server.stop_now()
    finally:
        await provider.stop()


async def _complete(session: aiohttp.ClientSession, base: str, behaviour: str, **extra: Any) -> int:
    async with session.post(
        f"{base}{CHAT}", json={**BODY, **extra}, headers={"x-sim-behaviour": behaviour}
    ) as resp:
        await resp.read()
        return resp.status


async def _hang_up_after(base: str, tokens: int) -> None:
    url = URL(base)
    assert url.host is not None and url.port is not None
    client = await RawClient.connect(url.host, url.port)
    await client.post_json(
        CHAT, {**BODY, "max_tokens": MAX_TOKENS}, {"x-sim-behaviour": f"stall:after={tokens}"}
    )
    await client.read_until(lambda got: got.count(b'"content":" ') >= tokens)
    client.close()


async def run_workload(server: ProxyServer, sink: RecordSink) -> None:
    """The nine requests; returns once the proxy has recorded all of them."""
    base, before = server.base_url, len(sink.records)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}{CHAT}", data=b"{not json", headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
        for _ in range(3):
            assert await _complete(session, base, "normal:tokens=20") == 200
        for _ in range(2):
            await _hang_up_after(base, 3)
        for _ in range(2):
            # The idle deadline fires mid-stream: a 200 with an in-band error event.
            assert await _complete(session, base, "stall:after=2", max_tokens=MAX_TOKENS) == 200
        assert await _complete(session, base, "error:status=500", stream=False) >= 500
    await sink.wait(
        lambda: len(sink.records) == before + REQUESTS, 5.0, "the workload's nine records"
    )
