"""A fault-injecting OpenAI-compatible upstream on raw asyncio sockets (not `proxy.sim`).

It writes every byte itself, so it can do what an HTTP server library will not: reset a
connection (RST) at an exact point, cut a chunked body mid-chunk, send a broken chunk-size
line, malformed SSE, keep-alive comments only, gzip an error body, or stay silent.

Each request is answered by the `Behaviour` the harness set for its `x-request-id` (default:
a healthy answer). A healthy answer is deterministic: `WORDS` words "w0 w1 ..." (a prefixed
assistant message continues from where its text stops, DeepSeek-style `prefix: true` or vLLM's
`continue_final_message`), so a client can check it got exactly the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

WORDS = 12


def answer_words(count: int = WORDS) -> list[str]:
    return [f"w{i} " for i in range(count)]


def full_text(count: int = WORDS) -> str:
    return "".join(answer_words(count))


@dataclass
class Seen:
    """One request the upstream received."""

    request_id: str
    model: str
    stream: bool
    body: dict[str, Any]
    received_at: float
    behaviour: str
    closed_at: float | None = None  # when the connection carrying it was closed (by either side)
    finished: bool = False  # its answer was written whole and the connection kept for reuse


class Conn:
    """What a behaviour may do with the connection that carries its request."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        self.reader, self.writer, self.seen = reader, writer, seen
        self.body = seen.body
        self.keep_open = True  # False: close after this answer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, status: int, headers: dict[str, str]) -> None:
        reason = {200: "OK", 400: "Bad Request", 429: "Too Many Requests"}.get(status, "X")
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def chunk(self, data: bytes) -> None:
        await self.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def event(self, obj: dict[str, Any] | str) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        await self.chunk(f"data: {payload}\n\n".encode())

    async def end_chunks(self) -> None:
        await self.send(b"0\r\n\r\n")

    def reset(self) -> None:
        """An RST now: SO_LINGER 0 and close."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        self.keep_open = False

    def close(self) -> None:
        self.writer.close()
        self.keep_open = False

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds` unless the client closes first (then False: stop answering)."""
        try:
            async with asyncio.timeout(seconds):
                data = await self.reader.read(65536)
        except TimeoutError:
            return True
        except ConnectionError:
            data = b""
        if not data:
            self.keep_open = False
            self.seen.closed_at = time.monotonic()
            return False
        return True

    async def until_closed(self, limit: float = 900.0) -> None:
        """Stay silent until the client (hangup) closes the connection."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(limit):
                while await self.reader.read(65536):
                    pass
        self.keep_open = False

    async def json_answer(self, status: int, obj: dict[str, Any], **headers: str) -> None:
        data = json.dumps(obj).encode()
        await self.head(
            status,
            {"content-type": "application/json", "content-length": str(len(data)), **headers},
        )
        await self.send(data)

    async def error(self, status: int, message: str, code: str | None, **headers: str) -> None:
        err = {"message": message, "type": "invalid_request_error", "code": code}
        await self.json_answer(status, {"error": err}, **headers)

    # --- healthy answers ----------------------------------------------------------------
    def words(self) -> tuple[list[str], str]:
        """The words still to generate (after an assistant prefix) and the model to report."""
        words = answer_words()
        messages = self.body.get("messages") or []
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant" and (
            last.get("prefix") or self.body.get("continue_final_message")
        ):
            have = len(str(last.get("content") or "").split())
            words = words[have:]
        return words, str(self.body.get("model"))

    async def stream_head(self) -> None:
        await self.head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})

    def chunk_obj(self, model: str, delta: dict[str, Any], finish: str | None = None) -> Any:
        return {
            "id": "chatcmpl-fault",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    async def healthy_stream(
        self,
        *,
        gap: float = 0.0,
        model: str | None = None,
        words: list[str] | None = None,
        head: bool = True,
        role: bool = True,
    ) -> None:
        todo, asked = self.words()
        todo = todo if words is None else words
        model = model or asked
        if head:
            await self.stream_head()
        if role:
            await self.event(self.chunk_obj(model, {"role": "assistant", "content": ""}))
        for word in todo:
            if gap and not await self.pause(gap):
                return
            await self.event(self.chunk_obj(model, {"content": word}))
        await self.event(self.chunk_obj(model, {}, "stop"))
        if (self.body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": len(todo),
                "total_tokens": 7 + len(todo),
            }
            await self.event({**self.chunk_obj(model, {}), "choices": [], "usage": usage})
        await self.event("[DONE]")
        await self.end_chunks()

    async def healthy_json(self, model: str | None = None) -> None:
        todo, asked = self.words()
        model = model or asked
        await self.json_answer(200, completion(model, "".join(todo)))

    async def healthy(self) -> None:
        if self.seen.stream:
            await self.healthy_stream()
        else:
            await self.healthy_json()


def completion(model: str, text: str) -> dict[str, Any]:
    words = len(text.split())
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": words, "total_tokens": 7 + words},
    }


Behaviour = Callable[[Conn, int], Awaitable[None]]  # (connection, how many times this id came)


async def healthy(conn: Conn, nth: int) -> None:
    await conn.healthy()


@dataclass
class FaultUpstream:
    name: str
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    default: Behaviour = healthy
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    def requests(self, request_id: str) -> list[Seen]:
        return [s for s in self.seen if s.request_id == request_id]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        on_conn: list[Seen] = []
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                headers, body = request
                request_id = headers.get("x-request-id", "")
                behaviour = self.behaviours.get(request_id, self.default)
                nth = len(self.requests(request_id))
                seen = Seen(
                    request_id,
                    str(body.get("model")),
                    bool(body.get("stream")),
                    body,
                    time.monotonic(),
                    getattr(behaviour, "__name__", "?"),
                )
                self.seen.append(seen)
                on_conn.append(seen)
                conn = Conn(reader, writer, seen)
                await behaviour(conn, nth)
                if not conn.keep_open or writer.is_closing():
                    return
                seen.finished = True
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        finally:
            now = time.monotonic()
            for seen in on_conn:
                if seen.closed_at is None:
                    seen.closed_at = now
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[dict[str, str], dict[str, Any]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            raw += data[:-2]
    else:
        raw = bytearray(await reader.readexactly(int(headers.get("content-length", "0"))))
    body = json.loads(raw) if raw else {}
    return headers, body if isinstance(body, dict) else {}


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)
