"""Hedging: p99 time to first token with and without `hedge_after_s` under a simulated slow
tail, and what the hedges cost.

Two simulated providers (their own processes) both have a slow tail: the model
`tail:p=P,delay=S` makes a seeded fraction P of their requests wait S seconds before the first
token. Two hangup processes (the real CLI) route to the first with the second as fallback; one
has `hedge_after_s` set, the other not. A client (this process) sends the same streamed chat to
both, alternating, a few at a time, and measures time to first content chunk at the client.

Waste is counted at the simulators, from their own records: every request hangup hung up on
before it finished (a hedge loser) was sent the whole prompt and generated what its record says.

`python -m bench.hedging [--requests 300] [--p 0.05] [--delay 2] [--hedge-after 0.25]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    Procs,
    http_get,
    http_json,
    metric_samples,
    metric_sum,
    percentile,
    report,
    table,
)
from proxy.sim import prompt_tokens

BODY: dict[str, Any] = {
    "stream": True,
    "messages": [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
}


def config_text(primary: str, backup: str, model: str, hedge_after: float | None) -> str:
    hedge = f"    hedge_after_s: {hedge_after}\n" if hedge_after is not None else ""
    return (
        "upstreams:\n"
        f"  primary: {{base_url: {json.dumps(primary + '/v1')}}}\n"
        f"  backup: {{base_url: {json.dumps(backup + '/v1')}}}\n"
        "routes:\n"
        "  - name: chat\n"
        "    upstream: primary\n"
        f"    fallbacks: [{{upstream: backup, model: {json.dumps(model)}}}]\n"
        "    circuit_failures: 0\n"
        f"{hedge}"
        "logging: {access_log: false}\n"
    )


async def one(session: aiohttp.ClientSession, base: str, model: str, request_id: str) -> float:
    """Time to the first content chunk, seconds; raises on anything but a whole good stream."""
    started = time.monotonic()
    first: float | None = None
    async with session.post(
        f"{base}/v1/chat/completions",
        json={**BODY, "model": model},
        headers={"x-request-id": request_id},
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"{request_id}: status {response.status}")
        done = False
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                if b'"content":""' not in line:
                    first = time.monotonic()
            done = done or line.startswith(b"data: [DONE]")
    if first is None or not done:
        raise RuntimeError(f"{request_id}: no content or no [DONE]")
    return first - started


async def drive(
    urls: dict[str, str], model: str, requests: int, concurrency: int
) -> tuple[dict[str, list[float]], list[str]]:
    ttft: dict[str, list[float]] = {name: [] for name in urls}
    failures: list[str] = []
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for i in range(requests):
        for name in urls:  # interleaved: both see the same machine at the same time
            queue.put_nowait((name, i))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            name, i = queue.get_nowait()
            try:
                ttft[name].append(await one(session, urls[name], model, f"{name}-{i}"))
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                failures.append(str(exc))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ttft, failures


def waste(sim_urls: list[str], prefix: str) -> dict[str, int]:
    """Requests of this hangup that a simulator saw end because hangup hung up, and what they
    cost: whole prompts, and the tokens each generated before it was closed."""
    losers = generated = 0
    for url in sim_urls:
        for rec in http_json(f"{url}/_sim/requests"):
            if str(rec["request_id"]).startswith(prefix) and rec["end"] == "peer_closed":
                losers += 1
                generated += int(rec["tokens_generated"])
    prompt = prompt_tokens("chat", {**BODY, "model": "x"})
    return {
        "losers": losers,
        "prompt_tokens": losers * prompt,
        "completion_tokens": generated,
    }


def loser_close_lags(sim_urls: list[str], prefix: str) -> list[float]:
    """For every hedged request: the loser's connection close minus the winner's first token,
    both as the simulator processes recorded them (CLOCK_MONOTONIC, shared by processes)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for url in sim_urls:
        for rec in http_json(f"{url}/_sim/requests"):
            if str(rec["request_id"]).startswith(prefix):
                by_id.setdefault(str(rec["request_id"]), []).append(rec)
    lags = []
    for recs in by_id.values():
        winners = [r for r in recs if r["end"] == "completed" and r["first_token_at"]]
        losers = [r for r in recs if r["end"] == "peer_closed" and r["connection_closed_at"]]
        if len(winners) == 1 and len(losers) == 1:
            lags.append(losers[0]["connection_closed_at"] - winners[0]["first_token_at"])
    return lags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per variant")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--p", type=float, default=0.05, help="fraction of slow first tokens")
    parser.add_argument("--delay", type=float, default=2.0, help="the slow first token, s")
    parser.add_argument("--hedge-after", type=float, default=0.25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = f"tail:p={args.p},delay={args.delay}"
    with Procs() as procs:
        # 200 tokens/s: a first token after 5 ms normally, `delay` in the tail.
        primary = procs.sim("primary", tokens_per_s=200, max_records=4 * args.requests + 100)
        backup = procs.sim("backup", tokens_per_s=200, max_records=4 * args.requests + 100)
        urls: dict[str, str] = {}
        for name, hedge in (("plain", None), ("hedged", args.hedge_after)):
            path = procs.workdir / f"{name}.yaml"
            path.write_text(config_text(primary.url, backup.url, model, hedge))
            urls[name] = procs.hangup(primary.url, name=name, config=path).url
        ttft, failures = asyncio.run(drive(urls, model, args.requests, args.concurrency))
        sims = [primary.url, backup.url]
        costs = {name: waste(sims, f"{name}-") for name in urls}
        lags = loser_close_lags(sims, "hedged-")
        samples = metric_samples(http_get(urls["hedged"] + "/metrics").decode())
        started = metric_sum(samples, "hangup_hedges_total", event="started")
        won = metric_sum(samples, "hangup_hedges_total", event="won")
    rows = []
    result: dict[str, Any] = {"model": model, "hedge_after_s": args.hedge_after, "variants": {}}
    for name, values in ttft.items():
        stats = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
        stats["max"] = max(values) if values else float("nan")
        n = len(values)
        cost = costs[name]
        result["variants"][name] = {"n": n, "ttft_s": stats, "waste": cost}
        rows.append(
            [
                name,
                n,
                f"{stats['p50'] * 1000:.0f}",
                f"{stats['p90'] * 1000:.0f}",
                f"{stats['p99'] * 1000:.0f}",
                f"{stats['max'] * 1000:.0f}",
                cost["losers"],
                f"{cost['prompt_tokens'] / max(n, 1):.1f}",
                f"{cost['completion_tokens'] / max(n, 1):.2f}",
            ]
        )
    plain, hedged = result["variants"]["plain"], result["variants"]["hedged"]
    ratio = hedged["ttft_s"]["p99"] / plain["ttft_s"]["p99"] if plain["ttft_s"]["p99"] else None
    result["p99_ratio_hedged_to_plain"] = ratio
    result["hedges"] = {"started": started, "won": won}
    result["loser_close_after_winner_first_token_s"] = {
        "n": len(lags),
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "max": max(lags) if lags else None,
    }
    print(
        table(
            [
                "variant",
                "requests",
                "TTFT p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "losers closed",
                "wasted prompt tok/req",
                "wasted completion tok/req",
            ],
            rows,
        )
    )
    print(f"\np99 TTFT hedged / plain: {ratio:.3f}" if ratio else "")
    print(f"hedges started {started:.0f}, won {won:.0f} (of {args.requests} hedged requests)")
    if lags:
        print(
            f"loser closed after the winner's first token (at the simulators, {len(lags)} "
            f"hedges): p50 {percentile(lags, 50) * 1000:.2f} ms, "
            f"p99 {percentile(lags, 99) * 1000:.2f} ms, max {max(lags) * 1000:.2f} ms"
        )
    expected = args.requests
    for name, values in ttft.items():
        if len(values) != expected:
            failures.append(f"{name}: {len(values)} of {expected} requests streamed whole")
    if costs["plain"]["losers"]:
        failures.append(f"plain: {costs['plain']['losers']} upstream requests were hung up on")
    return report("hedging", result, args.out, failures)


if __name__ == "__main__":
    sys.exit(main())
