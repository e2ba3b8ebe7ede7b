"""`hangup --workers N`: N worker processes serving one listening socket, and their supervisor.

The supervisor binds the port itself, one SO_REUSEPORT socket per worker slot, and hands each
worker its slot's socket. Why this shape:

- a bind error (port taken, no permission) is reported once, before any worker starts, and
  `--port 0` works (the first socket picks the port, the others join it);
- the kernel spreads new connections evenly over the sockets (a hash of the address pair).
  One socket shared by every worker (the gunicorn model) does not: all workers wake on a new
  connection and the first one's accept loop takes everything queued (asyncio accepts up to
  `backlog` per wake-up); measured, 20 streams split 17 to 3 between two workers;
- the supervisor keeps every socket open, so when a worker dies, the connections queued on its
  socket wait for the replacement instead of being reset (which is what happens when a worker
  that bound its own SO_REUSEPORT socket exits).

Where SO_REUSEPORT is missing (not Linux), all workers share one socket instead.

Metrics: the workers start with PROMETHEUS_MULTIPROC_DIR set to a fresh directory (new
processes, so prometheus_client is imported after it is set), and any worker's /metrics returns
the sum over all of them (see proxy/metrics/facade.py). When a worker exits, `worker_exited(pid)`
drops its live gauges (in flight, open upstream connections); its counters stay in the totals.

Signals: SIGTERM or SIGINT is forwarded to every worker as SIGTERM (each drains on its own, so
they share the same deadline); a second signal is forwarded again (each worker stops now). The
workers run in their own session, so a terminal's Ctrl-C reaches the supervisor only, not
every process twice. If the supervisor itself dies (even by SIGKILL), each worker sees EOF on
a pipe only the supervisor could write to and drains as on SIGTERM: no orphan serves on.

A dead worker is restarted. It took only its own requests with it; the others keep serving, and
exiting instead would make the orchestrator restart the whole container, cutting every other
worker's streams too. A crash loop is not hidden, though: a worker that exits with code 2 (a
config error, which a restart cannot fix), or more than `MAX_DEATHS` deaths within
`DEATH_WINDOW_S`, make the supervisor drain the others and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

from proxy import __version__
from proxy.config import HangupConfig

log = logging.getLogger("hangup.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_DEATHS = 5
DEATH_WINDOW_S = 60.0
# Exit code of `hangup run` for config and usage errors.
CONFIG_ERROR_EXIT = 2
# Each worker promises to exit within grace + this (proxy.server.serve); one more second, and
# the supervisor kills it. (A constant here, not an import: the supervisor never loads the app.)
WORKER_EXIT_BOUND_S = 5.0


def supervise(
    config: HangupConfig, *, host: str, port: int, workers: int, args: argparse.Namespace
) -> int:
    """Bind, start `workers` workers, and supervise them until told to stop; the exit code."""
    try:
        socks = bind(host, port, config.listen.backlog, workers)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        log.error("cannot listen on %s:%d: %s", host, port, reason)
        return 1
    # A fresh directory every start: files left by an earlier run would add its totals in.
    metrics_dir = tempfile.mkdtemp(prefix="hangup-metrics-", dir=os.environ.get(MULTIPROC_ENV))
    os.environ[MULTIPROC_ENV] = metrics_dir  # before `worker_exited` reads it, and for workers
    try:
        supervisor = Supervisor(
            workers=workers,
            worker_args=_worker_args(args, host),
            socks=socks,
            grace_s=config.shutdown.grace_s,
        )
        return asyncio.run(supervisor.run())
    finally:
        for sock in socks:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def bind(host: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on host:port (the first address `host` resolves to), joined
    by SO_REUSEPORT; a single socket where the platform lacks it."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    address: tuple[str, int] = (str(sockaddr[0]), int(sockaddr[1]))
    if not (sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")):
        return [socket.create_server(address, family=family, backlog=backlog)]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_server(address, family=family, backlog=backlog, reuse_port=True)
            socks.append(sock)
            address = (address[0], int(sock.getsockname()[1]))  # port 0: the others join this one
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _worker_args(args: argparse.Namespace, host: str) -> list[str]:
    """The worker's command line: the supervisor's own options, minus those it handles."""
    out = ["--host", host]
    if args.config:
        out += ["--config", args.config]
    if args.upstream:
        out += ["--upstream", args.upstream]
    if args.log_level:
        out += ["--log-level", args.log_level]
    if args.loop:
        out += ["--loop", args.loop]
    return out


@dataclass(eq=False)
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    def __init__(
        self, *, workers: int, worker_args: list[str], socks: list[socket.socket], grace_s: float
    ) -> None:
        self.size = workers
        self.worker_args = worker_args
        self.socks = socks
        self.grace_s = grace_s
        self.workers: dict[int, Worker] = {}  # slot -> the worker serving it now
        self.exit_code = 0
        self._stops_asked = 0
        self._deaths: deque[float] = deque()
        self._watchers: set[asyncio.Task[None]] = set()
        self._all_exited = asyncio.Event()
        # Workers hold the read end; nobody ever writes. Its EOF tells them we are gone.
        self._lifeline_r, self._lifeline_w = os.pipe()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        address = self.socks[0].getsockname()
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        url = f"http://{shown}:{address[1]}"
        log.info(
            "hangup %s supervisor listening on %s with %d workers",
            __version__,
            url,
            self.size,
            extra={"fields": {"event": "listening", "url": url, "pid": os.getpid()}},
        )
        try:
            for slot in range(self.size):
                await self._spawn(slot)
            await self._all_exited.wait()
        finally:
            os.close(self._lifeline_r)
            os.close(self._lifeline_w)
        log.info("supervisor stopped", extra={"fields": {"event": "stopped"}})
        return self.exit_code

    def stop(self, reason: str) -> None:
        """First call: every worker drains; later calls: every worker stops now."""
        self._stops_asked += 1
        if self._stops_asked == 1:
            log.info("%s: stopping %d workers", reason, len(self.workers))
            deadline = self.grace_s + WORKER_EXIT_BOUND_S + 1.0
            asyncio.get_running_loop().call_later(deadline, self._kill_stragglers)
        else:
            log.info("%s again: workers stop now", reason)
        for worker in self.workers.values():
            _signal(worker, signal.SIGTERM)
        if not self.workers:
            self._all_exited.set()

    @property
    def stopping(self) -> bool:
        return self._stops_asked > 0

    async def _spawn(self, slot: int) -> None:
        env = dict(os.environ)
        sock = self.socks[slot % len(self.socks)]  # a replacement takes over the same socket
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            *self.worker_args,
            "--listen-fd",
            str(sock.fileno()),
            "--supervisor-fd",
            str(self._lifeline_r),
            pass_fds=(sock.fileno(), self._lifeline_r),
            env=env,
            start_new_session=True,
        )
        worker = Worker(slot, process)
        self.workers[slot] = worker
        if self.stopping:  # a stop came while this (re)start was under way
            _signal(worker, signal.SIGTERM)
        log.info(
            "worker %d started (pid %d)",
            slot,
            worker.pid,
            extra={"fields": {"event": "worker_started", "slot": slot, "worker_pid": worker.pid}},
        )
        watcher = asyncio.create_task(self._watch(worker), name=f"hangup-worker-{slot}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker) -> None:
        code = await worker.process.wait()
        self.workers.pop(worker.slot, None)
        _worker_exited(worker.pid)
        fields = {"event": "worker_exited", "slot": worker.slot, "worker_pid": worker.pid}
        if self.stopping:
            log.info(
                "worker %d (pid %d) exited with %d",
                worker.slot,
                worker.pid,
                code,
                extra={"fields": {**fields, "code": code}},
            )
            # -SIGTERM: the signal came before the worker installed its handler, i.e. before
            # its loop ran once, so it had served nothing.
            if code not in (0, -signal.SIGTERM):
                self.exit_code = 1
        else:
            log.error(
                "worker %d (pid %d) died with %d",
                worker.slot,
                worker.pid,
                code,
                extra={"fields": {**fields, "code": code}},
            )
            reason = self._give_up_reason(code)
            if reason is None:
                await self._spawn(worker.slot)
            else:
                log.error("giving up: %s; stopping the other workers", reason)
                self.exit_code = 1
                self.stop("supervisor giving up")
        if self.stopping and len(self.socks) > 1:
            # Nobody will accept on this slot's socket again: close it, so the kernel sends
            # new connections to the workers still draining (a quick 503) instead of queueing
            # them here until the supervisor exits.
            self.socks[worker.slot].close()
        if self.stopping and not self.workers:
            self._all_exited.set()

    def _give_up_reason(self, code: int) -> str | None:
        if code == CONFIG_ERROR_EXIT:
            return "a worker exited with a config error (code 2), which a restart cannot fix"
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - DEATH_WINDOW_S:
            self._deaths.popleft()
        if len(self._deaths) > MAX_DEATHS:
            return f"more than {MAX_DEATHS} worker deaths within {DEATH_WINDOW_S:g}s"
        return None

    def _kill_stragglers(self) -> None:
        for worker in self.workers.values():
            log.error(
                "worker %d (pid %d) overran its shutdown; killing it", worker.slot, worker.pid
            )
            _signal(worker, signal.SIGKILL)
        self.exit_code = 1


def _signal(worker: Worker, signum: signal.Signals) -> None:
    try:
        worker.process.send_signal(signum)
    except ProcessLookupError:
        pass  # exited already; its watcher will notice


def _worker_exited(pid: int) -> None:
    # Imported here: the supervisor has no metrics of its own, and the import must follow the
    # setting of PROMETHEUS_MULTIPROC_DIR above.
    from proxy.metrics import worker_exited

    worker_exited(pid)
