"""`hangup demo`: the proxy in front of its embedded simulated provider, with a scripted mix of
clients, so a newcomer sees what hanging up saves in a minute, with no API key.

Some clients read their answer to the end, some hang up mid-stream, one meets a stalled
upstream (idle timeout), one an upstream that only sends keep-alives (first-token timeout).
Then a summary; the proxy stays up (unless --exit) for a look at /metrics or your own client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from proxy.config import HangupConfig
from proxy.logs import configure_logging
from proxy.metrics import summarize
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider

DEMO_MODEL = "demo-model"
STALL_MODEL = "stall:after=20"
KEEPALIVE_MODEL = "slow-first-token:delay=60,keepalive=0.2"
# Demo prices, USD per million tokens (the order of magnitude of a mid-size hosted model).
DEMO_PRICES = {"input_per_mtok": 2.5, "cached_input_per_mtok": 1.25, "output_per_mtok": 10.0}


def demo_config(upstream_url: str, port: int) -> HangupConfig:
    return HangupConfig.model_validate(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            # The simulator plays a hosted provider whose billing stops when a stream is
            # closed (as OpenAI's does): hanging up saves dollars there, not only compute.
            "upstreams": {"simulator": {"base_url": upstream_url, "billing": {"stream": "stops"}}},
            "routes": [
                {
                    "name": "chat",
                    "match": {"path_prefix": "/v1/"},
                    "upstream": "simulator",
                    # Short on purpose, so the demo shows timeouts within seconds.
                    "timeouts": {"first_token_s": 2, "idle_s": 1.5},
                    "expected_completion_tokens": 400,
                }
            ],
            # Every model the demo sends is priced, so its summary has no "unpriced" request.
            "prices": {model: DEMO_PRICES for model in (DEMO_MODEL, STALL_MODEL, KEEPALIVE_MODEL)},
            "logging": {"access_log": False},
            # Not traced, whatever OTEL_* variables the user's shell has: the demo is about
            # hanging up, and must run without the otel extra.
            "tracing": {"enabled": False},
        }
    )


class CannotListen(Exception):
    """The demo's proxy port could not be bound (its cause is the OSError)."""


def _say(text: str) -> None:
    print(text, flush=True)


async def _stream(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    *,
    max_tokens: int,
    hang_up_after: int | None = None,
    show: bool = False,
    request_id: str,
) -> tuple[int, str | None]:
    """Stream a chat completion; return (content chunks read, error message if any)."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    }
    chunks, error = 0, None
    async with session.post(
        f"{base}/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    ) as response:
        if response.status != 200:
            payload = await response.json()
            return 0, payload["error"]["message"]
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                break
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    chunks += 1
                    if show:
                        print(text, end="", flush=True)
            if hang_up_after is not None and chunks >= hang_up_after:
                break  # leaving `async with` closes the connection: the client hangs up
    if show:
        print(flush=True)
    return chunks, error


async def run_demo(port: int, keep_running: bool) -> int:
    sim = SimulatedProvider(tokens_per_s=60.0, default_tokens=64)
    upstream = await sim.start(host="127.0.0.1", port=0)
    server = ProxyServer(demo_config(upstream, port))
    try:
        await server.start()
    except OSError as exc:  # the port is taken, or the address is not ours to bind
        await server.runner.cleanup()
        await sim.stop()
        raise CannotListen(exc) from exc
    base = server.base_url
    cancel_close_s: list[float] = []  # client hang-up -> upstream saw the close, per client
    try:
        _say(f"hangup demo: proxy {base}/v1  ->  simulated provider {upstream}")
        _say(f"metrics: {base}/metrics\n")
        async with aiohttp.ClientSession() as session:
            _say("1. A client reads a whole streamed answer (60 tokens/s):")
            await _stream(
                session, base, DEMO_MODEL, max_tokens=40, show=True, request_id="demo-complete"
            )

            _say("\n2. Eight clients hang up mid-stream (each asked for up to 2000 tokens):")
            cuts = [3, 5, 8, 10, 12, 15, 20, 25]
            ids = [f"demo-cut-{i}" for i in range(len(cuts))]
            hung_up_at: dict[str, float] = {}

            async def cut(request_id: str, after: int) -> None:
                await _stream(
                    session,
                    base,
                    DEMO_MODEL,
                    max_tokens=2000,
                    hang_up_after=after,
                    request_id=request_id,
                )
                hung_up_at[request_id] = time.monotonic()

            await asyncio.gather(*(cut(i, n) for i, n in zip(ids, cuts, strict=True)))
            for request_id, after in zip(ids, cuts, strict=True):
                closed = await sim.wait_closed(request_id, timeout=5.0)
                lag = max(0.0, closed - hung_up_at[request_id])
                cancel_close_s.append(lag)
                _say(
                    f"   hung up after {after:2d} tokens: the simulated provider saw its "
                    f"connection closed {lag * 1000:.1f} ms later"
                )

            _say("\n3. An upstream stalls after 20 tokens (idle_s=1.5 on this route):")
            chunks, error = await _stream(
                session, base, STALL_MODEL, max_tokens=500, request_id="demo-stall"
            )
            _say(f"   got {chunks} tokens, then: {error}")

            _say("\n4. An upstream sends only keep-alive comments (first_token_s=2):")
            chunks, error = await _stream(
                session,
                base,
                KEEPALIVE_MODEL,
                max_tokens=50,
                request_id="demo-keepalive",
            )
            _say(f"   got {chunks} tokens, then: {error}")

            _say("\n5. Five clients wait for whole (non-streamed) answers:")
            for i in range(5):
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={
                        "model": DEMO_MODEL,
                        "max_tokens": 30,
                        "messages": [{"role": "user", "content": f"Question {i}?"}],
                    },
                ) as response:
                    await response.read()
            _say("   done")
        # The summary's cancel line is computed from the same measurements as the lines above.
        _say(
            "\n"
            + summarize(
                server.state.metrics,
                cancel_close_s=cancel_close_s,
                prices=server.config.prices,
            )
        )
        if keep_running:
            _say(
                f"\nThe proxy stays up. Try:\n  curl -sN {base}/v1/chat/completions "
                f'-H \'Content-Type: application/json\' -d \'{{"model":"{DEMO_MODEL}",'
                f'"stream":true,"messages":[{{"role":"user","content":"hi"}}]}}\''
                f"\n  curl -s {base}/metrics | grep hangup_"
                f"\n  hangup stats {base} --watch 2\nCtrl-C to stop."
            )
            await _wait_for_interrupt()
    finally:
        await server.shutdown(grace_s=1.0)
        await sim.stop()
    return 0


async def _wait_for_interrupt() -> None:
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="hangup demo", description=__doc__)
    p.add_argument("--port", type=int, default=8080, help="proxy port (0: any free port)")
    p.add_argument("--exit", action="store_true", help="exit after the summary")
    args = p.parse_args(argv)
    configure_logging("WARNING", stream=sys.stderr)
    try:
        return asyncio.run(run_demo(args.port, keep_running=not args.exit))
    except CannotListen as failure:
        exc = failure.__cause__
        assert isinstance(exc, OSError)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(
            f"hangup demo: cannot listen on 127.0.0.1:{args.port}: {reason} "
            "(pick another with --port, or --port 0 for any free one)",
            file=sys.stderr,
        )
        return 1
