"""Prompt tokens against the real llama.cpp server: reported when it reports them, counted by
its own tokenizer (`/apply-template` + `/tokenize`) when a stream is cut before its usage.

The server's own prompt count for a message list is the `prompt_tokens` it reports for a
completed request with the same messages; its completion count for a cut stream comes from its
log (`stop processing: n_tokens` - prompt + 1, see tests/real_upstream.py).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from proxy.config import HangupConfig
from proxy.outcome import Outcome, RequestRecord
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.metrics_support import scrape, value
from tests.real_upstream import LlamaServer, available, sampled_tokens, stop_counts
from tests.support import RawClient, RecordSink, config_from, wait_until

pytestmark = [pytest.mark.real_upstream, pytest.mark.slow]

_why_not = available()
if _why_not is not None:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

CHAT = "/v1/chat/completions"
CONTENT_MARK = b'"delta":{"content":"'
MESSAGES = {
    "one user message": [{"role": "user", "content": "Tell me a very long story."}],
    "system and user": [
        {"role": "system", "content": "You are terse, and you answer in French."},
        {"role": "user", "content": "Tell me a very long story about seven birds."},
    ],
}


def config(llama: LlamaServer, engine: str) -> HangupConfig:
    return config_from(
        {
            "upstreams": {"llama": {"base_url": llama.base_url, "engine": engine}},
            "routes": [{"name": "default", "upstream": "llama"}],
        }
    )


async def server_counts(
    proxy: ProxyServer, messages: list[dict[str, str]], *, stream: bool, request_id: str
) -> tuple[int, int, bytes]:
    """A completed request through the proxy: the server's (prompt, completion) from the usage
    the client sees (streams ask for it), and the raw body."""
    request: dict[str, Any] = {"model": "tiny", "messages": messages, "max_tokens": 8}
    if stream:
        request |= {"stream": True, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.base_url}{CHAT}",
            json=request,
            headers={"x-request-id": request_id},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response,
    ):
        assert response.status == 200
        raw = await response.read()
    if stream:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]
        usage = events[-1]["usage"]
    else:
        usage = json.loads(raw)["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], raw


async def reference_counts(
    llama: LlamaServer, server: ProxyServer, messages: list[dict[str, str]], request_id: str
) -> tuple[int, int, bytes]:
    """`server_counts` of a non-streamed request, returned once the server has released its
    task: its release line can come after the answer, into the next measurement's log window."""
    offset = len(llama.log_text())
    counts = await server_counts(server, messages, stream=False, request_id=request_id)
    await wait_until(lambda: stop_counts(llama, offset) != [], 5.0, "the reference's release")
    return counts


async def cut_stream(
    llama: LlamaServer,
    server: ProxyServer,
    sink: RecordSink,
    messages: list[dict[str, str]],
    request_id: str,
    after: int = 10,
) -> tuple[RequestRecord, int]:
    """Stream, hang up after `after` content chunks; the record and the tokens the server
    sampled for it (from its log)."""
    offset = len(llama.log_text())
    client = await RawClient.connect("127.0.0.1", server.port)
    request = {"model": "tiny", "messages": messages, "max_tokens": 2000, "stream": True}
    await client.post_json(CHAT, request, {"x-request-id": request_id})
    await client.read_until(lambda b: b.count(CONTENT_MARK) >= after, timeout=30.0)
    client.close()
    record = await sink.wait_for(request_id, timeout=10.0)
    await wait_until(lambda: stop_counts(llama, offset) != [], 5.0, "the cut task's release")
    (n_tokens,) = stop_counts(llama, offset)
    return record, n_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["not-streamed", "stream"])
async def test_completed_requests_record_the_servers_own_counts(
    llama: LlamaServer, start_proxy: StartProxy, stream: bool
) -> None:
    server, sink = await start_proxy(config(llama, "llamacpp"))
    for name, messages in MESSAGES.items():
        rid = f"done-{stream}-{len(messages)}"
        prompt, completion, _ = await server_counts(server, messages, stream=stream, request_id=rid)
        record = await sink.wait_for(rid)
        assert record.outcome is Outcome.COMPLETED
        usage = record.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion), name
        assert usage.prompt_source == "reported" and usage.completion_source == "reported"


async def test_a_cut_streams_prompt_is_counted_exactly_by_the_engines_tokenizer(
    llama: LlamaServer, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hangup.access")
    server, sink = await start_proxy(config(llama, "llamacpp"))
    tokenized_total = 0
    for i, (name, messages) in enumerate(MESSAGES.items()):
        prompt, _, _ = await reference_counts(llama, server, messages, f"ref-{i}")
        record, n_tokens = await cut_stream(llama, server, sink, messages, f"cut-{i}")
        assert record.outcome is Outcome.CLIENT_CANCELLED
        usage = record.usage
        # The prompt: exactly the server's own count, and labelled as tokenized.
        assert usage.prompt_tokens == prompt, (name, usage, prompt)
        assert usage.prompt_source == "tokenized" and record.tokenizer == "llamacpp"
        # The completion: counted from the chunks, within 3 of what the server sampled.
        sampled = sampled_tokens(n_tokens, prompt)
        assert usage.completion_estimated and abs(usage.completion_tokens - sampled) <= 3
        (line,) = [
            fields
            for r in caplog.records
            if r.name == "hangup.access"
            and isinstance(fields := getattr(r, "fields", None), dict)
            and fields.get("request_id") == f"cut-{i}"
        ]
        assert line["tokens"]["prompt"] == prompt
        assert line["tokens"]["prompt_source"] == "tokenized"
        tokenized_total += prompt
        print(
            f"{name}: server prompt {prompt}, proxy tokenized {usage.prompt_tokens} "
            f"(heuristic would say {record.prompt_estimate}); completion proxy "
            f"{usage.completion_tokens}, server sampled {sampled}"
        )
    s = await scrape(server)
    counted = value(s, "hangup_prompt_tokens_tokenized_total", route="default", model="tiny")
    assert counted == tokenized_total


async def test_without_the_engine_key_the_prompt_stays_an_estimate(
    llama: LlamaServer, start_proxy: StartProxy
) -> None:
    """The control: the same cut stream on a `generic` upstream keeps the heuristic, which is
    not the server's count, so the test above passes because of the engine's tokenizer."""
    server, sink = await start_proxy(config(llama, "generic"))
    messages = MESSAGES["one user message"]
    prompt, _, _ = await reference_counts(llama, server, messages, "ref")
    record, _ = await cut_stream(llama, server, sink, messages, "cut-generic")
    assert record.usage.prompt_source == "estimated"
    assert record.usage.prompt_tokens == record.prompt_estimate != prompt


async def test_a_non_streamed_request_cut_before_its_answer_gets_the_exact_prompt(
    llama: LlamaServer, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(config(llama, "llamacpp"))
    messages = MESSAGES["system and user"]
    prompt, _, _ = await reference_counts(llama, server, messages, "ref-plain")
    offset = len(llama.log_text())
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        CHAT, {"model": "tiny", "messages": messages, "max_tokens": 2000}, {"x-request-id": "gone"}
    )
    # The server has started on it (its log says so) before the client gives up.
    await wait_until(lambda: "launch_slot_" in llama.log_text()[offset:], 10.0, "the task")
    client.close()
    record = await sink.wait_for("gone", timeout=10.0)
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.usage.prompt_tokens == prompt and record.usage.prompt_source == "tokenized"
    await wait_until(lambda: stop_counts(llama, offset) != [], 10.0, "the cut task's release")
