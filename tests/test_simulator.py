"""The simulated provider over real loopback sockets: shapes, behaviours, records, waits.

Every wait is bounded; timing assertions compare recorded `time.monotonic()` stamps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from proxy.sim import SimulatedProvider, build_app, completion_text, key_fingerprint

CHAT = "/chat/completions"
MESSAGES = [{"role": "user", "content": "say something nice"}]  # 3 words -> 3 + 6 + 3 = 9


@pytest.fixture
async def provider() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(tokens_per_s=2000.0, default_tokens=5) as sim:
        yield sim


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


async def post(
    http: aiohttp.ClientSession,
    sim: SimulatedProvider,
    path: str,
    body: Any,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    hdrs = {**(headers or {}), **({"x-request-id": request_id} if request_id else {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{sim.base_url}{path}", data=data, headers=hdrs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


def at(stamp: float | None) -> float:
    assert stamp is not None
    return stamp


def events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split("\n\n") if e]


def data(raw: bytes) -> list[Any]:
    """The JSON of every `data:` event, [DONE] as the string."""
    out: list[Any] = []
    for e in events(raw):
        for line in e.split("\n"):
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Raw:
    """A bare HTTP/1.1 client, so a test knows the exact moment it closed its socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.buf = reader, writer, b""

    @classmethod
    async def post(
        cls, sim: SimulatedProvider, body: Any, request_id: str, path: str = CHAT
    ) -> Raw:
        assert sim.base_url is not None
        host, port = sim.base_url.split("//")[1].split("/")[0].split(":")
        raw = cls(*await asyncio.open_connection(host, int(port)))
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = (
            f"POST /v1{path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
            f"x-request-id: {request_id}\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        raw.writer.write(head.encode() + payload)
        return raw

    async def read_until(self, done: Callable[[bytes], bool], timeout: float = 2.0) -> bytes:
        async with asyncio.timeout(timeout):
            while not done(self.buf):
                chunk = await self.reader.read(65536)
                assert chunk, f"connection closed; got {self.buf!r}"
                self.buf += chunk
        return self.buf

    def close(self, *, reset: bool = False) -> float:
        if reset:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        closed_at = time.monotonic()
        self.writer.transport.abort()
        return closed_at


# -- chat completions --------------------------------------------------------------------------


async def test_chat_stream_shape_and_exact_counts(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    status, headers, raw = await post(http, provider, CHAT, chat(stream=True), "c1")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "c1"
    chunks = data(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(content) == completion_text(5) and len(content) == 5
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks[:-1])
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks[:-1]
    )
    for line in raw.decode().split("\n\n")[:-2]:  # compact JSON, as OpenAI sends
        text = line.removeprefix("data: ")
        assert json.dumps(json.loads(text), separators=(",", ":")) == text
    rec = await provider.wait_finished("c1")
    assert (rec.end, rec.stream, rec.status) == ("completed", True, 200)
    assert rec.content_tokens_sent == 5 and rec.chunks_sent == 8  # role, 5, finish, [DONE]
    assert rec.seen_at <= at(rec.headers_sent_at) <= at(rec.first_token_at) <= at(rec.finished_at)
    assert await provider.wait_sent_bytes("c1") == raw


async def test_chat_include_usage(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    body = chat(stream=True, max_tokens=3, stream_options={"include_usage": True})
    _, _, raw = await post(http, provider, CHAT, body, "u1")
    chunks = data(raw)
    assert chunks[-1] == "[DONE]"
    *stream, final = chunks[:-1]
    for c in stream:
        assert list(c)[-1] == "usage" and c["usage"] is None
    assert stream[-1]["choices"][0]["finish_reason"] == "length"
    assert final["choices"] == []
    assert final["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_chat_continuous_usage_stats(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, _, raw = await post(http, provider, CHAT, chat(stream=True, stream_options=options))
    chunks = data(raw)[:-1]
    running = [c["usage"]["completion_tokens"] for c in chunks]
    assert running == [0, 1, 2, 3, 4, 5, 5, 5]  # role, 5 tokens, finish, final usage chunk
    assert chunks[-1]["choices"] == []


async def test_chat_non_stream(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    status, _, raw = await post(http, provider, CHAT, chat("gpt-4o-mini:cached=4"), "n1")
    body = json.loads(raw)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == completion_text(5)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    rec = await provider.wait_finished("n1")
    assert (rec.content_tokens_sent, rec.chunks_sent, rec.end) == (5, 0, "completed")


# -- completions, responses, embeddings, models ------------------------------------------------


async def test_completions_stream_and_not(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "prompt": "one two", "max_tokens": 4}
    _, _, raw = await post(http, provider, "/completions", body)
    parsed = json.loads(raw)
    assert parsed["object"] == "text_completion" and parsed["choices"][0][
        "text"
    ] == completion_text(4)
    assert (
        parsed["usage"]["prompt_tokens"] == 2 and parsed["choices"][0]["finish_reason"] == "length"
    )
    options = {"include_usage": True}
    _, _, raw = await post(
        http, provider, "/completions", {**body, "stream": True, "stream_options": options}
    )
    chunks = data(raw)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == completion_text(4)
    assert chunks[-2]["usage"]["completion_tokens"] == 4 and chunks[-2]["choices"] == []
    assert all(c["usage"] is None for c in chunks[:-2])


async def test_responses_stream(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "input": "hi there", "stream": True}
    _, _, raw = await post(http, provider, "/responses", body, "r1")
    evs = events(raw)
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in evs]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = data(raw)
    assert [p["type"] for p in payloads] == kinds
    assert [p["sequence_number"] for p in payloads] == list(range(len(kinds)))
    response = payloads[-1]["response"]
    assert response["id"].startswith("resp_") and response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == completion_text(5)
    assert response["usage"] == {
        "input_tokens": 8,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 13,
    }
    rec = await provider.wait_finished("r1")
    assert rec.response_id == response["id"] and rec.content_tokens_sent == 5


async def test_responses_max_output_tokens_is_incomplete(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "input": "hi", "max_output_tokens": 2}
    _, _, raw = await post(http, provider, "/responses", body)
    response = json.loads(raw)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 2
    _, _, raw = await post(http, provider, "/responses", {**body, "stream": True})
    assert data(raw)[-1]["type"] == "response.incomplete"


async def test_embeddings_are_deterministic(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a b c", "d"]}
    _, _, first = await post(http, provider, "/embeddings", body)
    _, _, second = await post(http, provider, "/embeddings", body)
    parsed = json.loads(first)
    assert first == second
    assert [len(d["embedding"]) for d in parsed["data"]] == [8, 8]
    assert parsed["data"][0]["embedding"] != parsed["data"][1]["embedding"]
    assert parsed["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


async def test_models_and_openai_shaped_errors(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{provider.base_url}/models") as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert "gpt-4o-mini" in ids and "stall" in ids
    cases = [
        ("/nope", chat(), 404, None, "Invalid URL (POST /v1/nope)"),
        (CHAT, b"{not json", 400, None, "parse the JSON"),
        (CHAT, {"messages": []}, 400, "model", "model parameter"),
        (CHAT, {"model": "m"}, 400, "messages", "messages"),
        (CHAT, chat("stall:after=x"), 400, "model", "after must be an integer"),
        (CHAT, chat(max_tokens=-1), 400, "max_tokens", "max_tokens"),
    ]
    for path, body, status, param, message in cases:
        got, _, raw = await post(http, provider, path, body)
        error = json.loads(raw)["error"]
        assert got == status, raw
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and message in error["message"]
    async with http.get(f"{provider.base_url}{CHAT}") as resp:
        assert resp.status == 404


async def test_authorization_is_fingerprinted_never_kept(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    await post(http, provider, CHAT, chat(), "a1", {"Authorization": "Bearer sk-secret-1"})
    await post(http, provider, CHAT, chat())
    rec = await provider.wait_finished("a1")
    assert rec.auth_present and rec.auth_fingerprint == key_fingerprint("sk-secret-1")
    assert "sk-secret-1" not in json.dumps([r.to_dict() for r in provider.requests])
    anonymous = provider.requests[-1]
    assert not anonymous.auth_present and anonymous.request_id.startswith("sim-")


# -- behaviours ----------------------------------------------------------------------------------


async def test_pacing_follows_an_absolute_schedule(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    await post(http, provider, CHAT, chat("normal:rate=200,tokens=40", stream=True), "p1")
    rec = await provider.wait_finished("p1")
    assert rec.first_token_at is not None and rec.last_content_at is not None
    elapsed = at(rec.last_content_at) - at(rec.headers_sent_at)
    assert 0.195 <= elapsed < 0.26, elapsed  # 40 tokens at 200/s, no drift
    await post(http, provider, CHAT, chat("normal:rate=0,tokens=3000", stream=True), "p2")
    assert (await provider.wait_finished("p2")).content_tokens_sent == 3000


async def test_slow_headers(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    for stream in (True, False):
        rid = f"sh-{stream}"
        await post(http, provider, CHAT, chat("slow-headers:delay=0.15", stream=stream), rid)
        rec = await provider.wait_finished(rid)
        assert at(rec.headers_sent_at) - rec.seen_at >= 0.15


async def test_slow_first_token_sends_keepalives(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = chat("slow-first-token:delay=0.2,keepalive=0.05,tokens=2", stream=True)
    _, _, raw = await post(http, provider, CHAT, body, "sft")
    parts = events(raw)
    assert parts[0].startswith("data: ") and '"role"' in parts[0]
    assert parts[1:4] == [": keep-alive"] * 3 and '"content":" the"' in parts[4]
    rec = await provider.wait_finished("sft")
    assert rec.progress.keepalives >= 3 and rec.content_tokens_sent == 2
    assert 0.2 <= at(rec.first_token_at) - at(rec.headers_sent_at) < 0.3


async def test_steady_interval(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    await post(http, provider, CHAT, chat("steady:interval=0.05,tokens=3", stream=True), "st")
    rec = await provider.wait_finished("st")
    assert 0.05 <= at(rec.first_token_at) - at(rec.headers_sent_at) < 0.1
    # Both stamps are taken just after their write: allow a little jitter below the schedule.
    assert 0.095 <= at(rec.last_content_at) - at(rec.first_token_at) < 0.15


async def test_error_statuses(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    status, headers, raw = await post(http, provider, CHAT, chat("error:status=429"), "e1")
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    status, _, raw = await post(http, provider, CHAT, chat("error:status=503", stream=True))
    assert status == 503 and json.loads(raw)["error"]["type"] == "server_error"
    assert (await provider.wait_finished("e1")).end == "error"


async def test_error_after_n_chunks_is_in_band(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    status, _, raw = await post(http, provider, CHAT, chat("error:after=2", stream=True), "e2")
    chunks = data(raw)
    assert status == 200 and len(chunks) == 4  # role, 2 tokens, error; no [DONE]
    assert chunks[-1]["error"]["type"] == "server_error"
    rec = await provider.wait_finished("e2")
    assert (rec.end, rec.content_tokens_sent) == ("error", 2)
    status, _, _ = await post(http, provider, CHAT, chat("error:after=2"), "e3")
    assert status == 500 and (await provider.wait_finished("e3")).tokens_generated == 2


async def test_reset_before_any_byte_and_mid_stream(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientError):
        await post(http, provider, CHAT, chat("reset", stream=True), "x0")
    rec = await provider.wait_finished("x0")
    assert (rec.end, rec.status, rec.chunks_sent) == ("reset", None, 0)
    await provider.wait_closed("x0")
    assert rec.connection is not None and rec.connection.closed_by == "server"
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, provider, CHAT, chat("reset:after=2", stream=True), "x2")
    rec = await provider.wait_finished("x2")
    assert (rec.end, rec.content_tokens_sent) == ("reset", 2)


async def test_malformed_event_then_normal(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    _, _, raw = await post(http, provider, CHAT, chat("malformed:after=1", stream=True), "m1")
    parts = events(raw)
    assert parts[2] == "data: {not json"
    content = [
        json.loads(p[6:])["choices"][0]["delta"]["content"] for p in [parts[1], *parts[3:-2]]
    ]
    assert "".join(content) == completion_text(5)
    assert (await provider.wait_finished("m1")).content_tokens_sent == 5
    _, _, raw = await post(http, provider, CHAT, chat("malformed"))
    assert raw == b"{not json"


async def test_empty_deltas_do_not_count(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    _, _, raw = await post(http, provider, CHAT, chat("empty-deltas:count=2", stream=True), "ed")
    chunks = data(raw)
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [{}, {}]
    rec = await provider.wait_finished("ed")
    assert (rec.content_tokens_sent, rec.chunks_sent) == (5, 10)


async def test_reasoning_tokens(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    body = chat("reasoning:tokens=3", stream=True, stream_options={"include_usage": True})
    _, _, raw = await post(http, provider, CHAT, body, "rs")
    chunks = data(raw)
    reasoning = [c["choices"][0]["delta"]["reasoning_content"] for c in chunks[1:4]]
    assert "".join(reasoning) == completion_text(3)
    usage = chunks[-2]["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 3
    rec = await provider.wait_finished("rs")
    assert (rec.reasoning_tokens_sent, rec.content_tokens_sent) == (3, 5)
    _, _, raw = await post(
        http, provider, "/responses", {"model": "reasoning:tokens=2", "input": "x"}
    )
    assert json.loads(raw)["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


async def test_tool_call_stream(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    _, _, raw = await post(http, provider, CHAT, chat("tool-call", stream=True, tools=tools))
    chunks = data(raw)[:-1]
    calls = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
    assert calls[0][0]["function"]["name"] == "get_weather" and calls[0][0]["id"].startswith(
        "call_"
    )
    arguments = "".join(call[0]["function"]["arguments"] for call in calls if call)
    assert json.loads(arguments) == {"text": completion_text(5)}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_slow_body_by_header_and_by_model(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    payload = json.dumps({**chat(), "pad": "x" * 4000}).encode()
    await post(http, provider, CHAT, payload, "sb1", {"x-sim-behaviour": "slow-body:rate=20000"})
    rec = await provider.wait_finished("sb1")
    assert at(rec.headers_sent_at) - rec.seen_at >= 0.19
    assert rec.body_bytes == len(payload)
    by_model = {"model": "slow-body:rate=20000", "messages": MESSAGES, "pad": "x" * 4000}
    await post(http, provider, CHAT, by_model, "sb2")
    rec = await provider.wait_finished("sb2")
    assert at(rec.headers_sent_at) - rec.seen_at >= 0.19


# -- disconnects and connection records ----------------------------------------------------------


async def test_client_leaving_mid_stream_is_seen_within_50ms(provider: SimulatedProvider) -> None:
    raw = await Raw.post(provider, chat("normal:tokens=100000,rate=200", stream=True), "gone")
    await raw.read_until(lambda b: b.count(b"data: ") >= 4)
    closed_by_client = raw.close()
    closed = await provider.wait_closed("gone")
    assert 0 <= closed - closed_by_client < 0.05
    rec = await provider.wait_finished("gone")
    assert rec.end == "peer_closed" and rec.peer_closed_at is not None
    assert rec.connection is not None and rec.connection.closed_by == "peer"
    assert 3 <= rec.content_tokens_sent < 100


async def test_connection_close_times_are_recorded_within_a_few_ms(
    provider: SimulatedProvider,
) -> None:
    # An idle keep-alive connection (no handler running) and a stalled stream.
    raw = await Raw.post(provider, chat(), "idle")
    await raw.read_until(lambda b: b.rstrip().endswith(b"}"))
    await provider.wait_finished("idle")
    closed_by_client = raw.close()
    assert 0 <= await provider.wait_closed("idle") - closed_by_client < 0.02
    raw = await Raw.post(provider, chat("stall:after=1", stream=True), "stalled")
    await raw.read_until(lambda b: b.count(b"data: ") >= 2)
    closed_by_client = raw.close(reset=True)
    assert 0 <= await provider.wait_closed("stalled") - closed_by_client < 0.02
    assert (await provider.wait_finished("stalled")).content_tokens_sent == 1


async def test_non_streaming_client_leaving_during_generation(provider: SimulatedProvider) -> None:
    raw = await Raw.post(provider, chat("normal:tokens=1000,rate=100"), "ns")
    await provider.wait_request("ns")
    raw.close()
    rec = await provider.wait_finished("ns")
    assert rec.end == "peer_closed" and rec.tokens_generated < 1000
    assert rec.content_tokens_sent == 0 and rec.status is None


async def test_reset_during_a_slow_body_upload_is_seen_at_once(provider: SimulatedProvider) -> None:
    body = {
        "model": "slow-body:rate=65536",
        "messages": [{"role": "user", "content": "x" * 4_000_000}],
    }
    raw = await Raw.post(provider, body, "upload")
    await provider.wait_request("upload")
    closed_by_client = raw.close(reset=True)
    assert await provider.wait_closed("upload") - closed_by_client < 0.05
    rec = await provider.wait_finished("upload")
    assert rec.end == "peer_closed" and rec.body_bytes < 4_000_000


async def test_server_side_close_is_recorded(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    await post(http, provider, CHAT, chat(), "cc", {"Connection": "close"})
    await provider.wait_closed("cc")
    conn = (await provider.wait_finished("cc")).connection
    assert conn is not None and conn.closed_by == "server" and conn.request_ids == ["cc"]


# -- background responses ---------------------------------------------------------------------


async def test_background_job_runs_and_can_be_retrieved(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "input": "hi", "background": True}
    _, _, raw = await post(http, provider, "/responses", body)
    queued = json.loads(raw)
    assert (queued["status"], queued["background"], queued["output"]) == ("queued", True, [])
    job = await provider.wait_job_done(queued["id"])
    assert (job.status, job.tokens_generated) == ("completed", 5)
    async with http.get(f"{provider.base_url}/responses/{queued['id']}") as resp:
        done = await resp.json()
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == completion_text(5)
    assert done["usage"]["output_tokens"] == 5


async def test_background_stream_client_leaving_does_not_stop_the_job(
    provider: SimulatedProvider,
) -> None:
    body = {"model": "normal:tokens=20,rate=200", "input": "hi", "background": True, "stream": True}
    raw = await Raw.post(provider, body, "bg", "/responses")
    buf = await raw.read_until(lambda b: b"response.output_text.delta" in b)
    created = json.loads(buf.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert created["type"] == "response.created"
    assert created["response"]["status"] == "queued"
    raw.close()
    assert (await provider.wait_finished("bg")).end == "peer_closed"
    job = await provider.wait_job_done(created["response"]["id"], timeout=2.0)
    assert (job.status, job.tokens_generated) == ("completed", 20)
    assert provider.cancel_calls == []


async def test_cancel_stops_the_job_at_once(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "normal:tokens=100000,rate=200", "input": "hi", "background": True}
    _, _, raw = await post(http, provider, "/responses", body)
    response_id = json.loads(raw)["id"]
    status, _, raw = await post(http, provider, f"/responses/{response_id}/cancel", b"")
    answered = time.monotonic()
    assert status == 200 and json.loads(raw)["status"] == "cancelled"
    job = provider.jobs[response_id]
    assert job.task is not None and job.task.done()  # generation stopped before the answer
    assert job.cancelled_at is not None and job.cancelled_at <= answered
    call = await provider.wait_cancel_call(response_id)
    assert call.found and call.status_before in ("queued", "in_progress")
    assert (call.status_after, call.tokens_generated) == ("cancelled", job.tokens_generated)
    # Idempotent: cancelling again returns the same, unchanged.
    _, _, again = await post(http, provider, f"/responses/{response_id}/cancel", b"")
    assert json.loads(again)["status"] == "cancelled" and len(provider.cancel_calls) == 2


async def test_cancel_after_completion_returns_it_unchanged(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    _, _, raw = await post(
        http, provider, "/responses", {"model": "m", "input": "x", "background": True}
    )
    response_id = json.loads(raw)["id"]
    await provider.wait_job_done(response_id)
    status, _, raw = await post(http, provider, f"/responses/{response_id}/cancel", b"")
    assert status == 200 and json.loads(raw)["status"] == "completed"
    call = await provider.wait_cancel_call(response_id)
    assert (call.status_before, call.status_after) == ("completed", "completed")
    status, _, raw = await post(http, provider, "/responses/resp_unknown/cancel", b"")
    assert status == 404 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert not (await provider.wait_cancel_call("resp_unknown")).found


async def test_background_stream_can_be_resumed(
    provider: SimulatedProvider, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "input": "x", "background": True, "stream": True}
    _, _, raw = await post(http, provider, "/responses", body)
    response_id = data(raw)[0]["response"]["id"]
    url = f"{provider.base_url}/responses/{response_id}?stream=true&starting_after=5"
    async with http.get(url) as resp:
        resumed = data(await resp.read())
    assert resumed[0]["sequence_number"] == 6 and resumed[-1]["type"] == "response.completed"


# -- recorder over HTTP, retention, lifecycle ----------------------------------------------------


async def test_control_endpoints(provider: SimulatedProvider, http: aiohttp.ClientSession) -> None:
    await post(http, provider, CHAT, chat(stream=True), "h1")
    root = str(provider.base_url).removesuffix("/v1")
    async with http.get(f"{root}/_sim/requests") as resp:
        listed = await resp.json()
    assert [r["request_id"] for r in listed] == ["h1"]  # control calls are not recorded
    async with http.get(f"{root}/_sim/requests/h1") as resp:
        one = await resp.json()
    assert one["content_tokens_sent"] == 5 and one["end"] == "completed"
    async with http.get(f"{root}/_sim/requests/nope") as resp:
        assert resp.status == 404
    async with http.get(f"{root}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["total_requests"] == 1 and stats["content_tokens_sent"] == 5
    assert stats["open_connections"] == 1 and stats["active_requests"] == 0
    async with http.get(f"{root}/_sim/connections") as resp:
        assert len(await resp.json()) == 1
    async with http.get(f"{root}/_sim/jobs") as resp:
        assert await resp.json() == {"jobs": [], "cancel_calls": []}
    async with http.post(f"{root}/_sim/reset") as resp:
        assert resp.status == 200
    assert provider.requests == [] and provider.stats()["total_requests"] == 0


async def test_retention_is_bounded(http: aiohttp.ClientSession) -> None:
    async with SimulatedProvider(tokens_per_s=0, max_records=3) as sim:
        for i in range(5):
            await post(http, sim, CHAT, chat(), f"k{i}")
        assert [r.request_id for r in sim.requests] == ["k2", "k3", "k4"]
        assert sim.request("k0") is None and sim.stats()["total_requests"] == 5


async def test_waits_are_bounded(provider: SimulatedProvider) -> None:
    with pytest.raises(TimeoutError, match="request 'never' arriving"):
        await provider.wait_request("never", timeout=0.05)
    with pytest.raises(TimeoutError, match="cancel call"):
        await provider.wait_cancel_call("resp_x", timeout=0.05)


async def test_stop_ends_streams_and_jobs(http: aiohttp.ClientSession) -> None:
    sim = SimulatedProvider()
    await sim.start()
    raw = await Raw.post(sim, chat("stall", stream=True), "held")
    await sim.wait_request("held")
    _, _, body = await post(
        http, sim, "/responses", {"model": "stall", "input": "x", "background": True}
    )
    await sim.stop()
    rec = sim.request("held")
    assert rec is not None and rec.end == "stopped"
    assert rec.connection is not None and rec.connection.closed_by == "server"
    job = sim.jobs[json.loads(body)["id"]]
    assert job.status == "cancelled" and job.task is not None and job.task.done()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("sim-")]
    raw.close()


async def test_build_app_under_a_test_server(aiohttp_server: AiohttpServer) -> None:
    sim = SimulatedProvider(tokens_per_s=0)
    server = await aiohttp_server(build_app(sim))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            server.make_url("/v1/chat/completions"), json=chat(), headers={"x-request-id": "ba"}
        ) as resp:
            assert (await resp.json())["usage"]["completion_tokens"] == 16
    rec = await sim.wait_finished("ba")
    assert rec.connection is None and rec.end == "completed"


async def test_module_runs_standalone() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.sim",
        "--port",
        "0",
        "--tokens-per-s",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        url = line.decode().split()[-1]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/chat/completions", json=chat(max_tokens=2)) as resp:
                assert (await resp.json())["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
