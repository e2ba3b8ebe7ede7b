"""Run the simulated provider on its own: ``hangup simulate --port 9000 --tokens-per-s 50``
(or ``python -m proxy.sim ...``).

Stops on SIGINT or SIGTERM, cancelling in-flight streams and background jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from proxy.sim.provider import SimulatedProvider


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hangup simulate",
        description="OpenAI-compatible simulated provider (behaviour chosen by model name).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="0: as fast as possible")
    parser.add_argument("--default-tokens", type=int, default=16, help="answer length")
    parser.add_argument("--max-records", type=int, default=10_000, help="request records kept")
    parser.add_argument(
        "--capture-bytes", type=int, default=0, help="response bytes kept per request record"
    )
    parser.add_argument(
        "--engine",
        choices=("openai", "sglang", "vllm"),
        default="openai",
        help="name requests and serve that engine's abort endpoint",
    )
    parser.add_argument(
        "--ignore-close",
        action="store_true",
        help="keep generating after the client closes (only an abort call stops a request)",
    )
    parser.add_argument(
        "--vllm-abort-endpoint",
        action="store_true",
        help="with --engine vllm: serve /abort_requests (as vLLM's --tokens-only or dev mode)",
    )
    parser.add_argument("--uvloop", action="store_true", help="use uvloop (pip install uvloop)")
    return parser.parse_args(argv)


class _CannotListen(Exception):
    pass


async def _serve(args: argparse.Namespace) -> None:
    sim = SimulatedProvider(
        tokens_per_s=args.tokens_per_s,
        default_tokens=args.default_tokens,
        max_records=args.max_records,
        capture_bytes=args.capture_bytes,
        engine=args.engine,
        ignore_close=args.ignore_close,
        vllm_abort_endpoint=args.vllm_abort_endpoint,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await sim.start(args.host, args.port)
    except OSError as exc:  # the port is taken, or the address is not ours to bind
        raise _CannotListen(exc) from exc
    # One line on stdout so a parent process (benchmarks, `hangup demo`) can read the URL.
    print(f"simulated provider listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.uvloop:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            uvloop.run(_serve(args))
        else:
            asyncio.run(_serve(args))
    except _CannotListen as failure:
        exc = failure.__cause__
        assert isinstance(exc, OSError)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(
            f"hangup simulate: cannot listen on {args.host}:{args.port}: {reason} "
            "(pick another with --port, or --port 0 for any free one)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
