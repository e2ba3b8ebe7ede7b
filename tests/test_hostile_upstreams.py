"""Broken and hostile upstreams, over raw sockets, against the production runner (issue 13).

The upstream is a scripted server that writes exact bytes (malformed heads, endless nesting,
gzip bombs, an echoed key, framing cut by FIN or RST). Each test asserts the exact status or
the clean cut the client sees, the record's outcome, no ERROR line and one access line.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging

import pytest
from aiohttp import web

from proxy.outcome import Outcome
from proxy.server import ProxyServer
from tests import hostile_support
from tests.conftest import StartProxy
from tests.hostile_support import (
    Reply,
    ScriptedUpstream,
    ScriptedUpstreams,
    SeenRequest,
    assert_clean_log,
    chat_body,
    exchange_raw,
    json_head,
    parse_response,
    request_bytes,
    reset,
    send_and_close,
    sse_head,
)
from tests.support import RawClient, RecordSink, config_from

UPSTREAM_KEY = "plainUpstreamKey-7Q2v9X0"  # not sk- shaped: pattern redaction misses it
HEADER_SECRET = "org-header-secret-K8p3Zt"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def proxy_before(
    reply: Reply, scripted: ScriptedUpstreams, start_proxy: StartProxy, **extra: object
) -> tuple[ProxyServer, RecordSink, ScriptedUpstream]:
    """The proxy before a scripted upstream whose configured key and header it must never
    let out."""
    upstream = {"api_key": UPSTREAM_KEY, "headers": {"OpenAI-Organization": HEADER_SECRET}}
    return await hostile_support.proxy_before(
        reply, scripted, start_proxy, upstream=upstream, **extra
    )


async def only_record(sink: RecordSink) -> Outcome | None:
    await sink.wait(lambda: sink.records, 5.0, "no record")
    (record,) = sink.records
    return record.outcome


# --- item 5: what an upstream sends never becomes internal_error --------------------------------


async def test_a_control_byte_in_an_upstream_header_is_a_502(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Bad: a\x01b\r\n"
    reply = send_and_close(head + b"Content-Length: 2\r\n\r\n{}")
    server, sink, _ = await proxy_before(reply, scripted, start_proxy)
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body())
    )
    assert response.status == 502
    assert response.error()["code"] == "upstream_failed"
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


async def test_an_sse_event_nested_50k_deep_ends_the_stream_with_an_error_event(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    client_has_it = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + good)
        await writer.drain()
        async with asyncio.timeout(5):
            await client_has_it.wait()  # the unreadable event comes in a read of its own
        writer.write(b"data: " + b"[" * 50_000 + b"\n\n")
        await writer.drain()

    server, sink, _ = await proxy_before(reply, scripted, start_proxy)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json("/v1/chat/completions", json.loads(chat_body(stream=True)))
    await client.read_until(lambda got: good in got)
    client_has_it.set()
    response = parse_response(await client.read_until(lambda got: got.endswith(b"0\r\n\r\n")))
    client.close()
    assert response.status == 200
    assert good in response.body
    events = response.body.split(b"\n\n")
    assert b'"upstream_error"' in events[-2] and b"nested too deeply" in events[-2]
    assert b"[" * 100 not in response.body  # the unreadable event is not passed on
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


async def test_a_gzip_bomb_in_a_json_answer_is_relayed_as_sent(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # 1 GiB of zeros inside a JSON string, ~1 MiB compressed.
    inner = gzip.compress(b'{"choices":[{"message":{"content":"' + b"0" * (256 << 20), 9)
    bomb = inner * 4  # gzip members concatenate: 1 GiB once inflated
    reply = send_and_close(json_head(len(bomb), "Content-Encoding: gzip\r\n") + bomb)
    server, sink, _ = await proxy_before(reply, scripted, start_proxy)
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body())
    )
    assert response.status == 200
    assert response.body == bomb  # byte-faithful, still compressed
    assert await only_record(sink) is Outcome.COMPLETED
    assert_clean_log(caplog)


async def test_a_client_gone_while_the_response_head_is_written_is_client_cancelled(
    scripted: ScriptedUpstreams, caplog: pytest.LogCaptureFixture
) -> None:
    # The client's socket closes exactly while the relay writes the response head: a prepare
    # hook (run inside StreamResponse.prepare, before the head is written) closes it.
    upstream = await scripted.start(send_and_close(json_head(2) + b"{}"))
    config = config_from(
        {
            "upstreams": {"up": {"base_url": upstream.base_url}},
            "routes": [{"name": "default", "upstream": "up"}],
        }
    )
    server = ProxyServer(config, host="127.0.0.1", port=0)
    sink = RecordSink()
    server.state.listeners.append(sink)

    async def client_vanishes(request: web.Request, response: web.StreamResponse) -> None:
        if request.transport is not None:
            request.transport.close()

    server.app.on_response_prepare.append(client_vanishes)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes("POST", "/v1/chat/completions", body=chat_body()))
        await writer.drain()
        assert await only_record(sink) is Outcome.CLIENT_CANCELLED
        assert await reader.read() == b""  # nothing was sent: the head never went out
        writer.close()
    finally:
        await server.stop_now()
    assert_clean_log(caplog)


# --- item 7: configured secrets never leave the process -----------------------------------------


def leaked(data: bytes | str) -> list[str]:
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return [s for s in (UPSTREAM_KEY, HEADER_SECRET, PROXY_KEY) if s in text]


PROXY_KEY = "hk-proxy-client-key-55Lm1"


async def test_an_upstream_echoing_the_key_in_a_401_is_scrubbed(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async def echo(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        body = (
            f'{{"error":{{"message":"Incorrect API key provided: {seen.headers["authorization"]}'
            f' (org {seen.headers["openai-organization"]})","type":"invalid_request_error"}}}}'
        ).encode()
        head = (
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f'WWW-Authenticate: Bearer realm="{seen.headers["authorization"]}"\r\n\r\n'
        )
        writer.write(head.encode() + body)
        await writer.drain()

    server, sink, upstream = await proxy_before(
        echo, scripted, start_proxy, auth={"keys": [PROXY_KEY]}
    )
    request = request_bytes(
        "POST",
        "/v1/chat/completions",
        body=chat_body(),
        headers={"Authorization": f"Bearer {PROXY_KEY}"},
    )
    response = await exchange_raw(server.port, request)
    assert response.status == 401
    assert upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert leaked(response.raw) == []
    assert b"*" * len(UPSTREAM_KEY) in response.body  # masked in place, same length
    assert len(response.body) == int(response.header("content-length") or -1)
    await sink.wait(lambda: sink.records, 5.0, "no record")
    assert leaked(caplog.text) == [] and leaked(repr([r.__dict__ for r in caplog.records])) == []
    assert_clean_log(caplog)


async def test_a_key_split_across_stream_chunks_is_scrubbed_in_band_and_in_the_log(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    before = b'data: {"error":{"message":"key '
    client_saw_the_start = asyncio.Event()

    async def split(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        cut = len(UPSTREAM_KEY) // 2
        writer.write(sse_head() + before + UPSTREAM_KEY[:cut].encode())
        await writer.drain()
        async with asyncio.timeout(5):
            await client_saw_the_start.wait()  # the proxy has read (and held) the first half
        writer.write(UPSTREAM_KEY[cut:].encode() + b' was revoked","type":"server_error"}}\n\n')
        await writer.drain()
        writer.close()

    # Without usage injection the relay passes bytes on as they come (no event buffering),
    # so the client sees the text before the key while the key's first half is held back.
    server, sink, _ = await proxy_before(
        split, scripted, start_proxy, defaults={"include_usage": False}
    )
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json("/v1/chat/completions", json.loads(chat_body(stream=True)))
    await client.read_until(lambda got: before in got)
    client_saw_the_start.set()
    raw = await client.read_until(lambda got: got.endswith(b"0\r\n\r\n"))
    client.close()
    assert leaked(raw) == []
    assert b"key " + b"*" * len(UPSTREAM_KEY) + b" was revoked" in parse_response(raw).body
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert leaked(caplog.text) == [] and leaked(repr([r.__dict__ for r in caplog.records])) == []
    assert_clean_log(caplog)


# --- item 8: framing and status ----------------------------------------------------------------


@pytest.mark.parametrize("cut", ["rst", "fin-mid-event"])
async def test_an_unframed_stream_cut_by_the_transport_is_not_completed(
    cut: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No Content-Length, no chunking: the body ends when the connection does.
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def cut_off(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + event * 3)
        if cut == "rst":
            await writer.drain()
            reset(writer)
        else:
            writer.write(b'data: {"choices":[{"ind')  # FIN in the middle of an event
            await writer.drain()
            writer.close()

    server, sink, _ = await proxy_before(cut_off, scripted, start_proxy)
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)),
    )
    assert response.status == 200
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


UNFRAMED = {  # whole answers, with neither Content-Length nor chunking: each ends at EOF
    "json": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
        b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":'
        b'"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":1,"total_tokens":4}}',
    ),
    "sse": (
        sse_head(),
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n",
    ),
}


@pytest.mark.parametrize("ending", ["fin", "rst"])
@pytest.mark.parametrize("kind", sorted(UNFRAMED))
async def test_an_unframed_answer_ends_at_a_fin_and_is_cut_by_a_reset(
    kind: str,
    ending: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole answer reached the client, then the upstream's connection ends. aiohttp reads
    a reset as the end of an unframed body, as it reads a FIN: only the proxy's watch on the
    connection (`upstream_checks.unframed_close`) tells a cut from an answer."""
    head, body = UNFRAMED[kind]
    client_has_it = asyncio.Event()

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(5):
            await client_has_it.wait()  # the end comes after the bytes, not with them
        if ending == "rst":
            reset(writer)
        else:
            writer.close()

    server, sink, _ = await proxy_before(reply, scripted, start_proxy)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions",
        json.loads(chat_body(stream=kind == "sse")),
        {"Connection": "close"},
    )
    try:
        await client.read_until(
            lambda got: b"\r\n\r\n" in got and body in parse_response(got).body, what="it all"
        )
        client_has_it.set()
        response = parse_response(await client.read_to_eof())
    finally:
        client.close()
    assert response.status == 200
    if ending == "fin":
        assert response.body == body and response.raw.endswith(b"0\r\n\r\n")
        assert await only_record(sink) is Outcome.COMPLETED
    elif kind == "sse":  # the cut, told in-band after what came
        assert response.body.startswith(body)
        assert b"connection was cut before the end" in response.body[len(body) :]
        assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    else:  # the cut passed on: no last chunk
        assert response.body == body and not response.raw.endswith(b"0\r\n\r\n")
        assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


