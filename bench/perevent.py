"""CPU per SSE event, one event a read, precise enough to see a change of ~0.05x the relay's.

`bench.wrk`'s slope (`slow20` -> `slow200`) spreads +-0.2x between rounds: 180 events a stream
against a per-request cost of 20-30 events, and wrk's cut of the requests in flight at the end of
its window charges their CPU to the completed ones. Here the slope is between a short and a long
paced stream (20 and, by default, 2,000 events 1 ms apart, so each event is its own read at the
proxy), at few connections (unsaturated), and a stream's CPU is divided by the streams' worth of
bytes wrk received (bytes / the size of one whole answer, measured once per target), so a
stream cut by the end of the window counts for the part that was relayed. Targets (the relay,
hangup, and with `--compare DIR` another source tree's CLI) are interleaved in every round;
each round gives one ratio hangup/relay of the slopes; reported: the median and quartiles of
the rounds' ratios and the ratio of the summed slopes.

`python -m bench.perevent [--rounds 6] [--duration 8] [--long 2000] [--connections 10]
[--compare DIR] [--targets relay,hangup,compare]`
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import fake_upstream
from bench.common import Procs, median, percentile, report, table
from bench.wrk import LUA, PATH, Target, measure, start_targets, wrk_binary

SHORT = 20
GAP_MS = 1.0


def lua_script(workdir: Path, events: int) -> Path:
    extra = (
        f'wrk.headers["x-bench-events"] = "{events}"\nwrk.headers["x-bench-gap-ms"] = "{GAP_MS:g}"'
    )
    body = fake_upstream.request_body(stream=True).decode()
    path = workdir / f"paced{events}.lua"
    path.write_text(LUA.format(body=body, extra=extra))
    return path


def answer_bytes(url: str, events: int) -> int:
    """Bytes of one whole streamed answer as wrk counts them (status line, head, chunked body)."""
    parts = urlsplit(url)
    body = fake_upstream.request_body(stream=True)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"x-bench-events: {events}\r\nx-bench-gap-ms: 0\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--long", type=int, default=2000, help="events of the long stream")
    p.add_argument("--targets", default="relay,hangup,compare")
    p.add_argument("--compare", type=Path, metavar="DIR", help="also the hangup CLI from DIR")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    wrk = wrk_binary()
    if wrk is None:
        print("bench.perevent needs Debian's wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    started = time.monotonic()
    sizes = (SHORT, args.long)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    full: dict[tuple[int, str], int] = {}
    with Procs() as procs:
        up = fake_upstream.start(procs)
        wanted = set(args.targets.split(","))
        targets: list[Target] = [
            t for t in start_targets(procs, up.url, args.compare) if t.name in wanted
        ]
        ours = sorted({up.pid, *(c.pid for c in procs.children)})
        scripts = {n: lua_script(procs.workdir, n) for n in sizes}
        for t in targets:
            for n in sizes:
                full[(n, t.name)] = answer_bytes(t.url, n)
        for rnd in range(args.rounds):
            for n in sizes:
                for t in targets:
                    r = measure(
                        wrk,
                        t,
                        scripts[n],
                        ours,
                        connections=args.connections,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                    streams = int(r["bytes"]) / full[(n, t.name)]
                    r["streams"] = streams
                    r["cpu_us_per_stream"] = r["proxy_cpu_s"] / streams * 1e6
                    runs.setdefault((n, t.name), []).append(r)
                    print(
                        f"round {rnd + 1} {n:5} events {t.name:8} {streams:8.1f} streams"
                        f"  cpu {r['cpu_us_per_stream']:8.0f} us/stream"
                        f" ({r['proxy_cpus']:.2f} CPU)  others {r['others_cpus']:.2f} CPU",
                        flush=True,
                    )
    span = args.long - SHORT
    names = [t.name for t in targets]
    slopes = {
        name: [
            (lng["cpu_us_per_stream"] - sht["cpu_us_per_stream"]) / span
            for sht, lng in zip(runs[(SHORT, name)], runs[(args.long, name)], strict=True)
        ]
        for name in names
    }
    results: dict[str, Any] = {}
    rows = []
    for name in names:
        row: dict[str, Any] = {
            "event_us_rounds": [round(v, 3) for v in slopes[name]],
            "event_us_median": median(slopes[name]),
        }
        if name != "relay" and "relay" in slopes:
            ratios = [a / b for a, b in zip(slopes[name], slopes["relay"], strict=True)]
            row |= {
                "ratio_rounds": [round(v, 3) for v in ratios],
                "ratio_median": median(ratios),
                "ratio_q1": percentile(ratios, 25),
                "ratio_q3": percentile(ratios, 75),
                "ratio_of_sums": sum(slopes[name]) / sum(slopes["relay"]),
            }
        results[name] = row
        rows.append(
            [
                name,
                row["event_us_median"],
                min(slopes[name]),
                max(slopes[name]),
                row.get("ratio_median", "-"),
                f"{row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}" if "ratio_q1" in row else "-",
                row.get("ratio_of_sums", "-"),
            ]
        )
    others = [float(r["others_cpus"]) for rs in runs.values() for r in rs]
    failures = [
        f"{name}, {n} events: wrk errors {errors}"
        for (n, name), rs in runs.items()
        if (
            errors := {
                k: sum(int(r[k]) for r in rs) for k in ("connect", "read", "write", "status")
            }
        )
        and any(errors.values())
    ]
    print()
    print(
        f"CPU per event, slope {SHORT} -> {args.long} events {GAP_MS:g} ms apart,"
        f" {args.connections} connections, {args.rounds} interleaved rounds of"
        f" {args.duration:g} s; others' CPUs median {median(others):.2f}, max {max(others):.2f}"
    )
    print(
        table(
            ["target", "us/event", "min", "max", "vs relay (median)", "quartiles", "of sums"],
            rows,
        )
    )
    return report(
        "perevent",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": time.monotonic() - started,
            "answer_bytes": {f"{n}/{name}": v for (n, name), v in full.items()},
            "others_cpus": {"median": median(others), "max": max(others)},
            "results": results,
            "runs": {f"{n}/{name}": v for (n, name), v in runs.items()},
            "failures": failures,
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
