"""Profile: where hangup's CPU goes per request, two ways.

1. `--spy` (default): py-spy samples the hangup process (the real CLI) while the load generator
   saturates it with small chat completions or short streams; the samples are grouped into the
   components of a request (SSE pipeline, access log, metrics, admission, deadlines, usage,
   aiohttp tracing, socket writes) and printed as shares of the event loop thread's samples
   (py-spy counts the log writer thread's waits as samples; each thread's real CPU per request
   is read from /proc and printed beside). Needs py-spy (`pip install py-spy`); sampling pauses
   the process, so absolute CPU is inflated and only the shares mean something.
2. `--micro`: each component timed alone in this process (`time.process_time`, 3,000 rounds),
   in µs per request, on the same request and stream shapes the overhead benchmark uses.

3. `--memory N`: tracemalloc inside a hangup server (built in this process with the CLI's own
   config resolution, so tracemalloc can see it) while another process holds N idle
   `stall:after=1` streams through it; prints the Python heap per stream by file and by
   allocation site.

`python -m bench.profile [--kind chat|stream] [--seconds 12] [--micro] [--memory N] [--out F]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, PY, REPO, Procs, table, write_json

# Component -> substrings of py-spy frames ("function (file:line)") that belong to it.
COMPONENTS: dict[str, tuple[str, ...]] = {
    # (the pumps moved from relay.Exchange to downstream.Downstream: both names count)
    "SSE pipeline (_pump_sse)": ("Exchange._pump_sse", "Downstream._pump_sse"),
    "  SSE decode": ("SSEDecoder.",),
    "  usage tracking": ("StreamUsageTracker.feed", "PlainReads.feed"),  # feed, feed_plain
    "  usage filter": ("UsageChunkFilter.",),
    "body relay (_pump_body)": ("Exchange._pump_body", "Downstream._pump_body"),
    "access log": ("Logger.log",),
    "  redact": ("redact (",),
    "metrics": ("Metrics.request_finished", "Metrics.request_started", "Metrics.request_ended"),
    "accounting + usage of bodies": ("Accountant.settle", "Exchange.final_usage"),
    "admission": ("Exchange._admit", "admission.py"),
    "deadlines + watchdog": ("Deadlines.", "Watchdog."),
    "aiohttp tracing signals": ("Signal.send",),
    "upstream request (aiohttp client)": ("ClientSession._request",),
    "client response prepare": ("StreamResponse.prepare",),
    "socket writes (syscalls)": ("_SelectorSocketTransport.write",),
}


def spy(kind: str, seconds: float, rate: int, loop: str = "default") -> dict[str, Any]:
    """py-spy on the hangup CLI while wrk (50 connections) saturates it with one workload of
    bench.wrk (`chat`, `stream20`, ...) from bench.fake_upstream."""
    from bench import fake_upstream, wrk

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    wrk_exe = wrk.wrk_binary()
    if wrk_exe is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with Procs() as procs:
        up = fake_upstream.start(procs)
        hang = procs.hangup(up.url + "/v1", loop=loop)
        target = wrk.Target("hangup", hang.url, hang.pid, loop, None)
        script = wrk.lua_script(procs.workdir, kind)
        wrk.run_wrk(wrk_exe, target, script, connections=50, duration=1)  # warm up
        raw = procs.workdir / "pyspy.txt"
        recorder = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(hang.pid),
                "--rate",
                str(rate),
                "--duration",
                str(int(seconds)),
                "--format",
                "raw",
                "--threads",
                "--output",
                str(raw),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threads_before = _thread_cpu(hang.pid)
        try:
            load = wrk.run_wrk(wrk_exe, target, script, connections=50, duration=seconds + 1)
            recorder.wait(seconds + 60)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait(5)
        threads_after = _thread_cpu(hang.pid)
        stacks = raw.read_text().splitlines()
    # Only the event loop's thread: py-spy counts the log writer's waits on its queue as
    # samples (its idle detection misses them); the threads' real CPU comes from /proc.
    total = 0
    shares: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in stacks:
        stack, _, count = line.rpartition(" ")
        thread, _, stack = stack.partition(";")
        if not thread.endswith(": MainThread"):
            continue
        n = int(count)
        total += n
        for name, needles in COMPONENTS.items():
            if any(needle in stack for needle in needles):
                shares[name] += n
        leaves[stack.rsplit(";", 1)[-1].rsplit(" (", 1)[0]] += n
    requests = max(1, int(load["requests"]))
    return {
        "kind": kind,
        "samples": total,
        "load": load,
        # CPU per request of each thread over the profiled run (sampling inflates it a little).
        "thread_cpu_us_per_request": {
            name: (threads_after.get(name, 0.0) - threads_before.get(name, 0.0)) / requests * 1e6
            for name in threads_after
        },
        "shares": {k: shares[k] / total for k in COMPONENTS},
        "top_self": [(f, n / total) for f, n in leaves.most_common(15)],
    }


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (the loop's thread is the process's name, `python`)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def _timed(fn: Callable[[], object], rounds: int = 3000) -> float:
    fn()
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) / rounds * 1e6


def micro() -> dict[str, float]:
    """Each component alone, µs per request (16-token answers, as in bench.overhead)."""
    from prometheus_client import CollectorRegistry

    from proxy.config import HangupConfig
    from proxy.logs import JsonFormatter, access_fields, redact
    from proxy.metrics import Metrics
    from proxy.outcome import Outcome, RequestRecord
    from proxy.sim.behaviour import parse_behaviour
    from proxy.sim.formats import ChatStream
    from proxy.sim.tokens import make_plan
    from proxy.sse import SSEDecoder
    from proxy.usage import (
        StreamUsageTracker,
        UsageChunkFilter,
        body_usage,
        inject_stream_usage,
        inspect_request,
    )

    req: dict[str, Any] = {
        "model": "normal:tokens=16,rate=0",
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": 16,
        "stream": True,
    }
    raw = json.dumps(req).encode()
    injected = {**req, "stream_options": {"include_usage": True}}
    plan = make_plan(
        "chat", injected, parse_behaviour(req["model"]), default_tokens=16, default_rate=0
    )
    fmt = ChatStream(model=req["model"], plan=plan, include_usage=True)
    chunks = fmt.head() + [fmt.content(i) for i in range(16)] + fmt.tail()
    facts = inspect_request("/v1/chat/completions", req)

    def admit() -> None:
        f = inspect_request("/v1/chat/completions", json.loads(raw))
        inject_stream_usage(raw, f, continuous=False)

    def decode() -> None:
        d = SSEDecoder()
        for c in chunks:
            d.feed(c)

    def decode_track() -> None:
        d, tracker = SSEDecoder(), StreamUsageTracker(facts)
        for c in chunks:
            for ev in d.feed(c):
                tracker.feed(ev)

    def decode_track_filter() -> None:
        d, tracker, flt = SSEDecoder(), StreamUsageTracker(facts), UsageChunkFilter()
        for c in chunks:
            b"".join(flt.client_bytes(ev, tracker.feed(ev)) for ev in d.feed(c))

    plain = {k: v for k, v in req.items() if k != "stream"}
    plain_facts = inspect_request("/v1/chat/completions", plain)
    answer = ChatStream(model=req["model"], plan=plan)
    answer.account(0, 16)
    body = json.dumps(answer.body()).encode()

    rec = RequestRecord(
        request_id="0123456789abcdef0123456789abcdef",
        method="POST",
        path="/v1/chat/completions",
        started_at=1.0,
        wall_started_at=time.time(),
    )
    rec.route, rec.model, rec.endpoint = "default", req["model"], "chat.completions"
    rec.status = rec.upstream_status = 200
    rec.settle(Outcome.COMPLETED)
    rec.ended_at = 1.01
    logger = logging.getLogger("bench.profile.access")
    logger.propagate = False
    sink = open(os.devnull, "w")  # closed in the finally below
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "request", (), None)
    record.fields = access_fields(rec)
    line = JsonFormatter().format(record)
    base_url = "http://127.0.0.1:1/v1"
    config = HangupConfig.model_validate(
        {"upstreams": {"s": {"base_url": base_url}}, "routes": [{"name": "d", "upstream": "s"}]}
    )
    metrics = Metrics(
        config.metrics, routes=["d"], configured_models=set(), registry=CollectorRegistry()
    )

    def finished() -> None:
        metrics.request_started()
        metrics.request_ended()
        metrics.request_finished(rec)

    try:
        return {
            "admission: parse + inspect + inject include_usage": _timed(admit),
            "SSE decode, 16-token stream (20 events)": _timed(decode),
            "SSE decode + usage tracking": _timed(decode_track),
            "SSE decode + tracking + usage filter": _timed(decode_track_filter),
            "usage of a non-streamed answer (body_usage)": _timed(
                lambda: body_usage(body, plain_facts, None)
            ),
            "access log line (whole logging call)": _timed(
                lambda: logger.info("request", extra={"fields": access_fields(rec)})
            ),
            "  of which redact() of the line": _timed(lambda: redact(line)),
            "metrics: request_started + request_ended + request_finished": _timed(finished),
        }
    finally:
        logger.removeHandler(handler)
        sink.close()


async def _hold_streams(port: int, n: int) -> None:
    """The holder process: open n streams, say so, hold them until stdin closes."""
    from bench.scale import close_all, hold

    held = await hold(port, n, 100, 60)
    print(f"held {len(held['streams'])} {held['errors']}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await close_all(held["streams"])


async def _memory(sim_url: str, n: int) -> dict[str, Any]:
    import gc
    import tracemalloc

    from bench.common import free_port, rss_bytes
    from proxy.__main__ import resolve_config
    from proxy.server import ProxyServer

    config = resolve_config(None, sim_url + "/v1")
    logging.getLogger("hangup.access").disabled = True  # no log handler here; keep quiet
    port = free_port()
    server = ProxyServer(config, host="127.0.0.1", port=port)
    await server.start()

    async def holder(count: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            PY, "-m", "bench.profile", "--holder", str(port), str(count),
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        print(line.decode().strip(), flush=True)
        return proc

    async def release(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 60)

    try:
        await release(await holder(100))  # warm-up: one-time costs are not per stream
        await asyncio.sleep(0.5)
        gc.collect()
        tracemalloc.start(1)
        before, rss0 = tracemalloc.take_snapshot(), rss_bytes(os.getpid())
        proc = await holder(n)
        try:
            await asyncio.sleep(1)
            gc.collect()
            after, rss1 = tracemalloc.take_snapshot(), rss_bytes(os.getpid())
        finally:
            await release(proc)
        tracemalloc.stop()
    finally:
        await server.stop_now()

    def where(filename: str) -> str:
        return filename.split("/site-packages/")[-1].replace(str(REPO) + "/", "")

    files = after.compare_to(before, "filename")
    return {
        "streams": n,
        "heap_bytes_per_stream": sum(s.size_diff for s in files) / n,
        "rss_bytes_per_stream_with_tracemalloc": (rss1 - rss0) / n,
        "by_file": [(where(s.traceback[0].filename), s.size_diff / n) for s in files[:15]],
        "by_line": [
            (
                f"{where(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                s.size_diff / n,
                s.count_diff / n,
            )
            for s in after.compare_to(before, "lineno")[:25]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kind", choices=["chat", "stream20", "burst20", "burst200"], action="append")
    p.add_argument("--loop", choices=["default", "asyncio", "uvloop"], default="default")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--micro", action="store_true", help="only the micro-timings")
    p.add_argument("--memory", type=int, metavar="N", help="heap per idle stream, N streams")
    p.add_argument("--holder", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.holder:
        asyncio.run(_hold_streams(*args.holder))
        return 0
    if args.memory:
        with Procs() as procs:
            sim = procs.sim(tokens_per_s=0, default_tokens=16)
            mem = asyncio.run(_memory(sim.url, args.memory))
        print(f"\nPython heap per idle stream: {mem['heap_bytes_per_stream']:.0f} B")
        print(table(["file", "B/stream"], [[f, round(b)] for f, b in mem["by_file"]]))
        print()
        rows = [[site, round(b), round(c, 1)] for site, b, c in mem["by_line"]]
        print(table(["allocation site", "B/stream", "objects/stream"], rows))
        path = write_json("profile-memory", mem, args.out)
        print(f"\nwrote {path}")
        return 0
    result: dict[str, Any] = {"micro_us": micro()}
    print("components alone (µs per request, this process)")
    print(table(["component", "µs"], [[k, v] for k, v in result["micro_us"].items()]))
    if not args.micro:
        kinds = args.kind or ["chat", "stream20"]
        result["spy"] = [spy(kind, args.seconds, args.rate, args.loop) for kind in kinds]
        rows = [[name, *(f"{r['shares'][name]:.1%}" for r in result["spy"])] for name in COMPONENTS]
        print()
        print("share of the event loop thread's samples under saturating load (py-spy)")
        print(table(["component", *kinds], rows))
        for r in result["spy"]:
            print(f"\n{r['kind']}: top functions by own time")
            print(table(["function", "share"], [[f, f"{s:.1%}"] for f, s in r["top_self"]]))
            threads = ", ".join(
                f"{name} {us:.0f}" for name, us in r["thread_cpu_us_per_request"].items()
            )
            print(f"CPU µs per request by thread (/proc, while sampled): {threads}")
    path = write_json("profile", result, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
