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

`UpstreamRequest.send` writes a small body in the same step as the head instead of in a task
of its own (another ~4 %: 1,105 k -> 1,059 k a completion), and on an open transport in one
transport write without `write_bytes`' three coroutines (~1.5 % more). It uses the writer
and payload internals of the aiohttp it was measured on (3.14: `write_bytes`,
`_get_content_length`, `_serialize_headers`, the writer's counts, `BytesPayload`'s fields),
hence pyproject's floor; tests/test_upstream_request_inline.py compares its bytes on the
wire, its errors and every attribute it sets with aiohttp's own. The response to such a
request is built and started the same way (proxy/sent_response.py, whose steps `send` runs
for its start): the attributes aiohttp's `ClientResponse.__init__` and `start` leave,
without the keyword call, the no-op timer's context and the properties.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import (
    ClientOSError,
    ClientRequest,
    ClientResponse,
    ClientSession,
    hdrs,
)
from aiohttp.client_exceptions import ClientError, ConnectionTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import _CONTAINS_CONTROL_CHAR_RE
from aiohttp.connector import BaseConnector, Connection
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpProcessingError, HttpVersion11, StreamWriter
from aiohttp.http_writer import _serialize_headers
from aiohttp.payload import TOO_LARGE_BYTES_BODY, BytesPayload
from multidict import CIMultiDict
from yarl import URL

from proxy.sent_response import connected, head_error, headed, sent_response
from proxy.upstream_connector import Connector

if TYPE_CHECKING:
    from proxy.upstream_connector import AttemptHooks

# aiohttp's own `connect`, which `Connector.connect` wraps (`send` runs the wrapper's checks).
_connect: Final = BaseConnector.connect

# What aiohttp must not add: read by its payload and send steps (`Content-Type`), never changed.
_ADDED_NONE: Final[CIMultiDict[None]] = CIMultiDict(
    (name, None) for name in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE, hdrs.USER_AGENT)
)
_NO_TIMER: Final = TimerNoop()
_OCTET_STREAM: Final = "application/octet-stream"
_BYTES: Final = (bytes, bytearray)
# A request whose head and body together are no larger than this is written in `send` itself
# rather than by a task of its own: aiohttp's writer drains above 64 KiB written, and an
# asyncio transport pauses (makes a drain wait) only above 64 KiB buffered, so such a write
# never waits for the upstream to read.
INLINE_WRITE_BYTES: Final = 64 * 1024
_NO_TRACES: Final[list[Any]] = []  # never appended to: no trace configs


