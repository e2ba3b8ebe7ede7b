"""The one seam to upstream servers: owns the aiohttp ClientSession and its connection pool
(whose connector, proxy/upstream_connector.py, checks a pooled connection before reuse), maps
aiohttp's client exceptions to ours once (proxy/upstream_errors.py), and decides the one case
where a request may be sent again on another connection. The relay speaks only this module's
types: `Upstreams.attempt(...)` -> `OpenAttempt`, whose `start()` gives an `UpstreamResponse`
(status, headers, is-event-stream, `read()` chunks) and whose `close()` / `abort()` end it.

Closing is structural: cancelling `start()` or `read()` and then `close()` closes the socket at
once (aiohttp never pools a connection whose body was not read to EOF).

## When a request is sent twice (never, if the upstream may have started it)

An upstream may close an idle keep-alive connection at any moment (llama-server closes after
every stream while advertising keep-alive; load balancers close after their idle timeout). The
rule, in two parts:

1. **Before reuse**, a pooled connection is checked without blocking: if its socket is readable
   (a FIN, a reset or stray bytes are waiting), the upstream closed it while it was idle; it is
   dropped and another taken. Nothing was sent on it. (urllib3's `is_connection_dropped`, Go's
   `errServerClosedIdle`.)
2. **After sending** on a reused connection, a close or reset with no response byte means the
   request is resent once on a fresh connection only when it came within `RESEND_WINDOW_S` of the
   request being written: the upstream's close crossed our request on the wire, so it closed
   without having read it. Any later close (after a silent wait) may follow work the upstream
   has begun and billed: it is never resent here; it is an attempt failure, which the relay's
   policy may fail over to another target but never repeats on this one at once.

Fresh connections are never resent: a failure there is the upstream's answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

import aiohttp
from aiohttp.helpers import parse_content_type
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.attempts import AttemptResult
from proxy.bare_context import BARE_CONTEXT
from proxy.body_payload import BodyInSlices
from proxy.errors import UpstreamFailed, UpstreamUnreachable
from proxy.request_body import RequestBody
from proxy.upstream_checks import check_unframed_end, unframed_close
from proxy.upstream_connector import AttemptHooks, Connector
from proxy.upstream_errors import READ_ERRORS, AttemptFailed, map_open_error
from proxy.upstream_request import UpstreamRequest
from proxy.upstream_request import send as send_upstream

log = logging.getLogger("hangup.upstream")

_LARGE_BODY = 1024 * 1024


class UpstreamResponse:
    """An upstream's answer once its headers arrived: the relay's only view of it."""

    __slots__ = (
        "_closed",
        "_response",
        "_unframed",
        "_upstream",
        "content_encoding",
        "content_type",
        "event_stream",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream
        # Read several times a request: attributes, not properties (a call each). The status
        # line and head of a response whose head was read never change.
        self.status: int = response.status
        self.reason: str | None = response.reason
        headers: CIMultiDictProxy[str] = response.headers
        self.headers = headers
        # aiohttp's cached parse, not `response.content_type`: that property keeps a copy of
        # the parameters on the response (~180 B under every held stream).
        raw_type = headers.get("content-type")
        self.content_type = content_type = (
            parse_content_type(raw_type)[0] if raw_type is not None else "application/octet-stream"
        )
        self.event_stream: bool = content_type == "text/event-stream"
        self.content_encoding = headers.get("content-encoding")
        # A body without Content-Length or chunking ends with its connection, which aiohttp
        # reports as a normal end even when it was reset: that connection's close is watched
        # (`unframed_close`), here rather than by an object of its own for every response.
        self._unframed: asyncio.Future[None] | None = None
        if "content-length" not in headers and (
            "chunked" not in headers.get("transfer-encoding", "").lower()
        ):
            self._unframed = unframed_close(response)
        # aiohttp's C parser, on a broken chunk-size line mid-body, closes the connection but
        # never ends or fails the body: a read would wait for the next deadline. Watch the
        # close and fail a body that has not ended (detach() when done with the response).
        self._closed: asyncio.Future[None] | None = None
        connection = response._connection  # (what the properties read: three calls fewer)
        protocol = connection._protocol if connection is not None else None
        if protocol is not None:
            closed = protocol.closed
            if closed is not None:
                closed.add_done_callback(self._connection_closed, context=BARE_CONTEXT)
                self._closed = closed

    def _connection_closed(self, closed: asyncio.Future[None]) -> None:
        if not closed.cancelled():
            closed.exception()  # retrieved: a reset must not log "never retrieved"
        content = self._response.content
        if not content.is_eof() and content.exception() is None:
            content.set_exception(aiohttp.ClientPayloadError("connection closed mid-body"))

    def detach(self) -> None:
        """Stop watching the connection (it may go back to the pool and serve others)."""
        if self._closed is not None:
            self._closed.remove_done_callback(self._connection_closed)
            self._closed = None

    def body_complete(self) -> bool:
        """The whole body is here (framed, its end already parsed): reading it will not wait.
        Unframed answers end with their connection's close, which is checked at that end."""
        return self._unframed is None and self._response.content.is_eof()

    def at_end(self) -> bool:
        """Everything was read: the next `read()` returns b"" without waiting."""
        return self._response.content.at_eof()

    def check_end(self, *, mid_event: bool = False) -> None:
        """At the end of the body: an unframed answer whose connection was reset, or a stream
        that stopped mid-event, was cut (`AttemptFailed(STREAM_ERROR)`), not finished."""
        if self._unframed is None:  # framed: aiohttp's parser told a cut body from its end
            return
        try:
            check_unframed_end(self._unframed, self._upstream, mid_event=mid_event)
        except UpstreamFailed as err:
            raise AttemptFailed(AttemptResult.STREAM_ERROR, err) from err

    async def read(self) -> bytes:
        """The next body chunk as it came off the socket; b"" at the end. A broken body raises
        `AttemptFailed(STREAM_ERROR)` (the relay decides whether that was before content)."""
        try:
            return await self._response.content.readany()
        except READ_ERRORS as exc:
            raise self.cut_off(exc) from exc

    @property
    def content(self) -> aiohttp.StreamReader | None:
        """The body's reader, for the stream pump: `content.readany()` is `read()` without a
        coroutine of its own (one frame less under every idle stream, one level less to
        resume per read); its errors in `READ_ERRORS` must go through `cut_off`. None when
        reads must go through `read()` (a subclass that replays what was read first)."""
        return self._response.content

    def cut_off(self, exc: BaseException) -> AttemptFailed:
        """What a read error in `READ_ERRORS` means: the body was cut."""
        return AttemptFailed(
            AttemptResult.STREAM_ERROR,
            UpstreamFailed(
                f'upstream "{self._upstream}" response was cut off ({type(exc).__name__})'
            ),
        )


