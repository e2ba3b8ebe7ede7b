"""A huge SSE event through the production runner: the same bytes and the same accounting as
an ordinary one, while the relay writes it in pieces (proxy/downstream.py `_write_pieces`,
`Pieces`) and cuts its usage member with one copy (proxy/usage/filter.py).

The upstream is a scripted server; the stream holds ordinary chunks around a 3 MiB content
chunk (over the 1 MiB write piece), every chunk with `"usage":null` as OpenAI sends it when
asked, then the finish, the usage chunk and `[DONE]`, all in one write or in small writes.
The client did not ask for usage, so the proxy must hide every usage member and drop the usage
chunk; the configured upstream key inside the huge text must be masked.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.outcome import Outcome
from proxy.usage import chunk_tokens
from tests.conftest import StartProxy
from tests.hostile_support import (
    ScriptedUpstreams,
    SeenRequest,
    assert_clean_log,
    chat_body,
    exchange_raw,
    parse_response,
    proxy_before,
    request_bytes,
    sse_head,
)

KEY = "plainUpstreamKey-7Q2v9X0"
HUGE = 3 * 1024 * 1024


def _chunk(choices: list[object], usage: object) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": choices, "usage": usage}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _content(text: str) -> bytes:
    return _chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}], None)


TEXTS = ["Hello", "x" * (HUGE - len(KEY)) + KEY, " world", "é" * 40]
EVENTS = [
    _chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}], None),
    *(_content(text) for text in TEXTS),
    _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], None),
    _chunk([], {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}),
    b"data: [DONE]\n\n",
]
# What the client must get: no usage member anywhere, no usage chunk, the key masked.
EXPECTED = (
    b"".join(EVENTS[:-2]).replace(b',"usage":null}', b"}").replace(KEY.encode(), b"*" * len(KEY))
    + EVENTS[-1]
)


@pytest.mark.parametrize("writes", ["one write", "64 KiB writes"])
async def test_a_huge_event_reaches_the_client_as_an_ordinary_one_would(
    writes: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    body = b"".join(EVENTS)

    async def stream(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head())
        step = len(body) if writes == "one write" else 64 * 1024
        for start in range(0, len(body), step):
            writer.write(body[start : start + step])
            await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(stream, scripted, start_proxy, upstream={"api_key": KEY})
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)),
        timeout=20,
    )
    assert response.status == 200
    assert response.body == EXPECTED
    record = await sink.wait(lambda: next(iter(sink.records), None), 5.0, "the record")
    assert record.outcome is Outcome.COMPLETED
    assert record.content_chunks == len(TEXTS)
    assert record.bytes_to_client == len(EXPECTED)
    # The upstream reported 7 completion tokens; its figure wins over the estimate...
    assert record.usage is not None and record.usage.completion_tokens == 7
    assert not record.usage.completion_estimated
    assert_clean_log(caplog)


async def test_a_huge_event_without_reported_usage_is_estimated_from_its_text(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """...and without one, the estimate counts the huge chunk by its characters."""
    caplog.set_level(logging.INFO)
    body = b"".join(EVENTS[:-2] + EVENTS[-1:])  # no usage chunk

    async def stream(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + body)
        await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(stream, scripted, start_proxy)
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)),
        timeout=20,
    )
    assert response.body == b"".join(EVENTS[:-2]).replace(b',"usage":null}', b"}") + EVENTS[-1]
    record = await sink.wait(lambda: next(iter(sink.records), None), 5.0, "the record")
    assert record.outcome is Outcome.COMPLETED
    assert record.usage is not None and record.usage.completion_estimated
    assert record.usage.completion_tokens == sum(chunk_tokens(len(t)) for t in TEXTS)
    assert_clean_log(caplog)


async def test_a_huge_event_reaches_the_client_before_its_end_is_sent(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passed through as it arrives (proxy/sse_large.py): the upstream sends 3 of the 4 MiB of
    one event's text and waits; the client gets those megabytes before the rest is sent. Then
    the stream ends as an ordinary one would (usage member cut, usage chunk dropped, the key
    masked)."""
    caplog.set_level(logging.INFO)
    text = "y" * (4 * 1024 * 1024) + KEY
    huge = _content(text)
    events = [EVENTS[0], huge, *EVENTS[-3:]]
    body = b"".join(events)
    split = len(EVENTS[0]) + 3 * 1024 * 1024
    client_has_it = asyncio.Event()

    async def stream(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + body[:split])
        await writer.drain()
        await asyncio.wait_for(client_has_it.wait(), 20)
        writer.write(body[split:])
        await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(stream, scripted, start_proxy, upstream={"api_key": KEY})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    received = bytearray()
    try:
        writer.write(request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)))
        async with asyncio.timeout(20):
            while len(received) < split - 64 * 1024:
                chunk = await reader.read(1 << 20)
                assert chunk, "the stream ended early"
                received += chunk
            client_has_it.set()
            while chunk := await reader.read(1 << 20):
                received += chunk
    finally:
        writer.close()
    response = parse_response(bytes(received))
    want = b"".join(events[:-2]).replace(b',"usage":null}', b"}") + events[-1]
    assert response.body == want.replace(KEY.encode(), b"*" * len(KEY))
    record = await sink.wait(lambda: next(iter(sink.records), None), 5.0, "the record")
    assert record.outcome is Outcome.COMPLETED
    assert record.content_chunks == 1 and record.bytes_to_client == len(want)
    assert record.usage is not None and record.usage.completion_tokens == 7
    assert_clean_log(caplog)


async def test_a_huge_malformed_event_is_relayed_once_it_has_begun(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The documented decision (docs/resilience.md): an event over 256 KiB that turns out not
    to be JSON at its end has gone out in part already; the rest follows, and the stream goes
    on. (A shorter one is dropped, tests/test_hostile_upstreams.py.)"""
    caplog.set_level(logging.INFO)
    broken = b'data: {"choices":[{"delta":{"content":"' + b"z" * (2 * 1024 * 1024) + b"\n\n"
    events = [EVENTS[0], broken, *EVENTS[1:2], *EVENTS[-3:]]

    async def stream(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + b"".join(events))
        await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(stream, scripted, start_proxy, upstream={"api_key": KEY})
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)),
        timeout=20,
    )
    want = b"".join(events[:-2]).replace(b',"usage":null}', b"}") + events[-1]
    assert response.body == want
    record = await sink.wait(lambda: next(iter(sink.records), None), 5.0, "the record")
    assert record.outcome is Outcome.COMPLETED and record.content_chunks == 1
    assert_clean_log(caplog)
