"""The real llama.cpp OpenAI-compatible server of ../shared/real_upstream, for end-to-end proof
that hanging up stops generation. The build is cached outside the repo (scripts/test makes it);
the server is judged from outside by its CPU time in /proc, as shared/real_upstream describes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HANGUP_SHARED", ROOT.parent / "shared"))
START = SHARED / "real_upstream" / "start.sh"
STOP = SHARED / "real_upstream" / "stop.sh"
CACHE = Path(os.environ.get("HANGUP_CACHE", Path.home() / ".cache" / "hangup")) / "llama"
TICK = os.sysconf("SC_CLK_TCK")
IDLE_PCT = 15.0  # below this the server is not generating (it idles at 0.0 %)


def available() -> str | None:
    """None when the real upstream can run here, else why not."""
    if not START.exists():
        return f"no {START} (the shared/ folder is not beside the repo)"
    if not (CACHE / "llama.cpp" / "build" / "bin" / "llama-server").exists():
        return f"llama-server not built in {CACHE}: run scripts/real-upstream-build"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class LlamaServer:
    port: int
    pid: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def start(cls) -> LlamaServer:
        port = free_port()
        out = subprocess.run(
            ["bash", str(START), str(CACHE), str(port)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        pid = int(out.stdout.strip().splitlines()[-1])
        return cls(port, pid, CACHE / f"server-{port}.log")

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(STOP), str(CACHE), str(self.port)],
            check=False,
            capture_output=True,
            timeout=30,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stopped_at_tokens(self, after: int) -> int | None:
        """n_tokens (prompt + generated) of the first 'stop processing' line past offset."""
        m = re.search(r"stop processing: n_tokens = (\d+)", self.log_text()[after:])
        return int(m.group(1)) if m else None


def idle_after(pid: int, watch_s: float, interval: float = 0.1) -> tuple[float | None, list[float]]:
    """Sample the server's CPU for `watch_s` from now; return the time (seconds from now) from
    which it stayed idle to the end of the watch, or None if it was still busy at the end.
    Blocking on purpose: call it in a thread."""
    samples: list[float] = []
    t0 = prev_t = time.monotonic()
    prev_c = cpu_seconds(pid)
    times: list[float] = []
    while time.monotonic() - t0 < watch_s:
        time.sleep(interval)
        now, c = time.monotonic(), cpu_seconds(pid)
        samples.append(100.0 * (c - prev_c) / (now - prev_t))
        times.append(prev_t - t0)  # the sample covers [prev_t, now]
        prev_t, prev_c = now, c
    idle_from: float | None = None
    for start, pct in zip(reversed(times), reversed(samples), strict=True):
        if pct >= IDLE_PCT:
            break
        idle_from = start
    return idle_from, samples
