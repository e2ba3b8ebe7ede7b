"""Scrape lag: how late the event loop runs while `/metrics` is rendered at the label bound.

The scrape handler renders in a worker thread (`proxy.app.metrics`); while it does, the loop
thread needs the GIL back for every step. This measures just that, with nothing else running:
a hangup server built in this process (the CLI's config resolution), every metric label
filled to its bound (`bench.looplag.saturate_labels`), then a 1 ms timer on the loop records
how late it fires while the metrics are rendered in the worker thread (as a scrape does) and,
for comparison, on the loop itself.

`python -m bench.scrapelag [--repeat 3] [--switch-interval S]`
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench.common import free_port


async def _measure(repeat: int) -> list[tuple[str, float, float]]:
    from bench.looplag import saturate_labels
    from proxy.__main__ import resolve_config
    from proxy.server import ProxyServer
    from proxy.state import STATE

    config = resolve_config(None, "http://127.0.0.1:9/v1")
    server = ProxyServer(config, host="127.0.0.1", port=free_port())
    await server.start()
    try:
        metrics = server.app[STATE].metrics
        saturate_labels(server.app[STATE])
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        running = True

        async def probe() -> None:
            while running:
                due = loop.time() + 0.001
                await asyncio.sleep(0.001)
                lags.append(loop.time() - due)

        task = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        out: list[tuple[str, float, float]] = []
        for _ in range(repeat):
            for where in ("worker thread", "on the loop"):
                lags.clear()
                started = time.perf_counter()
                if where == "worker thread":
                    await loop.run_in_executor(None, metrics.render)
                else:
                    metrics.render()
                    await asyncio.sleep(0.002)  # let the probe see the stall
                out.append((where, (time.perf_counter() - started) * 1000, max(lags) * 1000))
                await asyncio.sleep(0.05)
        running = False
        await task
        return out
    finally:
        await server.stop_now()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (default 0.005)")
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(f"GIL switch interval {sys.getswitchinterval() * 1000:.1f} ms")
    for where, wall_ms, lag_ms in asyncio.run(_measure(args.repeat)):
        print(f"render {where:14} {wall_ms:6.1f} ms; the loop's largest lag {lag_ms:6.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
