"""Print the fault suite's scorecard: hangup run as a user runs it (the `hangup` command with a
YAML config, a primary and a fallback in issue 14's shape) in front of two fault-injecting
upstreams (bench/fault_upstream.py), driven by the OpenAI Python SDK.

    python -m bench.faultsuite                 # tuned deadlines a user would set (5/5/5 s)
    python -m bench.faultsuite --defaults      # hangup's shipped deadlines
    python -m bench.faultsuite --inproc        # the production runner in this process (faster)
    python -m bench.faultsuite -k silent       # only cases whose name contains "silent"

One hangup process and one pair of upstreams per case (circuit state does not leak between
cases); four cases at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path

from bench.fault_cases import (
    SCORES,
    Case,
    Result,
    Timing,
    cases,
    hangup_config,
    run_case,
)
from bench.fault_upstream import FaultUpstream

# A right answer after 15 s is partial: the fault was waited out, not rescued.
USER_TIMING = Timing(headers_s=5, first_token_s=5, idle_s=5, late_s=20, hang_bound_s=40, slow_s=15)
DEFAULTS_TIMING = Timing(
    headers_s=300, first_token_s=120, idle_s=60, late_s=20, hang_bound_s=330, slow_s=15
)


async def one(
    case: Case, t: Timing, defaults: bool, inproc: bool, extra: dict[str, object], tmp: Path
) -> list[Result]:
    primary, backup = FaultUpstream("primary"), FaultUpstream("backup")
    await primary.start()
    await backup.start()
    data = hangup_config(primary, backup, None if defaults else t, **extra)
    try:
        if inproc:
            from proxy.config import HangupConfig
            from proxy.server import ProxyServer

            server = ProxyServer(HangupConfig.model_validate(data), host="127.0.0.1", port=0)
            await server.start()
            try:
                return await run_case(case, f"{server.base_url}/v1", primary, backup, t)
            finally:
                await server.stop_now()
        from tests.cli_support import HangupProcess, write_config

        path = write_config(tmp / f"{abs(hash(case.name))}.yaml", data)
        proc = await HangupProcess("--config", str(path)).start()
        try:
            url = await proc.listening_url(timeout=90)  # slow on a loaded machine
            return await run_case(case, f"{url}/v1", primary, backup, t)
        finally:
            await proc.close()
    finally:
        await primary.stop()
        await backup.stop()


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faultsuite")
    p.add_argument("--defaults", action="store_true", help="hangup's shipped deadlines")
    p.add_argument("--inproc", action="store_true", help="run the proxy in this process")
    p.add_argument(
        "--continue",
        dest="cont",
        action="store_true",
        help="continue_cut_streams: true (the fallback accepts an assistant prefix)",
    )
    p.add_argument("-k", default="", help="only cases whose name contains this")
    p.add_argument("-j", type=int, default=4, help="cases at a time")
    args = p.parse_args(argv)
    t = DEFAULTS_TIMING if args.defaults else USER_TIMING
    extra: dict[str, object] = {"continue_cut_streams": True} if args.cont else {}
    chosen = [c for c in cases(t) if args.k.lower() in c.name.lower()]
    gate = asyncio.Semaphore(args.j)
    with tempfile.TemporaryDirectory() as tmp:

        async def gated(case: Case) -> list[Result]:
            async with gate:
                try:
                    return await one(case, t, args.defaults, args.inproc, extra, Path(tmp))
                except AssertionError as exc:  # hangup did not start: the harness's problem
                    return [Result(case.name, "-", "error", str(exc)[:120], 0.0)]

        done = await asyncio.gather(*(gated(c) for c in chosen))
    results = [r for rs in done for r in rs]
    counts = collections.Counter(r.score for r in results)
    print(
        f"config: {'defaults' if args.defaults else t.route()}"
        f"{' + continue_cut_streams' if args.cont else ''}"
    )
    for r in results:
        print(f"{r.score:8} {r.case:42} {r.mode:7} {r.seconds:6.2f}s  {r.detail}")
    print(" / ".join(f"{counts[s]} {s}" for s in SCORES), f"({len(results)} runs)")
    if counts["error"]:
        print(f"{counts['error']} cases could not run (hangup did not start)")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
