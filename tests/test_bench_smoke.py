"""The CI-short benchmarks (what bench/ci.py runs) through pytest, so `.ci/run` covers them.

Each runs in its own process tree, as a user would run it (`python -m bench.NAME --short`). A
benchmark exits non-zero on a correctness problem (a lost or doubly counted request, a cancel
that never reached the upstream, a connection left open, wrong token accounting). Beyond the
exit code, each test reads the JSON report and checks that it holds what it claims: every cell
measured, numbers finite and consistent with each other (sums, orderings, cross-counts).
Timings are printed, never bounded: on a shared 2-core machine they say nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.wrk import derive as wrk_derive

REPO = Path(__file__).resolve().parents[1]


def run_bench(benchmark: str, args: list[str], out: Path, *, timeout: float) -> dict[str, Any]:
    """`python -m bench.<benchmark> ARGS --out OUT` as a user runs it: it must exit 0 and
    write a report of its own name that lists no failure."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{benchmark}", *args, "--out", str(out)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    print(output)  # the tables, shown with -s or on failure
    assert proc.returncode == 0, output[-4000:]
    data = json.loads(out.read_text())
    assert isinstance(data, dict)
    assert data["benchmark"] == benchmark
    assert data["failures"] == []
    return data


def run_short(benchmark: str, out: Path) -> dict[str, Any]:
    data = run_bench(benchmark, ["--short"], out, timeout=140)
    assert data["machine"]["cpus"] >= 1
    assert finite(data["elapsed_s"]) > 0
    return data


def finite(x: Any) -> float:
    assert isinstance(x, int | float) and not isinstance(x, bool), x
    assert math.isfinite(x), x
    return float(x)


def check_overhead(data: dict[str, Any]) -> None:
    kinds = data["args"]["kinds"].split(",")
    cells = {f"{k}/{load}" for k in kinds for load in ("saturating", "moderate")}
    assert set(data["results"]) == cells
    hangup_ok = 0
    for cell, targets in data["results"].items():
        assert set(targets) == {"direct", "baseline", "hangup"}, cell
        for target, row in targets.items():
            runs = data["runs"][f"{cell}/{target}"]
            assert len(runs) == row["rounds"] == data["args"]["rounds"]
            assert row["requests"] == sum(r["ok"] for r in runs) > 0, (cell, target)
            assert finite(row["rps"]) > 0
            assert 0 < finite(row["p50_ms"]) <= finite(row["p99_ms"]), (cell, target)
            # The ratios are of this run's own figures.
            baseline = targets["baseline"]["rps"]
            assert row["rps_vs_baseline"] == pytest.approx(row["rps"] / baseline)
            assert row["added_p50_ms"] == pytest.approx(row["p50_ms"] - targets["direct"]["p50_ms"])
            if target == "hangup":
                hangup_ok += row["requests"]
    # hangup's own metrics saw at least every request its clients completed (plus warm-ups).
    assert data["hangup_requests_total"] >= hangup_ok


def check_cancel(data: dict[str, Any]) -> None:
    assert data["results"], "no scenario measured"
    windows = None
    for scenario, by_window in data["results"].items():
        windows = windows or set(by_window)
        assert set(by_window) == windows, scenario  # every scenario covers every window
        for window, w in by_window.items():
            latencies = [finite(x) for x in w["latencies_ms"]]
            assert w["samples"] == len(latencies) > 0, (scenario, window)
            # (w["failures"] lists samples whose setup never reached the window under load:
            # not measured, not a correctness failure; the report's own list is checked above.)
            assert min(latencies) >= 0
            assert finite(w["p50_ms"]) <= finite(w["p99_ms"]) <= finite(w["max_ms"])
            assert w["max_ms"] == pytest.approx(max(latencies), abs=0.001)
    assert windows is not None and {"connect", "mid-stream", "non-streaming"} <= windows