def _nothing() -> None:
    pass


class OpenAttempt:
    """One attempt: `await start()` sends the request and waits for the response headers;
    `await close()` ends it (always call it, in a `finally`). Cancelling `start()` resets the
    connection at once."""

    __slots__ = (
        "_answer",
        "_body",
        "_headers",
        "_hooks",
        "_method",
        "_response",
        "_session",
        "_url",
        "resent",
        "upstream",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: RequestBody,
        on_headers_sent: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        stream: bool = True,
    ) -> None:
        self._session = session
        self.upstream = upstream
        self._method, self._url, self._headers, self._body = method, url, headers, body
        self._hooks = AttemptHooks(on_headers_sent, loop, clock, stream)
        self._response: aiohttp.ClientResponse | None = None
        self._answer: UpstreamResponse | None = None
        self.resent = False

    async def start(self) -> UpstreamResponse:
        hooks = self._hooks
        for first in (True, False):
            try:
                # The send, here rather than in a coroutine of its own (a frame fewer a
                # request). The hooks go with this send's request, and only with it: a later
                # control call in this task (a background cancel) is not this send.
                hooks.reset()
                body = self._body
                data: RequestBody | BodyInSlices | None = body or None
                if len(body) > _LARGE_BODY:
                    # Written in slices rather than in one transport write that holds up the
                    # loop.
                    data = BodyInSlices(body)
                self._response = await send_upstream(
                    self._session, self._method, self._url, self._headers, data, hooks.loop, hooks
                )
                self._answer = UpstreamResponse(self._response, self.upstream)
                # Answered: no resend, so its headers go out no more. The callback (a bound
                # method, 64 B) is not kept for the rest of the stream.
                hooks.on_headers_sent = _nothing
                return self._answer
            except asyncio.CancelledError:
                hooks.abort()  # the body may still be in flight: reset, don't flush
                raise
            except (aiohttp.ClientError, OSError) as exc:
                if first and hooks.may_resend(exc):
                    self.resent = True
                    log.info(
                        'upstream "%s" closed a pooled connection as the request went out; '
                        "resending on a new connection",
                        self.upstream,
                    )
                    continue
                raise map_open_error(exc, self.upstream) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close_now(self) -> None:
        """Close at once, from synchronous code: an answer in progress gets its FIN in this
        very call (asyncio would send it only on a later loop step, after whatever else is
        ready, such as relaying a hedge winner); an attempt still waiting for headers gets a
        reset (its request body may still be in flight)."""
        if self._response is None:
            self._hooks.abort()
            return
        transport = self._hooks.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone: nothing to tell the upstream
        self._response.close()

    def abort(self) -> None:
        """Reset the connection now (no flush of unsent request bytes)."""
        self._hooks.abort()
        if self._response is not None:
            self._response.close()

    def closed_at_once(self) -> bool:
        """`close()` where it would not wait, done here without its two coroutines (its own and
        aiohttp's `wait_for_close`): True. A response aiohttp's own send made may have its
        writer task still running: nothing is done, False (then `await close()`)."""
        response = self._response
        # (aiohttp's writer task, by its mangled name: its `_writer` property is a call)
        writer = response._ClientResponse__writer if response is not None else None  # type: ignore[attr-defined]
        if writer is not None:
            return False
        self._response = None
        if self._answer is not None:
            self._answer.detach()
            self._answer = None
        if response is not None:
            # (what `wait_for_close` ends in, with no writer to wait for: `release` again)
            response.release()
        return True

    async def close(self) -> None:
        """Release a finished response to the pool; close an unfinished one at once."""
        response, self._response = self._response, None
        if self._answer is not None:
            self._answer.detach()
            self._answer = None
        if response is None:
            return
        response.release()
        await response.wait_for_close()