class UpstreamRequest(ClientRequest):
    """A `ClientRequest` that adds no default header.

    What aiohttp 3.x's own method does with a skip list of exactly these names: it adds no
    default header, and keeps the list where its payload and send steps look for it.
    tests/test_headers.py checks on the wire that nothing is added."""

    # The attempt's hooks, for the connector (`Connector.adopt`): set by `send`; None for a
    # request the session builds itself (a control call).
    hooks: AttemptHooks | None = None
    # What aiohttp's `__init__` sets to the same value for every request the lean `__init__`
    # builds: read from the class instead of stored on each request (aiohttp's own
    # `__init__`, for any other request, stores its values on the request as before).
    chunked = None
    compress = None
    length = None
    _ssl = True
    server_hostname = None
    version = HttpVersion11
    _skip_auto_headers = _ADDED_NONE
    proxy = None
    proxy_auth = None
    proxy_headers = None
    # The body's payload when the lean `__init__` built this request (none of aiohttp's
    # options, a body of bytes whose Content-Length is ours): `send` need not ask again what
    # that decided. None for any other request.
    _lean: BytesPayload | None = None
    # `send` made the response itself (`sent_response`): the module's `send` starts it.
    _lean_response = False

    def __init__(
        self,
        method: str,
        url: URL,
        *,
        headers: Any = None,
        data: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        response_class: type[ClientResponse] | None = None,
        timer: Any = None,
        session: ClientSession | None = None,
        traces: list[Any] | None = None,
        **options: Any,
    ) -> None:
        """aiohttp's `__init__` for what `send` builds: ours headers (`CIMultiDict`, no
        `Host`, no `Expect`), a body of bytes or none, no option. Its ten `update_*` steps
        decide nothing for such a request but the `Host` field, the body's payload and its
        `Content-Length`: those are set here at once, the rest as aiohttp leaves them
        (tests/test_upstream_request_inline.py compares every attribute with aiohttp's).
        Anything else (a session's own `request`, which passes every option) is aiohttp's."""
        if (
            options
            or loop is None
            or type(headers) is not CIMultiDict
            or hdrs.HOST in headers
            or hdrs.EXPECT in headers
            or (data is not None and type(data) not in _BYTES)
            or not url.raw_host
            or url.raw_user
            or url.raw_password
            or url.raw_fragment
            or _CONTAINS_CONTROL_CHAR_RE.search(method)
            or loop.get_debug()
        ):
            super().__init__(
                method,
                url,
                headers=headers,
                data=data,
                loop=loop,
                response_class=response_class,
                timer=timer,
                session=session,
                traces=traces,
                **options,
            )
            return
        assert session is not None
        self._session = session
        self.original_url = self.url = url
        self.method = method = method.upper()
        self.loop = loop
        self.response_class = ClientResponse if response_class is None else response_class
        self._timer = timer if timer is not None else TimerNoop()
        self.headers = fields = CIMultiDict[str]()
        fields[hdrs.HOST] = url.host_port_subcomponent  # type: ignore[assignment]  # absolute
        fields.extend(headers)
        if data is None:
            if method not in self.GET_METHODS and hdrs.CONTENT_LENGTH not in fields:
                fields[hdrs.CONTENT_LENGTH] = "0"
        else:
            # The registry's payload for bytes: its only header, Content-Type, is skipped.
            self._body = payload = _bytes_payload(data)
            if hdrs.CONTENT_LENGTH not in fields:
                fields[hdrs.CONTENT_LENGTH] = str(len(data))
                # Ours: `_get_content_length` (a regex and two lookups) would give `len(data)`.
                if method != hdrs.METH_CONNECT:
                    self._lean = payload
        self._traces = [] if traces is None else traces

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _ADDED_NONE

    def written(self, conn: Connection) -> ClientResponse | None:
        """The usual lean request sent at once, synchronously: its head and small body in one
        write on an open transport, its response made by `sent_response` (aiohttp's response
        class, no timer); None, with nothing written, for any other case (`send` then, which
        writes the same way what it can, and fails a write on a closing transport as aiohttp
        does).

        Not a coroutine: the module's `send` calls it first, so the usual request makes no
        coroutine (and frame) for a step that never waits."""
        lean = self._lean
        if (
            lean is None
            or self.response_class is not ClientResponse
            or self._timer is not _NO_TIMER
        ):
            return None  # (the module's `send` makes none such: aiohttp's response and timer)
        protocol = conn._protocol  # (what the `protocol` property reads: a call fewer)
        assert protocol is not None
        # The lean `__init__`'s request: its body is a `BytesPayload` of bytes with our
        # Content-Length, and chunking, compression, a proxy, 100-continue, an upload
        # tracker, another version or CONNECT are aiohttp's options it never takes (nothing
        # between it and this call sets them).
        value = lean._value
        size = len(value)
        if size > INLINE_WRITE_BYTES or protocol.writing_paused or conn._connector.force_close:
            return None
        transport = protocol.transport
        if transport is None or transport.is_closing():
            return None  # `send` fails it as aiohttp's `write_bytes` does
        # No default Content-Type (the skip list) and no Connection header to add (HTTP/1.1
        # on a connector that keeps connections): as aiohttp's `send` decides for this case.
        head = _serialize_headers(f"{self.method} {self.url.raw_path_qs} HTTP/1.1", self.headers)
        if len(head) + size > INLINE_WRITE_BYTES:
            return None
        writer = _written_whole(
            protocol, transport, StreamWriter(protocol, self.loop), head + value
        )
        self._lean_response = True
        self.response = response = sent_response(self, writer)
        return response

    def _response_of(self, writer: StreamWriter, *, lean: bool) -> ClientResponse:
        if lean and self.response_class is ClientResponse and self._timer is _NO_TIMER:
            self._lean_response = True
            return sent_response(self, writer)
        return self.response_class(
            self.method,
            self.original_url,
            writer=None,
            continue100=None,
            timer=self._timer,
            request_info=self.request_info,
            traces=self._traces,
            loop=self.loop,
            session=self._session,
            stream_writer=writer,
        )

    async def send(self, conn: Connection) -> ClientResponse:
        """aiohttp's `send` for the relay's usual request: a small body of bytes, HTTP/1.1,
        no proxy, compression, chunking or 100-continue, a connection that may be kept.

        aiohttp writes every body in a task of its own (on Python < 3.12 the task waits for
        the next loop iteration), whose end a done callback records: two handles, a task
        step and the `_writer` bookkeeping per request. A small body's write never waits
        (`INLINE_WRITE_BYTES`), so it is written here, in the same step, as aiohttp >= 3.12
        does on Python >= 3.12 when its eager task finishes at once; the response then has
        no writer to wait for. On an open transport head and body go out in one write (what
        `write_bytes` ends in, without its three coroutines); on a closing one `write_bytes`
        itself fails it (set on the protocol, raised by the response's start), as its task
        would. Anything else takes aiohttp's own path. (The module's `send` tries `written`
        first, the usual case of this without a coroutine.)"""
        body = self._body
        protocol = conn._protocol
        assert protocol is not None
        lean = self._lean
        size: int | None
        if lean is not None:
            body = lean
            size = len(lean._value)
            if size > INLINE_WRITE_BYTES or protocol.writing_paused or conn._connector.force_close:
                return await super().send(conn)
        elif (
            type(body) is not BytesPayload
            or (size := body.size) is None
            or size > INLINE_WRITE_BYTES
            or protocol.writing_paused
            or self._continue is not None
            or self._upload_tracker is not None
            or self.chunked is not None
            or self.compress
            or self.proxy is not None
            or self.version is not HttpVersion11
            or self.method == hdrs.METH_CONNECT
            or conn._connector.force_close
        ):
            return await super().send(conn)
        writer = StreamWriter(protocol, self.loop)
        head = _serialize_headers(f"{self.method} {self.url.raw_path_qs} HTTP/1.1", self.headers)
        if len(head) + size > INLINE_WRITE_BYTES:
            return await super().send(conn)  # nothing was written: aiohttp's own path
        transport = protocol.transport
        if (
            transport is None
            or transport.is_closing()
            or (lean is None and self._get_content_length() != size)
        ):
            # aiohttp's `write_bytes`, which fails such a write as its own task would (or
            # writes the body cut to a Content-Length of the caller's).
            writer._headers_buf, writer._headers_written = head, False
            await self.write_bytes(writer, conn, self._get_content_length())
        else:
            _written_whole(protocol, transport, writer, head + body._value)
        self.response = response = self._response_of(writer, lean=lean is not None)
        return response