def _pair(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+) / (\d+)", text)
    assert m is not None, text
    return int(m[1]), int(m[2])


def check_soak(data: dict[str, Any]) -> None:
    checks = data["checks"]
    planned, sent = _pair(checks["requests planned / sent"])
    assert planned == sent == data["args"]["requests"]
    # One outcome per request, as the proxy counted them and as the clients saw them.
    assert sum(data["outcomes"].values()) == sent
    assert int(checks["outcome counters sum"]) == sent
    assert _pair(checks["ids with no / several outcomes"]) == (0, 0)
    assert data["client"]["hung up"] + data["client"]["complete"] == sent
    assert data["outcomes"]["client_cancelled"] <= data["client"]["hung up"]
    assert data["outcomes"]["completed"] > 0 and data["client"]["hung up"] > 0
    # Tokens: hangup's count of completed answers equals the simulator's; log equals metrics.
    proxy_tokens, sim_tokens = _pair(checks["completed: tokens hangup / sim"])
    assert proxy_tokens == sim_tokens > 0
    logged, exported = _pair(checks["completion tokens log / metrics"])
    assert logged == exported >= proxy_tokens
    assert checks["verdict"] == "nothing lost"
    assert data["mismatched_examples"] == []


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "overhead": check_overhead,
    "cancel": check_cancel,
    "soak": check_soak,
}


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("benchmark", list(CHECKS))
def test_short_benchmark_reports_sane_numbers(benchmark: str, tmp_path: Path) -> None:
    CHECKS[benchmark](run_short(benchmark, tmp_path / f"{benchmark}.json"))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs Debian's wrk (scripts/test installs it)"
)
def test_wrk_benchmark_reports_cpu_ratios_and_contention(tmp_path: Path) -> None:
    """bench.wrk --short: every target answered, CPU per request and the ratios to the relay are
    there and positive, contention is recorded. Timings are not judged."""
    out = tmp_path / "wrk.json"
    data = run_bench("wrk", ["--short", "--workloads", "chat,stream20"], out, timeout=170)
    for workload in ("chat", "stream20"):
        rows = data["results"][workload]
        assert {"direct", "relay", "hangup"} <= set(rows)
        for name, row in rows.items():
            assert row["requests"] > 0, (workload, name)
            assert 0 < row["cpu_us_per_req"] < 1e6, (workload, name)
        assert rows["hangup"]["cpu_vs_relay"] == pytest.approx(
            rows["hangup"]["cpu_us_per_req"] / rows["relay"]["cpu_us_per_req"]
        )
        # One round: the per-round ratio is that round's.
        assert rows["hangup"]["cpu_vs_relay_per_round"] == pytest.approx(
            rows["hangup"]["cpu_us_per_req_rounds"][0] / rows["relay"]["cpu_us_per_req_rounds"][0],
            rel=1e-3,
        )
    assert math.isfinite(data["per_target"]["hangup"]["event_us"])
    assert data["others_cpus_in_windows"]["median"] >= 0
    assert 0 <= data["contention"]["others_cpus"] <= data["machine"]["cpus"]
    totals = data["hangup_requests"]["hangup-asyncio"]
    assert totals[1] > 0  # completed requests counted by hangup's own metrics


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs Debian's wrk (scripts/test installs it)"
)
def test_wrk_paired_loads_the_proxies_in_one_window(tmp_path: Path) -> None:
    """bench.wrk --paired: the relay and hangup are measured over one shared window (the same
    wall time and machine load in their runs), each served its own wrk's requests, and the
    per-round ratio is that window's. `direct` is not loaded beside them."""
    out = tmp_path / "paired.json"
    data = run_bench(
        "wrk",
        ["--short", "--paired", "--targets", "direct,relay,hangup", "--workloads", "chat"],
        out,
        timeout=170,
    )
    assert set(data["results"]["chat"]) == {"relay", "hangup"}
    relay, hangup = data["runs"]["chat/relay"][0], data["runs"]["chat/hangup"][0]
    assert relay["wall_s"] == hangup["wall_s"]
    assert relay["busy_cpus"] == hangup["busy_cpus"]
    for run in (relay, hangup):
        assert run["requests"] > 0
        assert 0 < run["cpu_us_per_req"] < 1e6
    assert data["results"]["chat"]["hangup"]["cpu_vs_relay_per_round"] == pytest.approx(
        hangup["cpu_us_per_req"] / relay["cpu_us_per_req"], rel=1e-6
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("callgrind_control") is None,
    reason="needs Debian's wrk and valgrind",
)
def test_instructions_benchmark_counts_each_targets_instructions(tmp_path: Path) -> None:
    """bench.instructions --short: the relay and hangup each served requests under callgrind
    and executed a counted number of instructions for them; the ratio is theirs. Not judged."""
    out = tmp_path / "instructions.json"
    data = run_bench("instructions", ["--short"], out, timeout=170)
    rows = data["results"]["chat"]
    assert set(rows) == {"relay", "hangup"}
    for row in rows.values():
        assert row["requests"] > 0
        assert 0 < finite(row["kir_per_request"]) < 1e6
    assert rows["hangup"]["vs_relay"] == pytest.approx(
        rows["hangup"]["kir_per_request"] / rows["relay"]["kir_per_request"]
    )


