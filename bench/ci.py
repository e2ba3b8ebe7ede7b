"""`python -m bench.ci`: the short versions of overhead, cancel and soak, for CI (about 2 min).

Prints each benchmark's table. Exits non-zero only on a *correctness* failure (a request lost
or counted twice, a cancel that never reached the upstream, a connection left open, tokens
accounted wrongly, errors under load), never on a timing: on a shared 2-core machine timings
are reported, not asserted. Results go to bench/results/ci-*.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench import cancel, overhead, soak
from bench.common import RESULTS

BENCHMARKS: tuple[tuple[str, Callable[[list[str] | None], int]], ...] = (
    ("overhead", overhead.main),
    ("cancel", cancel.main),
    ("soak", soak.main),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=[name for name, _ in BENCHMARKS], action="append")
    args = p.parse_args(argv)
    started = time.monotonic()
    failed: list[str] = []
    for name, run in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        print(f"\n== bench {name} --short", flush=True)
        t = time.monotonic()
        rc = run(["--short", "--out", str(RESULTS / f"ci-{name}.json")])
        print(f"== bench {name}: {'ok' if rc == 0 else 'FAILED'} in {time.monotonic() - t:.0f} s")
        if rc != 0:
            failed.append(name)
    print(f"\nbench ci: {time.monotonic() - started:.0f} s, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
