"""Instructions per request: a deterministic companion to bench.wrk's CPU time.

CPU time per request moves with whatever else the machine runs (caches, frequency, other
tenants): per-round ratios in bench.wrk spread by 5-10 %, so a change of a few µs is not
visible while anything else is busy. The number of instructions the proxy executes per request
does not depend on that. Each target runs under valgrind's callgrind with instrumentation off;
a few seconds of wrk warm it up (imports, caches, pools), then instrumentation is switched on
(`callgrind_control -i on`) for a fixed number of seconds of load and off again, and the
instructions executed (callgrind's `Ir`) are divided by the requests wrk completed in that
window. Repeat runs of one tree agree within ~0.3 % for `chat` on a quiet machine (~1 % beside
a busy one); `stream20`'s paced events share reads under callgrind's slowdown, so its figure
moves by ~1.5 % (per event: bench.event_instructions).

An instruction is not a microsecond (a cache miss costs hundreds of cycles, a syscall's kernel
work is not counted at all: callgrind sees user space only), so this is for comparing two
versions of hangup, and hangup with the relay, not a replacement for bench.wrk's CPU time.
Valgrind slows the process ~50x: a run of 10 s serves a few hundred requests.

Targets: `relay` (bench/baseline_relay.py), `hangup` (this tree's CLI, shipped defaults),
`relay+uv` and `hangup+uv` (the same on uvloop, compared with each other, as in bench.wrk) and,
with `--compare DIR`, the CLI from another source tree (`git archive OLD | tar -x -C DIR`).

With `--simulate`, callgrind also simulates the caches and the branch predictor, and the run
reports per request the misses of each and a cycle estimate: where hangup's CPU per request is a
larger multiple of the relay's than its instructions are, this says whether caches or branches
make each instruction dearer (this VM has no hardware counters for `perf stat`).

A window of wrk's seconds starts and ends with requests in flight, counted in the instructions
but not in the requests: on a busy machine, where a target's requests in a window vary by up
to 2x, that moves the figure by ~1 %. `--requests N` counts over exactly N requests instead,
each sent and awaited by this process (a thread a connection) inside the window, the figure
to compare two trees while other work shares the machine.

`python -m bench.instructions [--workloads chat,stream20] [--seconds 10] [--compare DIR]
[--simulate] [--connections 4] [--requests N]`
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import fake_upstream
from bench.common import Child, Procs, report, table
from bench.event_instructions import callgrind_control
from bench.wrk import PATH, WORKLOADS, Target, lua_script, run_wrk, wrk_binary

CONNECTIONS = 4  # enough to keep the slowed proxy busy; few enough to stay unsaturated
WARMUP_S = 3
SIMULATED_LL = "2097152,16,64"  # size, ways, line: this machine's per-core L2


def _callgrind(out: Path, *, simulate: bool = False, last_level: str = SIMULATED_LL) -> list[str]:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # nothing counted until switched on, after the warm-up
        f"--callgrind-out-file={out}",
    ]
    if simulate:
        # The last level simulated is one core's L2 (2 MiB here), not the shared L3 valgrind
        # would take from the host: what a process's working set spills out of first.
        command += ["--cache-sim=yes", "--branch-sim=yes", f"--LL={last_level}"]
    return command


def completed_requests(url: str, script: Path, seconds: int, connections: int = CONNECTIONS) -> int:
    """Requests wrk completed against `url` in `seconds` (bench.wrk's run, fewer connections)."""
    wrk = wrk_binary()
    assert wrk is not None
    target = Target("instructions", url, 0, "-", None)
    # Under valgrind a request takes ~50 times as long, and each waits for the others in flight.
    timeout_s = max(10, 2 * connections)
    result = run_wrk(
        wrk, target, script, connections=connections, duration=seconds, timeout_s=timeout_s
    )
    return int(result["requests"]) - int(result["status"])


def _totals(dumps: list[Path]) -> dict[str, int]:
    """Each event's `totals:` over callgrind's dumps (the last one is written when the process
    exits): `Ir` always; with `--simulate`, also the cache and branch events (`D1mr`, `Bcm`...)."""
    totals: dict[str, int] = {}
    for path in dumps:
        names: list[str] = []
        for line in path.read_text().splitlines():
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):
                for name, value in zip(names or ["Ir"], line.split()[1:], strict=False):
                    totals[name] = totals.get(name, 0) + int(value)
    return totals


