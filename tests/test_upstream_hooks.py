"""What the connector tells an attempt about its send (`AttemptHooks`, carried by the attempt's
request): the transport it got, whether the connection came from the pool, when the request
went out; and that nothing else sent in the same task (a control call, a background cancel)
is told to that attempt. The resend rule reads these facts (proxy/upstream.py's doc)."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.upstream import OpenAttempt, Upstreams
from tests.hostile_support import ScriptedUpstreams, SeenRequest, json_head
from tests.upstream_support import open_attempt

OK = b'{"ok": true}'


@pytest.fixture
async def keep_alive_upstream(scripted: ScriptedUpstreams) -> str:
    """A server on 127.0.0.1 that keeps its connections alive."""

    async def answer(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(json_head(len(OK)) + OK)
        await writer.drain()

    upstream = await scripted.start(answer, keep_alive=True)
    return upstream.base_url + "/chat/completions"


def _attempt(upstreams: Upstreams, url: str, sent: list[int]) -> OpenAttempt:
    return open_attempt(
        upstreams,
        url,
        method="POST",
        headers=CIMultiDict({"Content-Type": "application/json"}),
        body=b'{"model":"m"}',
        on_headers_sent=lambda: sent.append(1),
    )


async def _answered(attempt: OpenAttempt) -> None:
    answer = await asyncio.wait_for(attempt.start(), 5)
    assert answer.status == 200
    assert await asyncio.wait_for(answer.read(), 5) == OK


async def test_each_attempt_learns_its_own_transport_reuse_and_send_time(
    upstreams: Upstreams, keep_alive_upstream: str
) -> None:
    sent: list[int] = []
    first = _attempt(upstreams, keep_alive_upstream, sent)
    try:
        await _answered(first)
        hooks = first._hooks
        assert hooks.transport is not None and not hooks.reused  # a fresh connection
        assert hooks.sent_at is not None and sent == [1]
        transport = hooks.transport
    finally:
        await first.close()  # read to its end: the connection goes back to the pool

    second = _attempt(upstreams, keep_alive_upstream, sent)
    try:
        await _answered(second)
        hooks = second._hooks
        assert hooks.reused and hooks.transport is transport  # the pooled one
        assert hooks.sent_at is not None and sent == [1, 1]
        told = (hooks.transport, hooks.reused, hooks.sent_at)
        # A control call in this same task while the attempt is open: its connection and
        # its send are not the attempt's.
        status, _ = await asyncio.wait_for(
            upstreams.post_empty(URL(keep_alive_upstream), CIMultiDict()), 5
        )
        assert status == 200
        assert (hooks.transport, hooks.reused, hooks.sent_at) == told
        assert sent == [1, 1]
    finally:
        await second.close()
