"""Token accounting end to end against a real inference server (llama.cpp, tiny random model,
CPU): the proxy's counts against the server's own, from its `usage` and its log.

The tiny model never samples EOS, so every request runs to `max_tokens` unless it is cut: what a
cut request would have generated is known exactly (`max_tokens`), which makes the savings
checkable. One server for the module, one slot, requests one at a time.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from proxy.outcome import Outcome, RequestRecord
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.real_upstream import (
    LlamaServer,
    eval_counts,
    sampled_tokens,
    stop_counts,
)
from tests.support import (
    LateFin,
    RawClient,
    RecordSink,
    held_by_this_process,
    make_config,
    socket_inodes_toward,
    wait_until,
)

pytestmark = [pytest.mark.real_upstream, pytest.mark.slow]

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Tell me a very long story."}]
CONTENT_MARK = b'"delta":{"content":"'  # llama.cpp's role chunk has "content":null


def body(max_tokens: int, *, stream: bool, include_usage: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "tiny", "messages": PROMPT, "max_tokens": max_tokens}
    if stream:
        out["stream"] = True
        if include_usage:
            out["stream_options"] = {"include_usage": True}
    return out


async def stream_connection_closed(llama: LlamaServer) -> None:
    """Until the proxy has seen llama-server close the connection of the stream just read.

    llama-server b11434 closes the connection after every streamed answer, although its headers
    say `Keep-Alive: timeout=5, max=100`; a request that reuses the pooled connection before the
    FIN is processed meets a closed connection (the proxy resends it: the test at the end of this
    file forces that race). Waiting for the close keeps the race out of the accounting checks.
    """
    inodes = socket_inodes_toward(llama.port)
    await wait_until(
        lambda: not held_by_this_process(inodes),
        2.0,
        "llama-server to close the connection after a stream (b11434 does)",
    )


async def complete(
    llama: LlamaServer,
    proxy: tuple[ProxyServer, RecordSink],
    request: dict[str, Any],
    request_id: str,
) -> tuple[RequestRecord, int]:
    """Send `request` through the proxy and read it all; return the proxy's record and the
    server's own completion count from its log, checked against its `usage` where the client
    can see one."""
    server, sink = proxy
    offset = len(llama.log_text())
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.port}{CHAT}",
            json=request,
            headers={"x-request-id": request_id},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response,
    ):
        assert response.status == 200, await response.text()
        raw = await response.read()
    record = await sink.wait_for(request_id)
    assert record.outcome is Outcome.COMPLETED, record
    if request.get("stream"):
        await stream_connection_closed(llama)
    assert not record.usage.prompt_estimated and not record.usage.completion_estimated
    await wait_until(lambda: stop_counts(llama, offset) != [], 5.0, "the task's release line")
    (logged,) = eval_counts(llama, offset)
    (n_tokens,) = stop_counts(llama, offset)
    # The log agrees with itself: sampled = n_tokens - prompt + 1 (see tests/real_upstream.py).
    assert sampled_tokens(n_tokens, record.usage.prompt_tokens) == logged
    if not request.get("stream"):
        assert json.loads(raw)["usage"]["completion_tokens"] == logged
    elif request.get("stream_options", {}).get("include_usage"):
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]
        assert events[-1]["choices"] == []
        assert events[-1]["usage"]["completion_tokens"] == logged
    else:
        # The client did not ask for usage: the proxy's injected usage chunk must not show, and
        # the log is the only witness of the server's count.
        assert b'"usage"' not in raw
    return record, logged


@pytest.mark.parametrize(
    ("stream", "include_usage"),
    [(True, False), (True, True), (False, False)],
    ids=["stream", "stream-include-usage", "not-streamed"],
)
async def test_completed_requests_count_what_the_server_counted(
    llama: LlamaServer,
    llama_proxy: tuple[ProxyServer, RecordSink],
    stream: bool,
    include_usage: bool,
) -> None:
    request = body(32, stream=stream, include_usage=include_usage)
    record, server_count = await complete(llama, llama_proxy, request, "real-done")
    assert record.usage.completion_tokens == server_count == 32
    print(
        f"stream={stream} include_usage={include_usage}: proxy {record.usage.completion_tokens},"
        f" server {server_count}, prompt {record.usage.prompt_tokens}"
    )


async def test_a_stream_cut_after_50_chunks_counts_what_the_server_decoded(
    llama: LlamaServer, llama_proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = llama_proxy
    # History: min_samples completed requests whose median is TYPICAL. The short ones sit below
    # the median and keep the warm-up quick; the median ignores how short they are.
    min_samples = server.state.accountant.typical.min_samples
    typical, short = 100, 4
    n_long = min_samples // 2 + 1
    lengths = [typical] * n_long + [short] * (min_samples - n_long)
    prompt = 0
    for i, length in enumerate(lengths):
        kind = i % 3  # stream (usage injected), stream with include_usage, not streamed
        request = body(length, stream=kind < 2, include_usage=kind == 1)
        record, _ = await complete(llama, llama_proxy, request, f"real-warm-{i}")
        assert record.usage.completion_tokens == length
        prompt = record.usage.prompt_tokens
    assert server.state.accountant.typical.typical("default", "tiny") == typical

    max_tokens, cut_at = 2000, 50
    offset = len(llama.log_text())
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(CHAT, body(max_tokens, stream=True), {"x-request-id": "real-cut"})
    await client.read_until(lambda b: b.count(CONTENT_MARK) >= cut_at, timeout=30.0)
    seen = client.received.count(CONTENT_MARK)
    client.close()
    record = await sink.wait_for("real-cut")
    await wait_until(lambda: stop_counts(llama, offset) != [], 5.0, "the cut task's release")
    assert "cancel task" in llama.log_text()[offset:]
    assert eval_counts(llama, offset) == []  # it did not run to the end
    (n_tokens,) = stop_counts(llama, offset)
    decoded = sampled_tokens(n_tokens, prompt)

    assert record.outcome is Outcome.CLIENT_CANCELLED
    generated = record.usage.completion_tokens
    assert record.usage.completion_estimated  # no usage chunk: counted from the chunks
    assert seen <= generated
    assert abs(generated - decoded) <= 3, (generated, decoded)
    savings = record.savings
    assert savings is not None
    assert (savings.basis, savings.expected_tokens) == ("history", typical)
    assert savings.tokens_saved == max(0, typical - generated)
    assert savings.tokens_saved_upper == max_tokens - generated
    # This model would have run to max_tokens: what hanging up really saved is known, and the
    # upper bound is it (to the few tokens in flight); the median estimate is the cautious claim.
    really_saved = max_tokens - decoded
    assert savings.tokens_saved_upper is not None
    assert abs(savings.tokens_saved_upper - really_saved) <= 3
    assert savings.tokens_saved <= really_saved
    print(
        f"cut: client saw {seen}, proxy counted {generated}, server sampled {decoded} "
        f"(n_tokens {n_tokens} - prompt {prompt} + 1); saved {savings.tokens_saved} "
        f"(median {typical}), upper {savings.tokens_saved_upper}, really {really_saved}, "
        f"wasted {savings.tokens_wasted}"
    )


async def test_a_request_right_after_a_stream_does_not_fail_on_the_closed_connection(
    llama: LlamaServer, start_proxy: StartProxy
) -> None:
    """llama-server closes the connection after each stream while advertising keep-alive. A
    request that reuses that pooled connection before the proxy has seen the FIN must be resent
    on a new connection, not answered 502. `LateFin` holds each FIN back until the proxy reuses
    the connection, so the race is lost every time instead of about half the time."""
    late = await LateFin("127.0.0.1", llama.port).start()
    try:
        server, _ = await start_proxy(make_config(late.url))
        url = f"http://127.0.0.1:{server.port}{CHAT}"
        statuses: list[int] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for _ in range(3):
                async with session.post(url, json=body(4, stream=True)) as response:
                    await response.read()
                    assert response.status == 200
                async with session.post(url, json=body(4, stream=False)) as response:
                    await response.read()
                    statuses.append(response.status)
    finally:
        await late.stop()
    assert late.raced == 3  # each follow-up met the closed connection...
    assert statuses == [200] * 3  # ...and was resent, not failed
