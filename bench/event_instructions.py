"""Instructions per SSE event (valgrind's callgrind): a deterministic second figure beside
`bench.perevent`'s CPU time, for changes too small for timed runs to see.

Each target (the bare relay, hangup, and with `--compare DIR` another source tree's CLI) runs
under `valgrind --tool=callgrind` with its instrumentation off while it starts. Then, one at a
time over one keep-alive connection: warm-up streams, the counters zeroed, `--streams` streams
of 20 events, a dump, the same number of `--long` events, a dump. Events come `--gap-ms` apart
(20 ms: the proxy under valgrind runs ~50x slower and must still read each event alone; the
dumps count `recv` calls to show it). Instructions per event: (long - short) / (long events -
20) / streams. What it does not see: cache misses, the kernel, time spent waiting; it is an
instruction count, not CPU time (the target of issue 17 is CPU time: `bench.perevent`).

The long streams last longer, and work a target does by the clock rather than by the event
(hangup's loop-lag probe: a timer 20 times a second, ~40k instructions a tick under callgrind,
~0.4 ticks an event at 20 ms) is counted with their events. So, after the streams, the target
idles `--idle-s` seconds and a third dump gives its instructions a second with no request;
"idle excluded" takes that rate times the long streams' extra wall time off (the raw figure
stays beside it). The relay idles at ~0.

`python -m bench.event_instructions [--streams 3] [--long 200] [--gap-ms 20] [--idle-s 5]
[--compare DIR]`
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import fake_upstream
from bench.common import HOST, Child, Procs, report, table
from bench.wrk import PATH

SHORT = 20
_CALLS = re.compile(rb"^calls=(\d+)")


def valgrind(outdir: Path, name: str) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--compress-strings=no",
        "--compress-pos=no",
        f"--callgrind-out-file={outdir / name}.%p",
    ]


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def stream(conn: http.client.HTTPConnection, events: int, gap_ms: float) -> int:
    conn.request(
        "POST",
        PATH,
        body=fake_upstream.request_body(stream=True),
        headers={
            "Content-Type": "application/json",
            "x-bench-events": str(events),
            "x-bench-gap-ms": f"{gap_ms:g}",
        },
    )
    response = conn.getresponse()
    data = response.read()
    if response.status != 200 or b"[DONE]" not in data:
        raise RuntimeError(f"stream failed: {response.status} {data[-200:]!r}")
    return len(data)


def dump(child: Child, outdir: Path, seen: set[Path]) -> dict[str, int]:
    """Dump the counters since the last dump (or zeroing); the dump's instructions and calls."""
    callgrind_control("--dump", str(child.pid))
    deadline = time.monotonic() + 60
    while True:
        new = sorted(set(outdir.glob(f"{child.name}.{child.pid}*")) - seen)
        if new:
            time.sleep(0.5)  # written whole before callgrind_control returns; be safe
            break
        if time.monotonic() > deadline:
            raise RuntimeError("callgrind wrote no dump")
        time.sleep(0.2)
    seen.update(new)
    totals = 0
    recv = 0
    for path in new:
        cfn = b""
        for line in path.read_bytes().splitlines():
            if line.startswith((b"summary:", b"totals:")):
                totals = max(totals, int(line.split()[1]))
            elif line.startswith(b"cfn="):
                cfn = line[4:].strip()
            elif cfn and (m := _CALLS.match(line)):
                if cfn in (b"recv", b"__libc_recv", b"read", b"__libc_read"):
                    recv += int(m.group(1))
                cfn = b""
    return {"instructions": totals, "recv_calls": recv}