# The cycle estimate of KCachegrind ("CEst"): an L1 miss ~10 cycles, a last-level miss ~100, a
# mispredicted branch ~10, everything else one cycle. Rough, and the simulated predictor is far
# simpler than a real CPU's, but it tells which process pays more per instruction, and for what,
# on machines without hardware counters (this VM's `perf stat` has none).
_L1_MISSES = ("I1mr", "D1mr", "D1mw")
_LL_MISSES = ("ILmr", "DLmr", "DLmw")
_MISPREDICTS = ("Bcm", "Bim")


def cycle_estimate(totals: dict[str, int]) -> int:
    l1 = sum(totals.get(name, 0) for name in _L1_MISSES)
    ll = sum(totals.get(name, 0) for name in _LL_MISSES)
    branches = sum(totals.get(name, 0) for name in _MISPREDICTS)
    return totals["Ir"] + 10 * l1 + 100 * ll + 10 * branches


def exactly(url: str, workload: str, requests: int, connections: int) -> int:
    """Send `requests` requests of `workload` over `connections` keep-alive connections, each
    awaited (a thread a connection, http.client): every one starts and ends here, so none is
    in flight when the caller switches counting on or off. Returns the requests sent."""
    events, gap, _ = WORKLOADS[workload]
    body = fake_upstream.request_body(stream=events > 0)
    headers = {"Content-Type": "application/json"}
    if events:
        headers |= {"x-bench-events": str(events), "x-bench-gap-ms": f"{gap:g}"}
    host, port = url.removeprefix("http://").split(":")
    each = [requests // connections + (k < requests % connections) for k in range(connections)]
    failures: list[str] = []

    def connection(count: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            for _ in range(count):
                conn.request("POST", PATH, body, headers)
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or (events and not data.endswith(b"[DONE]\n\n")):
                    failures.append(f"{response.status} {data[-120:]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=connection, args=(count,)) for count in each if count]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed: {failures[0]}")
    return requests


def measure(
    procs: Procs,
    child: Child,
    out: Path,
    script: Path,
    seconds: int,
    connections: int = CONNECTIONS,
    *,
    workload: str = "chat",
    requests: int | None = None,
) -> dict[str, Any]:
    """Instructions per request over `seconds` of wrk, or, with `requests`, over exactly that
    many requests (`exactly`): no request in flight at either end of the counted window, so
    nothing counted that is not divided by, whatever the machine's load."""
    if requests is None:
        completed_requests(child.url, script, WARMUP_S, connections)
    else:
        exactly(child.url, workload, max(connections, requests // 10), connections)
    callgrind_control("-i", "on", str(child.pid))
    if requests is None:
        requests = completed_requests(child.url, script, seconds, connections)
    else:
        requests = exactly(child.url, workload, requests, connections)
    callgrind_control("-i", "off", str(child.pid))
    procs.stop(child, timeout=120)  # callgrind writes its counts as the process exits
    dumps = sorted(out.parent.glob(out.name + "*"))
    totals = _totals(dumps)
    for path in dumps:
        path.unlink()
    instructions = totals.get("Ir", 0)
    if requests <= 0 or instructions <= 0:
        return {"requests": requests, "instructions": instructions}
    row: dict[str, Any] = {"requests": requests, "kir_per_request": instructions / requests / 1e3}
    if len(totals) > 1:
        row["per_request"] = {name: value / requests for name, value in totals.items()}
        row["kcycles_estimate_per_request"] = cycle_estimate(totals) / requests / 1e3
    return row


def simulated_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per request: the cycle estimate (and its ratio to the relay on the same loop), the
    simulated cache misses and mispredicted branches (conditional, indirect)."""
    rows = []
    for workload, by_target in results.items():
        for target, row in by_target.items():
            if "per_request" not in row:
                continue
            relay = by_target.get("relay+uv" if target.endswith("+uv") else "relay", {})
            cycles = row["kcycles_estimate_per_request"]
            relay_cycles = relay.get("kcycles_estimate_per_request")
            row["cycles_vs_relay"] = cycles / relay_cycles if relay_cycles else None
            each = row["per_request"]
            rows.append(
                [
                    workload,
                    target,
                    round(cycles, 1),
                    "-"
                    if relay_cycles is None or target.startswith("relay")
                    else f"{cycles / relay_cycles:.2f}x",
                    round(each.get("I1mr", 0)),
                    round(each.get("D1mr", 0) + each.get("D1mw", 0)),
                    round(sum(each.get(name, 0) for name in _LL_MISSES)),
                    round(each.get("Bcm", 0)),
                    round(each.get("Bim", 0)),
                ]
            )
    return (
        "simulated per request (callgrind --cache-sim --branch-sim; cycles: KCachegrind's CEst)\n"
        + table(
            [
                "workload",
                "target",
                "k cycles",
                "vs relay",
                "I1 miss",
                "D1 miss",
                "LL miss",
                "Bc miss",
                "Bi miss",
            ],
            rows,
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="chat,stream20")
    p.add_argument("--seconds", type=int, default=10, help="instrumented seconds per target")
    p.add_argument("--compare", type=Path, metavar="DIR", help="also the CLI from DIR")
    p.add_argument("--targets", default="relay,hangup,compare")
    p.add_argument("--short", action="store_true", help="CI: chat, relay and hangup, 2 s")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="also simulate caches and branch prediction (callgrind --cache-sim --branch-sim):"
        " misses per request and a cycle estimate",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help="wrk's connections: requests in flight at once (their working sets share the caches)",
    )
    p.add_argument(
        "--last-level",
        default=SIMULATED_LL,
        metavar="SIZE,WAYS,LINE",
        help=f"with --simulate: the last cache level simulated (default {SIMULATED_LL}, this"
        " machine's per-core L2; another host's L2 to see how the working set fits there)",
    )
    p.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="count over exactly N requests (each awaited, none in flight at the window's"
        " edges) instead of --seconds of wrk: the figure to compare trees on a busy machine",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.short:
        args.workloads, args.seconds, args.targets = "chat", 2, "relay,hangup"
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing or wrk_binary() is None:
        print("bench.instructions needs valgrind and wrk (Debian's packages)", file=sys.stderr)
        return 2
    wanted = args.targets.split(",")
    if args.compare is None:
        wanted = [t for t in wanted if t != "compare"]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    failures: list[str] = []
    with Procs() as procs:
        up = fake_upstream.start(procs)
        for workload in workloads:
            script = lua_script(procs.workdir, workload)
            for target in wanted:
                out = procs.workdir / f"callgrind.{workload}.{target}"
                wrapper = _callgrind(out, simulate=args.simulate, last_level=args.last_level)
                on_uvloop = target.endswith("+uv")
                if target.startswith("relay"):
                    child = procs.baseline(
                        up.url, name=target, uvloop=on_uvloop, wrapper=wrapper, start_timeout=300
                    )
                else:
                    source = args.compare if target == "compare" else None
                    child = procs.hangup(
                        up.url + "/v1",
                        name=target,
                        source=source,
                        uvloop=on_uvloop,
                        wrapper=wrapper,
                        start_timeout=300,
                    )
                row = measure(
                    procs,
                    child,
                    out,
                    script,
                    args.seconds,
                    args.connections,
                    workload=workload,
                    requests=args.requests,
                )
                results.setdefault(workload, {})[target] = row
                if "kir_per_request" not in row:
                    failures.append(f"{workload}/{target}: nothing counted ({row})")
                    continue
                print(
                    f"{workload:9} {target:8} {row['requests']:6d} requests"
                    f"  {row['kir_per_request']:9.1f} k instructions/request",
                    flush=True,
                )
    rows = []
    for workload, by_target in results.items():
        for target, row in by_target.items():
            if "kir_per_request" not in row:
                continue
            # against the relay on the same event loop, as bench.wrk's ratios
            relay = by_target.get("relay+uv" if target.endswith("+uv") else "relay")
            if relay is not None and "kir_per_request" not in relay:
                relay = None
            ratio = row["kir_per_request"] / relay["kir_per_request"] if relay else None
            if ratio is not None:
                row["vs_relay"] = ratio
            rows.append(
                [
                    workload,
                    target,
                    row["requests"],
                    round(row["kir_per_request"], 1),
                    "-" if ratio is None or target.startswith("relay") else f"{ratio:.2f}x",
                ]
            )
    print()
    print(
        "instructions per request (callgrind Ir, user space), "
        + (f"{args.seconds} s" if args.requests is None else f"exactly {args.requests} requests")
        + f" instrumented per target, {args.connections} connections"
    )
    print(table(["workload", "target", "requests", "k instr/req", "vs relay"], rows))
    if args.simulate:
        print()
        print(simulated_table(results))
    data = {
        "results": results,
        "seconds": args.seconds,
        "elapsed_s": time.monotonic() - started,
        "failures": failures,
    }
    return report("instructions", data, args.out, failures)


if __name__ == "__main__":
    sys.exit(main())
