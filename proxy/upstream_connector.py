"""The connector under `Upstreams`' session: it checks a pooled connection before reuse and
tells the current attempt what happened on the wire during its send (`AttemptHooks`, carried by
the request it connects for): which transport it got, whether it was reused, when the request
went out.
Those facts decide the one case where a request may be sent again (the rule, and why, is in
proxy/upstream.py's module doc); `AttemptHooks` also resets a send's socket at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, cast

import aiohttp
import msgspec
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import DataQueue, StreamReader

from proxy.head_read import head_read
from proxy.steady_reader import SteadySink
from proxy.upstream_body import lean_body

log = logging.getLogger("hangup.upstream")

# A close that comes this soon after our request was written crossed it on the wire: the
# upstream closed the idle connection before reading what we sent (see proxy/upstream.py's
# doc). About one LAN round trip plus scheduling slack on a busy loop; the silent waits after
# which a resend would duplicate work are seconds to minutes, three orders of magnitude longer.
RESEND_WINDOW_S = 0.05


class AttemptHooks(msgspec.Struct):
    """Handed to the connector (as the request's `hooks`): what happened on the wire during
    one send."""

    on_headers_sent: Callable[[], None]
    loop: asyncio.AbstractEventLoop
    clock: Callable[[], float]  # the loop's (`sse_stream.loop_clock`)
    # The request asked for a stream: its answer's head is read by proxy/head_read.py's split
    # (which pays only for a chunked body's events read with the head). A completion's head
    # is parsed as aiohttp parses it, without the split's two searches of its read.
    split_head: bool = True
    transport: asyncio.Transport | None = None  # of the current send, once connected
    reused: bool = False  # the connection came from the pool
    sent_at: float | None = None  # when the request headers were written

    def headers_going_out(self) -> None:
        """The connection is ours: aiohttp writes the request headers in this same loop step
        (nothing is awaited between its connector and the write). Known here rather than from
        an aiohttp `TraceConfig`, whose signals (a dozen per request, all awaited) cost 1-2 %
        of a request's CPU for this one fact."""
        self.sent_at = self.clock()
        self.on_headers_sent()

    def reset(self) -> None:
        self.transport, self.reused, self.sent_at = None, False, None

    def abort(self) -> None:
        """Close the socket *now*, with a reset.

        aiohttp closes an abandoned connection with `transport.close()`, which keeps the socket
        open until unsent request-body bytes are flushed: against an upstream that reads a big
        prompt slowly that is seconds. SO_LINGER 0 + abort() drops both buffers and sends RST,
        so the upstream learns at once that nobody is waiting."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already closed: nothing left to reset
        transport.abort()

    def may_resend(self, exc: Exception) -> bool:
        """Part 2 of the resend rule (proxy/upstream.py's doc): a reused connection failed
        before any response byte, within RESEND_WINDOW_S of our request being written (or
        before it was)."""
        if not self.reused or isinstance(exc, aiohttp.ClientConnectorError):
            return False
        if not isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
            return False
        return self.sent_at is None or self.clock() - self.sent_at <= RESEND_WINDOW_S


def _closed_while_idle(transport: asyncio.BaseTransport) -> bool:
    """Part 1 of the resend rule: an idle pooled socket with anything to read (EOF, a reset,
    stray bytes) was closed or broken by the upstream while it sat in the pool.

    An asyncio selector transport's descriptor is read from the transport itself (`_sock_fd`,
    its socket's `fileno()` while it is open, as a pooled one handed out is): not through
    `get_extra_info` and the socket wrapper's `fileno`, two calls. Any other transport
    (uvloop's) is asked for its socket."""
    fd = getattr(transport, "_sock_fd", None)
    if fd is None:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return True
        fd = sock.fileno()
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# Marks a pooled connection's protocol once it has carried a request. An attribute of the
# protocol (aiohttp's has an instance dict) rather than a WeakSet of them: ~110 B less under
# every held stream.
_USED: Final = "_hangup_used"


class UpstreamProtocol(ResponseHandler):
    """aiohttp's client protocol, resuming reading only when it is paused: aiohttp's body
    reader calls `resume_reading` after every read that leaves its buffer under the
    low-water mark, paused or not, and unpaused that call reparses nothing (the parser holds
    unparsed bytes only while one of the two pauses holds) and resumes a transport that is
    not paused. The client side's twin of `GuardedRequestHandler.resume_reading`."""

    # The exchange relaying a steady stream on this connection, offered each read of its body
    # first (proxy/steady_reader.py); None otherwise (a class default: no bytes per connection
    # until a stream sets it).
    steady_sink: SteadySink | None = None
    # From a stream's request's connect (`Connector.adopt`, `AttemptHooks.split_head`)
    # until its response's head is parsed.
    _head_due = False

    def data_received(self, data: bytes) -> None:
        """aiohttp's, then the steady stream's reads taken in it go out (one write for all
        the events of one read, as the pump's write of a read joined them). A read that may
        hold a response's head: proxy/head_read.py's."""
        try:
            if self._head_due:
                head_read(self, data)
            else:
                super().data_received(data)
        finally:
            sink = self.steady_sink
            if sink is not None:
                sink.flush_steady()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        """A response's head was parsed: its body's reader becomes hangup's lean one
        (proxy/upstream_body.py) before anything reads it. Here rather than once the response
        is handed over: the reads between (the rest of this one, and any before the waiting
        task resumes) are fed to the lean reader already."""
        self._head_due = False
        lean_body(data[1])
        DataQueue.feed_data(self, data, size)


class Connector(aiohttp.TCPConnector):
    """A TCPConnector that checks a pooled connection before reuse and tells the current
    attempt which transport it got and whether it was reused; its connections' protocol is
    `UpstreamProtocol`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # (typeshed's `partial` is invariant: a factory of the subclass is one of the class)
        self._factory = cast(
            "functools.partial[ResponseHandler]",
            functools.partial(UpstreamProtocol, loop=self._loop),
        )

    async def connect(
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 (aiohttp's own signature)
    ) -> aiohttp.connector.Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            if self.adopt(connection, req):
                return connection

    def adopt(self, connection: aiohttp.connector.Connection, req: Any) -> bool:
        """What `connect` does with the connection aiohttp's `connect` gave it: False for a
        pooled one the upstream closed while idle (closed here: take another). Otherwise
        the protocol is marked, a stream's head read is due, and the attempt's hooks learn
        the transport, as its request's headers go out. proxy/upstream_request.py's `send`
        calls aiohttp's `connect` and this itself: no coroutine of this class's a request."""
        # (aiohttp's `protocol` and `transport` properties read these: two calls fewer)
        protocol = connection._protocol
        transport = protocol.transport if protocol is not None else None
        reused = getattr(protocol, _USED, False)
        if reused and transport is not None and _closed_while_idle(transport):
            log.debug("dropping a pooled upstream connection the upstream closed while idle")
            connection.close()
            return False
        # The attempt's hooks ride on its request (`UpstreamRequest.hooks`; None for a control
        # call's): no registry keyed by `asyncio.current_task()`, a getpid() syscall on 3.11.
        hooks: AttemptHooks | None = getattr(req, "hooks", None)
        if protocol is not None:
            if not reused:
                setattr(protocol, _USED, True)
            if hooks is not None and hooks.split_head:
                protocol._head_due = True  # type: ignore[attr-defined]
        if hooks is not None:
            hooks.transport = transport
            hooks.reused = reused
            hooks.headers_going_out()
        return True
