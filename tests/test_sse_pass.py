"""A huge SSE event passed through as it arrives (proxy/sse_large.py, proxy/sse_large_relay.py,
proxy/usage/skeleton.py) gives the client the same bytes and accounting the same figures as
the same event completed whole in one step (the path every smaller event takes).

Two pumps (`Downstream._sse_step`, as tests/test_usage_plain.py drives it) get the same reads:
one passes lines over a small threshold through (so that generated events cross it), the other
never does. Events of every shape the tracker reads (content, refusal, reasoning, tool calls,
legacy text, Responses deltas and terminal events, finish and usage chunks, usage first or
last, named events, comments, several data lines, CR line ends, escapes, surrogate pairs,
invalid UTF-8, `\\u0000` in the text, huge model names) are cut into reads at random, with
each usage filter, forwarded or held for a fallback. After every read the trackers, records
and marks must be equal, a failure must be the same failure, and at the end the client must
have the same bytes. The one documented difference, a malformed event whose start already went
out, has its own test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.relay import Exchange
from proxy.sse_large import LARGE_EVENT, LargeEvent
from proxy.sse_stream import Pieces, StreamState
from proxy.upstream_errors import AttemptFailed
from proxy.usage import UsageChunkFilter
from proxy.usage.fast import parse_json
from proxy.usage.skeleton import Skeleton, restore
from tests.test_usage_plain import _FILTERS, _cut, _pump, _snapshot, _Upstream

NEVER = 10**12
PATH = "/v1/chat/completions"


def _run(
    reads: list[bytes],
    chunk_filter: UsageChunkFilter | None,
    large_at: int,
    *,
    run: int = 8,
    holding: bool = False,
    raw: bool = False,
    collect: bool = False,
) -> tuple[list[tuple[Any, ...]], bytes, int, str]:
    """Per read the state after it (and any failure); the client's bytes; reads that ended
    with a huge event in progress; the text collected for a continuation (`collect`)."""
    pump, stream, marks = _pump(PATH, chunk_filter, plain=True)
    stream.__class__ = type(
        "_Tuned", (StreamState,), {"__slots__": (), "large_at": large_at, "large_run": run}
    )
    if holding:
        stream.held = []
    stream.raw_mode = raw
    if collect:  # continue_cut_streams: each content chunk's text is kept (no plain path)
        stream.collect_text, stream.plain = True, False
    upstream = _Upstream()
    steps: list[tuple[Any, ...]] = []
    client = b""
    passing = 0
    for n, chunk in enumerate([*reads, b""]):
        failed: Any = None
        try:
            out = pump._sse_step(stream, upstream, chunk, float(n))
            client += out.join() if isinstance(out, Pieces) else out
        except AttemptFailed as exc:
            failed = ("failed", exc.result, exc.error.message)
        except ProxyError as exc:
            failed = ("raised", type(exc).__name__, exc.message)
        passing += stream.large is not None
        steps.append((failed, _snapshot(pump, stream, marks), tuple(upstream.ends)))
        if failed:
            break
    return steps, client, passing, "".join(pump.delivered_text or ())


def _agree(
    reads: list[bytes], *, holding: bool = False, raw: bool = False, collect: bool = False
) -> int:
    """Both paths, each filter: equal; returns how many reads ended mid-way in a huge event."""
    passing = 0
    for chunk_filter in _FILTERS:
        got = _run(reads, chunk_filter, 64, holding=holding, raw=raw, collect=collect)
        want = _run(reads, chunk_filter, NEVER, holding=holding, raw=raw, collect=collect)
        assert want[2] == 0
        for n, (a, b) in enumerate(zip(got[0], want[0], strict=True)):
            assert a == b, f"read {n} of {reads!r} (filter {chunk_filter!r})"
        assert got[1] == want[1], f"client bytes of {reads!r} (filter {chunk_filter!r})"
        assert got[3] == want[3], f"collected text of {reads!r}"
        passing += got[2]
    return passing


def _data(obj: object, ascii: bool = True) -> bytes:
    text = json.dumps(obj, ensure_ascii=ascii, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8


def _chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta}], **extra}


_texts = st.one_of(
    st.text(min_size=1, max_size=40),
    st.sampled_from(["x", "é", "😀", 'say "hi"\n', "\\", "a\u0000b", "\ud83d\ude00", "tab\t"]),
).map(lambda t: t * (1 + 400 // max(1, len(t))))


def _shapes(text: str, ascii: bool) -> list[bytes]:
    """Data (not framed) of every shape accounting reads, each holding `text`."""
    d = [
        _chunk({"content": text}, usage=None),
        {"usage": None, **_chunk({"content": text})},
        _chunk({"refusal": text}),
        _chunk({"reasoning_content": text, "content": ""}),
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": text}}]}),
        {"choices": [{"index": 0, "text": text}]},
        {"choices": [{"index": 1, "delta": {"content": text}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}, "pad": text},
        {"model": text, "choices": [{"index": 0, "delta": {"content": "x"}}]},
        {"error": {"message": text}},
        {"type": "response.output_text.delta", "delta": text, "output_index": 0},
        {
            "type": "response.completed",
            "response": {"id": "r", "output": [{"text": text}], "usage": {"output_tokens": 9}},
        },
        {"choices": [{"delta": {"content": text}}], "usage": {"completion_tokens": 4}},
    ]
    return [_data(obj, ascii) for obj in d]


def _frame(data: bytes, how: int) -> bytes:
    if how == 1:
        return b"event: response.output_text.delta\ndata: " + data + b"\n\n"
    if how == 2:
        return b"data:" + data + b"\r\n\r\n"
    if how == 3:  # two data lines: the line end between them is JSON whitespace
        head, comma, rest = data.partition(b',"')
        if comma:
            return b"data: " + head + b",\ndata: " + b'"' + rest + b"\n\n"
    if how == 4:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


_small = st.sampled_from(
    [
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n',
        b": keep-alive\n\n",
        b"data: [DONE]\n\n",
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
    ]
)


@st.composite
def _huge(draw: st.DrawFn) -> bytes:
    text, ascii = draw(_texts), draw(st.booleans())
    data = draw(st.sampled_from(_shapes(text, ascii)))
    if draw(st.integers(0, 9)) == 0:  # invalid UTF-8 inside the text
        data = data.replace(b"x", b"x\xff\xe2\x82", 1)
    if spaces := draw(st.integers(0, 12)):  # JSON whitespace before a usage member
        data = data.replace(b',"usage"', b"," + b" " * spaces + b'"usage"')
    return _frame(data, draw(st.integers(0, 4)))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_small, _huge()), min_size=1, max_size=5),
    st.lists(st.integers(0, 10**5), max_size=8),
    st.sampled_from(["forward", "holding", "raw", "collect"]),
)
def test_passed_through_events_agree_with_whole_ones(
    events: list[bytes], cuts: list[int], mode: str
) -> None:
    data = b"".join(events)
    reads = _cut(data, cuts)
    _agree(reads, holding=mode == "holding", raw=mode == "raw", collect=mode == "collect")


def test_a_continuation_collects_a_huge_chunk_text_in_parts() -> None:
    """continue_cut_streams: the text of a huge content chunk is collected as the whole path
    collects it (escapes read, markers replaced by the text they stand for), and the
    skeleton, not a whole read, answers."""
    text = 'line "one"\n\ttwo é😀 ' * 3000
    event = b"data: " + _data(_chunk({"content": text}, usage=None), False) + b"\n\n"
    reads = _cut(event, [len(event) * k // 16 for k in range(1, 16)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LargeEvent, "whole", None)  # a whole read would fail
        got = _run(reads, UsageChunkFilter(), 64, run=4096, collect=True)
    assert got[3] == text and got[2] > 0


def test_the_pass_through_is_taken_and_the_skeleton_answers() -> None:
    """Not vacuous: a huge content event in 32 reads is passed through in most of them, and
    its kind and size come from the skeleton, not from reading it whole."""
    text = "héllo wörld " * 20_000
    event = b"data: " + _data(_chunk({"content": text}, usage=None), False) + b"\n\n"
    reads = _cut(event, [len(event) * k // 32 for k in range(1, 32)])
    whole = LargeEvent.whole
    calls: list[int] = []

    def counting(self: LargeEvent) -> Any:
        calls.append(1)
        return whole(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LargeEvent, "whole", counting)
        assert _agree(reads) >= 3 * 28
        got = _run(reads, UsageChunkFilter(), 64, run=4096)
    assert not calls
    assert got[0][-1][1][2] == 1  # one content chunk, counted at the event's end
    assert got[1] == event.replace(b',"usage":null}', b"}")


def test_a_huge_event_goes_out_as_it_arrives() -> None:
    """Before its end arrives, all but its held tail (`,"usage":null}` and what follows) has
    reached the client; a stream held for a fallback sends nothing until its content came."""
    text = "x" * (3 * LARGE_EVENT)
    event = b"data: " + _data(_chunk({"content": text}, usage=None)) + b"\n\n"
    reads = _cut(event, [len(event) * k // 8 for k in range(1, 8)])
    pump, stream, _ = _pump(PATH, UsageChunkFilter(), plain=True)
    upstream = _Upstream()
    sent = [pump._sse_step(stream, upstream, c, 0.0) for c in reads[:-1]]
    assert sent[:2] == [b"", b""]  # under the threshold: the decoder holds it, as before
    arrived = len(b"".join(reads[:-1]))  # all but the last bytes, that `"usage` may begin
    assert arrived - len(b'"usage') <= sum(map(len, sent)) < arrived
    assert stream.large is not None and stream.large.skeleton is not None
    pump._sse_step(stream, upstream, reads[-1], 0.0)
    assert len(stream.large.skeleton_text if stream.large else "") < 2 * LARGE_EVENT
    held = _run(reads, UsageChunkFilter(), LARGE_EVENT, holding=True)
    assert held[1] == event.replace(b',"usage":null}', b"}")


@pytest.mark.parametrize("shape", ["broken JSON", "not an object"])
def test_a_malformed_huge_event_is_relayed_once_its_start_went_out(shape: str) -> None:
    """The documented difference: an event over the threshold that turns out malformed at
    its end is relayed whole (its start had gone out) and counted; held, it is dropped."""
    body = b'{"choices":[{"delta":{"content":"' + b"x" * 3000
    if shape == "not an object":
        body = b'["' + b"x" * 3000 + b'"]'
    event = b"data: " + body + b"\n\n"
    after = b"data: [DONE]\n\n"
    reads = _cut(event + after, [500, 1500, 2500])
    for chunk_filter in _FILTERS:
        passed = _run(reads, chunk_filter, 64)
        whole = _run(reads, chunk_filter, NEVER)
        assert passed[0] == whole[0]  # the same accounting: one malformed event, counted
        assert whole[1] == after and passed[1] == event + after
        assert passed[0][-1][1][-1] == 1  # stream.malformed
        held = _run(reads, chunk_filter, 64, holding=True)
        assert held[1] == whole[1] == after


def test_a_usage_member_first_holds_the_event_and_is_cut_exactly() -> None:
    """`"usage"` early: nothing after it goes out before the end, and the cut is the one
    `client_bytes` makes of the whole event (a usage-only chunk the client did not ask for is
    then dropped whole, as a smaller one)."""
    text = "y" * 5000
    first = b'data: {"usage":null,"choices":[{"delta":{"content":"' + text.encode() + b'"}}]}\n\n'
    usage = b'"usage":{"completion_tokens":1}'
    only = b'data: {"choices":[],' + usage + b',"pad":"' + text.encode() + b'"}\n\n'
    for event in (first, only):
        reads = _cut(event, [100, 2000, 4000])
        assert _agree(reads) > 0


def test_spaces_before_a_usage_member_are_held_with_it() -> None:
    """The comma before `"usage"` goes with the member: a read that ends in spaces after it
    must not have sent the comma."""
    head = b'data: {"choices":[{"delta":{"content":"' + b"z" * 3000 + b'"}}],'
    event = head + b" " * 20 + b'"usage":null}\n\n'
    assert _agree(_cut(event, [len(head) + 10])) > 0


def _lengths(value: Any) -> Any:
    """Every string's length, in place of the string (the structure otherwise as it is)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return {k: _lengths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lengths(v) for v in value]
    return value


