"""The one seam to upstream servers: owns the aiohttp ClientSession and maps aiohttp's client
exceptions to our error vocabulary once, here.

Closing is structural: leaving the `async with` around a request by cancellation or exception
closes the socket at once (aiohttp never pools a connection whose body was not read to EOF).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import ProxyError, UpstreamFailed, UpstreamUnreachable


@dataclass(slots=True)
class AttemptHooks:
    """Passed to aiohttp's tracing as `trace_request_ctx`: tells the relay when the request
    headers went out (the end of the connect phase, the start of the headers phase)."""

    on_headers_sent: Callable[[], None]
    on_connection: Callable[[], None] = field(default=lambda: None)


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
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
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
        return self._session.request(
            method,
            url,
            headers=headers,
            data=body if body else None,
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
        return UpstreamUnreachable(
            f'cannot connect to upstream "{upstream}" ({exc.host}:{exc.port}): '
            f"{exc.os_error.strerror or type(exc.os_error).__name__}"
        )
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