@pytest.mark.parametrize(
    ("workload", "answer"), [("chat", b"{}"), ("stream20", b"data: [DONE]\n\n")]
)
async def test_instructions_sends_exactly_the_requests_it_says_each_answered(
    workload: str, answer: bytes
) -> None:
    """bench.instructions --requests: exactly N requests, over at most the given connections,
    every one awaited before it returns (so none is in flight when counting stops); a failed
    one is an error, not a request counted."""
    import asyncio

    from aiohttp import web

    from bench.instructions import exactly
    from tests.support import serving

    seen: list[str | None] = []
    peers: set[object] = set()
    status = 200

    async def answer_it(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("x-bench-events"))
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(status=status, body=answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer_it)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        assert await asyncio.to_thread(exactly, url, workload, 7, 3) == 7
        assert len(seen) == 7 and len(peers) == 3  # every request answered, on 3 keep-alives
        assert set(seen) == ({"20"} if workload == "stream20" else {None})
        status = 500
        with pytest.raises(RuntimeError, match="2 of 2 requests failed: 500"):
            await asyncio.to_thread(exactly, url, workload, 2, 1)


def test_instructions_reads_every_event_of_callgrinds_dumps_and_estimates_cycles(
    tmp_path: Path,
) -> None:
    """bench.instructions --simulate: each event's totals summed over the dumps, by the names of
    each dump's own `events:` line, and KCachegrind's cycle estimate from them."""
    from bench.instructions import _totals, cycle_estimate

    names = "Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim"
    first = tmp_path / "callgrind.out.1"
    first.write_text(
        f"events: {names}\nfn=x\n1 5\ntotals: 1000 300 200 7 11 13 1 2 3 90 17 40 19\n"
    )
    second = tmp_path / "callgrind.out.2"
    second.write_text(f"events: {names}\ntotals: 500 0 0 1 1 1 0 0 1 0 3 0 1\n")
    plain = tmp_path / "callgrind.out.3"  # no simulation: Ir alone, no events line needed
    plain.write_text("totals: 42\n")
    totals = _totals([first, second])
    assert totals["Ir"] == 1500 and totals["D1mw"] == 14 and totals["Bim"] == 20
    assert totals["DLmw"] == 4 and totals["Bcm"] == 20
    l1 = 7 + 11 + 13 + 1 + 1 + 1
    ll = 1 + 2 + 3 + 1
    mispredicted = 17 + 19 + 3 + 1
    assert cycle_estimate(totals) == 1500 + 10 * l1 + 100 * ll + 10 * mispredicted
    assert _totals([plain]) == {"Ir": 42}
    assert cycle_estimate({"Ir": 42}) == 42


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs Debian's wrk")
def test_bytecodes_benchmark_charges_every_bytecode_to_a_function(tmp_path: Path) -> None:
    """bench.bytecodes: requests traced, and the counts by area and by function add up to the
    total per request, with hangup's own modules among them."""
    out = tmp_path / "bytecodes.json"
    data = run_bench("bytecodes", ["--seconds", "1"], out, timeout=110)
    assert data["requests"] > 0
    total = finite(data["bytecodes_per_request"])
    assert sum(n for _, n in data["by_area"]) == pytest.approx(total)
    areas = dict(data["by_area"])
    assert areas["proxy/relay.py"] > 0 and areas["aiohttp"] > 0
    assert all(n > 0 for _, n in data["by_function"])


