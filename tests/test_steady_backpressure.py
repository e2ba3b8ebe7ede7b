"""A steady stream's reads taken without waking the pump (proxy/steady_reader.py) keep the
client's backpressure: while the client reads nothing, what hangup holds for it stays within
the pump's bound (the client's transport paused, the pump waiting in its drain, the upstream's
reads buffered up to aiohttp's bound and then paused); once the client reads on, it gets every
byte, and the record counts them. Over real sockets, through the production runner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import pytest
from aiohttp.http_writer import StreamWriter

from proxy import chunked_write, sse_relay, steady_relay
from proxy.downstream import Downstream
from tests.conftest import StartProxy, chat
from tests.hostile_support import ScriptedUpstreams, sse_in_chunks
from tests.support import RawClient, config_from, http_body

TEXT = "x" * 1000
EVENTS = 6000  # ~6.4 MB: far more than the socket buffers and hangup's bounds hold
# The most hangup's transport to the client may hold while the client reads nothing, as the
# pump bounds it: the transport pauses above 64 KiB, aiohttp's count asks for a drain (which
# then waits) once more than 64 KiB went out since the last, and one write more. (Without the
# bound, the stream's megabytes pile up there: 4 MB measured.)
TRANSPORT_MAX = 64 * 1024 + 64 * 1024 + 16 * 1024 + 16


def _chunk(text: str) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def test_a_client_that_stops_reading_holds_the_upstream_back(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    real_take = Downstream.take_steady

    def counted_take(self: Downstream, chunk: bytes) -> bool:
        took = real_take(self, chunk)
        taken.append(took)
        return took

    monkeypatch.setattr(Downstream, "take_steady", counted_take)
    buffered: list[int] = [0]  # the most hangup's transport to the client held after a write
    real_write = chunked_write.write_chunk

    def watched_write(writer: StreamWriter, data: bytes) -> bool:
        drain = real_write(writer, data)
        transport = writer.transport
        if transport is not None:
            buffered[0] = max(buffered[0], transport.get_write_buffer_size())
        return drain

    monkeypatch.setattr(sse_relay, "write_chunk", watched_write)  # the pump's writes
    monkeypatch.setattr(steady_relay, "write_chunk", watched_write)  # the taken reads'
    # The upstream drains each write: it waits while hangup does not read.
    done = asyncio.Event()
    writes = [_chunk(TEXT)] * EVENTS + [b"data: [DONE]\n\n"]
    upstream = await scripted.start(sse_in_chunks(writes, sent=done))
    config = config_from(
        {
            "upstreams": {"sim": {"base_url": upstream.base_url}},
            "routes": [{"name": "default", "upstream": "sim"}],
            "defaults": {"timeouts": {"idle_s": 30}},
        }
    )
    server, sink = await start_proxy(config)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    client = RawClient(reader, writer)
    await client.post_json(
        "/v1/chat/completions",
        chat("m", stream=True, stream_options={"include_usage": True}),
        {"Connection": "close"},
    )
    # The head and the first events, then nothing read, while the upstream writes on (into
    # the sockets' buffers, which hold the rest on loopback; at most a bounded wait).
    await client.read_until(lambda b: b"data: " in b)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 3.0)
    assert 64 * 1024 < buffered[0] <= TRANSPORT_MAX, buffered[0]  # paused, and bounded
    # Reading on, the client gets the whole stream.
    raw = await asyncio.wait_for(client.read_to_eof(timeout=60), 60)
    client.close()
    assert done.is_set()
    body = http_body(raw)
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert contents == [TEXT] * EVENTS
    record = await sink.wait(lambda: next(iter(sink.records), None), 5, "the record")
    assert record.content_chunks == EVENTS
    assert record.bytes_to_client == len(body)
    # The reads went both ways: taken while the client kept up, left to the pump while it
    # did not.
    assert any(taken) and not all(taken), (sum(taken), len(taken))
