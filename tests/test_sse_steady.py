"""The pump's steady read (proxy/sse_relay.py `_pump_sse`): once a stream is steady, a read
that is one block of the last content chunk's `Shape` is handled in the pump itself, without
`_sse_step`. Held to `_sse_step` (which tests/test_usage_plain.py holds to the full parse):
the same streams, through the production runner over real sockets, once as shipped and once
with no stream ever steady (every read through `_sse_step`), must give the client the same
bytes and the record the same figures. The streams are ordinary ones and hostile ones (split
reads, invalid UTF-8, CRLF, `data:` without its space, escapes, a comment, an event over the
inline cut's size, a configured secret in the text), with each usage filter."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy import sse_relay
from proxy.downstream import Downstream
from proxy.sse_stream import StreamState
from proxy.usage.filter import CUT_INLINE_BELOW
from tests.conftest import StartProxy, chat
from tests.hostile_support import ScriptedUpstreams, sse_in_chunks
from tests.support import RawClient, config_from, http_body

SECRET = "sk-PLANTEDsteadyKey0123456789"
PAUSE_S = 0.004  # between the upstream's writes: most arrive as reads of their own
IDLE_S = 0.4  # the idle deadline; the ordinary streams last longer (127 writes, >= 0.5 s)


def _chunk(text: str, *, usage: bool = True) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    if usage:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _end(*, usage: bool = True) -> list[bytes]:
    finish: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    out = []
    if usage:
        finish["usage"] = None
        tally = {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}
        usage_only = {**finish, "choices": [], "usage": tally}
    out.append(b"data: " + json.dumps(finish, separators=(",", ":")).encode() + b"\n\n")
    if usage:
        out.append(b"data: " + json.dumps(usage_only, separators=(",", ":")).encode() + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


def _ordinary(usage: bool = True) -> list[bytes]:
    texts = [f" word{i}" for i in range(120)]
    return [_chunk("", usage=usage), *(_chunk(t, usage=usage) for t in texts), *_end(usage=usage)]


def _hostile() -> list[bytes]:
    c = _chunk
    steady = [c(f" w{i}") for i in range(8)]
    bad_utf8 = c(" \u00e9t\u00e9").replace("é".encode(), b"\xc3\x28", 1)  # invalid UTF-8
    crlf = c(" crlf").replace(b"\n\n", b"\r\n\r\n")
    no_space = c(" nospace").replace(b"data: ", b"data:", 1)
    split = c(" split in two reads")
    huge = c(" " + "x" * (CUT_INLINE_BELOW + 100))
    return [
        c(""),
        *steady,
        c(" caf\u00e9 \u65e5\u672c"),  # non-ASCII, the same shape
        *steady,
        bad_utf8,
        *steady,
        crlf,
        *steady,
        no_space,
        *steady,
        c(' a "quoted" \\ text'),
        *steady,
        b": a comment\n\n",
        *steady,
        split[:25],
        split[25:],
        *steady,
        c(f" the key {SECRET} pasted"),
        *steady,
        c(" two") + c(" in one read"),
        *steady,
        huge,
        *steady,
        c(""),  # an empty text
        *steady,
        *_end(),
    ]


STREAMS = {
    "ordinary": _ordinary(),
    "ordinary without usage": _ordinary(False),
    "hostile": _hostile(),
}


class _NeverSteady(StreamState):
    """A stream that is never steady: every read goes through `_sse_step`."""

    __slots__ = ()

    @property
    def steady(self) -> bool:
        return False

    @steady.setter
    def steady(self, value: bool) -> None:
        pass


async def _relay(
    start_proxy: StartProxy, upstream: str, extra: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    config = config_from(
        {  # a configured secret (the upstream's key): scrubbed from the stream
            "upstreams": {"sim": {"base_url": upstream, "api_key": SECRET}},
            "routes": [{"name": "default", "upstream": "sim"}],
            # Shorter than the stream: a steady read that did not mark progress would cut it.
            "defaults": {"timeouts": {"idle_s": IDLE_S}},
        }
    )
    server, sink = await start_proxy(config)
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        "/v1/chat/completions", chat("m", stream=True, **extra), {"Connection": "close"}
    )
    raw = await asyncio.wait_for(client.read_to_eof(), 20)
    client.close()
    record = await sink.wait(lambda: next(iter(sink.records), None), 5, "the record")
    usage = record.usage
    figures = {
        "status": record.status,
        "outcome": record.outcome,
        "bytes_to_client": record.bytes_to_client,
        "content_chunks": record.content_chunks,
        "generated_tokens": record.generated_tokens,
        "delivered_tokens": record.delivered_tokens,
        "stream_terminated": record.stream_terminated,
        "first_token": record.first_token_at is not None,
        "usage": (usage.completion_tokens, usage.completion_estimated, usage.prompt_tokens),
        "timeout": record.timeout_kind,
        "finish_reason": record.finish_reason,
    }
    await server.stop_now()
    return http_body(raw), figures


USAGE_ASKS = {
    "no usage asked (the usage filter drops it)": {},
    "usage asked (no filter)": {"stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("ask", sorted(USAGE_ASKS))
async def test_steady_reads_agree_with_the_step(
    name: str,
    ask: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[int] = []
    taken: list[int] = []
    real_step, real_take = Downstream._sse_step, Downstream.take_steady

    def counted(self: Downstream, *args: Any) -> Any:
        steps.append(1)
        return real_step(self, *args)

    def counted_take(self: Downstream, chunk: bytes) -> bool:
        took = real_take(self, chunk)
        taken.append(took)
        return took

    monkeypatch.setattr(Downstream, "_sse_step", counted)
    monkeypatch.setattr(Downstream, "take_steady", counted_take)
    upstream = await scripted.start(sse_in_chunks(STREAMS[name], PAUSE_S))
    body, figures = await _relay(start_proxy, upstream.base_url, USAGE_ASKS[ask])
    stepped, took = len(steps), sum(taken)
    steps.clear()
    monkeypatch.setattr(sse_relay, "StreamState", _NeverSteady)
    ref_body, ref_figures = await _relay(start_proxy, upstream.base_url, USAGE_ASKS[ask])
    assert figures["status"] == 200 and body.endswith(b"data: [DONE]\n\n")
    assert SECRET.encode() not in body and SECRET.encode() not in ref_body
    assert body == ref_body
    assert figures == ref_figures
    # The steady path was taken (every read reached `_sse_step` in the reference run), for
    # most of the stream's content reads.
    assert stepped < len(steps) - 20
    # Most of them without waking the pump (`take_steady`, proxy/steady_reader.py).
    assert took > 20, (took, stepped, len(steps))