@pytest.mark.parametrize("benchmark", list(CHECKS))
def test_the_checks_accept_a_recorded_report_and_reject_a_doctored_one(
    benchmark: str, tmp_path: Path
) -> None:
    """The checks themselves can fail: each rejects its report with one figure changed."""
    recorded = REPO / "tests" / "fixtures" / "bench" / f"{benchmark}.json"
    data = json.loads(recorded.read_text())
    CHECKS[benchmark](data)
    doctored = DOCTOR[benchmark](json.loads(recorded.read_text()))
    with pytest.raises(AssertionError):
        CHECKS[benchmark](doctored)


def _lose_a_request(data: dict[str, Any]) -> dict[str, Any]:
    data["outcomes"]["completed"] -= 1
    return data


def _drop_a_cancel_sample(data: dict[str, Any]) -> dict[str, Any]:
    scenario = next(iter(data["results"].values()))
    scenario["mid-stream"]["latencies_ms"].pop()
    return data


def _miscount_hangup(data: dict[str, Any]) -> dict[str, Any]:
    data["hangup_requests_total"] = 0
    return data


DOCTOR: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "overhead": _miscount_hangup,
    "cancel": _drop_a_cancel_sample,
    "soak": _lose_a_request,
}


@pytest.mark.parametrize("name", ["hangup-nolog", "hangup-nousage"])
def test_wrk_ablations_change_exactly_their_one_setting(name: str, tmp_path: Path) -> None:
    """`bench.wrk --ablations` runs the shipped config with one feature off: the file it
    writes must load as a hangup config that differs from the shipped one in that setting
    (and the upstream) only, or the ablation would measure something else."""
    from bench.wrk import ABLATIONS, ablated_config
    from proxy.config_file import load_config

    upstream = "http://127.0.0.1:9/v1"
    section, key, value = ABLATIONS[name]
    ablated = load_config(ablated_config(tmp_path, name, upstream, ABLATIONS[name]))
    shipped = load_config(Path("config/hangup.yaml"))
    assert ablated.upstreams["openai"].base_url == upstream
    assert str(getattr(getattr(ablated, section), key)).lower() == value
    assert getattr(getattr(ablated, section), key) != getattr(getattr(shipped, section), key)
    a, b = ablated.model_dump(), shipped.model_dump()
    a["upstreams"]["openai"]["base_url"] = b["upstreams"]["openai"]["base_url"]
    a[section][key] = b[section][key]
    assert a == b


