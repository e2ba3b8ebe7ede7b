"""A small request body written in `UpstreamRequest.send` itself (no writer task) puts on the
wire exactly what aiohttp's own `send` puts there, and gets the same response; anything past
the bound, or not a body of bytes, still takes aiohttp's path. Over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientRequest, ClientResponse
from multidict import CIMultiDict
from yarl import URL

from proxy import upstream_request
from proxy.body_payload import BodyInSlices
from proxy.upstream_connector import Connector
from proxy.upstream_errors import map_open_error
from proxy.upstream_request import INLINE_WRITE_BYTES, UpstreamRequest, send

ANSWER = b'{"ok":true}'


class CaptureUpstream:
    """Keeps every request's raw bytes (head and Content-Length body) and answers each with
    the same small JSON response, keeping the connection."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.extra_head = b""  # more header lines for every answer

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}/v1/chat/completions?x=1&y=%20")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s"
                    b"Content-Length: %d\r\n\r\n%s" % (self.extra_head, len(ANSWER), ANSWER)
                )
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def capture() -> AsyncIterator[tuple[CaptureUpstream, URL, aiohttp.ClientSession]]:
    upstream = CaptureUpstream()
    url = await upstream.start()
    session = aiohttp.ClientSession(
        connector=Connector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        request_class=UpstreamRequest,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        yield upstream, url, session
    finally:
        await session.close()
        await upstream.stop()


def count_aiohttp_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> list[int]:
    """Counts the requests that went through aiohttp's own `send` (the writer-task path)."""
    calls: list[int] = []
    original: Callable[[ClientRequest, Any], Awaitable[ClientResponse]] = ClientRequest.send

    async def counted(self: ClientRequest, conn: Any) -> ClientResponse:
        calls.append(1)
        return await original(self, conn)

    monkeypatch.setattr(ClientRequest, "send", counted)
    return calls


def count_write_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bodies written by aiohttp's `write_bytes` (rather than `send`'s own write)."""
    calls: list[int] = []
    original = ClientRequest.write_bytes

    async def counted(self: ClientRequest, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        await original(self, *args, **kwargs)

    monkeypatch.setattr(ClientRequest, "write_bytes", counted)
    return calls


def count_aiohttp_inits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the requests built by aiohttp's own `__init__`."""
    calls: list[int] = []
    original = ClientRequest.__init__

    def counted(self: ClientRequest, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ClientRequest, "__init__", counted)
    return calls


async def exchange(
    session: aiohttp.ClientSession, url: URL, body: Any, **more: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": "r-1", **more})
    response = await asyncio.wait_for(
        send(session, "POST", url, headers, body, asyncio.get_running_loop()), timeout=5
    )
    try:
        payload = await asyncio.wait_for(response.read(), timeout=5)
        return response.status, list(response.headers.items()), payload
    finally:
        response.release()


@pytest.mark.parametrize("size", [1, 1000, 16 * 1024, INLINE_WRITE_BYTES - 200])
async def test_inline_write_equals_aiohttps_send_on_the_wire(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
    size: int,
) -> None:
    upstream, url, session = capture
    aiohttp_sends = count_aiohttp_sends(monkeypatch)
    body_writes = count_write_bytes(monkeypatch)
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)

    inline = await exchange(session, url, body)
    assert aiohttp_sends == [] and body_writes == []  # written by send itself, in one write
    inline_bytearray = await exchange(session, url, bytearray(body))
    assert aiohttp_sends == [] and body_writes == []

    monkeypatch.setattr(upstream_request, "INLINE_WRITE_BYTES", -1)  # everything to aiohttp
    general = await exchange(session, url, body)
    assert aiohttp_sends == [1]

    assert inline == general == inline_bytearray == (200, inline[1], ANSWER)
    first, second, third = upstream.requests
    assert first == second == third
    assert first.startswith(b"POST /v1/chat/completions?x=1&y=%20 HTTP/1.1\r\n")
    assert first.endswith(b"\r\n\r\n" + body)


