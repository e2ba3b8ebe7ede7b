"""A connection's requests run in the connection's own task (proxy/edge/inline_handler.py),
not in a task each, and what that task carries from one request to the next changes nothing:
a deadline's cancel withdrawn by one request leaves the next one's deadline its own (not
taken for a client's disconnect), and a client's disconnect still cancels the request."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import aiohttp
import pytest

from proxy.edge.connections import GuardedRequestHandler
from proxy.outcome import Outcome, TimeoutKind
from proxy.sim import SimulatedProvider
from proxy.state import ProxyState
from tests.conftest import StartProxy, chat
from tests.support import make_config

CHAT = "/v1/chat/completions"


@pytest.fixture
def served_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple[asyncio.Task[Any], Any]]:
    """Each request's task as the relay sees it, with the connection's task beside it."""
    seen: list[tuple[asyncio.Task[Any], Any]] = []
    began = ProxyState.request_began

    def noted(self: ProxyState, task: asyncio.Task[object]) -> None:
        handlers = [h for h in _handlers() if h._current_request is not None]
        assert len(handlers) == 1  # one request at a time in these tests
        seen.append((task, handlers[0]._task_handler))
        began(self, task)

    monkeypatch.setattr(ProxyState, "request_began", noted)
    return seen


def _handlers() -> list[GuardedRequestHandler]:
    return [h for h in gc.get_objects() if isinstance(h, GuardedRequestHandler)]


async def test_a_connections_requests_run_in_its_own_task(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    served_in: list[tuple[asyncio.Task[Any], Any]],
) -> None:
    server, sink = await start_proxy(make_config(sim.base_url))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for n, stream in enumerate((False, True, False)):
            async with session.post(
                server.base_url + CHAT,
                json=chat("normal:tokens=3", stream=stream),
                headers={"x-request-id": f"inline-{n}"},
            ) as answer:
                assert answer.status == 200
                await answer.read()
    for n in range(3):
        assert (await sink.wait_for(f"inline-{n}")).outcome is Outcome.COMPLETED
    tasks = [task for task, _ in served_in]
    assert len(tasks) == 3
    # aiohttp's own loop makes a task for each request: three different ones.
    assert all(task is connection for task, connection in served_in)
    assert len(set(map(id, tasks))) == 1


async def test_each_request_of_a_connection_gets_its_own_deadline(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The connection's task is cancelled by each request's deadline in turn; each cancel is
    withdrawn when its 504 is made, so the next request's deadline is a deadline again (a
    count left behind would make it look like the client's disconnect: no answer at all)."""
    server, sink = await start_proxy(
        make_config(sim.base_url, timeouts={"headers_s": 0.3, "connect_s": 10})
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for n in range(3):
            started = time.monotonic()
            async with session.post(
                server.base_url + CHAT,
                json=chat("slow-headers:delay=30", stream=False),
                headers={"x-request-id": f"late-{n}"},
            ) as answer:
                assert answer.status == 504
                assert b"timeouts.headers_s=0.3" in await answer.read()
            assert time.monotonic() - started < 5.0
        # Still usable after three deadlines.
        async with session.post(
            server.base_url + CHAT, json=chat("normal:tokens=3", stream=False)
        ) as answer:
            assert answer.status == 200
    for n in range(3):
        record = await sink.wait_for(f"late-{n}")
        assert record.outcome is Outcome.TIMEOUT
        assert record.timeout_kind is TimeoutKind.HEADERS


async def test_a_client_that_leaves_still_cancels_its_request(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(make_config(sim.base_url))
    async with aiohttp.ClientSession() as session:
        # One completed request first: the connection's task has served one already.
        async with session.post(
            server.base_url + CHAT, json=chat("normal:tokens=3", stream=False)
        ) as answer:
            assert answer.status == 200
            await answer.read()
        request = asyncio.ensure_future(
            session.post(
                server.base_url + CHAT,
                json=chat("slow-headers:delay=30", stream=False),
                headers={"x-request-id": "leaves"},
            )
        )
        await sim.wait_request("leaves")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await sim.wait_closed("leaves", timeout=2.0)
    record = await sink.wait_for("leaves")
    assert record.outcome is Outcome.CLIENT_CANCELLED
