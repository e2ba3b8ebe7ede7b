"""Tools for the hostile-input suite: raw HTTP over asyncio streams, an upstream that answers
with exact bytes, a witness that records any connection it gets, and the log checks every
hostile test ends with (no ERROR, one access line)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from tests.support import RecordSink, config_from

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from tests.conftest import StartProxy

ACCESS_LOGGER = "hangup.access"


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def error(self) -> dict[str, object]:
        obj = json.loads(self.body)
        assert isinstance(obj, dict) and isinstance(obj.get("error"), dict), self.body[:200]
        error: dict[str, object] = obj["error"]
        return error


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, rest = data.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def parse_response(raw: bytes) -> Response:
    """The first response in `raw` (a 100 Continue is skipped); the body as far as it came."""
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    response = Response(int(status), " ".join(reason), headers, body, raw)
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        response.body = _dechunk(body)
    return response


async def exchange_raw(port: int, data: bytes, *, timeout: float = 5.0) -> Response:
    """Send `data` on a new connection, read until the server closes, parse the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    assert received, "the server sent nothing"
    return parse_response(bytes(received))


def request_bytes(
    method: str,
    target: str,
    *,
    body: bytes = b"",
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    content_type: str | None = "application/json",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if content_type is not None and body:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat_body(model: str = "m", *, stream: bool = False, **extra: object) -> bytes:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


class Witness:
    """A loopback listener nobody should reach: records every connection it accepts."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Witness:
        if self._sock is not None:
            self.server = await asyncio.start_server(self._accept, sock=self._sock)
        else:
            self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def bind_port_ending_in(suffixes: tuple[int, ...], tries: int = 20_000) -> socket.socket:
    """A listening socket on a free port (bound to port 0, as the OS picks) whose last two
    digits are one of `suffixes`: the port a request would reach if those digits were glued
    onto `base_url: http://127.0.0.1:<port // 100>`."""
    held: list[socket.socket] = []
    try:
        for _ in range(tries):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] % 100 in suffixes:
                sock.listen(16)
                sock.setblocking(False)
                return sock
            held.append(sock)  # keep it, so the OS offers another port next time
        raise AssertionError(f"no free port ending in {suffixes} in {tries} tries")
    finally:
        for sock in held:
            sock.close()


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Reply = Callable[[SeenRequest, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedUpstream:
    """An upstream that answers each request with whatever `reply` writes (exact bytes, a FIN,
    a reset); records every request it got. Each connection serves one request and is closed,
    or with `keep_alive` serves requests in turn until the client closes it."""

    reply: Reply
    keep_alive: bool = False
    requests: list[SeenRequest] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    connections: int = 0
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = SeenRequest(method, target, headers, body)
                self.requests.append(seen)
                await self.reply(seen, writer)
                if not self.keep_alive or writer.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            # Python 3.11's wait_closed does not wait for the open connections (one kept
            # alive for its next request, one whose reply still sleeps): closed here, not
            # left to the end of the test's loop.
            for writer in list(self._open):
                writer.close()
            await self.server.wait_closed()


class ScriptedUpstreams:
    """The scripted upstreams a test started (the conftest `scripted` fixture): all stopped
    after it."""

    def __init__(self) -> None:
        self.started: list[ScriptedUpstream] = []

    async def start(self, reply: Reply, *, keep_alive: bool = False) -> ScriptedUpstream:
        upstream = await ScriptedUpstream(reply, keep_alive).start()
        self.started.append(upstream)
        return upstream

    async def stop(self) -> None:
        for upstream in self.started:
            await upstream.stop()


async def proxy_before(
    reply: Reply,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    *,
    upstream: Mapping[str, object] | None = None,
    **extra: object,
) -> tuple[ProxyServer, RecordSink, ScriptedUpstream]:
    """The production runner with one route to a scripted upstream ("up") answering with
    `reply`; `upstream` adds to that upstream's config (a key, headers), `extra` to the
    config's top level."""
    scripted_upstream = await scripted.start(reply)
    data: dict[str, object] = {
        "upstreams": {"up": {"base_url": scripted_upstream.base_url, **(upstream or {})}},
        "routes": [{"name": "default", "upstream": "up"}],
        **extra,
    }
    server, sink = await start_proxy(config_from(data))
    return server, sink, scripted_upstream


def send_and_close(data: bytes) -> Reply:
    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    return reply


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def sse_head(extra: str = "") -> bytes:
    return ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + extra + "\r\n").encode()


def http_chunk(data: bytes) -> bytes:
    assert data, "an empty chunk would be the body's end"
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_in_chunks(
    writes: Iterable[bytes], pause_s: float = 0.0, *, sent: asyncio.Event | None = None
) -> Reply:
    """A 200 event stream, as aiohttp's server writes one: each of `writes` an HTTP chunk of
    its own (the head goes with the first), drained (so it waits while the reader does not
    read) and followed by `pause_s` of sleep (0: a turn of the loop, so a proxy in this loop
    mostly reads each alone); then the last chunk, and `sent` is set."""

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        head = sse_head("Transfer-Encoding: chunked\r\n")
        for data in writes:
            writer.write(head + http_chunk(data))
            head = b""
            await writer.drain()
            await asyncio.sleep(pause_s)
        writer.write(head + b"0\r\n\r\n")
        await writer.drain()
        if sent is not None:
            sent.set()

    return reply


def json_head(length: int, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        + extra
        + "\r\n"
    ).encode()


OK_BODY = b'{"id":"x","object":"chat.completion","choices":[],"usage":null}'


async def answer_ok(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
    """A scripted upstream's plain 200: a small chat completion."""
    writer.write(json_head(len(OK_BODY)) + OK_BODY)
    await writer.drain()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER]


def assert_clean_log(caplog: pytest.LogCaptureFixture, *, access: int = 1) -> None:
    """No ERROR (or worse) line from anywhere, and exactly `access` access lines."""
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert len(access_lines(caplog)) == access, [r.getMessage() for r in caplog.records]