async def test_a_stream_with_cr_only_line_endings_is_completed(
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Valid SSE (WHATWG: a line ends in CRLF, LF or CR): the last block is held until EOF shows
    # its final CR was not half of a CRLF; it is whole, so the stream was not cut.
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\r\r'
    done = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\rdata: [DONE]\r\r'

    async def cr_only(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + event * 3 + done)
        await writer.drain()
        writer.close()

    server, sink, _ = await proxy_before(cr_only, scripted, start_proxy)
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=True)),
    )
    assert response.status == 200
    assert response.body.endswith(b"data: [DONE]\r\r")
    assert await only_record(sink) is Outcome.COMPLETED
    assert_clean_log(caplog)


@pytest.mark.parametrize("status", [101, 600, 999])
async def test_a_status_outside_200_to_599_is_a_502(
    status: int,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = "Upgrade: websocket\r\nConnection: upgrade\r\n" if status == 101 else ""
    head = f"HTTP/1.1 {status} Odd\r\n{extra}Content-Length: 2\r\n\r\n{{}}".encode()
    server, sink, _ = await proxy_before(send_and_close(head), scripted, start_proxy)
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=chat_body())
    )
    assert response.status == 502
    assert response.error()["code"] == "upstream_failed"
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


async def test_streams_ask_for_identity_and_refuse_a_compressed_event_stream(
    scripted: ScriptedUpstreams, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    event = gzip.compress(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    head = sse_head("Content-Encoding: gzip\r\n")
    server, sink, upstream = await proxy_before(send_and_close(head + event), scripted, start_proxy)
    request = request_bytes(
        "POST",
        "/v1/chat/completions",
        body=chat_body(stream=True),
        headers={"Accept-Encoding": "gzip, br"},
    )
    response = await exchange_raw(server.port, request)
    assert upstream.requests[0].headers["accept-encoding"] == "identity"
    assert response.status == 502
    assert await only_record(sink) is Outcome.UPSTREAM_ERROR
    assert_clean_log(caplog)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_absurd_usage_counts_from_an_upstream_are_not_counts(
    stream: bool,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 10**4000 tokens overflowed float conversion in accounting and metrics (two ERRORs).
    usage = b'"usage":{"prompt_tokens":1' + b"0" * 4000 + b',"completion_tokens":-7}'
    if stream:
        answer = sse_head() + b'data: {"choices":[],' + usage + b"}\n\ndata: [DONE]\n\n"
    else:
        body = b'{"choices":[],' + usage + b"}"
        answer = json_head(len(body)) + body
    server, sink, _ = await proxy_before(
        send_and_close(answer),
        scripted,
        start_proxy,
        prices={"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
    )
    response = await exchange_raw(
        server.port,
        request_bytes("POST", "/v1/chat/completions", body=chat_body("m", stream=stream)),
    )
    assert response.status == 200
    assert await only_record(sink) is Outcome.COMPLETED
    usage_record = sink.records[0].usage
    assert usage_record.prompt_estimated and usage_record.completion_estimated
    assert_clean_log(caplog)
