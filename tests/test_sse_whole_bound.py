"""An SSE event that cannot pass through is at most 1 MiB (proxy/sse_stream.py `MAX_WHOLE_EVENT`),
over raw sockets against the production runner.

One huge data line passes through as it comes (tests/test_sse_large.py). Any other shape is
completed in one step of the loop, up to ~6 ms of CPU a MiB: an upstream that sends one over 1 MiB
(only a broken or hostile one does) ends the stream with an in-band error, as an event over
16 MiB always did, instead of holding every other request for tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.outcome import Outcome
from proxy.sse_stream import MAX_WHOLE_EVENT
from tests.conftest import StartProxy
from tests.hostile_support import (
    ScriptedUpstreams,
    SeenRequest,
    assert_clean_log,
    chat_body,
    exchange_raw,
    parse_response,
    proxy_before,
    request_bytes,
    sse_head,
)
from tests.support import RawClient

GOOD = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
OVER = MAX_WHOLE_EVENT + 512 * 1024  # 1.5 MiB
HEAD = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],'


def _event_line() -> bytes:
    return b"event: " + b"e" * OVER + b"\n" + HEAD + b'"x":1}\n\n'


def _many_data_lines() -> bytes:
    # Valid JSON once its lines are joined: an array of numbers, a line each.
    return HEAD + b'"pad":[\n' + b"data: 1,\n" * (OVER // 9) + b"data: 1]}\n\n"


def _two_huge_data_lines() -> bytes:
    # The first passes through (over 256 KiB); the second, read whole, is over the bound.
    first, second = b"x" * (512 * 1024), b"y" * OVER
    return HEAD[:-1] + b',"p":"' + first + b'",\ndata: "q":"' + second + b'"}\n\n'


SHAPES = {
    "an event: line": _event_line(),
    "many data lines": _many_data_lines(),
    "two huge data lines": _two_huge_data_lines(),
}


def test_each_shape_is_over_the_bound_and_valid_sse() -> None:
    for name, event in SHAPES.items():
        assert len(event) > MAX_WHOLE_EVENT, name
        assert event.endswith(b"\n\n") and event.count(b"\n\n") == 1, name
        data = b"\n".join(
            line[5:].removeprefix(b" ")
            for line in event.rstrip(b"\n").split(b"\n")
            if line.startswith(b"data:")
        )
        assert isinstance(json.loads(data), dict), name  # a chunk, were it small


@pytest.mark.parametrize("shape", SHAPES)
async def test_an_event_read_whole_over_1_mib_ends_the_stream_in_band(
    shape: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    event = SHAPES[shape]
    client_has_it = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + GOOD)
        await writer.drain()
        async with asyncio.timeout(5):
            await client_has_it.wait()
        for start in range(0, len(event), 64 * 1024):
            writer.write(event[start : start + 64 * 1024])
            await writer.drain()
        writer.write(GOOD + b"data: [DONE]\n\n")
        await writer.drain()

    server, sink, upstream = await proxy_before(reply, scripted, start_proxy)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json("/v1/chat/completions", json.loads(chat_body(stream=True)))
    await client.read_until(lambda got: GOOD in got)
    client_has_it.set()
    response = parse_response(await client.read_until(lambda got: got.endswith(b"0\r\n\r\n")))
    client.close()
    assert response.status == 200
    events = response.body.split(b"\n\n")
    assert events[0] + b"\n\n" == GOOD
    assert b'"upstream_error"' in events[-2], events[-2][:300]
    assert b"over 1 MiB that is not one data line" in events[-2]
    if shape == "two huge data lines":
        # Its first line passed through as it came (what went out cannot be taken back): the
        # cut event, then the error, as for an event cut over 16 MiB.
        assert HEAD in response.body and len(response.body) < len(event)
    else:
        assert len(response.body) < 64 * 1024  # nothing of the huge event went out
    (record,) = await sink.wait(lambda: sink.records or None, 5.0, "the record")
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)

    # The proxy goes on serving.
    upstream.reply = _ordinary
    after = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True))
    )
    assert after.status == 200 and after.body == GOOD + b"data: [DONE]\n\n"


async def _ordinary(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(sse_head() + GOOD + b"data: [DONE]\n\n")
    await writer.drain()
    writer.close()


async def test_one_huge_data_line_of_json_structure_is_still_relayed_whole(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One data line passes through, whatever it holds: one whose bulk is JSON structure (its
    skeleton, the decoder's stand-in for it, as long as itself) is still relayed and read
    whole at its end, not refused, also when its block ends in a later read."""
    caplog.set_level(logging.INFO)
    line = HEAD + b'"pad":[' + b"1," * (OVER // 2) + b"1]}\n"
    rest = b"\n" + b"data: [DONE]\n\n"
    line_out = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + GOOD)
        for start in range(0, len(line), 64 * 1024):
            writer.write(line[start : start + 64 * 1024])
            await writer.drain()
        async with asyncio.timeout(10):
            await line_out.wait()  # the proxy has read the line's end: the block's is later
        writer.write(rest)
        await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(
        reply, scripted, start_proxy, defaults={"include_usage": False}
    )
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json("/v1/chat/completions", json.loads(chat_body(stream=True)))
    await client.read_until(lambda got: b"1]}" in got, timeout=20)
    line_out.set()
    got = await client.read_until(lambda got: got.endswith(b"0\r\n\r\n"), timeout=20)
    client.close()
    response = parse_response(got)
    assert response.status == 200 and response.body == GOOD + line + rest
    (record,) = await sink.wait(lambda: sink.records or None, 5.0, "the record")
    assert record.outcome is Outcome.COMPLETED and record.content_chunks == 2
    assert_clean_log(caplog)
