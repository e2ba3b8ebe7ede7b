"""The CI-short benchmarks (bench/ci.py) through pytest, so `.ci/run` covers them.

Each runs in its own process tree, as a user would run it. A benchmark fails only on a
correctness problem (a lost or doubly counted request, a cancel that never reached the
upstream, a connection left open, wrong token accounting); timings are printed, never asserted.
"""

from __future__ import annotations

import json
import math
import shutil
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


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs Debian's wrk (scripts/test installs it)"
)
def test_wrk_benchmark_reports_cpu_ratios_and_contention(tmp_path: Path) -> None:
    """bench.wrk --short: every target answered, CPU per request and the ratios to the relay are
    there and positive, contention is recorded. Timings are not judged."""
    out = tmp_path / "wrk.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wrk", "--short", "--workloads", "chat,stream20",
         "--out", str(out)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    print(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert data["failures"] == []
    for workload in ("chat", "stream20"):
        rows = data["results"][workload]
        assert {"direct", "relay", "hangup"} <= set(rows)
        for name, row in rows.items():
            assert row["requests"] > 0, (workload, name)
            assert 0 < row["cpu_us_per_req"] < 1e6, (workload, name)
        assert rows["hangup"]["cpu_vs_relay"] == pytest.approx(
            rows["hangup"]["cpu_us_per_req"] / rows["relay"]["cpu_us_per_req"]
        )
    assert math.isfinite(data["per_target"]["hangup"]["event_us"])
    assert data["others_cpus_in_windows"]["median"] >= 0
    assert 0 <= data["contention"]["others_cpus"] <= data["machine"]["cpus"]
    totals = data["hangup_requests"]["hangup-asyncio"]
    assert totals[1] > 0  # completed requests counted by hangup's own metrics
