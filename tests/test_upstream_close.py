"""proxy/upstream.py `OpenAttempt.closed_at_once`: the relay's close of an attempt without a
coroutine when nothing is left to wait for; and the other end of a pooled connection's use,
`send`'s connect without `Connector.connect`'s coroutine: against a scripted upstream on
127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

from proxy.upstream import OpenAttempt
from proxy.upstream_connector import Connector
from tests.hostile_support import OK_BODY, ScriptedUpstream, answer_ok
from tests.upstream_support import open_attempt, upstream_seam


async def _answered(attempt: OpenAttempt) -> None:
    response = await asyncio.wait_for(attempt.start(), 5)
    assert await asyncio.wait_for(response._response.read(), 5) == OK_BODY


async def test_a_usual_answer_is_closed_at_once_and_its_connection_pooled() -> None:
    """A request `send` wrote itself has no writer task: closed in the call, its read
    connection back in the pool for the next attempt."""
    server = await ScriptedUpstream(answer_ok, keep_alive=True).start()
    try:
        async with upstream_seam() as upstreams:
            for _ in range(2):
                attempt = open_attempt(upstreams, server.base_url + "/x", method="POST", body=b"{}")
                await _answered(attempt)
                assert attempt.closed_at_once()
                assert attempt._response is None and attempt._answer is None
                assert attempt.closed_at_once()  # (again: nothing left to close)
    finally:
        await server.stop()
    assert server.connections == 1


async def test_an_answer_with_a_writer_task_still_running_is_left_to_close() -> None:
    """A response aiohttp's own send made, whose body's writer task still runs: nothing is
    done at once (False); `close()` ends the writer and waits for it."""
    server = await ScriptedUpstream(answer_ok, keep_alive=True).start()
    try:
        async with upstream_seam() as upstreams:
            attempt = open_attempt(upstreams, server.base_url + "/x", method="POST", body=b"{}")
            await _answered(attempt)
            response = attempt._response
            assert response is not None
            writing = asyncio.get_running_loop().create_future()
            response._ClientResponse__writer = writing  # type: ignore[attr-defined]
            assert not attempt.closed_at_once()
            assert attempt._response is response and attempt._answer is not None
            await asyncio.wait_for(attempt.close(), 5)
            assert writing.cancelled()  # (aiohttp's `release` cancels it; `close` awaits it)
            assert attempt._response is None and attempt._answer is None
    finally:
        await server.stop()


async def test_an_answer_closed_before_its_body_ended_closes_its_connection() -> None:
    """Closed at once mid-body (the relay gave up on the answer): its connection is closed in
    the call, not left open nor pooled."""

    async def part_of_a_body(seen: object, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    server = await ScriptedUpstream(part_of_a_body, keep_alive=True).start()
    try:
        async with upstream_seam() as upstreams:
            attempt = open_attempt(upstreams, server.base_url + "/x", method="POST", body=b"{}")
            response = await asyncio.wait_for(attempt.start(), 5)
            connection = response._response._connection
            assert connection is not None and connection.protocol is not None
            protocol = connection.protocol
            assert attempt.closed_at_once()
            assert protocol.transport is None  # closed
            assert response._response._connection is None
    finally:
        await server.stop()


async def test_send_takes_another_connection_for_one_the_connector_drops() -> None:
    """`send` runs `Connector.adopt` on what aiohttp's `connect` gave: a pooled connection it
    drops (closed by the upstream while idle) is never written to; a new one is taken, and
    the request is sent once (not resent)."""
    server = await ScriptedUpstream(answer_ok, keep_alive=True).start()
    adopt = Connector.adopt
    offered: list[Any] = []

    def first_dropped(self: Connector, connection: Any, req: Any) -> bool:
        offered.append(connection.protocol)
        if len(offered) == 1:
            connection.close()  # (what `adopt` does with a connection it drops)
            return False
        return adopt(self, connection, req)

    try:
        async with upstream_seam() as upstreams:
            first = open_attempt(upstreams, server.base_url + "/x", method="POST", body=b"{}")
            await _answered(first)
            assert first.closed_at_once()  # pooled
            with mock.patch.object(Connector, "adopt", first_dropped):
                second = open_attempt(upstreams, server.base_url + "/x", method="POST", body=b"{}")
                await _answered(second)
            assert not second.resent
            assert second.closed_at_once()
    finally:
        await server.stop()
    assert len(offered) == 2 and offered[0] is not offered[1]
    assert server.connections == 2