async def test_past_the_bound_or_not_bytes_takes_aiohttps_path(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, url, session = capture
    aiohttp_sends = count_aiohttp_sends(monkeypatch)
    body = b"a" * INLINE_WRITE_BYTES  # the head makes it larger than the bound
    assert (await exchange(session, url, body))[2] == ANSWER
    assert aiohttp_sends == [1]
    assert (await exchange(session, url, BodyInSlices(body)))[2] == ANSWER
    assert aiohttp_sends == [1, 1]
    assert (await exchange(session, url, None))[2] == ANSWER
    assert aiohttp_sends == [1, 1, 1]
    assert [request.endswith(b"\r\n\r\n" + body) for request in upstream.requests] == [
        True,
        True,
        False,
    ]
    assert upstream.requests[2].endswith(b"Content-Length: 0\r\n\r\n")


class ClosingConnector(Connector):
    """Hands out connections whose transport is already closing: the write must fail."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        assert connection.transport is not None
        connection.transport.close()
        return connection


async def failed_send(url: URL) -> BaseException:
    session = aiohttp.ClientSession(
        connector=ClosingConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        request_class=UpstreamRequest,
    )
    try:
        with pytest.raises(aiohttp.ClientError) as raised:
            await exchange(session, url, b'{"model":"m"}')
        return raised.value
    finally:
        await session.close()


async def test_a_failed_write_raises_what_aiohttps_send_raises(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write on a closing transport. aiohttp's task writes one loop step later, when the
    close has been seen (ServerDisconnectedError); written at once, `write_bytes` finds the
    transport closing (ClientOSError, set on the protocol and raised by the response's
    start, as aiohttp's task does). Either is what the relay reads the same way: the resend
    rule's kinds of failure (`AttemptHooks.may_resend`), and one attempt result."""
    _, url, _ = capture
    aiohttp_sends = count_aiohttp_sends(monkeypatch)
    inline = await failed_send(url)
    assert aiohttp_sends == []
    monkeypatch.setattr(upstream_request, "INLINE_WRITE_BYTES", -1)
    general = await failed_send(url)
    assert aiohttp_sends == [1]
    resendable = aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
    assert isinstance(inline, resendable) and isinstance(general, resendable), (inline, general)
    assert type(inline) is aiohttp.ClientOSError  # `write_bytes`' own error, as its task's
    assert map_open_error(inline, "u").result is map_open_error(general, "u").result


def request_state(request: ClientRequest, names: set[str]) -> dict[str, Any]:
    """Everything a request holds (`names`: what either request stores on itself; a value
    may come from its class), the payload and the headers by value."""
    state = {name: getattr(request, name) for name in names}
    state["headers"] = list(request.headers.items())
    state["_body"] = body = request._body
    if body is not None:
        payload = {name: getattr(body, name) for name in vars(body)}
        payload["_headers"] = list(body.headers.items())
        state["_body"] = (type(body), payload, body._value, body.size)
    state.pop("_traces")  # a new empty list each: compared below
    if "_continue" in state:  # a new future each
        state["_continue"] = type(state["_continue"])
    return state


def same_state(ours: ClientRequest, aiohttps: ClientRequest) -> bool:
    # `_lean` is ours alone: the lean `__init__`'s mark for `send` (its payload), no state of
    # aiohttp's request.
    names = (set(vars(ours)) | set(vars(aiohttps))) - {"_lean"}
    assert ours._body is None or set(vars(ours._body)) == set(vars(aiohttps._body))
    return request_state(ours, names) == request_state(aiohttps, names)


@pytest.mark.parametrize(
    ("method", "body", "fields"),
    [
        ("POST", b'{"model":"m"}', [("Content-Type", "application/json"), ("X-A", "1")]),
        ("post", bytearray(b"abc"), [("X-Multi", "one"), ("x-multi", "two")]),
        ("POST", None, [("Via", "1.1 hangup")]),
        ("GET", None, []),
        ("POST", b"", [("Content-Length", "7")]),
    ],
)
async def test_built_as_aiohttps_init_builds_it(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    body: bytes | bytearray | None,
    fields: list[tuple[str, str]],
) -> None:
    _, url, session = capture
    loop = asyncio.get_running_loop()
    common: dict[str, Any] = {
        "data": body,
        "loop": loop,
        "response_class": ClientResponse,
        "timer": upstream_request._NO_TIMER,
        "session": session,
        "traces": [],
    }
    aiohttp_inits = count_aiohttp_inits(monkeypatch)
    ours = UpstreamRequest(method, url, headers=CIMultiDict(fields), **common)
    assert aiohttp_inits == []
    # An option, even at its default, takes aiohttp's own __init__.
    aiohttps = UpstreamRequest(method, url, headers=CIMultiDict(fields), chunked=None, **common)
    assert aiohttp_inits == [1]
    assert same_state(ours, aiohttps)
    assert ours._traces == aiohttps._traces == []
    assert next(iter(ours.headers)) == "Host"


@pytest.mark.parametrize(
    "fields",
    [[("Host", "elsewhere")], [("Expect", "100-continue")], [("Expect", "other")]],
)
async def test_host_or_expect_in_the_fields_is_aiohttps_to_build(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
    fields: list[tuple[str, str]],
) -> None:
    _, url, session = capture
    common: dict[str, Any] = {
        "data": b"x",
        "loop": asyncio.get_running_loop(),
        "timer": upstream_request._NO_TIMER,
    }
    aiohttp_inits = count_aiohttp_inits(monkeypatch)
    ours = UpstreamRequest("POST", url, headers=CIMultiDict(fields), session=session, **common)
    aiohttps = UpstreamRequest(
        "POST", url, headers=CIMultiDict(fields), session=session, chunked=None, **common
    )
    assert aiohttp_inits == [1, 1]
    assert same_state(ours, aiohttps)


async def test_a_callers_content_length_is_written_as_aiohttp_writes_it(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Content-Length of the caller's that is not the body's size: aiohttp's `write_bytes`
    writes the body cut to it (never the one-write path, which writes the whole body)."""
    upstream, url, session = capture
    body_writes = count_write_bytes(monkeypatch)
    body = b'{"model":"m","x":"0123456789"}'
    inline = await exchange(session, url, body, **{"Content-Length": "12"})
    assert body_writes == [1]
    monkeypatch.setattr(upstream_request, "INLINE_WRITE_BYTES", -1)  # everything to aiohttp
    general = await exchange(session, url, body, **{"Content-Length": "12"})
    assert inline == general
    assert upstream.requests[0] == upstream.requests[1]
    assert upstream.requests[0].endswith(b"\r\n\r\n" + body[:12])


async def test_the_usual_request_never_reads_its_own_content_length_back(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request whose Content-Length the lean `__init__` set from its body is written in one
    step without `_get_content_length` (a regex and two lookups that can only give the body's
    length); one that carries the caller's Content-Length still reads it."""
    upstream, url, session = capture
    reads: list[int] = []
    original = ClientRequest._get_content_length

    def counted(self: ClientRequest) -> int | None:
        reads.append(1)
        return original(self)

    monkeypatch.setattr(ClientRequest, "_get_content_length", counted)
    body = b'{"model":"m"}'
    assert await exchange(session, url, body) == (
        200,
        [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))],
        ANSWER,
    )
    assert reads == []
    assert upstream.requests[0].endswith(b"Content-Length: 13\r\n\r\n" + body)
    await exchange(session, url, body, **{"Content-Length": "13"})
    assert reads == [1]
    assert upstream.requests[1] == upstream.requests[0]


