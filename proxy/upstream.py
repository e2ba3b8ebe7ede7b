"""The one seam to upstream servers: owns the aiohttp ClientSession and maps aiohttp's client
exceptions to our error vocabulary once, here.

Closing is structural: leaving the `async with` around a request by cancellation or exception
closes the socket at once (aiohttp never pools a connection whose body was not read to EOF).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import struct
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import ProxyError, UpstreamFailed, UpstreamUnreachable

log = logging.getLogger("hangup.upstream")

_LARGE_BODY = 1024 * 1024


@dataclass(slots=True)
class AttemptHooks:
    """Passed to aiohttp's tracing as `trace_request_ctx`: tells the relay when the request
    headers went out (the end of the connect phase, the start of the headers phase)."""

    on_headers_sent: Callable[[], None]
    on_connection: Callable[[], None] = field(default=lambda: None)
    transport: asyncio.Transport | None = None  # of the current attempt, once connected

    def abort(self) -> None:
        """Close the attempt's socket *now*, with a reset.

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


# The attempt the current task is making: lets the connector hand its transport to the relay.
_ATTEMPT: ContextVar[AttemptHooks | None] = ContextVar("hangup_attempt", default=None)


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector that tells the current attempt which transport it got."""

    async def connect(
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 (aiohttp's own signature)
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        hooks = _ATTEMPT.get()
        if hooks is not None:
            hooks.transport = connection.transport
        return connection


async def _headers_sent(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object
) -> None:
    hooks = ctx.trace_request_ctx
    if isinstance(hooks, AttemptHooks):
        hooks.on_headers_sent()


async def _connection_created(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object
) -> None:
    hooks = ctx.trace_request_ctx
    if isinstance(hooks, AttemptHooks):
        hooks.on_connection()


class Upstreams:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        trace.on_connection_create_end.append(_connection_created)
        self._session = aiohttp.ClientSession(
            # limit=0: the default of 100 would queue the 101st concurrent stream.
            connector=_Connector(limit=0, ttl_dns_cache=60),
            # Our own deadlines govern every phase; aiohttp's default total=300 s would cut
            # long streams.
            timeout=aiohttp.ClientTimeout(total=None),
            # Byte-faithful: relay compressed bodies as they are.
            auto_decompress=False,
            # Send only what the client sent (no aiohttp User-Agent / Accept-Encoding).
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            trace_configs=[trace],
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        return self._session is not None and not self._session.closed

    def request(
        self,
        method: str,
        url: URL,
        *,
        headers: CIMultiDict[str],
        body: bytes,
        hooks: AttemptHooks,
    ) -> Any:
        """An aiohttp request context manager; use with `async with`."""
        if self._session is None:
            raise UpstreamUnreachable("the upstream client is not running")
        hooks.transport = None
        _ATTEMPT.set(hooks)
        data: bytes | io.BytesIO | None = body or None
        if len(body) > _LARGE_BODY:
            # Written in chunks rather than in one transport write that holds up the loop.
            data = io.BytesIO(body)
        return self._session.request(
            method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            trace_request_ctx=hooks,
        )

    async def post_empty(self, url: URL, headers: CIMultiDict[str]) -> tuple[int, bytes]:
        """A small control call (e.g. a background cancel): status and body."""
        if self._session is None:
            raise aiohttp.ClientConnectionError("the upstream client is not running")
        async with self._session.post(url, headers=headers, allow_redirects=False) as response:
            return response.status, await response.read()


def map_open_error(exc: Exception, upstream: str) -> ProxyError:
    """An exception raised while sending the request or awaiting response headers."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # strerror can quote the address ("Connect call failed ('10.0.0.1', 443)"): by errno.
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else type(exc.os_error).__name__
        # The address is for the operator's log, not for the client's error body.
        log.warning(
            'cannot connect to upstream "%s" (%s:%s): %s', upstream, exc.host, exc.port, reason
        )
        return UpstreamUnreachable(f'cannot connect to upstream "{upstream}": {reason}')
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamFailed(f'upstream "{upstream}" closed the connection without a response')
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamFailed(f'upstream "{upstream}" sent an invalid HTTP response')
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamFailed(f'upstream "{upstream}" connection failed: {type(exc).__name__}')
    return UpstreamFailed(f'upstream "{upstream}" request failed: {type(exc).__name__}')


def map_body_error(exc: Exception, upstream: str) -> ProxyError:
    """An exception raised while reading the response body."""
    return UpstreamFailed(f'upstream "{upstream}" response was cut off ({type(exc).__name__})')


OPEN_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, OSError)
BODY_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError,
    OSError,
    asyncio.IncompleteReadError,
)
