"""`--workers N`: two real worker processes write into one PROMETHEUS_MULTIPROC_DIR and one
render (from a third process, as a scrape of any worker would) returns their sum."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__
from tests.metrics_support import parse, value

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import os, sys
from proxy.outcome import Cost, Outcome, Usage
from tests.metrics_support import make_record, new_metrics

n = int(sys.argv[1])
m = new_metrics()
for _ in range(n + 1):
    m.request_started()
for _ in range(n):
    m.request_ended()
    m.request_finished(make_record(usage=Usage(prompt_tokens=10, completion_tokens=5),
                                   cost=Cost(used_usd=0.001), first_token_at=1000.5))
m.request_ended()
m.request_finished(make_record(outcome=Outcome.CLIENT_CANCELLED, client_gone_at=1001.0,
                               upstream_closed_at=1001.002))
m.request_started()  # still in flight when the worker exits
m.upstream_connection_opened()
print(os.getpid())
"""

RENDER = """
import sys
from proxy.metrics import worker_exited
from tests.metrics_support import new_metrics

m = new_metrics()
assert m.multiprocess
sys.stdout.write(m.render()[0].decode())
print("=== after worker_exited")
worker_exited(int(sys.argv[1]))
sys.stdout.write(m.render()[0].decode())
"""


def run(script: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def test_one_render_sums_every_worker(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [run(WORKER, "3", env=env), run(WORKER, "4", env=env)]
    pid_a, _ = (int(finish(w).strip()) for w in workers)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("counter_"))

    before, after = finish(run(RENDER, str(pid_a), env=env)).split("=== after worker_exited\n")
    s = parse(before)
    chat = {"route": "chat", "model": "gpt-4o-mini"}
    assert value(s, "hangup_requests_total", **chat, outcome="completed") == 7
    assert value(s, "hangup_requests_total", **chat, outcome="client_cancelled") == 2
    assert value(s, "hangup_tokens_total", **chat, type="prompt") == 70
    assert value(s, "hangup_cost_usd_total", **chat) == pytest.approx(0.007)
    assert value(s, "hangup_time_to_first_token_seconds_count", **chat) == 7
    propagation = "hangup_cancel_propagation_seconds_bucket"
    assert value(s, propagation, route="chat", le="0.002") == 2
    assert value(s, propagation, route="chat", le="0.001") == 0
    # Gauges are live sums: each worker left one request in flight and one connection open.
    assert value(s, "hangup_requests_in_flight") == 2
    assert value(s, "hangup_upstream_connections") == 2
    # Every process says build_info 1; the scrape must still say 1, not the worker count.
    assert value(s, "hangup_build_info", version=__version__) == 1
    assert not any(name.endswith("_created") for name, _ in s)

    s = parse(after)
    # A dead worker's totals stay; its live gauges go.
    assert value(s, "hangup_requests_total", **chat, outcome="completed") == 7
    assert value(s, "hangup_requests_in_flight") == 1
    assert value(s, "hangup_upstream_connections") == 1
