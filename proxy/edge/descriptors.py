"""File descriptors: size the connection cap to what the process may open, and turn
asyncio's per-accept ERROR on descriptor exhaustion into a rate-limited warning.

Each proxied request holds two descriptors (client and upstream socket). If the cap allowed
more connections than descriptors exist, `accept()` would fail with EMFILE, the listener would
stop accepting (asyncio retries it after a second), `/healthz` would go unanswered, and
asyncio would log an ERROR with a traceback every time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

from proxy.edge.capacity import ConnectionGuard
from proxy.edge.ratelog import RateLimitedLog

log = logging.getLogger("hangup.connections")

# Descriptors kept for everything that is not a client connection or its upstream socket:
# listeners, log files, the event loop's own, DNS, the inflate threads, a --workers pipe.
RESERVED_FDS = 64
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_soft_limit() -> int:
    """Raise this process's descriptor soft limit to its hard limit (what Go programs and
    nginx's worker_rlimit_nofile do; systemd's default soft limit is 1024). The new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def fit_to_descriptors(guard: ConnectionGuard) -> None:
    """Lower the effective cap so that every connection it admits, with its upstream socket
    and the probe headroom, fits in the soft descriptor limit; say so when it does."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    headroom = guard.config.probe_headroom
    fits = (soft - RESERVED_FDS) // 2 - headroom
    wanted = guard.config.max_connections
    if fits >= wanted:
        guard.max_connections = wanted
        return
    guard.max_connections = max(1, fits)
    log.warning(
        "the descriptor limit (%d) is too low for connections.max_connections (%d): serving "
        "at most %d client connections; raise `ulimit -n` to at least %d",
        soft,
        wanted,
        guard.max_connections,
        2 * (wanted + headroom) + RESERVED_FDS,
    )


ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptErrors:
    """A loop exception handler that turns accept() resource errors into one warning per
    interval and passes everything else to the handler it replaced."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ratelog: RateLimitedLog) -> None:
        self.loop = loop
        self.ratelog = ratelog
        self.previous: ExceptionHandler | None = None

    def install(self) -> None:
        self.previous = self.loop.get_exception_handler()
        self.loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in _EXHAUSTED
            and "accept" in str(context.get("message", ""))
        ):
            self.ratelog.warning(
                "accept_out_of_descriptors",
                "cannot accept connections: %s; new connections wait in the backlog until "
                "descriptors free up (lower connections.max_connections or raise ulimit -n)",
                exc.strerror or type(exc).__name__,
            )
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


# asyncio accepts as many connections per wake-up as the listen backlog it was given (4,096
# here), each taking a descriptor before any of our code can refuse it: a burst would hit
# EMFILE (and asyncio's one-second accept pause) before the cap could answer. So the site is
# started with this small number, and the kernel's queue is widened afterwards.
ACCEPT_BATCH = 16


def widen_backlog(site: object, backlog: int) -> None:
    """Give the site's listening sockets the kernel backlog `backlog`, keeping asyncio's
    per-wake-up accept batch at ACCEPT_BATCH (aiohttp keeps the asyncio server in `_server`)."""
    server = getattr(site, "_server", None)
    for transport_socket in getattr(server, "sockets", ()):
        with socket.socket(fileno=os.dup(transport_socket.fileno())) as listener:
            listener.listen(backlog)
