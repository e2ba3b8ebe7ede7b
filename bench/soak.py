"""Soak: a bounded chaos run, then an audit that nothing was lost.

Thousands of requests (streaming and not) go through hangup (the real CLI, with short
deadlines so that stalls end in timeouts) to the simulated provider, with random upstream
faults chosen by model name (normal answers of random length and pace, resets, stalls, 5xx and
429, in-band errors, malformed chunks, slow headers, slow first tokens with keep-alives) and
random client hang-ups at random moments. Afterwards:

1. exactly one outcome per request: every request id sent appears exactly once in hangup's
   access log, and the outcome counters of /metrics grew by exactly the number sent;
2. nothing left open: hangup's in-flight and upstream-connection gauges are 0 and the
   simulator has no open connection and no active request;
3. accounting equals what the simulator sent: for every completed request, the completion
   tokens hangup accounted are the tokens the simulator's record says it sent; and the access
   log's token totals equal the /metrics token counters;
4. memory is bounded: RSS after the last phase is within `--rss-slack-mib` of RSS after the
   first phase (the run is split into phases to tell a leak from a high-water mark).

`python -m bench.soak [--requests 3000] [--concurrency 32] [--short] [--seed 1] [--out FILE]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    HOST,
    Child,
    Procs,
    http_get,
    http_json,
    metric_samples,
    metric_sum,
    open_fds,
    report,
    rss_bytes,
    sim_open_connections,
    status_field,
    table,
)

TIMEOUTS = {"connect_s": 2, "headers_s": 3, "first_token_s": 2, "idle_s": 1, "total_s": 20}


@dataclass(frozen=True)
class Plan:
    request_id: str
    model: str
    stream: bool
    hangup_after: float | None  # seconds after sending; None: the client waits to the end


def choose(rng: random.Random, i: int, hangup_p: float) -> Plan:
    """One request of the chaos mix."""
    stream = rng.random() < 0.6
    k = rng.randint(0, 6)
    tokens = rng.randint(1, 64)
    rate = rng.choice([0, 0, 200, 1000, 5000])
    roll = rng.random()
    if roll < 0.45:
        model = f"normal:tokens={tokens},rate={rate}"
    elif roll < 0.55:
        model = f"reset:after={k},tokens={tokens},rate={rate}"
    elif roll < 0.62:
        model = f"stall:after={k},tokens={tokens},rate={rate}"
    elif roll < 0.70:
        status = rng.choice([500, 502, 503, 429])
        model = f"error:status={status}"
        if stream and rng.random() < 0.5:
            model += f",after={k},tokens={tokens}"
    elif roll < 0.80:
        model = f"malformed:after={k},tokens={max(tokens, k)},rate={rate}"
    elif roll < 0.88:
        delay = rng.choice([0.05, 0.2, 0.5])
        model = f"slow-first-token:delay={delay},keepalive=0.02,tokens={tokens}"
    elif roll < 0.94:
        model = f"slow-headers:delay={rng.choice([0.05, 0.2])},tokens={tokens}"
    else:
        model = f"empty-deltas:count={k},tokens={tokens},rate={rate}"
    hangup_after = rng.uniform(0, 0.4) if rng.random() < hangup_p else None
    return Plan(f"soak-{i}", model, stream, hangup_after)


@dataclass
class Seen:
    """What the client saw of one request."""

    sent: bool = False  # the request head went out (the proxy can know about it)
    status: int | None = None
    complete: bool = False  # read to the end
    hung_up: bool = False  # we left before the end
    error: str | None = None


async def _headers_sent(session: object, ctx: Any, params: object) -> None:
    event = ctx.trace_request_ctx
    if isinstance(event, asyncio.Event):
        event.set()


def tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return trace


async def send(session: aiohttp.ClientSession, url: str, plan: Plan) -> Seen:
    """One request; a planned hang-up happens `hangup_after` s after the request went out."""
    seen = Seen()
    body = {
        "model": plan.model,
        "messages": [{"role": "user", "content": "Chaos, please."}],
        "stream": plan.stream,
    }
    headers = {"x-request-id": plan.request_id}
    sent = asyncio.Event()

    async def exchange() -> None:
        async with session.post(url, json=body, headers=headers, trace_request_ctx=sent) as resp:
            seen.status = resp.status
            await resp.read()
            seen.complete = True

    task = asyncio.ensure_future(exchange())
    waiter = asyncio.ensure_future(sent.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        seen.sent = sent.is_set()
        if plan.hangup_after is not None and not task.done():
            done, _ = await asyncio.wait((task,), timeout=plan.hangup_after)
            if not done:
                seen.hung_up = True
                task.cancel()  # aiohttp closes the connection: the client hangs up
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            seen.error = type(task.exception()).__name__
    finally:
        for t in (task, waiter):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    return seen


async def drive(url: str, plans: list[Plan], concurrency: int, bound_s: float) -> dict[str, Seen]:
    seen: dict[str, Seen] = {}
    queue = list(reversed(plans))
    # One connection per request: a hang-up must not take a pooled connection's next request.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trace_configs=[tracing()]
    ) as session:

        async def worker() -> None:
            while queue:
                plan = queue.pop()
                seen[plan.request_id] = await send(session, url, plan)

        async with asyncio.timeout(bound_s):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


def access_log(child: Child) -> list[dict[str, Any]]:
    lines = []
    for raw in child.log_path.read_text(errors="replace").splitlines():
        if '"hangup.access"' not in raw:
            continue
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def wait_for(probe: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.05)
    return bool(probe())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--hangup-p", type=float, default=0.3, help="share of client hang-ups")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rss-slack-mib", type=float, default=16.0)
    p.add_argument("--bound-s", type=float, default=600.0, help="hard bound on the whole run")
    p.add_argument("--short", action="store_true", help="CI: 600 requests")
    p.add_argument("--uvloop", action="store_true", help="run hangup on uvloop")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.short:
        args.requests = 600
    rng = random.Random(args.seed)
    plans = [choose(rng, i, args.hangup_p) for i in range(args.requests)]
    started = time.monotonic()
    failures: list[str] = []
    with Procs() as procs:
        sim = procs.sim(tokens_per_s=0, default_tokens=16, max_records=args.requests + 1000)
        config = procs.workdir / "soak.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"host": HOST, "port": 0},
                    "upstreams": {"sim": {"base_url": sim.url + "/v1"}},
                    "routes": [{"name": "default", "upstream": "sim"}],
                    "defaults": {"timeouts": TIMEOUTS},
                }
            )
        )
        proxy = procs.hangup(sim.url, config=config, uvloop=args.uvloop)
        url = proxy.url + "/v1/chat/completions"
        rss_start, fds_start = rss_bytes(proxy.pid), open_fds(proxy.pid)
        seen: dict[str, Seen] = {}
        rss_phases: list[int] = []
        per_phase = -(-len(plans) // args.phases)
        for ph in range(args.phases):
            chunk = plans[ph * per_phase : (ph + 1) * per_phase]
            remaining = args.bound_s - (time.monotonic() - started)
            seen.update(asyncio.run(drive(url, chunk, args.concurrency, remaining)))
            wait_for(lambda: http_json(sim.url + "/_sim/stats")["active_requests"] == 0, 10)
            rss_phases.append(rss_bytes(proxy.pid))
            print(
                f"phase {ph + 1}/{args.phases}: {len(seen)} requests done,"
                f" proxy RSS {rss_phases[-1] / 2**20:.1f} MiB",
                flush=True,
            )
        elapsed = time.monotonic() - started

        def metrics() -> list[tuple[str, dict[str, str], float]]:
            return metric_samples(http_get(proxy.url + "/metrics").decode())

        # Completed exchanges leave idle keep-alive connections in hangup's pool; they count
        # as open at the simulator until the pool's keep-alive timeout (aiohttp's 15 s) closes
        # them. The full run waits for that (see below); --short only requires that none of
        # them carries a request (the simulator has no active request).
        idle_started = time.monotonic()

        def settled() -> bool:
            if metric_sum(metrics(), "hangup_requests_in_flight") != 0:
                return False
            if args.short:
                return bool(http_json(sim.url + "/_sim/stats")["active_requests"] == 0)
            return sim_open_connections(sim.url) == 0

        # aiohttp closes idle connections older than 15 s on a sweep that itself runs every
        # 15 s, so the last one may take up to 30 s.
        idle = wait_for(settled, 40)
        idle_s = time.monotonic() - idle_started
        m = metrics()
        sim_stats = http_json(sim.url + "/_sim/stats")
        sim_records = {
            r["request_id"]: r
            for r in http_json(sim.url + f"/_sim/requests?limit={args.requests + 1000}", 30)
        }
        time.sleep(0.2)  # the access log is written in the request's finally; let it flush
        log = access_log(proxy)
        rss_end, hwm, fds_end = (
            rss_bytes(proxy.pid),
            status_field(proxy.pid, "VmHWM"),
            open_fds(proxy.pid),
        )

    # 1. Exactly one outcome per request (that went out: a hang-up before the request head was
    # written is a request the proxy never saw).
    sent = {rid for rid, s in seen.items() if s.sent}
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in log:
        by_id.setdefault(line["request_id"], []).append(line)
    missing = sent - by_id.keys()
    doubled = [rid for rid, lines in by_id.items() if len(lines) > 1]
    outcomes = Counter(lines[0]["outcome"] for rid, lines in by_id.items() if rid in sent)
    counted = metric_sum(m, "hangup_requests_total")
    if missing:
        failures.append(f"{len(missing)} requests have no outcome, e.g. {sorted(missing)[:3]}")
    if doubled:
        failures.append(f"{len(doubled)} requests have more than one outcome: {doubled[:3]}")
    if counted != len(sent):
        failures.append(f"outcome counters sum to {counted:g}, {len(sent)} requests were sent")
    if len(seen) != len(plans):
        failures.append(f"the client finished {len(seen)} of {len(plans)} requests (bound hit)")
    # 2. Nothing left open.
    inflight = metric_sum(m, "hangup_requests_in_flight")
    upstream_open = metric_sum(m, "hangup_upstream_connections")
    sim_open = sim_stats["open_connections"] - 1  # less the connection asking for the stats
    pooled = sim_open if args.short else 0  # idle in hangup's keep-alive pool (see settled)
    if not idle or inflight or upstream_open or sim_open > pooled or sim_stats["active_requests"]:
        failures.append(
            f"left open: in-flight {inflight:g}, upstream gauge {upstream_open:g},"
            f" simulator connections {sim_open}, active {sim_stats['active_requests']}"
        )
    # 3. Accounting.
    mismatched: list[str] = []
    completed_tokens_proxy = completed_tokens_sim = 0
    for rid in sent & by_id.keys():
        line = by_id[rid][0]
        rec = sim_records.get(rid)
        if line["outcome"] != "completed" or rec is None or line.get("upstream_status") != 200:
            continue
        proxy_tokens = line["tokens"]["completion"]
        sim_tokens = rec["content_tokens_sent"] + rec["reasoning_tokens_sent"]
        completed_tokens_proxy += proxy_tokens
        completed_tokens_sim += sim_tokens
        if proxy_tokens != sim_tokens:
            mismatched.append(f"{rid} ({rec['model']}): hangup {proxy_tokens}, sim {sim_tokens}")
    if mismatched:
        failures.append(
            f"{len(mismatched)} completed requests accounted differently from what the"
            f" simulator sent, e.g. {mismatched[:3]}"
        )
    log_completion = sum(by_id[r][0]["tokens"]["completion"] for r in sent & by_id.keys())
    log_prompt = sum(by_id[r][0]["tokens"]["prompt"] for r in sent & by_id.keys())
    metric_completion = metric_sum(m, "hangup_tokens_total", type="completion")
    metric_prompt = metric_sum(m, "hangup_tokens_total", type="prompt")
    if (log_completion, log_prompt) != (metric_completion, metric_prompt):
        failures.append(
            f"access log tokens (completion {log_completion}, prompt {log_prompt}) differ"
            f" from /metrics ({metric_completion:g}, {metric_prompt:g})"
        )
    saved = metric_sum(m, "hangup_tokens_saved_total")
    # 4. Memory.
    mib = 2**20
    growth = (rss_phases[-1] - rss_phases[0]) / mib
    if growth > args.rss_slack_mib:
        failures.append(f"RSS grew {growth:.1f} MiB from phase 1 to the end (leak?)")
    client = Counter(
        "hung up" if s.hung_up else ("complete" if s.complete else f"error {s.error}")
        for s in seen.values()
    )
    rows = [[k, v] for k, v in sorted(outcomes.items())]
    print()
    print(
        f"soak: {len(plans)} requests, {args.concurrency} concurrent, seed {args.seed},"
        f" {elapsed:.1f} s ({len(plans) / elapsed:.0f} req/s)"
    )
    print(table(["outcome (access log)", "requests"], rows))
    print()
    checks = [
        ["requests planned / sent", f"{len(plans)} / {len(sent)}"],
        ["outcome counters sum", f"{counted:g}"],
        ["ids with no / several outcomes", f"{len(missing)} / {len(doubled)}"],
        ["client view", ", ".join(f"{k} {v}" for k, v in sorted(client.items()))],
        ["in-flight, upstream gauge, sim open", f"{inflight:g}, {upstream_open:g}, {sim_open}"],
        [
            "upstream pool idle-closed after",
            f"not waited ({pooled} idle pooled)" if args.short else f"{idle_s:.1f} s",
        ],
        ["completed: tokens hangup / sim", f"{completed_tokens_proxy} / {completed_tokens_sim}"],
        ["completion tokens log / metrics", f"{log_completion} / {metric_completion:g}"],
        ["tokens saved (estimate)", f"{saved:g}"],
        ["sim content tokens sent (all)", sim_stats["content_tokens_sent"]],
        [
            "proxy RSS start / phases / end MiB",
            f"{rss_start / mib:.1f} / "
            + " ".join(f"{r / mib:.1f}" for r in rss_phases)
            + f" / {rss_end / mib:.1f} (HWM {hwm / mib:.1f})",
        ],
        ["proxy fds start / end", f"{fds_start} / {fds_end}"],
        ["verdict", "FAIL" if failures else "nothing lost"],
    ]
    print(table(["check", "value"], checks))
    return report(
        "soak",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": elapsed,
            "outcomes": dict(outcomes),
            "client": dict(client),
            "checks": {str(k): v for k, v in checks},
            "rss_phases": rss_phases,
            "failures": failures,
            "mismatched_examples": mismatched[:20],
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
