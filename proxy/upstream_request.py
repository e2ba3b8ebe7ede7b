"""How one request goes to an upstream: aiohttp's `ClientRequest`, sent on the session's
connector, without the rest of `ClientSession.request`.

An upstream gets the headers the client sent (less hop-by-hop ones, plus ours: see
proxy/headers.py), never aiohttp's `User-Agent`, `Accept`, `Accept-Encoding` or a payload's
`Content-Type`. aiohttp's own way to say that, a session's `skip_auto_headers`, costs every
request a sorted copy of the list, a new `CIMultiDict` of it and a copy of the request's
headers; `UpstreamRequest` decides it once.

`send` does what `ClientSession._request` does for the one kind of request the relay makes, and
nothing else: no redirects (the client follows them), cookies, auth from the URL (the config
refuses it), proxies from the environment, session timeouts (our deadlines cancel instead),
traces or middlewares, and no retry of its own. `ClientSession._request` would retry an
idempotent request once on a reused connection that broke, whenever it broke: that is the
resend rule's decision (proxy/upstream.py), which only resends when the upstream cannot have
started the work. Skipping the rest is ~4 % of a small completion's instructions (callgrind:
~58 k of ~1,460 k per request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import ClientOSError, ClientRequest, ClientResponse, ClientSession, hdrs
from aiohttp.client_exceptions import ClientError, ConnectionTimeoutError
from aiohttp.helpers import TimerNoop
from multidict import CIMultiDict
from yarl import URL

# What aiohttp must not add: read by its payload and send steps (`Content-Type`), never changed.
_ADDED_NONE: Final[CIMultiDict[None]] = CIMultiDict(
    (name, None) for name in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE, hdrs.USER_AGENT)
)
_NO_TIMER: Final = TimerNoop()
_NO_TRACES: Final[list[Any]] = []  # never appended to: no trace configs


class UpstreamRequest(ClientRequest):
    """A `ClientRequest` that adds no default header.

    What aiohttp 3.x's own method does with a skip list of exactly these names: it adds no
    default header, and keeps the list where its payload and send steps look for it.
    tests/test_headers.py checks on the wire that nothing is added."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _ADDED_NONE


async def send(
    session: ClientSession, method: str, url: URL, headers: CIMultiDict[str], data: Any
) -> ClientResponse:
    """The request on a connection of `session`'s pool, up to the response's head (as
    `ClientSession._request`'s own connect-and-send step, with its errors)."""
    connector = session.connector
    if connector is None or session.closed:
        raise RuntimeError("Session is closed")
    request = UpstreamRequest(
        method,
        url,
        headers=headers,
        data=data,
        loop=asyncio.get_running_loop(),
        response_class=ClientResponse,
        timer=_NO_TIMER,
        session=session,
        traces=_NO_TRACES,
    )
    try:
        try:
            connection = await connector.connect(
                request, traces=_NO_TRACES, timeout=session.timeout
            )
        except TimeoutError as exc:
            raise ConnectionTimeoutError(f"Connection timeout to host {request.url}") from exc
        protocol = connection.protocol
        assert protocol is not None
        protocol.set_response_params(
            timer=_NO_TIMER,
            skip_payload=method == hdrs.METH_HEAD,
            read_until_eof=True,
            auto_decompress=False,  # byte-faithful: compressed bodies pass as they are
        )
        try:
            response = await request.send(connection)
            try:
                await response.start(connection)
            except BaseException:
                response.close()
                raise
        except BaseException:
            connection.close()
            raise
    except ClientError:
        raise
    except OSError as exc:
        if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
            raise
        raise ClientOSError(*exc.args) from exc
    return response
