"""The real `hangup` command in a subprocess, for tests of what only a process shows: signals,
exit codes and timing, `--workers`, its log lines.

Every wait is bounded; `close()` kills and reaps the process whatever state the test left it
in, so no test leaves an orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent

Line = dict[str, Any]


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def sim_config(upstream_url: str, **top: Any) -> dict[str, Any]:
    """A config with one upstream "sim" and a catch-all route, byte-faithful (no usage
    injection), on an ephemeral loopback port; `top` replaces top-level sections."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstreams": {"sim": {"base_url": upstream_url}},
        "routes": [{"name": "default", "upstream": "sim"}],
        "defaults": {"include_usage": False},
        "shutdown": {"grace_s": 1.0},
    }
    data.update(top)
    return data


class HangupProcess:
    """`python -m proxy ARGS` with its stderr read line by line (JSON lines parsed)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        # A key in the test runner's environment must not change what the proxy does.
        self.env.pop("OPENAI_API_KEY", None)
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[Line] = []
        self.raw = bytearray()  # all of stderr and stdout, for greps
        self._changed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self.returncode: int | None = None
        self.exited_at: float | None = None

    async def start(self) -> HangupProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stderr), name="hangup-stderr"),
            asyncio.create_task(self._read(self.proc.stdout), name="hangup-stdout"),
        ]
        return self

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.raw += line
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = {"msg": line.decode(errors="replace").rstrip("\n"), "raw": True}
            if isinstance(parsed, dict):
                self.lines.append(parsed)
            self._changed.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace")

    async def wait_line(self, probe: Callable[[Line], bool], timeout: float, what: str) -> Line:
        """The first line for which `probe` is true, waiting for it up to `timeout` s."""
        seen = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines[seen:]:
                        if probe(line):
                            return line
                    seen = len(self.lines)
                    if self.proc is not None and self.proc.returncode is not None:
                        # The readers may still hold the last lines; one more pass after EOF.
                        await asyncio.gather(*self._readers)
                        for line in self.lines[seen:]:
                            if probe(line):
                                return line
                        raise AssertionError(f"hangup exited before {what}:\n{self.text}")
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):  # re-check the exit now and then
                            await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s:\n{self.text}") from None

    def events(self, name: str) -> list[Line]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_events(self, name: str, count: int, timeout: float) -> list[Line]:
        """Until `count` lines of event `name` have been logged; all of them."""
        await self.wait_line(
            lambda _: len(self.events(name)) >= count, timeout, f"{count} {name!r} lines"
        )
        return self.events(name)

    async def listening_url(self, timeout: float = 20.0) -> str:
        line = await self.wait_line(
            lambda ln: ln.get("event") == "listening", timeout, "listening line"
        )
        return str(line["url"])

    def access_lines(self) -> list[Line]:
        return [line for line in self.lines if line.get("logger") == "hangup.access"]

    def signal(self, signum: signal.Signals) -> float:
        """Send a signal now; returns the monotonic time it was sent."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(signum)
        return sent

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                self.exited_at = time.monotonic()
                # Children (workers) may hold the pipes a little longer.
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(f"hangup did not exit within {timeout}s:\n{self.text}") from None
        self.returncode = code
        return code

    async def close(self) -> None:
        """Stop (if still running) and reap, whatever happened in the test: two SIGTERMs (stop
        now, upstreams closed), SIGKILL if that did not do it, and SIGKILL for any worker
        process it started that is still there."""
        if self.proc is not None and self.proc.returncode is None:
            for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signum)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await self.proc.wait()
                if self.proc.returncode is not None:
                    break
        for line in self.lines:
            pid = line.get("worker_pid") or (line.get("pid") if line.get("event") else None)
            if isinstance(pid, int) and pid != self.pid and alive(pid) and _is_hangup(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def wait_ready(url: str, timeout: float = 20.0) -> None:
    """Poll /readyz until it answers 200, with a bound."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
                    last = resp.status
            except aiohttp.ClientError as exc:
                last = exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url}/readyz not ready within {timeout}s (last: {last!r})")


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _is_hangup(pid: int) -> bool:
    """Still one of ours (a pid can be reused once its process is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"proxy" in f.read().split(b"\0")
    except FileNotFoundError:
        return False


def one_per_request(lines: Iterable[Line]) -> dict[str, Line]:
    """Access-log lines by request id, asserting no request was logged twice."""
    by_id: dict[str, Line] = {}
    for line in lines:
        rid = str(line["request_id"])
        assert rid not in by_id, f"request {rid} logged twice: {by_id[rid]} and {line}"
        by_id[rid] = line
    return by_id


# --- who owns a TCP connection (Linux /proc), to tell which worker process served what -----


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _tcp_table() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket on this machine."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                rows.append((local_port, remote_port, fields[3], int(fields[9])))
    return rows


ESTABLISHED = "01"


def connections_to(pid: int, remote_port: int) -> int:
    """Established TCP connections process `pid` holds to `remote_port`."""
    mine = _socket_inodes(pid)
    return sum(
        1
        for _, rport, state, inode in _tcp_table()
        if rport == remote_port and state == ESTABLISHED and inode in mine
    )


def owner_of(local_port: int, remote_port: int, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the socket local_port <-> remote_port."""
    for lport, rport, _, inode in _tcp_table():
        if lport == local_port and rport == remote_port:
            for pid in pids:
                if inode in _socket_inodes(pid):
                    return pid
    return None
