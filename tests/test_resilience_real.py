"""The resend rule against the real llama.cpp server, which closes the connection after every
streamed answer while advertising keep-alive: a request sent right behind a stream must be
answered (the stale pooled connection is never the client's problem) and processed once."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.attempts import AttemptResult
from proxy.server import ProxyServer
from tests.real_upstream import LlamaServer, available, stop_counts
from tests.support import RecordSink, wait_until

pytestmark = [pytest.mark.real_upstream, pytest.mark.slow]

_why_not = available()
if _why_not is not None:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

PROMPT = [{"role": "user", "content": "Say hello."}]


async def test_back_to_back_requests_behind_a_stream_are_answered_once_each(
    llama: LlamaServer, llama_proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = llama_proxy
    offset = len(llama.log_text())
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    rounds = 5
    async with aiohttp.ClientSession() as session:
        for i in range(rounds):
            for stream in (True, False):
                body = {"model": "tiny", "messages": PROMPT, "max_tokens": 4, "stream": stream}
                async with session.post(
                    url, json=body, headers={"x-request-id": f"real-{i}-{stream}"}
                ) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
    for i in range(rounds):
        for stream in (True, False):
            record = await sink.wait_for(f"real-{i}-{stream}")
            assert [a.result for a in record.attempts] == [AttemptResult.OK]
    # Every request was processed by llama-server exactly once: no double generation. (Its
    # log is written as it goes: wait for the last line, then check none came twice.)
    await wait_until(
        lambda: len(stop_counts(llama, offset)) >= 2 * rounds, 5.0, "llama-server's log lines"
    )
    assert len(stop_counts(llama, offset)) == 2 * rounds