def test_only_a_body_of_ours_with_its_length_is_lean() -> None:
    """The lean mark is the lean `__init__`'s alone: a CONNECT, a body-less request and one
    with the caller's Content-Length keep `send`'s full checks."""
    url = URL("http://127.0.0.1:9/v1/x")
    loop = asyncio.new_event_loop()
    try:
        common: dict[str, Any] = {"loop": loop, "session": object(), "timer": None}
        lean = UpstreamRequest("POST", url, headers=CIMultiDict(), data=b"ab", **common)
        assert lean._lean is lean._body
        for method, data, fields in (
            ("CONNECT", b"ab", {}),
            ("POST", None, {}),
            ("POST", b"ab", {"Content-Length": "2"}),
        ):
            request = UpstreamRequest(method, url, headers=CIMultiDict(fields), data=data, **common)
            assert request._lean is None
    finally:
        loop.close()


def _response_state(response: ClientResponse) -> dict[str, Any]:
    """A started response's attributes, the per-connection objects by type (they are this
    connection's own), the request's headers by their items."""
    state: dict[str, Any] = {}
    for name, value in vars(response).items():
        if name in ("_protocol", "_connection", "content", "_loop", "_session"):
            state[name] = type(value)
        elif name == "_request_info":
            state[name] = (value.url, value.method, list(value.headers.items()), value.real_url)
        elif name == "_headers":
            state[name] = list(value.items())
        elif name == "_raw_headers":
            state[name] = [(k, v) for k, v in value if k.lower() != b"date"]
        else:
            state[name] = value
    return state


@pytest.mark.parametrize("cookies", [b"", b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"])
async def test_the_sent_response_is_built_and_started_as_aiohttps(
    capture: tuple[CaptureUpstream, URL, aiohttp.ClientSession],
    monkeypatch: pytest.MonkeyPatch,
    cookies: bytes,
) -> None:
    """The response `send` makes for the request it wrote itself (and starts without
    `ClientResponse.start`) holds what aiohttp's `__init__` and `start` leave on it, cookie
    headers too."""
    upstream, url, session = capture
    upstream.extra_head = cookies
    loop = asyncio.get_running_loop()
    starts: list[int] = []
    original = ClientResponse.start

    async def counted(self: ClientResponse, connection: Any) -> ClientResponse:
        starts.append(1)
        return await original(self, connection)

    monkeypatch.setattr(ClientResponse, "start", counted)
    states = []
    for inline in (True, False):
        if not inline:
            monkeypatch.setattr(upstream_request, "INLINE_WRITE_BYTES", -1)
        headers = CIMultiDict({"X-Request-Id": "r-1"})
        response = await send(session, "POST", url, headers, b'{"a":1}', loop)
        try:
            assert starts == ([] if inline else [1])
            states.append(_response_state(response))
            assert await response.read() == ANSWER
        finally:
            response.release()
    lean, general = states
    # aiohttp's own way keeps its writer task's bookkeeping; the one-write path has none.
    for name in ("_ClientResponse__writer", "_stream_writer", "_writer"):
        general.pop(name, None)
    assert lean == general
    assert lean.get("_raw_cookie_headers") == (("a=1", "b=2") if cookies else None)
    assert lean["_request_info"][2] == [
        ("Host", url.host_port_subcomponent),
        ("X-Request-Id", "r-1"),
        ("Content-Length", "7"),
    ]
