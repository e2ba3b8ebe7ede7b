"""End to end against a real inference server (llama.cpp, tiny model, CPU): hanging up through
hangup stops generation. The server's own CPU time is the witness."""

from __future__ import annotations

import asyncio

import pytest

from proxy.server import ProxyServer
from tests.real_upstream import LlamaServer, idle_after
from tests.support import RawClient, RecordSink

pytestmark = [pytest.mark.real_upstream, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "Tell me a very long story."}]


async def _assert_server_idles(llama: LlamaServer, within_s: float) -> float:
    idle_from, samples = await asyncio.to_thread(idle_after, llama.pid, 2.5)
    assert idle_from is not None, (
        f"llama-server still generating 2.5 s after the hang-up: {samples}"
    )
    assert idle_from <= within_s, f"idle only {idle_from:.2f}s after the hang-up: {samples}"
    return idle_from


async def test_stream_cut_after_20_chunks_stops_generation(
    llama: LlamaServer, llama_proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = llama_proxy
    log_offset = len(llama.log_text())
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions",
        {"model": "tiny", "messages": PROMPT, "max_tokens": 2000, "stream": True},
        {"x-request-id": "real-stream-cut"},
    )
    await client.read_until(lambda b: b.count(b"data: ") >= 20, timeout=60)
    client.close()
    idle_from = await _assert_server_idles(llama, within_s=1.0)
    record = await sink.wait_for("real-stream-cut")
    assert record.outcome is not None and record.outcome.value == "client_cancelled"
    # llama-server's own log says it cancelled the task (not that it finished 2000 tokens).
    assert "cancel task" in llama.log_text()[log_offset:]
    assert llama.stopped_at_tokens(log_offset) is not None
    print(f"stream: server idle {idle_from:.2f}s after the hang-up")


async def test_non_stream_cut_after_1_5s_stops_generation(
    llama: LlamaServer, llama_proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = llama_proxy
    log_offset = len(llama.log_text())
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions",
        {"model": "tiny", "messages": PROMPT, "max_tokens": 2000},
        {"x-request-id": "real-nonstream-cut"},
    )
    await asyncio.sleep(1.5)  # the scenario itself: hang up after 1.5 s of generation
    # Still generating: the proxy has no record of it yet. (The client reads nothing, so its
    # buffer could not tell; an answer complete this early would show as a record here.)
    assert not sink.by_id("real-nonstream-cut"), "the 2000-token answer was ready after 1.5 s"
    client.close()
    # llama-server notices a closed non-streaming request at its next 1-s poll.
    idle_from = await _assert_server_idles(llama, within_s=1.0)
    record = await sink.wait_for("real-nonstream-cut")
    assert record.outcome is not None and record.outcome.value == "client_cancelled"
    assert "cancel task" in llama.log_text()[log_offset:]
    print(f"non-stream: server idle {idle_from:.2f}s after the hang-up")
