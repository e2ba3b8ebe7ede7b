"""The CI-short benchmarks (bench/ci.py) through pytest, so `.ci/run` covers them.

Each runs in its own process tree, as a user would run it. A benchmark fails only on a
correctness problem (a lost or doubly counted request, a cancel that never reached the
upstream, a connection left open, wrong token accounting); timings are printed, never asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("benchmark", ["overhead", "cancel", "soak"])
def test_short_benchmark_finds_no_correctness_problem(benchmark: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ci", "--only", benchmark],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=140,
    )
    report = proc.stdout + proc.stderr
    print(report)  # the tables, shown with -s or on failure
    assert proc.returncode == 0, report[-4000:]