_hard_text = st.lists(
    st.sampled_from(
        ["a", "é", "😀", '"', "\\", "\n", "\u0000", "\ud83d", "\ude00", " ", "1", "true", "u"]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    _hard_text,
    st.integers(1, 300),
    st.booleans(),
    st.lists(st.integers(0, 10**6), max_size=10),
    st.sampled_from([4, 16, 64]),
)
def test_the_skeleton_measures_every_string_as_the_whole_parse(
    text: str, times: int, ascii: bool, cuts: list[int], run: int
) -> None:
    """Texts dense with escapes, quotes, surrogates (paired and lone), invalid UTF-8 and
    characters JSON structure also has, cut anywhere: the skeleton parses to the whole line's
    structure with every string of the whole line's length, or says it cannot."""
    long = text * times
    data = _data({"a": long, "b": [long, 1, {"c": long}], "d": "x" * 5000 + long}, ascii)
    skeleton = Skeleton(run)
    pieces = _cut(data, cuts) or [b""]
    for n, piece in enumerate(pieces):
        skeleton.feed(piece, final=n == len(pieces) - 1)
    want = json.loads(data.decode("utf-8", "replace"))
    text_now = skeleton.text()
    if not text_now:
        assert "\\u0000" in data.decode("utf-8", "replace")  # its own marker-like escape
        return
    got = restore(parse_json(text_now), skeleton.runs)
    assert got is not None and _lengths(got) == _lengths(want)


def test_the_exchange_keeps_no_instance_dict() -> None:
    """Every base of the exchange is slotted, the huge-event mixin (proxy/sse_large_relay.py)
    included: one without `__slots__` would give every held stream an instance dict."""
    exchange = object.__new__(Exchange)
    assert not hasattr(exchange, "__dict__")