class Upstreams:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = time.monotonic

    async def start(self) -> None:
        # The session's loop, known once: `asyncio.get_running_loop()` is a getpid() syscall
        # on Python 3.11, and every attempt needs the loop.
        self._loop = loop = asyncio.get_running_loop()
        # Its clock as `sse_stream.loop_clock` reads it: `time.monotonic` itself where
        # `loop.time()` is asyncio's (a frame less a reading), else the loop's own.
        self._clock = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        self._session = aiohttp.ClientSession(
            # limit=0: the default of 100 would queue the 101st concurrent stream.
            connector=Connector(limit=0, ttl_dns_cache=60),
            # Our own deadlines govern every phase; aiohttp's default total=300 s would cut
            # long streams.
            timeout=aiohttp.ClientTimeout(total=None),
            # Byte-faithful: relay compressed bodies as they are.
            auto_decompress=False,
            # Send only what the client sent: no aiohttp default header (its skip list, decided
            # once rather than on every request: proxy/upstream_request.py).
            request_class=UpstreamRequest,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        return self._session is not None and not self._session.closed

    def attempt(
        self,
        upstream: str,
        method: str,
        url: URL,
        *,
        headers: CIMultiDict[str],
        body: RequestBody,
        on_headers_sent: Callable[[], None],
        stream: bool = True,
    ) -> OpenAttempt:
        """A new attempt at `upstream` (its name, for messages); nothing is sent until start().
        `stream`: the client asked for a stream (only then is the answer's head read split
        from the events that came with it, proxy/head_read.py)."""
        if self._session is None or self._loop is None:
            raise AttemptFailed(
                AttemptResult.CONNECT_ERROR,
                UpstreamUnreachable("the upstream client is not running"),
            )
        return OpenAttempt(
            self._session,
            upstream,
            method,
            url,
            headers,
            body,
            on_headers_sent,
            self._loop,
            self._clock,
            stream,
        )

    async def post_empty(self, url: URL, headers: CIMultiDict[str]) -> tuple[int, bytes]:
        """A small control call (e.g. a background cancel): status and body."""
        if self._session is None:
            raise aiohttp.ClientConnectionError("the upstream client is not running")
        async with self._session.post(url, headers=headers, allow_redirects=False) as response:
            return response.status, await response.read()

    async def post_control(
        self, url: URL, headers: CIMultiDict[str], body: bytes
    ) -> tuple[int, bytes]:
        """A small control call with a body (an engine abort): status and the first 64 KiB of
        the answer (nobody needs more; an upstream that sends more cannot make us buffer it)."""
        if self._session is None:
            raise aiohttp.ClientConnectionError("the upstream client is not running")
        async with self._session.post(
            url, headers=headers, data=body, allow_redirects=False
        ) as response:
            return response.status, await response.content.read(65536)