def _written_whole(
    protocol: ResponseHandler, transport: asyncio.Transport, writer: StreamWriter, data: bytes
) -> StreamWriter:
    """What `write_bytes` does for a small body (`write_with_length`, `write`, `write_eof`)
    on an open transport: head and body (`data`) in one transport write, the writer's
    counts and end marked, the read timeout started; without its three coroutines. Nothing
    else reads the writer but the response (`output_size`)."""
    writer._headers_written = writer._eof = True
    writer.buffer_size = writer.output_size = len(data)
    transport.write(data)
    protocol.start_timeout()
    return writer


def _bytes_payload(data: bytes | bytearray) -> BytesPayload:
    """`BytesPayload(data, disposition=None)`, the payload aiohttp makes for bytes, with the
    attributes its two `__init__`s set (tests/test_upstream_request_inline.py compares them),
    without their calls; a body over aiohttp's large-body bound gets aiohttp's own (and its
    warning)."""
    if len(data) > TOO_LARGE_BYTES_BODY:
        return BytesPayload(data, disposition=None)
    payload = BytesPayload.__new__(BytesPayload)
    payload._encoding = None
    payload._filename = None
    payload._headers = CIMultiDict({hdrs.CONTENT_TYPE: _OCTET_STREAM})
    payload._value = data  # type: ignore[assignment]  # (aiohttp's own keeps a bytearray too)
    payload._size = len(data)
    return payload


async def send(
    session: ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: Any,
    loop: asyncio.AbstractEventLoop,
    hooks: AttemptHooks | None = None,
) -> ClientResponse:
    """The request on a connection of `session`'s pool, up to the response's head (as
    `ClientSession._request`'s own connect-and-send step, with its errors). `loop`: the
    running one, passed in (`asyncio.get_running_loop()` is a getpid() syscall on 3.11);
    `hooks`: what the connector tells the attempt (proxy/upstream_connector.py)."""
    connector = session.connector
    if connector is None or session.closed:
        raise RuntimeError("Session is closed")
    request = UpstreamRequest(
        method,
        url,
        headers=headers,
        data=data,
        loop=loop,
        response_class=ClientResponse,
        timer=_NO_TIMER,
        session=session,
        traces=_NO_TRACES,
    )
    if hooks is not None:
        request.hooks = hooks
    try:
        try:
            if type(connector) is Connector:
                # `Connector.connect` without its coroutine: aiohttp's, then its checks.
                while True:
                    connection = await _connect(connector, request, _NO_TRACES, session.timeout)
                    if connector.adopt(connection, request):
                        break
            else:
                connection = await connector.connect(
                    request, traces=_NO_TRACES, timeout=session.timeout
                )
        except TimeoutError as exc:
            raise ConnectionTimeoutError(f"Connection timeout to host {request.url}") from exc
        protocol = connection._protocol
        assert protocol is not None
        protocol.set_response_params(
            timer=_NO_TIMER,
            skip_payload=method == hdrs.METH_HEAD,
            read_until_eof=True,
            auto_decompress=False,  # byte-faithful: compressed bodies pass as they are
        )
        try:
            # (no coroutine for the usual request's write: `written`)
            response = request.written(connection)
            if response is None:
                response = await request.send(connection)
            try:
                if request._lean_response:
                    # `response.start(connection)` for a response `sent_response` made,
                    # without a coroutine of its own (proxy/sent_response.py).
                    connected(response, connection)
                    while True:
                        try:
                            message, payload = await protocol.read()
                        except HttpProcessingError as exc:
                            raise head_error(response, exc) from exc
                        code = message.code
                        if code < 100 or code > 199 or code == 101:
                            break
                        # (an interim answer: no 100-continue was asked for, nothing to tell)
                    headed(response, message, payload)
                else:
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
