"""Scale: N concurrent idle streams held through one proxy process.

Each stream asks the simulated provider for `stall:after=1`: the role chunk and one content
chunk, then silence until the peer hangs up. The client (this process, raw sockets) opens the
streams in batches, waits for each one's first content chunk to arrive through the proxy, holds
them all, then hangs up on all of them.

Reported per target (hangup, and the minimal aiohttp relay as the floor): time to open all N,
time to first chunk p50/p99, proxy RSS before / held / after and (held - before) / N, open file
descriptors, and the clean-close checks: every stream got its chunk, the simulator ends with no
open connection, hangup's in-flight gauge returns to 0 and it counted N client_cancelled.

N streams cost 2N sockets in the proxy (client side + upstream side). This process raises its
soft RLIMIT_NOFILE to the hard limit, which the children inherit; N defaults to what fits.

`python -m bench.scale [--streams N] [--batch 200] [--targets hangup,baseline] [--out FILE]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    Child,
    Procs,
    http_get,
    http_json,
    metric_samples,
    metric_sum,
    open_fds,
    percentile,
    raise_nofile,
    report,
    rss_bytes,
    sim_open_connections,
    status_field,
    table,
)

FD_RESERVE = 200  # descriptors the proxy needs besides its streams' sockets
REQUEST = json.dumps(
    {
        "model": "stall:after=1",
        "messages": [{"role": "user", "content": "Hold on."}],
        "stream": True,
    }
).encode()


class Stream:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def open_stream(port: int, n: int, timeout: float) -> tuple[Stream, float]:
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Type: application/json\r\nx-request-id: scale-{n}\r\n"
            f"Content-Length: {len(REQUEST)}\r\n\r\n"
        ).encode()
        writer.write(head + REQUEST)
        got = b""
        # The role chunk, then the first content chunk: two SSE events.
        while got.count(b"data: ") < 2:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before the first chunk")
            got += data
    return Stream(reader, writer), time.monotonic() - started


async def hold(port: int, n: int, batch: int, timeout: float) -> dict[str, Any]:
    streams: list[Stream] = []
    ttfc: list[float] = []
    errors: dict[str, int] = {}
    started = time.monotonic()
    for first in range(0, n, batch):
        results = await asyncio.gather(
            *(open_stream(port, i, timeout) for i in range(first, min(n, first + batch))),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
            else:
                streams.append(r[0])
                ttfc.append(r[1])
    return {
        "streams": streams,
        "open_s": time.monotonic() - started,
        "ttfc": ttfc,
        "errors": errors,
    }


async def close_all(streams: list[Stream]) -> float:
    started = time.monotonic()
    for s in streams:
        s.writer.close()
    await asyncio.gather(*(s.writer.wait_closed() for s in streams), return_exceptions=True)
    return time.monotonic() - started


def wait_for(probe: Any, timeout: float) -> tuple[bool, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if probe():
            return True, time.monotonic() - started
        time.sleep(0.05)
    return bool(probe()), time.monotonic() - started


def run_target(
    name: str, proxy: Child, sim: Child, n: int, batch: int, timeout: float, hold_s: float
) -> dict[str, Any]:
    port = int(proxy.url.rsplit(":", 1)[1])
    is_hangup = name.startswith("hangup")

    def metrics() -> list[tuple[str, dict[str, str], float]]:
        return metric_samples(http_get(proxy.url + "/metrics").decode())

    # Warm-up: a first batch opened and closed, so one-time costs are not counted per stream.
    warm = asyncio.run(_cycle(port, min(batch, 100), batch, timeout))
    wait_for(lambda: sim_open_connections(sim.url) == 0, 30)
    time.sleep(0.5)
    rss0, fds0 = rss_bytes(proxy.pid), open_fds(proxy.pid)
    sim_stats0 = http_json(sim.url + "/_sim/stats")
    out: dict[str, Any] = {"target": name, "streams_wanted": n}

    async def scenario() -> dict[str, Any]:
        held = await hold(port, n, batch, timeout)
        streams: list[Stream] = held.pop("streams")
        await asyncio.sleep(hold_s)
        snap: dict[str, float] = {
            "rss_held": rss_bytes(proxy.pid),
            "hwm": status_field(proxy.pid, "VmHWM"),
            "fds_held": open_fds(proxy.pid),
            "sim_open_held": sim_open_connections(sim.url),
        }
        if is_hangup:
            snap["inflight_held"] = metric_sum(metrics(), "hangup_requests_in_flight")
        snap["close_s"] = await close_all(streams)
        return {**held, **snap, "streams_held": len(streams)}

    res = asyncio.run(scenario())
    ttfc = res.pop("ttfc")
    closed, settle_s = wait_for(lambda: sim_open_connections(sim.url) == 0, 60)
    out.update(res)
    out["sim_open_after"] = sim_open_connections(sim.url)
    out["upstream_closed_s"] = settle_s
    time.sleep(0.5)
    out.update(
        rss_before=rss0,
        rss_after=rss_bytes(proxy.pid),
        fds_before=fds0,
        fds_after=open_fds(proxy.pid),
        ttfc_p50_ms=percentile(ttfc, 50) * 1000,
        ttfc_p99_ms=percentile(ttfc, 99) * 1000,
        kib_per_stream=(res["rss_held"] - rss0) / 1024 / max(1, res["streams_held"]),
        sim_requests=http_json(sim.url + "/_sim/stats")["total_requests"]
        - sim_stats0["total_requests"],
        warmup=warm,
    )
    problems = []
    if out["streams_held"] != n or res["errors"]:
        problems.append(f"only {out['streams_held']} of {n} streams relayed: {res['errors']}")
    if res["sim_open_held"] < out["streams_held"]:
        problems.append(f"simulator held only {res['sim_open_held']} upstream connections")
    if not closed:
        problems.append(f"{out['sim_open_after']} upstream connections still open after 60 s")
    if is_hangup:
        ok, _ = wait_for(lambda: metric_sum(metrics(), "hangup_requests_in_flight") == 0, 30)
        m = metrics()
        out["inflight_after"] = metric_sum(m, "hangup_requests_in_flight")
        out["client_cancelled_total"] = metric_sum(
            m, "hangup_requests_total", outcome="client_cancelled"
        )
        out["requests_total"] = metric_sum(m, "hangup_requests_total")
        want = out["streams_held"] + warm["streams"]
        if not ok:
            problems.append(f"in-flight gauge still {out['inflight_after']}")
        if out["client_cancelled_total"] != want or out["requests_total"] != want:
            problems.append(
                f"outcomes: {out['client_cancelled_total']:g} client_cancelled of"
                f" {out['requests_total']:g} counted, {want} expected"
            )
    out["problems"] = problems
    return out


async def _cycle(port: int, n: int, batch: int, timeout: float) -> dict[str, Any]:
    held = await hold(port, n, batch, timeout)
    await close_all(held["streams"])
    return {"streams": len(held["streams"]), "errors": held["errors"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=10_000, help="capped by the fd limit")
    p.add_argument("--batch", type=int, default=200, help="streams opened concurrently")
    p.add_argument("--hold", type=float, default=3.0, help="seconds to hold them all")
    p.add_argument("--timeout", type=float, default=60.0, help="per stream, to the first chunk")
    p.add_argument("--targets", default="hangup,baseline")
    p.add_argument("--uvloop", action="store_true", help="run hangup on uvloop")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    soft, hard = raise_nofile()
    fit = (soft - FD_RESERVE) // 2
    n = min(args.streams, fit)
    print(f"RLIMIT_NOFILE soft {soft} hard {hard}: up to {fit} streams fit in one proxy; N={n}")
    if n < args.streams:
        print(f"  ({args.streams} streams need {2 * args.streams + FD_RESERVE} descriptors)")
    started = time.monotonic()
    outs: list[dict[str, Any]] = []
    for name in [t for t in args.targets.split(",") if t]:
        with Procs() as procs:
            sim = procs.sim(tokens_per_s=0, default_tokens=16)
            if name == "baseline":
                proxy = procs.baseline(sim.url)
            else:
                # Past the shipped 1,024 client connections the rest would be refused.
                limit = n + 64 if n > 1000 else None
                proxy = procs.hangup(sim.url + "/v1", uvloop=args.uvloop, max_connections=limit)
            print(f"{name}: opening {n} streams in batches of {args.batch}...", flush=True)
            out = run_target(name, proxy, sim, n, args.batch, args.timeout, args.hold)
            outs.append(out)
            print(
                f"{name}: held {out['streams_held']} in {out['open_s']:.1f} s,"
                f" {out['kib_per_stream']:.1f} KiB/stream, problems: {out['problems'] or 'none'}",
                flush=True,
            )
    mib = 1024 * 1024
    rows = [
        [
            o["target"],
            o["streams_held"],
            o["open_s"],
            o["ttfc_p50_ms"],
            o["ttfc_p99_ms"],
            o["rss_before"] / mib,
            o["rss_held"] / mib,
            o["rss_after"] / mib,
            o["kib_per_stream"],
            o["fds_held"],
            o["upstream_closed_s"],
            "yes" if not o["problems"] else "NO",
        ]
        for o in outs
    ]
    print()
    print(f"scale: {n} idle streams held through one proxy process")
    print(
        table(
            [
                "target",
                "streams",
                "open all s",
                "TTFC p50 ms",
                "TTFC p99 ms",
                "RSS before MiB",
                "RSS held MiB",
                "RSS after MiB",
                "KiB/stream",
                "fds held",
                "all closed in s",
                "clean",
            ],
            rows,
        )
    )
    failures = [f"{o['target']}: {p}" for o in outs for p in o["problems"]]
    return report(
        "scale",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "nofile": [soft, hard],
            "streams": n,
            "elapsed_s": time.monotonic() - started,
            "results": outs,
            "failures": failures,
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
