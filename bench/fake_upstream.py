"""A fake OpenAI-compatible upstream that costs little: raw asyncio protocol on uvloop (when
installed), fixed answers from memory, so a saturating run measures the proxies, not it.

`python -m bench.fake_upstream --port P`

Answers are fixed bytes shaped like OpenAI's: a ~550 B chat completion with usage, or (request
header `x-bench-events: N`) a chunked `text/event-stream` of N events: role chunk, content
chunks, finish chunk, usage chunk and `[DONE]`, every chunk with `"usage":null` as OpenAI sends
when `include_usage` was asked for (hangup asks). The proxies forward the header; the path and
body stay those of a chat request, so hangup's accounting sees an ordinary stream.

`x-bench-content-bytes: B` makes the completion's content, or each content chunk's, B bytes
long (large answers, huge events). `x-bench-logprobs-tokens: N` answers a Responses stream
whose `response.completed` carries N tokens' logprobs. `x-bench-gap-ms: G` writes the
events G ms apart, each in its own chunk, so that every event is one read at the proxy, as
with a real model generating tokens; without it the events go out in one write. Request
bodies are read (Content-Length only, as every client here sends) and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from bench.common import HOST, Child, Procs, free_port, wait_http

MODEL = "gpt-4o-mini-2024-07-18"
MAX_HEAD = 64 * 1024


def request_body(*, stream: bool) -> bytes:
    """The chat request the wrk-family benchmarks send (bench.wrk, bench.perevent,
    bench.event_instructions): what it asks for does not matter, this upstream answers from
    memory; one body, so that their figures are of the same request."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def chat_body(content_bytes: int = 0) -> bytes:
    answer = {
        "id": "chatcmpl-CQ4m2bW7n1sVx0K9qTzR3yLhP8dEa",
        "object": "chat.completion",
        "created": 1795460000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "x" * content_bytes
                    if content_bytes
                    else "Hello! How can I help you today? I am a small fixed answer.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 14,
            "completion_tokens": 16,
            "total_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "system_fingerprint": "fp_560af6e559",
    }
    return json.dumps(answer, separators=(",", ":")).encode()


def _chunk(choices: list[object], usage: object) -> bytes:
    obj = {
        "id": "chatcmpl-CQ4m2bW7n1sVx0K9qTzR3yLhP8dEa",
        "object": "chat.completion.chunk",
        "created": 1795460000,
        "model": MODEL,
        "system_fingerprint": "fp_560af6e559",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events(events: int, content_bytes: int = 0) -> list[bytes]:
    """`events` SSE events: role, events - 4 content chunks, finish, usage, [DONE]."""
    if events < 5:
        raise ValueError("a stream has at least 5 events")
    words = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
    if content_bytes:
        words = ["x" * content_bytes]
    content = events - 4
    out = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}], None)]
    for i in range(content):
        delta = {"content": words[i % len(words)]}
        out.append(_chunk([{"index": 0, "delta": delta, "finish_reason": None}], None))
    out.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], None))
    usage = {"prompt_tokens": 14, "completion_tokens": content, "total_tokens": 14 + content}
    out.append(_chunk([], usage))
    out.append(b"data: [DONE]\n\n")
    return out


def responses_events(tokens: int) -> list[bytes]:
    """A Responses stream (`/v1/responses`) of `tokens` one-word deltas whose
    `response.completed` repeats the output with each token's logprobs and five alternatives,
    as an upstream asked for `include: ["message.output_text.logprobs"]` sends it (~360 B a
    token: 40,000 tokens make a 13.7 MiB event)."""

    def event(name: str, obj: object) -> bytes:
        data = json.dumps({"type": name, **obj}, separators=(",", ":"))  # type: ignore[dict-item]
        return f"event: {name}\ndata: {data}\n\n".encode()

    head = {"id": "resp_bench", "object": "response", "model": MODEL, "status": "in_progress"}
    out = [event("response.created", {"response": {**head, "output": []}})]
    for _ in range(min(tokens, 8)):
        out.append(event("response.output_text.delta", {"output_index": 0, "delta": " tok"}))
    top = [{"token": " alt", "logprob": -2.5, "bytes": [32, 97, 108, 116]}] * 5
    logprobs = [{"token": " tok", "logprob": -0.125, "bytes": [32, 116, 111, 107],
                 "top_logprobs": top}] * tokens  # fmt: skip
    text = {"type": "output_text", "text": " tok" * tokens, "logprobs": logprobs}
    message = {"type": "message", "role": "assistant", "content": [text]}
    usage = {"input_tokens": 14, "output_tokens": tokens, "total_tokens": 14 + tokens}
    done = {**head, "status": "completed", "output": [message], "usage": usage}
    out.append(event("response.completed", {"response": done}))
    return out


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chat_response(content_bytes: int = 0) -> bytes:
    body = chat_body(content_bytes)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


_CHAT_RESPONSE = _chat_response()
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_END = b"0\r\n\r\n"
_streams: dict[tuple[int, int], list[bytes]] = {}


def _stream(events: int, content_bytes: int) -> list[bytes]:
    s = _streams.get((events, content_bytes))
    if s is None:
        s = [_chunked(e) for e in stream_events(events, content_bytes)]
        _streams[(events, content_bytes)] = s
    return s


def _logprobs_stream(tokens: int) -> list[bytes]:
    s = _streams.get((-1, tokens))
    if s is None:
        s = _streams[(-1, tokens)] = [_chunked(e) for e in responses_events(tokens)]
    return s


class FakeUpstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (no pipelining needed)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body_left = 0
        self.pending: tuple[int, float, int] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self.timer is None:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                del self.buf[:take]
                self.body_left -= take
                if self.body_left:
                    return
                self._answer()
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            events, gap, length, size = 0, 0.0, 0, 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-bench-events":
                    events = int(value)
                elif name == b"x-bench-gap-ms":
                    gap = float(value) / 1000
                elif name == b"x-bench-content-bytes":
                    size = int(value)
                elif name == b"x-bench-logprobs-tokens":
                    events, size = -1, int(value)
            if head.startswith(b"get /healthz"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            self.pending = (events, gap, size)
            self.body_left = length
            if not length:
                self._answer()

    def _answer(self) -> None:
        assert self.transport is not None and self.pending is not None
        events, gap, size = self.pending
        self.pending = None
        if not events:
            self.transport.write(_chat_response(size) if size else _CHAT_RESPONSE)
            return
        chunks = _stream(events, size) if events > 0 else _logprobs_stream(size)
        if gap <= 0:
            self.transport.write(_SSE_HEAD + b"".join(chunks) + _END)
            return
        self.transport.write(_SSE_HEAD)
        self._paced(chunks, 0, gap)

    def _paced(self, chunks: list[bytes], i: int, gap: float) -> None:
        self.timer = None
        if self.transport is None:
            return
        if i == len(chunks):
            self.transport.write(_END)
            if self.buf:  # a request that arrived meanwhile
                self.data_received(b"")
            return
        self.transport.write(chunks[i])
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(gap, self._paced, chunks, i + 1, gap)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, HOST, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


def start(procs: Procs) -> Child:
    port = free_port()
    child = procs.spawn(
        "fake-upstream", [sys.executable, "-m", "bench.fake_upstream", "--port", str(port)]
    )
    child.url = f"http://{HOST}:{port}"
    wait_http(child.url + "/healthz", child.proc)
    return child


if __name__ == "__main__":
    main()
