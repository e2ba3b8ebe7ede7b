"""The load generator: its own process, an aiohttp client (on uvloop when installed).

Closed loop (`--concurrency C`: C workers, each sends its next request as soon as the last one
is answered) or open loop (`--rate R`: requests start on a fixed schedule, R per second, at
most C in flight). Bounded by `--duration` seconds and `--max-requests` after `--warmup`.

Prints `warm` on a line of its own when the measured window starts, then one JSON line with
the results when it ends, so the caller can read the proxy's CPU time at both instants.

`python -m bench.loadgen --url http://127.0.0.1:P --kind chat|stream [--concurrency C] ...`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PATH = "/v1/chat/completions"


def request_body(kind: str, tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": f"normal:tokens={tokens},rate=0",
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": tokens,
    }
    if kind == "stream":
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def one(session: aiohttp.ClientSession, url: str, body: bytes, res: Results | None) -> None:
    start = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            data = await resp.read()
            if resp.status != 200:
                if res is not None:
                    res.error(f"status {resp.status}")
                return
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        if res is not None:
            res.error(type(exc).__name__)
        return
    if res is not None:
        res.latencies.append(time.perf_counter() - start)
        res.bytes += len(data)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + PATH
    body = request_body(args.kind, args.tokens)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: connections opened, caches filled; not measured.
        warm_end = loop.time() + args.warmup
        state: dict[str, Any] = {"res": None, "stop_at": warm_end, "sent": 0}

        async def closed_worker() -> None:
            while loop.time() < state["stop_at"]:
                res = state["res"]
                if res is not None:
                    if state["sent"] >= args.max_requests:
                        return
                    state["sent"] += 1
                await one(session, url, body, res)

        async def open_loop() -> None:
            interval = 1.0 / args.rate
            inflight: set[asyncio.Task[None]] = set()
            sem = asyncio.Semaphore(args.concurrency)
            next_at = loop.time()

            async def fire(res: Results | None) -> None:
                try:
                    await one(session, url, body, res)
                finally:
                    sem.release()

            while loop.time() < state["stop_at"]:
                res = state["res"]
                if res is not None and state["sent"] >= args.max_requests:
                    break
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
                if sem.locked():
                    if res is not None:
                        res.error("generator saturated")
                    continue
                await sem.acquire()
                if res is not None:
                    state["sent"] += 1
                task = asyncio.create_task(fire(res))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(inflight, timeout=args.request_timeout)

        async def phase(measured: bool) -> float:
            started = time.perf_counter()
            if args.rate:
                await open_loop()
            else:
                workers = [asyncio.create_task(closed_worker()) for _ in range(args.concurrency)]
                await asyncio.gather(*workers)
            return time.perf_counter() - started

        if args.warmup > 0:
            await phase(measured=False)
        res = Results()
        state["res"] = res
        state["stop_at"] = loop.time() + args.duration
        print("warm", flush=True)
        elapsed = await phase(measured=True)
    lat = res.latencies
    return {
        "kind": args.kind,
        "mode": f"rate {args.rate:g}/s" if args.rate else f"closed {args.concurrency}",
        "concurrency": args.concurrency,
        "rate": args.rate,
        "elapsed_s": elapsed,
        "ok": len(lat),
        "errors": res.errors,
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": (_pct(lat, 50) or 0) * 1000,
        "p90_ms": (_pct(lat, 90) or 0) * 1000,
        "p99_ms": (_pct(lat, 99) or 0) * 1000,
        "max_ms": max(lat, default=0) * 1000,
        "bytes": res.bytes,
        "uvloop": args.uvloop_used,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=["chat", "stream"], default="chat")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    loop_factory = None
    args.uvloop_used = False
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
            args.uvloop_used = True
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
