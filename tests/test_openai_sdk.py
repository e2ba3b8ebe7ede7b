"""The real OpenAI Python SDK through hangup: it works, sync and async, streamed and not, and
every way an SDK user abandons a request closes the upstream connection."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.outcome import Outcome
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider, completion_text
from tests.support import RecordSink

CLOSE_BOUND_S = 0.050
LONG = "normal:tokens=100000,rate=200"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]


def _clients(server: ProxyServer) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    base = f"{server.base_url}/v1"
    return (
        openai.OpenAI(base_url=base, api_key="sk-client", max_retries=0),
        openai.AsyncOpenAI(base_url=base, api_key="sk-client", max_retries=0),
    )


async def _closed_within(sim: SimulatedProvider, request_id: str, left_at: float) -> float:
    """`left_at`: taken just before the SDK call that lets go (close(), leaving the `with`), so
    the lag includes that call and cannot come out negative."""
    closed = await sim.wait_closed(request_id, timeout=2.0)
    lag = closed - left_at
    assert lag >= 0, f"upstream closed {-lag * 1000:.1f} ms before the SDK let go"
    assert lag < CLOSE_BOUND_S, f"upstream closed {lag * 1000:.1f} ms after the SDK let go"
    return lag


async def test_async_stream_and_non_stream_complete(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    sync_client, client = _clients(server)
    sync_client.close()
    stream = await client.chat.completions.create(
        model="normal:tokens=12",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-request-id": "sdk-a-stream"},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == completion_text(12)
    reply = await client.chat.completions.create(
        model="normal:tokens=7", messages=MESSAGES, extra_headers={"x-request-id": "sdk-a-plain"}
    )
    assert reply.choices[0].message.content == completion_text(7)
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    embedding = await client.embeddings.create(model="emb", input=["a b c"])
    assert embedding.data and embedding.usage.prompt_tokens > 0
    await client.close()
    for request_id in ("sdk-a-stream", "sdk-a-plain"):
        assert (await sink.wait_for(request_id)).outcome is Outcome.COMPLETED


async def test_sync_stream_and_non_stream_complete(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    client, async_client = _clients(server)
    await async_client.close()

    def run() -> tuple[str, str | None]:
        with client.chat.completions.create(
            model="normal:tokens=9",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-request-id": "sdk-s-stream"},
        ) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(
            model="normal:tokens=5",
            messages=MESSAGES,
            extra_headers={"x-request-id": "sdk-s-plain"},
        )
        client.close()
        return text, reply.choices[0].message.content

    text, content = await asyncio.to_thread(run)
    assert text == completion_text(9) and content == completion_text(5)
    assert (await sink.wait_for("sdk-s-stream")).outcome is Outcome.COMPLETED


async def test_async_stream_close(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    _, client = _clients(server)
    stream = await client.chat.completions.create(
        model=LONG, messages=MESSAGES, stream=True, extra_headers={"x-request-id": "sdk-close"}
    )
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    left = time.monotonic()
    await stream.close()
    await _closed_within(sim, "sdk-close", left)
    assert (await sink.wait_for("sdk-close")).outcome is Outcome.CLIENT_CANCELLED
    await client.close()


async def test_async_with_block_exit(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    _, client = _clients(server)
    stream = await client.chat.completions.create(
        model=LONG, messages=MESSAGES, stream=True, extra_headers={"x-request-id": "sdk-with"}
    )
    async with stream:
        async for _ in stream:
            left = time.monotonic()
            break  # and out of the `with`: that exit is what closes
    await _closed_within(sim, "sdk-with", left)
    assert (await sink.wait_for("sdk-with")).outcome is Outcome.CLIENT_CANCELLED
    await client.close()


async def test_sync_stream_close_and_with_exit(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    client, async_client = _clients(server)
    await async_client.close()

    def run() -> tuple[float, float]:
        stream = client.chat.completions.create(
            model=LONG,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-request-id": "sdk-s-close"},
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break
        closed = time.monotonic()
        stream.close()
        with client.chat.completions.create(
            model=LONG,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-request-id": "sdk-s-with"},
        ) as stream2:
            for _ in stream2:
                left = time.monotonic()
                break  # and out of the `with`: that exit is what closes
        client.close()
        return closed, left

    closed, left = await asyncio.to_thread(run)
    await _closed_within(sim, "sdk-s-close", closed)
    await _closed_within(sim, "sdk-s-with", left)
    for request_id in ("sdk-s-close", "sdk-s-with"):
        assert (await sink.wait_for(request_id)).outcome is Outcome.CLIENT_CANCELLED


@pytest.mark.parametrize("stream", [False, True])
async def test_cancelling_the_task(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink], stream: bool
) -> None:
    server, sink = proxy
    _, client = _clients(server)
    request_id = f"sdk-cancel-{stream}"

    flowing = asyncio.Event()

    async def call() -> None:
        result = await client.chat.completions.create(
            model=LONG, messages=MESSAGES, stream=stream, extra_headers={"x-request-id": request_id}
        )
        if isinstance(result, openai.AsyncStream):
            received = 0
            async for _ in result:
                received += 1
                if received == 3:
                    flowing.set()

    task = asyncio.create_task(call())
    await sim.wait_request(request_id, timeout=2.0)
    if stream:
        async with asyncio.timeout(2.0):
            await flowing.wait()
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _closed_within(sim, request_id, cancelled_at)
    assert (await sink.wait_for(request_id)).outcome is Outcome.CLIENT_CANCELLED
    await client.close()


async def test_responses_api_stream(
    sim: SimulatedProvider, proxy: tuple[ProxyServer, RecordSink]
) -> None:
    server, sink = proxy
    _, client = _clients(server)
    stream = await client.responses.create(
        model="normal:tokens=6",
        input="Say something.",
        stream=True,
        extra_headers={"x-request-id": "sdk-responses"},
    )
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 6
    record = await sink.wait_for("sdk-responses")
    assert record.outcome is Outcome.COMPLETED and record.usage.completion_tokens == 6
    await client.close()
