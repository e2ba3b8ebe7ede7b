"""proxy/admission.py: a small body all of which arrived before the handler ran is taken
without `read_body`'s coroutines (`read_arrived`); one still arriving is read by `read_body`,
as before. Through the production runner before a scripted upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import proxy.admission
import proxy.edge.body
from tests.conftest import StartProxy
from tests.hostile_support import (
    ScriptedUpstreams,
    answer_ok,
    chat_body,
    exchange_raw,
    proxy_before,
    request_bytes,
)
from tests.support import RawClient


@contextmanager
def reads_counted() -> Iterator[tuple[list[int], asyncio.Event]]:
    """Calls of admission's `read_body` (the body's length announced), and an event set at
    the first."""
    calls: list[int] = []
    called = asyncio.Event()
    read_body = proxy.edge.body.read_body

    async def counted(request: Any, limits: Any, encoding: Any, length: Any) -> Any:
        calls.append(length)
        called.set()
        return await read_body(request, limits, encoding, length)

    with mock.patch.object(proxy.admission, "read_body", counted):
        yield calls, called


async def test_a_body_that_arrived_with_its_head_is_taken_without_read_body(
    scripted: ScriptedUpstreams, start_proxy: StartProxy
) -> None:
    server, sink, upstream = await proxy_before(answer_ok, scripted, start_proxy)
    body = chat_body()
    with reads_counted() as (calls, _):
        response = await exchange_raw(
            server.port, request_bytes("POST", "/v1/chat/completions", body=body)
        )
    assert response.status == 200
    assert calls == []
    record = await sink.wait(lambda: sink.records[0] if sink.records else None, 5, "a record")
    assert record.bytes_from_client == len(body)
    assert upstream.requests[0].body == body


async def test_a_body_still_arriving_is_read_and_its_wait_is_the_clients(
    scripted: ScriptedUpstreams, start_proxy: StartProxy
) -> None:
    server, sink, upstream = await proxy_before(answer_ok, scripted, start_proxy)
    body = chat_body()
    half = len(body) // 2
    with reads_counted() as (calls, called):
        client = await RawClient.connect("127.0.0.1", server.port)
        client.send_head(
            "POST", "/v1/chat/completions", {"Content-Type": "application/json"}, len(body)
        )
        client.writer.write(body[:half])
        await client.writer.drain()
        await asyncio.wait_for(called.wait(), 5)  # the handler waits for the rest
        client.writer.write(body[half:])
        await client.writer.drain()
        await client.read_until(lambda got: b"\r\n\r\n" in got, what="the answer's head")
        client.writer.close()
    assert calls == [len(body)]
    record = await sink.wait(lambda: sink.records[0] if sink.records else None, 5, "a record")
    assert record.bytes_from_client == len(body)
    assert upstream.requests[0].body == body
