"""Overhead: what hangup costs per request, against two baselines measured in the same run.

Targets, all in front of one simulated provider (`python -m proxy.sim`, its own process):

- direct:    the load generator talks to the simulator itself (no proxy at all);
- baseline:  the minimal aiohttp relay (bench/baseline_relay.py), the floor for this stack;
- hangup:    the real CLI (`python -m proxy --upstream ... --port ...`), access log to a file,
             metrics and accounting on, asyncio's loop (what the CLI runs today);
- hangup+uvloop: the same CLI with `--loop uvloop`.

Workloads: small non-streaming chat completions and short streams (16 tokens), each under
saturating closed-loop load (`--concurrency`) and under moderate open-loop load (`--rate`).
Rounds interleave the targets (direct, baseline, hangup, hangup+uvloop, direct, ...) and the
table reports medians over rounds, because this 2-core machine is shared by the load generator,
the proxy, the simulator and other tenants: ratios are the result, absolute numbers are not.

CPU time per request is read from /proc/PID/stat of the proxy (or, for `direct`, of the
simulator) over the measured window only.

`python -m bench.overhead [--rounds 3] [--duration 6] [--short] [--out FILE]`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    REPO,
    Child,
    Procs,
    cpu_seconds,
    have_uvloop,
    http_get,
    median,
    metric_samples,
    metric_sum,
    report,
    table,
)


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int  # whose CPU time is "the proxy's" (the simulator's for direct)
    saturating_only: bool = False  # ablations: they measure CPU and throughput


# Ablations: hangup with one feature switched off by config, to price that feature.
ABLATIONS: dict[str, dict[str, Any]] = {
    "hangup-accesslog": {"logging": {"access_log": False}},
    "hangup-usage": {"defaults": {"include_usage": False}},
}


def run_load(
    target: Target, sim_pid: int, *, kind: str, load: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """One measured run of the load generator against one target."""
    argv = [PY, "-m", "bench.loadgen", "--url", target.url, "--kind", kind]
    for key, value in load.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    gen = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert gen.stdout is not None
        cpu0 = sim0 = 0.0
        result: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout
        for line in gen.stdout:
            line = line.strip()
            if line == "warm":
                cpu0, sim0 = cpu_seconds(target.pid), cpu_seconds(sim_pid)
            elif line.startswith("{"):
                cpu1, sim1 = cpu_seconds(target.pid), cpu_seconds(sim_pid)
                result = json.loads(line)
                result["proxy_cpu_s"] = cpu1 - cpu0
                result["sim_cpu_s"] = sim1 - sim0
            if time.monotonic() > deadline:
                break
        gen.wait(timeout=max(1.0, deadline - time.monotonic()))
        if result is None:
            err = gen.stderr.read() if gen.stderr else ""
            raise RuntimeError(f"load generator gave no result (rc={gen.returncode}): {err}")
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    ok = max(1, result["ok"])
    result["cpu_us_per_req"] = result["proxy_cpu_s"] / ok * 1e6
    result["sim_cpu_us_per_req"] = result["sim_cpu_s"] / ok * 1e6
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return median([float(r[key]) for r in runs])

    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "rounds": len(runs),
        "rps": med("rps"),
        "rps_rounds": [round(r["rps"], 1) for r in runs],
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "cpu_us_per_req": med("cpu_us_per_req"),
        "sim_cpu_us_per_req": med("sim_cpu_us_per_req"),
        "requests": sum(r["ok"] for r in runs),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers")
    p.add_argument("--rate", type=float, default=150.0, help="moderate open-loop req/s")
    p.add_argument("--kinds", default="chat,stream")
    p.add_argument("--no-uvloop-variant", action="store_true")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also hangup without its access log, and without include_usage injection",
    )
    p.add_argument(
        "--short", action="store_true", help="CI: 1 round of 1.5 s per run, no uvloop variant"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    loads: dict[str, dict[str, Any]] = {
        "saturating": {"concurrency": args.concurrency},
        "moderate": {"concurrency": 64, "rate": args.rate},
    }
    if args.short:
        args.rounds, args.duration, args.warmup = 1, 1.5, 0.3
        loads = {"saturating": loads["saturating"], "moderate": loads["moderate"]}
    kinds = [k for k in args.kinds.split(",") if k]
    uvloop_variant = have_uvloop() and not args.no_uvloop_variant and not args.short
    started = time.monotonic()
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with Procs() as procs:
        sim = procs.sim(tokens_per_s=0, default_tokens=16)
        base = procs.baseline(sim.url)
        hang = procs.hangup(sim.url + "/v1")
        children: list[tuple[str, Child]] = [("baseline", base), ("hangup", hang)]
        if uvloop_variant:
            children.append(
                ("hangup+uvloop", procs.hangup(sim.url + "/v1", name="hangup-uv", uvloop=True))
            )
        targets = [Target("direct", sim.url, sim.pid)]
        targets += [Target(name, c.url, c.pid) for name, c in children]
        if args.ablations and not args.short:
            for name, change in ABLATIONS.items():
                config = procs.workdir / f"{name}.yaml"
                data = {
                    "upstreams": {"sim": {"base_url": sim.url + "/v1"}},
                    "routes": [{"name": "default", "upstream": "sim"}],
                    **change,
                }
                config.write_text(json.dumps(data))
                child = procs.hangup(sim.url, name=name, config=config)
                targets.append(Target(name, child.url, child.pid, saturating_only=True))
        timeout = args.warmup + args.duration + 60
        for rnd in range(args.rounds):
            for kind in kinds:
                for load_name, load in loads.items():
                    for target in targets:
                        if target.saturating_only and load_name != "saturating":
                            continue
                        spec = {**load, "duration": args.duration, "warmup": args.warmup}
                        r = run_load(target, sim.pid, kind=kind, load=spec, timeout=timeout)
                        runs.setdefault((kind, load_name, target.name), []).append(r)
                        print(
                            f"round {rnd + 1} {kind:6} {load_name:10} {target.name:14}"
                            f" {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                            f"  p99 {r['p99_ms']:6.2f} ms  cpu {r['cpu_us_per_req']:5.0f} us/req"
                            + (f"  errors {r['errors']}" if r["errors"] else ""),
                            flush=True,
                        )
        hangup_metrics = metric_samples(http_get(hang.url + "/metrics").decode())
    results: dict[str, Any] = {}
    rows = []
    failures: list[str] = []
    for kind in kinds:
        for load_name in loads:
            order = [t.name for t in targets if (kind, load_name, t.name) in runs]
            s = {t: summarize(runs[(kind, load_name, t)]) for t in order}
            for t in order:
                row = s[t]
                row["rps_vs_baseline"] = row["rps"] / s["baseline"]["rps"]
                row["rps_vs_direct"] = row["rps"] / s["direct"]["rps"]
                row["added_p50_ms"] = row["p50_ms"] - s["direct"]["p50_ms"]
                row["added_p50_vs_baseline_ms"] = row["p50_ms"] - s["baseline"]["p50_ms"]
                if row["errors"]:
                    bad = {k: v for k, v in row["errors"].items() if k != "generator saturated"}
                    if bad:
                        failures.append(f"{kind}/{load_name}/{t}: errors {bad}")
                rows.append(
                    [
                        kind,
                        load_name,
                        t,
                        round(row["rps"]),
                        f"{row['rps_vs_baseline']:.2f}x",
                        f"{row['rps_vs_direct']:.2f}x",
                        row["p50_ms"],
                        row["p99_ms"],
                        f"{row['added_p50_ms']:+.2f}",
                        "-" if t == "direct" else round(row["cpu_us_per_req"]),
                        round(row["sim_cpu_us_per_req"]),
                    ]
                )
            results[f"{kind}/{load_name}"] = s
    completed = metric_sum(hangup_metrics, "hangup_requests_total", outcome="completed")
    total = metric_sum(hangup_metrics, "hangup_requests_total")
    if total != completed:
        failures.append(f"hangup counted {total - completed:g} requests not completed")
    headers = [
        "kind",
        "load",
        "target",
        "req/s",
        "vs baseline",
        "vs direct",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "proxy CPU us/req",
        "sim CPU us/req",
    ]
    print()
    print(
        f"overhead: medians of {args.rounds} interleaved round(s) of {args.duration:g} s;"
        f" saturating = closed loop, {args.concurrency} workers;"
        f" moderate = open loop, {args.rate:g} req/s"
    )
    print(table(headers, rows))
    return report(
        "overhead",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": time.monotonic() - started,
            "results": results,
            "runs": {"/".join(k): v for k, v in runs.items()},
            "hangup_requests_total": total,
            "failures": failures,
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
