"""The response to a request `UpstreamRequest` wrote itself (proxy/upstream_request.py),
built and started as aiohttp's `ClientResponse.__init__` and `start` leave it: the same
attributes, without the call of ten keywords, the no-op timer's context and the properties.
tests/test_upstream_request_inline.py compares the state each leaves with aiohttp's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import ClientResponse, ClientResponseError, RequestInfo, hdrs
from aiohttp.client_reqrep import ClientRequest
from aiohttp.http import HttpProcessingError, StreamWriter
from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from aiohttp.connector import Connection


def sent_response(request: ClientRequest, writer: StreamWriter) -> ClientResponse:
    """`ClientResponse(...)` as aiohttp's `send` makes it for a lean request written by
    `UpstreamRequest` itself (`request`), with the attributes aiohttp's `__init__` sets for one (no
    writer task, no 100-continue, a session, a URL without fragment and a loop out of debug:
    the lean `__init__` checked the last two), without its call of ten keywords; and its
    `request_info` without the request's property."""
    response = ClientResponse.__new__(ClientResponse)
    response.method = request.method
    response._real_url = response._url = url = request.url
    response._output_size = writer.output_size
    response._request_info = tuple.__new__(
        RequestInfo, (url, request.method, CIMultiDictProxy(request.headers), request.original_url)
    )
    response._timer = request._timer
    response._cache = {}
    response._traces = request._traces
    response._loop = request.loop
    session = request._session
    response._session = session
    response._resolve_charset = session._resolve_charset
    return response


def head_error(response: ClientResponse, exc: HttpProcessingError) -> ClientResponseError:
    """What aiohttp's `start` raises for a head its parser refused."""
    return ClientResponseError(
        response.request_info,
        response.history,
        status=exc.code,
        message=exc.message,
        headers=exc.headers,
    )


def connected(response: ClientResponse, connection: Connection) -> None:
    """`start`'s first steps: the response takes its connection and protocol."""
    response._closed = False
    response._protocol = connection._protocol
    response._connection = connection


def headed(response: ClientResponse, message: Any, payload: Any) -> None:
    """`start`'s last steps, once the protocol gave the final (not interim) head: its status,
    headers and body reader on the response. A plain function: the one wait, the head's
    read, is the caller's (no coroutine of its own a request)."""
    payload.on_eof(response._response_eof)
    response.version = message.version
    response.status = message.code
    response.reason = message.reason
    # `_cache["headers"]`: what `start` leaves there by reading `headers` (a reify).
    response._headers = response._cache["headers"] = headers = message.headers
    response._raw_headers = message.raw_headers
    response.content = payload
    if cookie_hdrs := headers.getall(hdrs.SET_COOKIE, ()):
        response._raw_cookie_headers = tuple(cookie_hdrs)
