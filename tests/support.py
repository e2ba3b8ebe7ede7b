"""Test helpers: a raw-socket HTTP client that can hang up at an exact moment, a blackhole
upstream for the connect window, a sink of outcome records, and config builders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Self, TypeVar

import pytest
from aiohttp import web
from hypothesis import strategies as st

from proxy.config import HangupConfig
from proxy.outcome import RequestRecord

T = TypeVar("T")


def make_config(upstream_url: str | None, **route: Any) -> HangupConfig:
    """One upstream "sim" and one catch-all route "default" with the given route options.
    Takes `str | None` because a simulator's `base_url` is None until it has started."""
    assert upstream_url is not None, "upstream not started: no base_url yet"
    data: dict[str, Any] = {
        "upstreams": {"sim": {"base_url": upstream_url}},
        "routes": [{"name": "default", "upstream": "sim", **route}],
    }
    return HangupConfig.model_validate(data)


def config_from(data: dict[str, Any]) -> HangupConfig:
    return HangupConfig.model_validate(data)


class RecordSink:
    """Collects every finished request record; waits on them with a bound."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self._changed = asyncio.Event()

    def __call__(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def by_id(self, request_id: str) -> list[RequestRecord]:
        return [r for r in self.records if r.request_id == request_id]

    async def wait_for(self, request_id: str, timeout: float = 5.0) -> RequestRecord:
        return await self.wait(
            lambda: next(iter(self.by_id(request_id)), None),
            timeout,
            f"a record for request {request_id}",
        )

    async def wait(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        """The first truthy value of `probe`, re-checked each time a record arrives; an
        AssertionError naming `what` if none within `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = probe()
                    if found:
                        return found
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = [(r.request_id, str(r.outcome)) for r in self.records[-5:]]
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last records: {seen}"
            ) from None


class RawClient:
    """An HTTP/1.1 client over a plain socket, so a test controls exactly when it hangs up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = bytearray()
        self.closed_at: float | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def send_head(
        self, method: str, path: str, headers: dict[str, str], content_length: int | None
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def post_json(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        raw = json.dumps(body).encode()
        self.send_head(
            "POST", path, {"Content-Type": "application/json", **(headers or {})}, len(raw)
        )
        self.writer.write(raw)
        await self.writer.drain()

    async def read_until(
        self, predicate: Callable[[bytes], bool], timeout: float = 5.0, what: str = ""
    ) -> bytes:
        """Read until `predicate(received)` holds. An AssertionError, showing the tail of what
        did arrive, if the peer closes first or `timeout` s pass."""
        awaited = what or "the awaited bytes"
        try:
            async with asyncio.timeout(timeout):
                while not predicate(bytes(self.received)):
                    data = await self.reader.read(65536)
                    if not data:
                        raise AssertionError(
                            f"connection closed before {awaited}; got {self._tail()}"
                        )
                    self.received += data
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {awaited}; got {self._tail()}"
            ) from None
        return bytes(self.received)

    async def read_to_eof(self, timeout: float = 10.0) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                while data := await self.reader.read(65536):
                    self.received += data
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for the peer to close; got {self._tail()}"
            ) from None
        return bytes(self.received)

    def _tail(self, n: int = 400) -> str:
        """The last `n` bytes received, for failure messages."""
        got = bytes(self.received)
        return f"{len(got)} bytes ending {got[-n:]!r}"

    def data_events(self) -> int:
        return bytes(self.received).count(b"data: ")

    def close(self) -> float:
        """Hang up (FIN) now; returns the monotonic time of the close."""
        self.closed_at = time.monotonic()
        self.writer.close()
        return self.closed_at


class Blackhole:
    """A loopback port where TCP connects hang: a listener with backlog 0 whose accept queue
    is already full, so the kernel drops further SYNs (the client sits in SYN_SENT)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)
        self.baseline = self.syn_sent()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def syn_sent(self) -> int:
        """Sockets on this machine in SYN_SENT toward the blackhole."""
        count = 0
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[2].split(":")[1], 16) == self.port and fields[3] == "02":
                    count += 1
        return count

    def connecting(self) -> int:
        return self.syn_sent() - self.baseline

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self.listener.close()


async def wait_until(
    probe: Callable[[], bool], timeout: float, what: str, interval: float = 0.002
) -> None:
    """For kernel state that has no event to wait on (socket states): poll with a bound."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class _Forwarder:
    """A TCP forwarder on a free loopback port to `target`; subclasses say what it does with
    each connection (`_accept`). `stop()` closes the listener and every connection it made."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _connect_upstream(
        self, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The upstream side of a new connection; both writers are closed by `stop()`."""
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.update((writer, up_writer))
        return up_reader, up_writer

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        if self._server is not None:
            await self._server.wait_closed()


class Tee(_Forwarder):
    """A TCP forwarder between the proxy and an upstream that records, per connection, the
    exact bytes the upstream sent: the witness for "relayed byte-identical"."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.responses: list[bytearray] = []
        self.requests: list[bytearray] = []  # what the proxy sent, per connection

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._connect_upstream(writer)
        received, sent = bytearray(), bytearray()
        self.responses.append(received)
        self.requests.append(sent)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray
        ) -> None:
            try:
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, sent), pump(up_reader, writer, received))


class LateFin(_Forwarder):
    """A TCP forwarder that makes the keep-alive race happen every time: when the upstream
    closes a connection, the close is held back from the proxy until the proxy sends its next
    request on it; that request is then dropped and the connection closed, before any answer.

    That is what a proxy sees when it reuses a pooled connection whose FIN is still in flight:
    the write succeeds, then the connection ends. `raced` counts the requests it happened to."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.raced = 0
        self.connections = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await self._connect_upstream(writer)
        upstream_closed = asyncio.Event()
        unanswered = False  # bytes went upstream since the upstream last sent any

        async def to_upstream() -> None:
            nonlocal unanswered
            try:
                while data := await reader.read(65536):
                    if upstream_closed.is_set():
                        self.raced += 1  # a request on a connection the upstream closed
                        break
                    unanswered = True
                    up_writer.write(data)
                    await up_writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
                up_writer.close()

        async def from_upstream() -> None:
            nonlocal unanswered
            try:
                while data := await up_reader.read(65536):
                    unanswered = False
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            upstream_closed.set()  # ...and the proxy is not told
            if unanswered:
                # The proxy's next request got here before the upstream's FIN (a busy
                # machine): it went to a closed upstream and will never be answered. Close
                # now, as the upstream did: the same race, seen a little later.
                self.raced += 1
                writer.close()

        await asyncio.gather(to_upstream(), from_upstream())


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, handler_cancellation: bool = False
) -> AsyncIterator[int]:
    """`app` served by aiohttp's runner on a free 127.0.0.1 port (yielded) until the block
    ends."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def http_body(raw: bytes) -> bytes:
    """The (de-chunked) body of the first HTTP response in `raw`."""
    import http.client
    import io

    class _Sock:
        def makefile(self, mode: str) -> io.BytesIO:
            return io.BytesIO(raw)

    response = http.client.HTTPResponse(_Sock())  # type: ignore[arg-type]
    response.begin()
    return response.read()


def socket_inodes_toward(port: int, state: str | None = None) -> set[int]:
    """Inodes of TCP sockets whose remote port is `port` (optionally in one state: "02" is
    SYN_SENT, "01" ESTABLISHED). Reading the table is slow when the machine holds many
    sockets; call it once, then watch the inodes with `held_by_this_process`."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) != port:
                        continue
                    if state is None or fields[3] == state:
                        inodes.add(int(fields[9]))
        except FileNotFoundError:
            continue
    return inodes


def held_by_this_process(inodes: set[int]) -> set[int]:
    """Which of these socket inodes this process still has open (cheap: our own fd table)."""
    held: set[int] = set()
    fd_dir = "/proc/self/fd"
    import os

    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in inodes:
                held.add(inode)
    return held


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The request's one access-log line (its structured fields), as pytest captured it."""
    lines: list[dict[str, Any]] = [
        fields
        for r in caplog.records
        if r.name == "hangup.access"
        and isinstance(fields := getattr(r, "fields", None), dict)
        and fields.get("request_id") == request_id
    ]
    assert len(lines) == 1, lines
    return lines[0]


def run_steps(steps: Generator[None, None, Any]) -> tuple[Any, int]:
    """A sans-I/O generator run to its end, as `proxy.edge.body.in_steps` runs it one loop
    iteration a step: its value and how many steps it yielded."""
    count = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, count
        count += 1


def json_in_a_style(draw: st.DrawFn, obj: Any) -> str:
    """`obj` as JSON written compact, spaced, indented (0 to 3) or ASCII-escaped, as drawn:
    the spellings a client's JSON library may produce."""
    style = draw(st.sampled_from(["compact", "spaced", "indent", "ascii"]))
    if style == "compact":
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    elif style == "spaced":
        text = json.dumps(obj, ensure_ascii=False)
    elif style == "indent":
        text = json.dumps(obj, ensure_ascii=False, indent=draw(st.integers(0, 3)))
    else:
        text = json.dumps(obj)
    return text


def in_forked_child(produce: Callable[[], str]) -> str:
    """What `produce` returns when called in a forked child of this process (sent back over a
    pipe; the child exits without any cleanup): for what a fork must not share with its
    parent, such as the state of an id generator."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, produce().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        sent = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return sent
