"""Client connections, bounded: a deadline for every phase a client controls, a cap on how
many it may hold open (its policy: proxy/edge/capacity.py), and a bound on the bytes of each
request head.

aiohttp has no header or body deadline, keeps idle connections for 3,630 s and accepts heads
of ~1 MiB; a client that trickles bytes holds a socket (and its memory) as long as it likes.
`GuardedRequestHandler` watches each connection through the phases only the client can stall:

    waiting  (between requests: aiohttp's keep-alive timer, connections.keepalive_timeout_s;
              a new connection gets header_timeout_s from accept for its first request)
    head     (first byte -> complete head: header_timeout_s; more than max_head_kb: 431)
    body     (silence over body_timeout_s, or an average under body_min_rate_bytes_s once
              the body has been arriving for body_timeout_s: the handler's read raises, 408)
    busy     (request read, response in progress: the route's own timeouts apply)

A request on a connection over the cap, or with a head the byte count could not see, is
refused by proxy/edge/gate.py's `connection_refusal`; the runner whose server makes these
connections is proxy/edge/runner.py's. It relies on aiohttp internals (`RequestHandler`
attributes); the tests in tests/test_hostile_connections.py fail if an aiohttp upgrade moves
them.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, Final

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage

from proxy.edge.body import BodyTimeout
from proxy.edge.capacity import (
    TIER_NORMAL,
    TIER_PROBES_ONLY,
    TIER_REFUSED,
    ConnectionGuard,
    Tier,
    over_capacity,
)
from proxy.edge.inline_handler import InlineRequestHandler
from proxy.errors import HeadTooLarge, ProxyError, RequestTimeout, render_body
from proxy.watchdog import Alarm

_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
# After a slow body's read was failed, the handler answers 408 and the connection closes; if
# nothing reads the body, close it ourselves this much later.
_BODY_BACKSTOP_S = 1.0


class Phase(enum.Enum):
    WAITING = "waiting"
    HEAD = "head"
    BODY = "body"
    BUSY = "busy"


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us).
_PHASE_BODY: Final = Phase.BODY
_PHASE_BUSY: Final = Phase.BUSY
_PHASE_HEAD: Final = Phase.HEAD
_PHASE_WAITING: Final = Phase.WAITING


def canned_response(err: ProxyError) -> bytes:
    """A complete HTTP/1.1 error response for a connection that has no request object (yet):
    OpenAI-shaped body, `Connection: close`."""
    body = render_body(err)
    head = [f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}"]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in err.headers().items()]
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedRequestHandler(InlineRequestHandler):
    """A connection: its phases, deadlines and bounds (module docstring); parser errors are
    answered the OpenAI way by `OpenAIErrorHandler`; its requests run in its own task
    (`InlineRequestHandler`)."""

    # aiohttp's handler is slotted; without these the subclass would carry a dict (~300 B
    # more for every connection, idle streams included).
    __slots__ = (
        "_body_seen_at",
        "_body_started_at",
        "_counted",
        "_deadline",
        "_head_bytes",
        "_head_tail",
        "_lingering",
        "_parsing_stopped",
        "_payload",
        "alarm",
        "guard",
        "phase",
        "tier",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.tier = TIER_NORMAL
        self.phase = _PHASE_WAITING
        self._counted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_tail = b""  # the last 3 bytes seen in the head, to find a split CRLFCRLF
        self._payload: Any = None
        self._body_started_at = 0.0
        self._body_seen_at = 0.0
        self._lingering: asyncio.Transport | None = None
        self._parsing_stopped = False
        # Its requests' watchdog timer, which one request leaves armed for the next.
        self.alarm = Alarm(self._loop, kept=True)

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp's, only when reading is paused. aiohttp's body reader calls it after every
        read that leaves its buffer under the low-water mark, paused or not; unpaused, it
        reparses nothing (the parser holds unparsed bytes only while one of the two pauses
        holds) and resumes a transport that is not paused: ~100 bytecodes a read for
        nothing. The upstream's protocol does the same (proxy/upstream_connector.py)."""
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    # --- connection lifetime ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        self.tier = guard.admit()
        self._counted = True
        super().connection_made(transport)
        if self.tier is TIER_REFUSED:
            guard.closed(
                "connection_refused_over_capacity",
                "refused a client connection: %d open, over connections.max_connections (%d) "
                "and its probe_headroom (%d)",
                guard.open,
                guard.max_connections,
                guard.config.probe_headroom,
            )
            self._refuse(over_capacity(guard))
            return
        self._set_phase(_PHASE_WAITING)
        # The first request's head is due header_timeout_s after accept (nginx's rule too).
        self._arm(self.guard.config.header_timeout_s, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.alarm.close()
        self._release()
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp API)
        if self._lingering is not None:  # the server is stopping: no more grace for it
            self._disarm()
            self._lingering.close()
        await super().shutdown(timeout)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.guard.released(self)

    def evict(self) -> None:
        """Give this connection's slot to a new one: it is closed, and counted out now."""
        self._release()
        self._disarm()
        self.force_close()

    def _set_phase(self, phase: Phase) -> None:
        """Track the phase, and whether the guard may reclaim this connection."""
        previous = self.phase
        self.phase = phase
        if not self._counted:
            return
        if self.tier is TIER_NORMAL:
            if phase is _PHASE_WAITING and not self._messages:
                self.guard.idle[self] = None
            elif previous is _PHASE_WAITING:
                # Only a waiting connection is ever listed: a move between two other phases
                # (head, body, busy: two of them a request) has nothing to take off.
                self.guard.idle.pop(self, None)
        elif self.tier is Tier.PROBES_ONLY:
            if phase in (Phase.WAITING, Phase.HEAD):
                self.guard.probation[self] = None
            else:
                self.guard.probation.pop(self, None)

    def _refuse(self, err: ProxyError) -> None:
        """Answer without a request object, then close (what else arrives is not parsed)."""
        self._disarm()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(canned_response(err))
        self._linger()

    def _linger(self) -> None:
        """Close after an answer that left request bytes unread, without reading them.

        Closing a socket with unread data makes the kernel answer with a reset, and a client
        still sending its body then sees "connection reset" instead of our status. So: FIN
        after the answer, then discard (never parse, never inflate) whatever arrives for
        connections.linger_s, then close: nginx's lingering close, bounded by time. Only a
        connection within the cap lingers: one over it gives its descriptor back at once."""
        transport = self.transport
        linger_s = self.guard.config.linger_s
        if (
            transport is None
            or transport.is_closing()
            or not linger_s
            or self.tier is not Tier.NORMAL
        ):
            self.force_close()
            return
        self._lingering = transport
        self.transport = None  # aiohttp no longer writes to it or closes it; we do
        self.force_close()  # the handler loop ends; the transport is ours until the timer
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        # aiohttp pauses reading while a body's buffer is full, as it is when the handler
        # answered mid-body (an inflated bomb's 413): resume, or nothing is discarded and a
        # client still sending blocks on a full socket until linger_s resets it.
        transport.resume_reading()
        self._arm(linger_s, transport.close)

    # --- timers -------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_expired(self) -> None:
        self._deadline = None
        if self.phase not in (Phase.WAITING, Phase.HEAD) or self._request_in_progress:
            return
        if self._messages:  # a complete request is queued: not ours to time out
            return
        timeout = self.guard.config.header_timeout_s
        if self.phase is Phase.HEAD:
            self.guard.closed(
                "header_timeout",
                "closed a connection whose request head took over %gs "
                "(connections.header_timeout_s)",
                timeout,
            )
            self._refuse(
                RequestTimeout(
                    f"the request head took over {timeout:g}s (connections.header_timeout_s)"
                )
            )
        else:  # nothing sent since accept: close quietly, like an idle keep-alive connection
            self.guard.closed(
                "header_timeout_idle",
                "closed a connection that sent nothing for %gs (connections.header_timeout_s)",
                timeout,
            )
            self.force_close()

    def _body_check(self) -> None:
        self._deadline = None
        payload = self._payload
        if self.phase is not Phase.BODY or payload is None or payload.is_eof():
            return
        config = self.guard.config
        now = self._loop.time()
        silent = now - self._body_seen_at
        elapsed = now - self._body_started_at
        key: str | None = None
        if silent >= config.body_timeout_s:
            key = "body_timeout_s"
        elif (
            config.body_min_rate_bytes_s
            and elapsed >= config.body_timeout_s
            and payload.total_bytes < config.body_min_rate_bytes_s * elapsed
        ):
            key = "body_min_rate_bytes_s"
        if key is None:
            # Next look: when the silence would reach the limit, or in a second for the rate.
            delay = config.body_timeout_s - silent
            if config.body_min_rate_bytes_s:
                delay = min(delay, max(config.body_timeout_s - elapsed, 1.0))
            self._arm(max(delay, 0.01), self._body_check)
            return
        self.guard.closed(
            "body_timeout",
            "failed a request whose body arrived too slowly (connections.%s)",
            key,
        )
        self._set_phase(Phase.BUSY)
        payload.set_exception(BodyTimeout(key))
        self._arm(_BODY_BACKSTOP_S, self.force_close)

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive timer, which closes a connection idle between requests.

        It is lazy: armed once, re-armed when it fires before the idle connection is due, and
        armed again after a response if it lapsed. Only the waiting phase is idle: from a
        head's first byte the connection's own deadlines govern (header_timeout_s, then the
        body's and the route's), so in any other phase it lapses here. Cancelling it at each
        head's first byte instead made aiohttp arm a new timer after every response."""
        if self.phase is not Phase.WAITING:
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    # --- bytes in -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._lingering is not None or self._parsing_stopped:
            return  # the rest of a refused request: discarded unread
        if self._force_close or self._close or not data:
            super().data_received(data)
            return
        head_due = False
        if self.phase is _PHASE_WAITING:
            self._set_phase(_PHASE_HEAD)
            self._head_bytes, self._head_tail = 0, b""
            # A kept-alive connection: the head is due from now, armed below unless this read
            # completes it (most do: no timer made and cancelled for them).
            head_due = self._deadline is None
            # aiohttp's keep-alive timer stays armed: it lapses in `_process_keepalive`.
        if self.phase is _PHASE_HEAD and not self._head_fits(data):
            limit_kb = self.guard.config.max_head_kb
            self.guard.closed(
                "head_too_large",
                "refused a request head over %d KiB (connections.max_head_kb)",
                limit_kb,
            )
            self._refuse(
                HeadTooLarge(
                    f"the request line and headers exceed {limit_kb} KiB (connections.max_head_kb)"
                )
            )
            return
        if self.phase is _PHASE_BODY:
            self._body_seen_at = self._loop.time()
        parsed_before = self._request_count
        queued_before = len(self._messages)
        # In the head phase, the first head this read completes was within the byte count.
        counted = 1 if self.phase is _PHASE_HEAD else 0
        super().data_received(data)
        if self._request_count > parsed_before + counted:
            self._check_parsed_heads(queued_before)
        if self.phase is _PHASE_HEAD and self._request_count > parsed_before:
            self._head_done(queued_before)
        elif head_due and self.phase is Phase.HEAD and self._deadline is None:
            self._arm(self.guard.config.header_timeout_s, self._head_expired)
        elif self.phase is Phase.BODY and self._payload is not None and self._payload.is_eof():
            self._set_phase(Phase.BUSY)
            self._disarm()

    def _head_fits(self, data: bytes) -> bool:
        """Whether the head, as far as it has arrived, is within max_head_kb."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        size = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
        if size > self.guard.max_head_bytes:
            return False
        self._head_bytes += len(data)
        self._head_tail = window[-3:]
        return True

    def _check_parsed_heads(self, queued_before: int) -> None:
        """Heads the byte count of the head phase could not see (pipelined behind a request in
        progress): one over max_head_kb stops the parsing of this connection; the request
        itself gets its 431 from `oversized_head_refusal` when its turn comes."""
        limit = self.guard.max_head_bytes
        for message, _ in list(self._messages)[queued_before:]:
            if not isinstance(message, RawRequestMessage):
                continue  # a parse error: aiohttp answers it with 400
            if head_size(message.path, message.raw_headers) > limit:
                # Parse nothing more: the requests queued so far are answered in turn, this
                # one with 431 (whose answer closes the connection), nothing after it.
                self._parsing_stopped = True
                return

    def _head_done(self, queued_before: int) -> None:
        self._disarm()
        messages = self._messages
        if self.tier is TIER_PROBES_ONLY:
            # One request per connection over the cap: the slot goes back at once.
            self.close()
        if len(messages) <= queued_before:  # already taken by the handler (cannot happen
            self._set_phase(Phase.BUSY)  # within data_received)
            return
        payload = messages[queued_before][1]  # (the first new one: no copy of the queue)
        if payload.is_eof():
            self._set_phase(_PHASE_BUSY)
            return
        self._set_phase(Phase.BODY)
        self._payload = payload
        now = self._loop.time()
        self._body_started_at = self._body_seen_at = now
        self._arm(self.guard.config.body_timeout_s, self._body_check)

    # --- response out -------------------------------------------------------------------------
    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        unread = not request.content.at_eof()
        if unread:
            # The handler answered without reading the whole body (an early 401, 413, 415,
            # 408...): close after this answer, whether the rest is still on the wire or
            # already buffered, rather than read it (aiohttp's lingering close, which we turn
            # off, parses and reads it for 10 s) or parse it as the next request.
            resp.force_close()
        result = await super().finish_response(request, resp, start_time)
        self._disarm()  # the body's deadline, if any: the request is answered
        self._payload = None
        if unread and not result[1]:
            self._linger()  # arms its own deadline, the close: keep it armed
        elif not self._close and not self._force_close:
            # Back to waiting: aiohttp's keep-alive timer (keepalive_timeout_s) takes over.
            self._set_phase(_PHASE_WAITING)
        return result


def head_size(path: str, raw_headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """Bytes of a parsed request head, near enough to the wire's: line plus header lines."""
    return len(path) + 16 + sum(len(k) + len(v) + 4 for k, v in raw_headers)
