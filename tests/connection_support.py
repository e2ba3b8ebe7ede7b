"""Helpers for the hostile-client tests: a raw HTTP/1.1 connection that reads exactly one
response (or EOF), configs with small connection deadlines, and log checks."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.config import HangupConfig
from tests.support import config_from

CHAT: dict[str, Any] = {
    "model": "normal:tokens=2,rate=0",
    "messages": [{"role": "user", "content": "hi"}],
}
BODY_JSON = json.dumps(CHAT).encode()


def hostile_config(upstream_url: str, **sections: Any) -> HangupConfig:
    """One upstream "sim", one route "default"; `sections` replace top-level keys, and the
    route's keys come from `route=`."""
    route = sections.pop("route", {})
    data: dict[str, Any] = {
        "upstreams": {"sim": {"base_url": upstream_url}},
        "routes": [{"name": "default", "upstream": "sim", **route}],
        "defaults": {"include_usage": False},
    }
    data.update(sections)
    return config_from(data)


@dataclass
class Response:
    status: int
    head: str
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def error(self) -> dict[str, Any]:
        parsed = json.loads(self.body)
        assert isinstance(parsed, dict)
        error = parsed["error"]
        assert isinstance(error, dict)
        return error


class Conn:
    """One raw client connection. `close_all` (called by the tests' fixture) closes every
    one a test opened."""

    _open: ClassVar[list[Conn]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer)
        cls._open.append(conn)
        return conn

    @classmethod
    async def close_all(cls) -> None:
        conns, cls._open = cls._open, []
        for conn in conns:
            conn.writer.close()
        for conn in conns:
            try:
                await conn.writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> Response:
        """The next complete response (Content-Length framed, as all of ours are)."""
        async with asyncio.timeout(timeout):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status = int(head.split(" ", 2)[1])
            length = 0
            for line in head.split("\r\n")[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            body = await self.reader.readexactly(length) if length else b""
        return Response(status, head, body)

    async def eof(self, timeout: float = 5.0) -> float:
        """Wait until the server closes; the monotonic time it did. Extra bytes fail."""
        async with asyncio.timeout(timeout):
            try:
                extra = await self.reader.read(65536)
            except ConnectionResetError:
                extra = b""
        assert extra == b"", extra[:200]
        return time.monotonic()

    def close(self) -> None:
        self.writer.close()


def head(
    target: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    length: int | None = None,
    extra: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if method == "POST":
        lines.append("Content-Type: application/json")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def errors_in(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


def access_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in records:
        if r.name == "hangup.access" and r.getMessage() == "request":
            fields = getattr(r, "fields", None)
            assert isinstance(fields, dict)
            out.append(fields)
    return out


def big_bomb(inflated_mib: int) -> bytes:
    """zlib-wrapped deflate of `inflated_mib` MiB of zeros, about 1 KiB per MiB, built in
    milliseconds: after a full flush each MiB block compresses to the same bytes, so one is
    repeated. (The trailing checksum is not that of the whole: a bound fires long before.)"""
    compressor = zlib.compressobj(9)
    block = bytes(1024 * 1024)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (inflated_mib - 1) + compressor.flush()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
