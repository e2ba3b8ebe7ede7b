"""Saturating CPU cost, measured with a C load generator (Debian's `wrk`).

An aiohttp load generator saturates before the proxy does on this machine and hides the proxy's
cost; wrk does not. Targets, interleaved in every round, all in front of one fake upstream
(bench/fake_upstream.py: a raw asyncio protocol answering from memory):

- direct:     wrk to the fake upstream (for scale);
- relay:      the bare aiohttp relay (bench/baseline_relay.py) on asyncio's loop;
- relay+uv:   the same relay on uvloop;
- hangup:     the real CLI with its shipped defaults (accounting, include_usage injection,
              metrics, JSON access log to a file) on its default event loop;
- hangup+asyncio / hangup+uv: the CLI with the other loop, when the CLI has a choice;
- with `--ablations`, what single features cost: the same CLI and shipped config with one
  setting changed (`ABLATIONS`): `hangup-nolog` without the access log, `hangup-nousage`
  without `include_usage` injection (no usage chunk asked for, so none to hide).

Workloads: a small non-streamed chat completion (`chat`); a 20-event stream whose events come
1 ms apart, so each is its own read at the proxy as with a generating model (`stream20`); the
same 20 events, and 200, sent in one write (`burst20`, `burst200`); 20 and 200 events 1 ms
apart at a fifth of the connections, unsaturated (`slow20`, `slow200`).
For each run: wrk warms up (`--warmup` s), then a measured run of `--duration` s; the proxy's
CPU time comes from /proc/PID/stat just before and after the measured run. Reported:

- CPU µs per request, as a ratio to the relay on the same event loop in the same round;
- CPU per event: (stream20 - chat) / 20, the definition of issue 17 (an event per read);
  (slow200 - slow20) / 180, the same cost as a slope between two unsaturated streams (what
  differs between a stream and a plain answer cancels out, and every event is its own read at
  both proxies); and
  (burst200 - burst20) / 180, the cost of an event that shares its read with others;
- contention: how many CPUs other processes used during the measured windows.

`--pin` puts the proxies on the first CPU and wrk, the fake upstream and this process on the
others, so that the proxy measured never waits for a core and rounds spread less.

`--paired` loads every proxy at once, a wrk each, and measures them over one window: on a host
whose speed moves by more between two windows than a change is worth (5 % here, from one
minute to the next), the ratio of two proxies loaded side by side is what the drift moves
least. With `--pin` they share the first CPU, each given its share by the scheduler.

`python -m bench.wrk [--rounds 3] [--duration 5] [--connections 50] [--pin] [--paired] [--short]
[--out FILE]`
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fake_upstream
from bench.common import (
    CLK_TCK,
    REPO,
    Procs,
    cpu_seconds,
    cpu_split,
    have_uvloop,
    http_get,
    median,
    metric_samples,
    metric_sum,
    report,
    table,
)

PATH = "/v1/chat/completions"
# Target name -> (section, key, value) changed in config/hangup.yaml: one feature off each.
ABLATIONS: dict[str, tuple[str, str, str]] = {
    "hangup-nolog": ("logging", "access_log", "false"),
    "hangup-nousage": ("defaults", "include_usage", "false"),
}
# A paced stream holds its connection ~20 ms doing little: more connections keep the proxies busy.
PACED_CONNECTIONS = 4
# The per-event slope's pair runs at a fifth of --connections (10 by default): well under
# saturation, so that every event is its own read at both proxies. A saturated proxy reads
# late, finds several events waiting and reads them at once, which makes the slower proxy's
# events look cheaper (measured: hangup 0.90x the relay's per event at 200 connections).
SLOPE_CONNECTIONS = 0.2
# name: (SSE events, ms between events, connections as a multiple of --connections);
# 0 events: a non-streamed completion
WORKLOADS: dict[str, tuple[int, float, float]] = {
    "chat": (0, 0, 1),
    "stream20": (20, 1.0, PACED_CONNECTIONS),  # paced: events one by one, as a model makes them
    "burst20": (20, 0, 1),  # the same 20 events in one write
    "burst200": (200, 0, 1),
    # Paced, unsaturated: (slow200 - slow20) / 180 is the cost of one more event, a read each.
    "slow20": (20, 1.0, SLOPE_CONNECTIONS),
    "slow200": (200, 1.0, SLOPE_CONNECTIONS),
}

LUA = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{extra}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def lua_script(workdir: Path, workload: str) -> Path:
    events, gap, _ = WORKLOADS[workload]
    extra = ""
    if events:
        extra = f'wrk.headers["x-bench-events"] = "{events}"'
        if gap:
            extra += f'\nwrk.headers["x-bench-gap-ms"] = "{gap:g}"'
    body = fake_upstream.request_body(stream=events > 0).decode()
    path = workdir / f"{workload}.lua"
    path.write_text(LUA.format(body=body, extra=extra))
    return path


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int
    loop: str  # "asyncio" or "uvloop"; "-" for direct
    relay: str | None  # the relay this target is compared with


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def run_wrk(
    wrk: str,
    target: Target,
    script: Path,
    *,
    connections: int,
    duration: float,
    timeout_s: int = 10,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    argv = [
        *(["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []),
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
        "--timeout",
        f"{timeout_s}s",
        "-s",
        str(script),
        target.url + PATH,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (rc={proc.returncode}): {proc.stdout}{proc.stderr}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def measure(
    wrk: str,
    target: Target,
    script: Path,
    ours: list[int],
    *,
    connections: int,
    duration: float,
    warmup: float,
    load_cpus: set[int] | None = None,
) -> dict[str, Any]:
    """One warm-up and one measured wrk run; CPU of the target and of the machine around it."""
    return measure_together(
        wrk,
        [target],
        script,
        ours,
        connections=connections,
        duration=duration,
        warmup=warmup,
        load_cpus=load_cpus,
    )[0]


def measure_together(
    wrk: str,
    targets: list[Target],
    script: Path,
    ours: list[int],
    *,
    connections: int,
    duration: float,
    warmup: float,
    load_cpus: set[int] | None = None,
) -> list[dict[str, Any]]:
    """`measure` for several targets loaded at once, a wrk each, over one window.

    Interleaved rounds compare targets measured seconds apart, and this host's speed moves by
    more than the few per cent a change is worth between two such windows. Loaded at the same
    time, every target meets the same host: whatever slows one slows the others, and the
    ratio of their CPU per request in a window is the one the drift moves least. Each target
    is its own process with its own wrk; they share the fake upstream (and, with `--pin`, one
    CPU, where the scheduler gives each runnable proxy its share)."""

    def load(seconds: float) -> list[dict[str, Any]]:
        if len(targets) == 1:  # `measure`'s: wrk from this thread, no pool beside it
            return [
                run_wrk(
                    wrk,
                    targets[0],
                    script,
                    connections=connections,
                    duration=seconds,
                    cpus=load_cpus,
                )
            ]
        with ThreadPoolExecutor(len(targets)) as pool:
            return list(
                pool.map(
                    lambda t: run_wrk(
                        wrk, t, script, connections=connections, duration=seconds, cpus=load_cpus
                    ),
                    targets,
                )
            )

    if warmup > 0:
        load(warmup)
    own = {pid: cpu_seconds(pid) for pid in ours}
    split0 = {t.pid: cpu_split(t.pid) for t in targets}
    kids0, self0, busy0, t0 = _children_cpu(), _self_cpu(), _machine_busy(), time.monotonic()
    results = load(duration)
    wall = time.monotonic() - t0
    busy = _machine_busy() - busy0
    ours_cpu = sum(cpu_seconds(pid) - c for pid, c in own.items())
    ours_cpu += (_children_cpu() - kids0) + (_self_cpu() - self0)  # wrk itself, and us
    for target, result in zip(targets, results, strict=True):
        proxy_cpu = cpu_seconds(target.pid) - own[target.pid]
        user0, system0 = split0[target.pid]
        user1, system1 = cpu_split(target.pid)
        ok = max(1, int(result["requests"]) - int(result["status"]))
        result.update(
            wall_s=wall,
            rps=ok / (int(result["duration_us"]) / 1e6),
            proxy_cpu_s=proxy_cpu,
            cpu_us_per_req=proxy_cpu / ok * 1e6,
            # Where the CPU went: the interpreter's and the libraries' own work (user)
            # against the kernel's socket work (system), which a relay of the same traffic
            # shares.
            user_us_per_req=(user1 - user0) / ok * 1e6,
            system_us_per_req=(system1 - system0) / ok * 1e6,
            proxy_cpus=proxy_cpu / wall,
            others_cpus=max(0.0, busy - ours_cpu) / wall,
            busy_cpus=busy / wall,
        )
    return results


def start_targets(
    procs: Procs, upstream: str, compare: Path | None = None, ablations: bool = False
) -> list[Target]:
    targets: list[Target] = []
    relay = procs.baseline(upstream, name="relay")
    targets.append(Target("relay", relay.url, relay.pid, "asyncio", None))
    uv = have_uvloop()
    if uv:
        relay_uv = procs.baseline(upstream, name="relay-uv", uvloop=True)
        targets.append(Target("relay+uv", relay_uv.url, relay_uv.pid, "uvloop", None))
    for loop in ("asyncio", "uvloop") if uv else ("asyncio",):
        child = procs.hangup(upstream + "/v1", name=f"hangup-{loop}", loop=loop)
        name = "hangup" if loop == "asyncio" else "hangup+uv"
        targets.append(
            Target(name, child.url, child.pid, loop, "relay" if loop == "asyncio" else "relay+uv")
        )
    if compare is not None:
        # The same CLI from another source tree, on asyncio's loop (the only loop older
        # versions know), compared with the asyncio relay.
        child = procs.hangup(upstream + "/v1", name="hangup-compare", source=compare)
        targets.append(Target("compare", child.url, child.pid, "asyncio", "relay"))
    if ablations:
        for name, change in ABLATIONS.items():
            config = ablated_config(procs.workdir, name, upstream + "/v1", change)
            child = procs.hangup(upstream + "/v1", name=name, config=config, loop="asyncio")
            targets.append(Target(name, child.url, child.pid, "asyncio", "relay"))
    return targets


def ablated_config(workdir: Path, name: str, upstream: str, change: tuple[str, str, str]) -> Path:
    """The shipped config/hangup.yaml with its upstream pointed at `upstream` and one setting
    changed; fails loudly when the file no longer has that setting where expected."""
    section, key, value = change
    text = (REPO / "config" / "hangup.yaml").read_text()
    text, found = re.subn(r"(?m)^(\s*base_url:)\s*\S+", rf"\g<1> {upstream}", text, count=1)
    at = re.search(rf"(?m)^{section}:\n", text)
    if found != 1 or at is None:
        raise RuntimeError(f"config/hangup.yaml changed: no base_url or no {section}: section")
    head, tail = text[: at.end()], text[at.end() :]
    tail, found = re.subn(rf"(?m)^(\s+{key}:)\s*[^\s#]+", rf"\g<1> {value}", tail, count=1)
    if found != 1:
        raise RuntimeError(f"config/hangup.yaml changed: no {section}.{key}")
    path = workdir / f"{name}.yaml"
    path.write_text(head + tail)
    return path


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return median([float(r[key]) for r in runs])

    return {
        "rounds": len(runs),
        "rps": med("rps"),
        "cpu_us_per_req": med("cpu_us_per_req"),
        "cpu_us_per_req_rounds": [round(r["cpu_us_per_req"], 1) for r in runs],
        "user_us_per_req": med("user_us_per_req"),
        "system_us_per_req": med("system_us_per_req"),
        "p50_ms": med("p50_us") / 1000,
        "p99_ms": med("p99_us") / 1000,
        "others_cpus": med("others_cpus"),
        "requests": sum(int(r["requests"]) for r in runs),
        "errors": {k: sum(int(r[k]) for r in runs) for k in ("connect", "read", "write", "status")},
    }


def derive(s: dict[str, dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """Per-event CPU and the ratios to the relay on the same loop."""
    out: dict[str, Any] = {}
    for name in names:
        cpu = {w: s[w][name]["cpu_us_per_req"] for w in s if name in s[w]}
        row: dict[str, Any] = {f"{w}_us": v for w, v in cpu.items()}
        if "chat" in cpu and "stream20" in cpu:
            row["event_us"] = (cpu["stream20"] - cpu["chat"]) / 20
        if "burst20" in cpu and "burst200" in cpu:
            row["event_slope_us"] = (cpu["burst200"] - cpu["burst20"]) / 180
        if "slow20" in cpu and "slow200" in cpu:
            row["paced_event_slope_us"] = (cpu["slow200"] - cpu["slow20"]) / 180
        out[name] = row
    return out


def compare_ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """hangup's CPU per request over --compare's: pooled (the ratio of the medians), the
    median of the rounds' ratios, and in how many rounds hangup's was the lower."""
    pairs = [(a["cpu_us_per_req"], b["cpu_us_per_req"]) for a, b in zip(ours, theirs, strict=False)]
    return {
        "pooled": median([a for a, _ in pairs]) / median([b for _, b in pairs]),
        "per_round": median([a / b for a, b in pairs]),
        "rounds_below": f"{sum(a < b for a, b in pairs)} of {len(pairs)}",
    }


def print_run(rnd: int, workload: str, target: Target, r: dict[str, Any]) -> None:
    print(
        f"round {rnd + 1} {workload:9} {target.name:10} {r['rps']:7.0f} req/s"
        f"  cpu {r['cpu_us_per_req']:6.0f} us/req ({r['proxy_cpus']:.2f} CPU,"
        f" user {r['user_us_per_req']:.0f} sys {r['system_us_per_req']:.0f})"
        f"  p50 {r['p50_us'] / 1000:6.2f} ms  others {r['others_cpus']:.2f} CPU",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--targets", help="comma-separated subset of the targets (direct is cheap)")
    p.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="also run the hangup CLI from DIR (e.g. `git archive OLD | tar -x -C DIR`)",
    )
    p.add_argument(
        "--ablations", action="store_true", help="also hangup with one feature off (ABLATIONS)"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="the proxies on the first CPU, wrk, the fake upstream and this process on the rest",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="load every proxy at once, a wrk each, over one window (not `direct`): the host's"
        " drift falls on all of them alike",
    )
    p.add_argument("--short", action="store_true", help="CI: 1 round of 1 s, 1 s warm-up")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.short:
        args.rounds, args.duration, args.warmup = 1, 1.0, 1.0
    wrk = wrk_binary()
    if wrk is None:
        print("bench.wrk needs Debian's wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    workloads = [w for w in args.workloads.split(",") if w]
    started = time.monotonic()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: list[str] = []
    hangup_totals: dict[str, tuple[float, float, float]] = {}
    with Procs() as procs:
        up = fake_upstream.start(procs)
        targets = [
            Target("direct", up.url, up.pid, "-", None),
            *start_targets(procs, up.url, args.compare, args.ablations),
        ]
        if args.targets:
            wanted = set(args.targets.split(","))
            targets = [t for t in targets if t.name in wanted]
        ours = sorted({up.pid, *(c.pid for c in procs.children)})
        load_cpus: set[int] | None = None
        if args.pin:
            # The proxy measured never waits for a core while wrk or the upstream runs, and
            # they never wait for it: less spread between rounds (both proxies alike).
            available = sorted(os.sched_getaffinity(0))
            if len(available) < 2:
                print("--pin needs two CPUs", file=sys.stderr)
                return 2
            proxy_cpus, load_cpus = {available[0]}, set(available[1:])
            for child in procs.children:
                pin(child.pid, load_cpus if child.pid == up.pid else proxy_cpus)
            pin(os.getpid(), load_cpus)
        scripts = {w: lua_script(procs.workdir, w) for w in workloads}
        for rnd in range(args.rounds):
            # Every other round in the reverse order: a host whose speed drifts during a round
            # favours neither the first target nor the last (the per-round ratios pair them).
            order = targets if rnd % 2 == 0 else targets[::-1]
            for workload in workloads:
                connections = max(1, round(args.connections * WORKLOADS[workload][2]))
                if args.paired:
                    together = [t for t in order if t.name != "direct"]
                    results = measure_together(
                        wrk,
                        together,
                        scripts[workload],
                        ours,
                        connections=connections,
                        duration=args.duration,
                        warmup=args.warmup,
                        load_cpus=load_cpus,
                    )
                    for target, r in zip(together, results, strict=True):
                        runs.setdefault((workload, target.name), []).append(r)
                        print_run(rnd, workload, target, r)
                    continue
                for target in order:
                    r = measure(
                        wrk,
                        target,
                        scripts[workload],
                        ours,
                        connections=connections,
                        duration=args.duration,
                        warmup=args.warmup,
                        load_cpus=load_cpus,
                    )
                    runs.setdefault((workload, target.name), []).append(r)
                    print_run(rnd, workload, target, r)
        measured = {t.url for t in targets}  # `--targets` leaves the others idle: not failures
        for child in procs.children:
            if child.name.startswith("hangup") and child.url in measured:
                samples = metric_samples(http_get(child.url + "/metrics").decode())
                hangup_totals[child.name] = (
                    metric_sum(samples, "hangup_requests_total"),
                    metric_sum(samples, "hangup_requests_total", outcome="completed"),
                    metric_sum(samples, "hangup_requests_total", outcome="client_cancelled"),
                )
    names = [t.name for t in targets]
    s = {w: {n: summarize(runs[(w, n)]) for n in names if (w, n) in runs} for w in workloads}
    for w, by_target in s.items():
        for n, row in by_target.items():
            errors = {k: v for k, v in row["errors"].items() if v}
            if errors:
                failures.append(f"{w}/{n}: wrk errors {errors}")
    # wrk cuts the requests in flight when its time is up: hangup rightly counts those as
    # client_cancelled. Anything else is a failure.
    for name, (total, completed, cancelled) in hangup_totals.items():
        if total != completed + cancelled:
            failures.append(
                f"{name}: {total - completed - cancelled:g} requests neither completed"
                " nor cancelled by wrk's stop"
            )
        if completed == 0:
            failures.append(f"{name}: no request completed")
    per = derive(s, names)
    relay_of = {t.name: t.relay for t in targets}
    rows = []
    for w, by_target in s.items():
        for n, row in by_target.items():
            base = relay_of.get(n)
            ratio = paired = None
            if base is not None and base in by_target:
                ratio = row["cpu_us_per_req"] / by_target[base]["cpu_us_per_req"]
                row["cpu_vs_relay"] = ratio
                # Each round's ratio to the relay measured beside it, then their median: what
                # the host's drift between rounds moves least.
                paired = median(
                    [
                        a["cpu_us_per_req"] / b["cpu_us_per_req"]
                        for a, b in zip(runs[(w, n)], runs[(w, base)], strict=False)
                    ]
                )
                row["cpu_vs_relay_per_round"] = paired
            rows.append(
                [
                    w,
                    n,
                    round(row["rps"]),
                    round(row["cpu_us_per_req"]),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    "-" if paired is None else f"{paired:.2f}x",
                    round(row["user_us_per_req"]),
                    round(row["system_us_per_req"]),
                    row["p50_ms"],
                    row["p99_ms"],
                    row["others_cpus"],
                ]
            )
    # This tree against --compare's, the same code path on the same loop: what a change did.
    versus_compare = {
        w: compare_ratios(runs[(w, "hangup")], runs[(w, "compare")])
        for w in workloads
        if (w, "hangup") in runs and (w, "compare") in runs
    }
    event_rows = []
    for n in names:
        if n == "direct":
            continue
        row = per[n]
        base = relay_of.get(n)
        cells: list[object] = [n]
        for key in ("event_us", "paced_event_slope_us", "event_slope_us"):
            value = row.get(key)
            ratio = None
            if value is not None and base in per and per[base].get(key):
                ratio = value / per[base][key]
                row[key.replace("_us", "_vs_relay")] = ratio
            cells += [value, "-" if ratio is None else f"{ratio:.2f}x"]
        event_rows.append(cells)
    print()
    print(
        f"wrk: medians of {args.rounds} interleaved round(s) of {args.duration:g} s,"
        f" {args.connections} connections"
        f" ({args.connections * PACED_CONNECTIONS:g} for stream20,"
        f" {max(1, round(args.connections * SLOPE_CONNECTIONS))} for slow20/slow200);"
        " CPU of the target process over the measured window;"
        " ratios against the relay on the same event loop"
        + ("; proxies pinned to one CPU, the load to the others" if args.pin else "")
        + ("; every proxy loaded at once in each window (paired)" if args.paired else "")
    )
    print(
        table(
            [
                "workload",
                "target",
                "req/s",
                "CPU us/req",
                "vs relay",
                "per round",
                "user us",
                "sys us",
                "p50 ms",
                "p99 ms",
                "others' CPUs",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            [
                "target",
                "us/event (stream20-chat)/20",
                "vs relay",
                "us/event slow 20->200",
                "vs relay",
                "us/event burst 20->200",
                "vs relay",
            ],
            event_rows,
        )
    )
    if versus_compare:
        print()
        print(
            table(
                ["workload", "hangup / compare", "per round", "rounds hangup below"],
                [
                    [w, f"{v['pooled']:.3f}", f"{v['per_round']:.3f}", v["rounds_below"]]
                    for w, v in versus_compare.items()
                ],
            )
        )
    others = [float(r["others_cpus"]) for rs in runs.values() for r in rs]
    return report(
        "wrk",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": time.monotonic() - started,
            "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[
                0
            ],
            "pid_cpus": os.cpu_count(),
            "others_cpus_in_windows": {
                "median": median(others),
                "max": max(others) if others else None,
            },
            "results": s,
            "per_target": per,
            "hangup_vs_compare": versus_compare,
            "hangup_requests": {k: list(v) for k, v in hangup_totals.items()},
            "runs": {"/".join(k): v for k, v in runs.items()},
            "failures": failures,
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
