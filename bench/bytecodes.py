"""Bytecodes executed per request, per function: where the interpreter's work goes, exactly.

py-spy samples wall time, so it charges a function for the preemptions inside its syscalls, and
cProfile's own timing inflates small functions; neither is repeatable to a few percent. This
counts: the server (hangup's `ProxyServer` as the CLI builds it, with the shipped config and its
JSON access log to /dev/null; or the bare relay) runs in this process, wrk loads it (4
connections) for a warm-up and then for `--seconds` with `sys.settrace` opcode events on, and
every bytecode executed is charged to its function. Divided by the requests wrk completed in
the traced window. Tracing slows the process ~30x; the counts hardly depend on that or on
what else the machine runs (repeat runs agree within ~1-2 %: a request's share of the loop's
periodic work moves with the request rate). A bytecode is not a fixed cost
(a `CALL` into C may do much), so this maps where Python code runs, beside bench.instructions'
totals and bench.wrk's CPU time.

`python -m bench.bytecodes [--workload chat] [--seconds 4] [--relay] [--uvloop] [--top 60]`
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import fake_upstream
from bench.common import Procs, free_port, report, table
from bench.instructions import completed_requests
from bench.wrk import WORKLOADS, lua_script, wrk_binary

WARMUP_S = 2

Key = tuple[str, int, str]


class Counter:
    """The trace function: every opcode event charged to its code object (dataclasses'
    generated `__init__`s, which share one file name, to their class)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[Key] = collections.Counter()

    def trace(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._opcode

    def _opcode(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
        if event == "opcode":
            code = frame.f_code
            if code.co_filename == "<string>":
                owner = type(frame.f_locals.get("self")).__name__
                self.counts[("<string>", 0, f"{code.co_qualname} of {owner}")] += 1
            else:
                self.counts[(code.co_filename, code.co_firstlineno, code.co_qualname)] += 1
        return self._opcode


def area(filename: str) -> str:
    """A file's package: hangup's modules by file, libraries and the stdlib by package."""
    path = Path(filename)
    parts = path.parts
    if "proxy" in parts and "site-packages" not in parts:
        return "/".join(parts[parts.index("proxy") :])
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "bench" in parts:
        return "/".join(parts[parts.index("bench") :])
    if path.parent.name in ("asyncio", "json", "logging", "concurrent"):
        return path.parent.name
    return path.name


async def _serve_relay(upstream: str, port: int) -> Callable[[], Awaitable[None]]:
    from aiohttp import web

    from bench import baseline_relay

    app = web.Application()
    app[baseline_relay.UPSTREAM] = upstream
    app.cleanup_ctx.append(baseline_relay.session_ctx)
    app.router.add_get("/healthz", baseline_relay.healthz)
    app.router.add_route("*", "/{tail:.*}", baseline_relay.relay)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner.cleanup


async def _serve_hangup(upstream: str, port: int) -> Callable[[], Awaitable[None]]:
    from proxy.__main__ import resolve_config
    from proxy.logs import configure_logging
    from proxy.server import ProxyServer

    config = resolve_config(None, upstream + "/v1")
    configure_logging("INFO", open(os.devnull, "w"))  # noqa: ASYNC230 (setup, before load)
    server = ProxyServer(config, host="127.0.0.1", port=port)
    await server.start()
    return server.stop_now


async def count(upstream: str, script: Path, seconds: int, relay: bool) -> dict[str, Any]:
    port = free_port()
    serve = _serve_relay if relay else _serve_hangup
    stop = await serve(upstream, port)
    loop = asyncio.get_running_loop()
    url = f"http://127.0.0.1:{port}"
    counter = Counter()
    try:
        await loop.run_in_executor(None, completed_requests, url, script, WARMUP_S)
        sys.settrace(counter.trace)
        threading.settrace(counter.trace)
        try:
            requests = await loop.run_in_executor(None, completed_requests, url, script, seconds)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type,unused-ignore]  # None: off
    finally:
        await stop()
    by_area: collections.Counter[str] = collections.Counter()
    for (filename, _, _), n in counter.counts.items():
        by_area[area(filename)] += n
    per = max(1, requests)
    return {
        "requests": requests,
        "bytecodes_per_request": sum(counter.counts.values()) / per,
        "by_area": [(a, n / per) for a, n in by_area.most_common()],
        "by_function": [
            (f"{area(f)}:{line} {name}", n / per)
            for (f, line, name), n in counter.counts.most_common()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="chat", choices=sorted(WORKLOADS))
    p.add_argument("--seconds", type=int, default=4, help="traced seconds of wrk load")
    p.add_argument("--relay", action="store_true", help="the bare relay instead of hangup")
    p.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    p.add_argument("--top", type=int, default=60, help="functions listed")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if wrk_binary() is None:
        print("bench.bytecodes needs Debian's wrk", file=sys.stderr)
        return 2
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # wrk's stop cuts requests
    started = time.monotonic()
    with Procs() as procs:
        up = fake_upstream.start(procs)
        script = lua_script(procs.workdir, args.workload)
        loop_factory = None
        if args.uvloop:
            import uvloop

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result = runner.run(count(up.url, script, args.seconds, args.relay))
    target = "relay" if args.relay else "hangup"
    print(
        f"{target}, {args.workload}: {result['requests']} requests traced,"
        f" {result['bytecodes_per_request']:.0f} bytecodes a request"
    )
    print(table(["where", "bytecodes/request"], [[a, round(n)] for a, n in result["by_area"][:30]]))
    print()
    rows = [[f, round(n)] for f, n in result["by_function"][: args.top]]
    print(table(["function", "bytecodes/request"], rows))
    result["by_function"] = result["by_function"][:300]
    failures = [] if result["requests"] > 0 else ["no request completed while traced"]
    data = {
        "target": target,
        "workload": args.workload,
        "seconds": args.seconds,
        "elapsed_s": time.monotonic() - started,
        "failures": failures,
        **result,
    }
    return report("bytecodes", data, args.out, failures)


if __name__ == "__main__":
    sys.exit(main())