def measure(procs: Procs, name: str, upstream: str, args: argparse.Namespace) -> dict[str, Any]:
    outdir = procs.workdir / "callgrind"
    outdir.mkdir(exist_ok=True)
    wrapper = valgrind(outdir, name)
    if name == "relay":
        child = procs.baseline(upstream, name=name, wrapper=wrapper, start_timeout=600)
    else:  # the CLI, from another source tree for `compare`
        source = args.compare if name == "compare" else None
        child = procs.hangup(
            upstream + "/v1", name=name, source=source, wrapper=wrapper, start_timeout=600
        )
    port = urlsplit(child.url).port
    assert port is not None
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    for _ in range(2):
        stream(conn, SHORT, 0)  # warm-up: imports and first-use caches, outside the counts
    callgrind_control("--instr=on", str(child.pid))
    stream(conn, SHORT, args.gap_ms)
    callgrind_control("--zero", str(child.pid))
    seen: set[Path] = set()
    counts: dict[str, dict[str, int]] = {}
    walls: dict[str, float] = {}
    began = time.monotonic()
    for events in (SHORT, args.long):
        for _ in range(args.streams):
            stream(conn, events, args.gap_ms)
        ended = time.monotonic()  # (the dump's own wait counts in the next window)
        counts[str(events)] = dump(child, outdir, seen)
        walls[str(events)], began = ended - began, ended
    # The target's work per second with no request (timers: hangup's loop-lag probe ticks
    # 20 times a second): the long streams last longer, and that work is not per event.
    time.sleep(args.idle_s)
    ended = time.monotonic()
    counts["idle"] = dump(child, outdir, seen)
    walls["idle"] = ended - began
    conn.close()
    procs.stop(child, timeout=120)
    short, long_ = counts[str(SHORT)], counts[str(args.long)]
    extra_events = (args.long - SHORT) * args.streams
    per_event = (long_["instructions"] - short["instructions"]) / extra_events
    idle_per_s = counts["idle"]["instructions"] / walls["idle"]
    extra_wall = walls[str(args.long)] - walls[str(SHORT)]
    return {
        "counts": counts,
        "walls_s": walls,
        "instructions_per_event": per_event,
        "idle_instructions_per_s": idle_per_s,
        "instructions_per_event_without_idle": per_event - idle_per_s * extra_wall / extra_events,
        "recv_per_event": (long_["recv_calls"] - short["recv_calls"]) / extra_events,
        "instructions_per_short_stream": short["instructions"] / args.streams,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--long", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--targets", default="relay,hangup,compare")
    p.add_argument("--compare", type=Path, metavar="DIR", help="also the hangup CLI from DIR")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle window after the streams")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.event_instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    started = time.monotonic()
    wanted = args.targets.split(",")
    results: dict[str, dict[str, Any]] = {}
    with Procs() as procs:
        up = fake_upstream.start(procs)
        for name in wanted:
            if name in ("relay", "hangup") or (name == "compare" and args.compare is not None):
                results[name] = measure(procs, name, up.url, args)
                per_event = results[name]["instructions_per_event"]
                print(f"{name}: {per_event:,.0f} instructions an event", flush=True)
    relay = results.get("relay")
    rows = []
    for name, r in results.items():
        ratios = [
            "-" if relay is None else f"{r[key] / relay[key]:.3f}x"
            for key in ("instructions_per_event", "instructions_per_event_without_idle")
        ]
        rows.append(
            [
                name,
                round(r["instructions_per_event"]),
                ratios[0],
                round(r["idle_instructions_per_s"]),
                round(r["instructions_per_event_without_idle"]),
                ratios[1],
                r["recv_per_event"],
                round(r["instructions_per_short_stream"]),
            ]
        )
    print()
    print(
        f"callgrind: {args.streams} streams each of {SHORT} and {args.long} events,"
        f" {args.gap_ms:g} ms apart, one keep-alive connection"
    )
    print(
        table(
            [
                "target",
                "instructions/event",
                "vs relay",
                "idle/s",
                "/event, idle excluded",
                "vs relay",
                "recv calls/event",
                "per 20-event stream",
            ],
            rows,
        )
    )
    failures = [
        f"{name}: {r['recv_per_event']:.2f} recv calls an event (events shared reads)"
        for name, r in results.items()
        if not 0.9 <= r["recv_per_event"] <= 1.1
    ]
    return report(
        "event_instructions",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": time.monotonic() - started,
            "results": results,
            "failures": failures,
        },
        args.out,
        failures,
    )


if __name__ == "__main__":
    sys.exit(main())
