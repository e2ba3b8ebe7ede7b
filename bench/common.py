"""Shared pieces of the benchmarks: child processes (hangup, the simulated provider, the
baseline relay, the load generator), /proc readings, percentiles, tables and JSON results.

Every child is started by `Procs`, which terminates and waits for all of them in its `close()`
(use it as a context manager), so a benchmark never leaves an orphan behind, whatever fails.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
HOST = "127.0.0.1"
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int | None = None) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to `want` (default: the hard limit); children
    inherit it. Returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(want, hard)
    if hard == resource.RLIM_INFINITY:
        target = want or 1_048_576
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/PID/stat; resolution 1/CLK_TCK s)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process, apart (the same /proc fields as cpu_seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def status_field(pid: int, name: str) -> int:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM, ...), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(name)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they only mean something next to this)."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    import aiohttp

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": have_uvloop(),
        "loadavg_at_start": load,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


_START = (time.monotonic(), *_proc_stat(), _own_cpu())


def contention() -> dict[str, float]:
    """How busy the machine was since this benchmark started, in CPUs (2.0 = both cores):
    everything, ours (this process and its children), and other tenants'."""
    t0, busy0, _total0, own0 = _START
    busy1, _total1 = _proc_stat()
    wall = max(1e-9, time.monotonic() - t0)
    busy = (busy1 - busy0) / wall
    ours = (_own_cpu() - own0) / wall
    return {
        "wall_s": round(wall, 1),
        "busy_cpus": round(busy, 2),
        "ours_cpus": round(ours, 2),
        "others_cpus": round(max(0.0, busy - ours), 2),
    }


# --- statistics and reporting -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into docs)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    busy = contention()
    print(
        f"machine: {busy['busy_cpus']:.2f} of {os.cpu_count()} CPUs busy on average during the run,"
        f" {busy['ours_cpus']:.2f} ours, {busy['others_cpus']:.2f} other tenants'"
    )
    payload = {
        "benchmark": name,
        "finished_at": time.time(),
        "machine": machine(),
        "contention": busy,
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# --- HTTP helpers (blocking; for setup and verification, never on a measured path) -----------


def report(name: str, data: dict[str, Any], out: Path | None, failures: list[str]) -> int:
    """End a benchmark: write its JSON, say where, list failures; the exit code (1 on any
    correctness failure, never on a timing)."""
    path = write_json(name, data, out)
    print(f"\nwrote {path}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def http_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(http_get(url, timeout))


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            http_get(url, timeout=1.0)
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s ({last})")


def sim_open_connections(sim_url: str) -> int:
    """Upstream connections open at the simulator, not counting the one asking."""
    return int(http_json(sim_url + "/_sim/stats")["open_connections"]) - 1


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parse Prometheus text exposition into (name, labels, value)."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        name = head
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in _split_labels(rest.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"')
        out.append((name, labels, float(value)))
    return out


def _split_labels(text: str) -> Iterator[str]:
    buf, quoted = "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            yield buf
            buf = ""
        else:
            buf += ch
    if buf:
        yield buf


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **match: str) -> float:
    return sum(
        v
        for n, labels, v in samples
        if n == name and all(labels.get(k) == want for k, want in match.items())
    )


# --- child processes --------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Starts the benchmark's child processes and always stops them (terminate, wait, kill)."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hangup-bench-")))
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()
        if exc_type is None and not os.environ.get("HANGUP_BENCH_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:  # keep the children's logs for a post-mortem
            print(f"logs of the benchmark's processes: {self.workdir}", file=sys.stderr)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd or REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        finally:
            log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def sim(
        self,
        name: str = "sim",
        *,
        tokens_per_s: float = 0,
        default_tokens: int = 16,
        max_records: int = 10_000,
    ) -> Child:
        port = free_port()
        child = self.spawn(
            name,
            [
                PY,
                "-m",
                "proxy.sim",
                "--host",
                HOST,
                "--port",
                str(port),
                "--tokens-per-s",
                str(tokens_per_s),
                "--default-tokens",
                str(default_tokens),
                "--max-records",
                str(max_records),
            ],
        )
        child.url = f"http://{HOST}:{port}"
        wait_http(child.url + "/_sim/stats", child.proc)
        return child

    def hangup(
        self,
        upstream: str,
        *,
        name: str = "hangup",
        config: Path | None = None,
        uvloop: bool = False,
        loop: str = "default",
        source: Path | None = None,
        max_connections: int | None = None,
        wrapper: Sequence[str] = (),
        start_timeout: float = 20.0,
    ) -> Child:
        """The real CLI, as users run it; its JSON log (access log included) goes to a file.
        `max_connections`: the shipped config with only that setting changed; `wrapper`: a
        command it runs under (e.g. valgrind's)."""
        port = free_port()
        args = ["--port", str(port), "--host", HOST]
        if config is None and max_connections is not None:
            config = self._shipped_config(max_connections=max_connections)
            args += ["--upstream", upstream]  # on top of the file, as without one
        if config is not None:
            args += ["--config", str(config)]
        else:
            args += ["--upstream", upstream]
        if uvloop:
            loop = "uvloop"
        if loop != "default":
            args += ["--loop", loop]
        entry = [PY, "-m", "proxy"]
        # cwd is the repo: --upstream keeps every other setting of config/hangup.yaml, the
        # shipped defaults (access log, metrics and accounting on).
        # `source`: another checkout of hangup (e.g. `git archive` of an older commit), run from
        # its own directory so that its `proxy` package and config are the ones imported.
        child = self.spawn(name, [*wrapper, *entry, *args], cwd=source)
        child.url = f"http://{HOST}:{port}"
        wait_http(child.url + "/healthz", child.proc, timeout=start_timeout)
        return child

    def _shipped_config(self, *, max_connections: int) -> Path:
        import yaml  # hangup's own dependency

        settings = yaml.safe_load((REPO / "config" / "hangup.yaml").read_text())
        settings["connections"]["max_connections"] = max_connections
        path = self.workdir / "hangup.yaml"
        path.write_text(yaml.safe_dump(settings))
        return path

    def baseline(
        self,
        upstream: str,
        *,
        name: str = "baseline",
        uvloop: bool = False,
        wrapper: Sequence[str] = (),
        start_timeout: float = 20.0,
    ) -> Child:
        """The bare relay; `wrapper`: a command it runs under (e.g. valgrind's)."""
        port = free_port()
        argv = [PY, "-m", "bench.baseline_relay", "--upstream", upstream, "--port", str(port)]
        if uvloop:
            argv.append("--uvloop")
        child = self.spawn(name, [*wrapper, *argv])
        child.url = f"http://{HOST}:{port}"
        wait_http(child.url + "/healthz", child.proc, timeout=start_timeout)
        return child

    def stop(self, child: Child, timeout: float = 10.0) -> int | None:
        proc = child.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if child in self.children:
            self.children.remove(child)
        return proc.returncode

    def close(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(child)