def test_wrk_derives_each_per_event_cost_from_its_two_workloads() -> None:
    """Per event: (stream20 - chat) / 20, (slow200 - slow20) / 180 (paced, a slope between two
    unsaturated streams) and (burst200 - burst20) / 180."""
    cpu = {
        "chat": 100.0,
        "stream20": 340.0,
        "slow20": 360.0,
        "slow200": 2160.0,
        "burst20": 300.0,
        "burst200": 660.0,
    }
    results = {w: {"t": {"cpu_us_per_req": v}} for w, v in cpu.items()}
    row = wrk_derive(results, ["t"])["t"]
    assert row["event_us"] == pytest.approx(12.0)
    assert row["paced_event_slope_us"] == pytest.approx(10.0)
    assert row["event_slope_us"] == pytest.approx(2.0)
    del results["slow200"]
    assert "paced_event_slope_us" not in wrk_derive(results, ["t"])["t"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs Debian's wrk")
def test_perevent_benchmark_gives_each_targets_cost_per_event(tmp_path: Path) -> None:
    """bench.perevent, one short round: the relay and hangup relayed paced streams of both
    lengths without a wrk error, and each has a per-event figure and hangup its ratio."""
    out = tmp_path / "perevent.json"
    data = run_bench(
        "perevent",
        [
            "--rounds",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--long",
            "200",
            "--targets",
            "relay,hangup",
        ],
        out,
        timeout=120,
    )
    assert set(data["results"]) == {"relay", "hangup"}
    for name in ("relay", "hangup"):
        for events in (20, 200):
            (run,) = data["runs"][f"{events}/{name}"]
            assert run["streams"] > 0 and run["proxy_cpu_s"] > 0
    (ratio,) = data["results"]["hangup"]["ratio_rounds"]
    (ours,) = data["results"]["hangup"]["event_us_rounds"]
    (relay,) = data["results"]["relay"]["event_us_rounds"]
    assert ratio == pytest.approx(ours / relay, rel=1e-2)


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="needs valgrind")
def test_event_instructions_benchmark_counts_an_event_a_read(tmp_path: Path) -> None:
    """bench.event_instructions, small: under callgrind the relay and hangup each read every
    event alone (the benchmark fails otherwise) and ran a counted number of instructions a
    event. Not judged."""
    out = tmp_path / "event_instructions.json"
    data = run_bench(
        "event_instructions",
        ["--streams", "1", "--long", "40", "--targets", "relay,hangup", "--idle-s", "2"],
        out,
        timeout=300,
    )
    assert set(data["results"]) == {"relay", "hangup"}
    for row in data["results"].values():
        assert 0.9 <= row["recv_per_event"] <= 1.1
        assert 1_000 < finite(row["instructions_per_event"]) < 10_000_000
        assert finite(row["instructions_per_event_without_idle"]) < 10_000_000
    # hangup's loop-lag probe ticks while it idles; the bare relay has no timer of its own.
    idle = {name: row["idle_instructions_per_s"] for name, row in data["results"].items()}
    assert idle["hangup"] > idle["relay"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_wrk_pin_puts_every_thread_of_a_process_on_the_cpus_given() -> None:
    """`bench.wrk --pin`'s `pin`: each thread of the process, not only its first."""
    from bench.wrk import pin

    code = "import threading,time; threading.Thread(target=time.sleep, args=(30,)).start(); " \
        "print('ready', flush=True); time.sleep(30)"  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        cpu = max(os.sched_getaffinity(0))
        pin(child.pid, {cpu})
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) == 2
        for tid in tids:
            assert os.sched_getaffinity(int(tid)) == {cpu}
    finally:
        child.kill()
        child.communicate()


def test_wrk_compare_ratios_pair_each_round_with_its_own() -> None:
    """bench.wrk's hangup-over-compare figures: the ratio of the medians, the median of each
    round's own ratio (not of rounds paired across), and the rounds where hangup was lower."""
    from bench.wrk import compare_ratios

    ours = [{"cpu_us_per_req": v} for v in (100.0, 300.0, 210.0)]
    theirs = [{"cpu_us_per_req": v} for v in (110.0, 280.0, 200.0)]
    got = compare_ratios(ours, theirs)
    assert got["pooled"] == pytest.approx(210.0 / 200.0)
    assert got["per_round"] == pytest.approx(1.05)  # of 100/110, 300/280, 210/200
    assert got["rounds_below"] == "1 of 3"
