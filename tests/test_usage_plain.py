"""The stream pump's plain path (`Downstream._sse_step` with `StreamUsageTracker.feed_plain`
and `UsageChunkFilter.plain_bytes`) gives the client the same bytes and accounting the same
figures as the full path (decoder, `SSEEvent`s, `feed`, `client_bytes`).

Two pumps, one with the plain path and one without (`StreamState.plain = False`), get the
same reads: every recorded fixture and generated streams (ordinary chunks, usage in every
place, [DONE], comments, named events, CR line ends, multi-line data, invalid UTF-8, broken
JSON), cut into reads at random places, with each usage filter. After every read their bytes
for the client, the trackers, the records, the attempts, and the deadline marks must be equal,
and a read that fails must fail the same way in both. A separate test shows the plain path
really takes the ordinary events, so the agreement is not vacuous.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fake_upstream import stream_events
from proxy.attempts import Attempt
from proxy.downstream import Downstream
from proxy.errors import ProxyError
from proxy.outcome import RequestRecord
from proxy.secrets import Secrets, StreamScrubber
from proxy.sse import SSEDecoder, SSEEvent
from proxy.sse_stream import Pieces, StreamState
from proxy.timeouts import Phase
from proxy.upstream_errors import AttemptFailed
from proxy.usage import (
    EventKind,
    RequestFacts,
    StreamUsageTracker,
    UsageChunkFilter,
    inspect_request,
    plain_reads,
)
from proxy.usage import stream as stream_module
from proxy.usage.fast import content_sizes, read_chunk
from proxy.usage.filter import cut_null_usages
from proxy.usage.stream import delta_chars
from tests.test_usage_fast import FIXTURE_FILES, _path_for, _serialised, _state

_FILTERS: list[UsageChunkFilter | None] = [
    None,
    UsageChunkFilter(drop_usage_chunk=True),
    UsageChunkFilter(drop_usage_chunk=False),
]


class _Marks:
    """Stands for the watchdog: counts what the pump tells it."""

    def __init__(self) -> None:
        self.rearms = 0

    def rearm(self) -> None:
        self.rearms += 1

    def streaming(self, now: float) -> None:
        self.rearms += 1


class _Deadlines:
    """What `Deadlines.content` keeps (the pump may set it itself once the stream is
    streaming): compared after every read."""

    def __init__(self) -> None:
        self.phase = Phase.AWAIT_CONTENT
        self.last_progress = -1.0

    def content(self, now: float) -> None:
        self.last_progress = now
        if self.phase is Phase.AWAIT_CONTENT:
            self.phase = Phase.STREAMING


class _Upstream:
    """The one call `_sse_step` makes on the upstream: the end-of-body check."""

    def __init__(self) -> None:
        self.ends: list[bool] = []

    def check_end(self, *, mid_event: bool = False) -> None:
        self.ends.append(mid_event)


class _Counting(StreamUsageTracker):
    """Notes the data of each event that took the full path."""

    __slots__ = ("fed",)

    def __init__(self, facts: RequestFacts) -> None:
        super().__init__(facts)
        self.fed: list[str | None] = []

    def feed(self, event: SSEEvent) -> EventKind:
        self.fed.append(event.data)
        return super().feed(event)


class _Pump(Downstream):
    __slots__ = ()


def _pump(path: str, chunk_filter: UsageChunkFilter | None, plain: bool) -> Any:
    pump = _Pump()
    pump.record = RequestRecord(
        request_id="r", method="POST", path=path, started_at=0.0, wall_started_at=0.0
    )
    pump.decoder = SSEDecoder()
    pump.tracker = StreamUsageTracker(inspect_request(path, {"model": "m", "stream": True}))
    pump.continuing = False
    pump.delivered_text = []
    # A scrubber with a secret: what it does to the bytes must not depend on the path either.
    pump.scrubber = StreamScrubber(Secrets(["sk-secret-0123456789"]))
    pump.response = None
    marks = _Marks()
    stream = StreamState.__new__(StreamState)
    stream.attempt = Attempt("u", "m", 0.0, "primary")
    stream.watchdog = marks  # type: ignore[assignment]
    stream.deadlines = _Deadlines()  # type: ignore[assignment]
    stream.chunk_filter = chunk_filter
    stream.held, stream.held_bytes, stream.malformed = None, 0, 0
    stream.collect_text, stream.raw_mode, stream.plain = False, False, plain
    stream.large, stream.steady = None, False
    return pump, stream, marks


def _snapshot(pump: Any, stream: StreamState, marks: _Marks) -> tuple[Any, ...]:
    record, attempt = pump.record, stream.attempt
    return (
        _state(pump.tracker),
        pump.tracker.response_model,
        record.content_chunks,
        record.first_token_at,
        attempt.first_token_at,
        stream.deadlines.phase,
        stream.deadlines.last_progress,
        marks.rearms,
        stream.malformed,
    )


def _run(path: str, reads: list[bytes], chunk_filter: UsageChunkFilter | None, plain: bool) -> Any:
    """Per read: the client's bytes (or the failure) and the state after it."""
    pump, stream, marks = _pump(path, chunk_filter, plain)
    upstream = _Upstream()
    steps: list[tuple[Any, ...]] = []
    for n, chunk in enumerate([*reads, b""]):
        try:
            out: Any = pump._sse_step(stream, upstream, chunk, float(n))
            if isinstance(out, Pieces):
                out = out.join()
        except AttemptFailed as exc:
            out = ("failed", exc.result, exc.error.message)
        except ProxyError as exc:  # an event nested too deeply to read
            out = ("raised", type(exc).__name__, exc.message)
        steps.append((out, _snapshot(pump, stream, marks), tuple(upstream.ends)))
        if isinstance(out, tuple):
            break
    return steps


def _agree(path: str, reads: list[bytes]) -> None:
    for chunk_filter in _FILTERS:
        plain = _run(path, reads, chunk_filter, plain=True)
        full = _run(path, reads, chunk_filter, plain=False)
        for n, (got, want) in enumerate(zip(plain, full, strict=True)):
            assert got == want, f"read {n} of {reads!r} (filter {chunk_filter!r})"


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        if point > start:
            pieces.append(data[start:point])
            start = point
    return pieces


# --- recorded streams --------------------------------------------------------------------


def test_every_fixture_agrees_read_as_recorded_and_event_by_event() -> None:
    for fixture in FIXTURE_FILES:
        data = fixture.read_bytes()
        _agree(_path_for(fixture), [data])
        blocks = [b + b"\n\n" for b in data.split(b"\n\n") if b]
        _agree(_path_for(fixture), blocks)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIXTURE_FILES), st.lists(st.integers(0, 10**6), max_size=12))
def test_every_fixture_agrees_however_it_is_cut(fixture: Any, cuts: list[int]) -> None:
    data = fixture.read_bytes()
    _agree(_path_for(fixture), _cut(data, cuts))


def test_the_plain_path_takes_the_ordinary_events() -> None:
    """Not vacuous: on the benchmark's streams every event goes the plain way, the finish
    and usage chunks (parsed in full from their bytes) and [DONE] included, read one by one
    or all at once, with each usage filter; what is not a chat chunk's JSON object (a
    Responses event, data that is not JSON) still goes to `feed`."""
    for reads, contents in (
        (stream_events(20), 16),
        ([b"".join(stream_events(200))], 196),
    ):
        for chunk_filter in _FILTERS:
            pump, stream, _ = _pump("/v1/chat/completions", chunk_filter, plain=True)
            tracker = pump.tracker = _Counting(pump.tracker.facts)
            upstream = _Upstream()
            steps = [pump._sse_step(stream, upstream, c, 0.0) for c in [*reads, b""]]
            out = b"".join(s if isinstance(s, bytes) else s.join() for s in steps)
            assert tracker.fed == [], tracker.fed
            assert pump.record.content_chunks == contents and tracker.done
            assert tracker.finish_reason == "stop" and tracker.reported
            assert out.endswith(b"data: [DONE]\n\n")
            usage = b'"usage":{' in out
            assert usage == (chunk_filter is None or not chunk_filter.drops_usage_chunk)
            assert (b'"usage":null' in out) == (chunk_filter is None)
    pump, stream, _ = _pump("/v1/chat/completions", UsageChunkFilter(), plain=True)
    tracker = pump.tracker = _Counting(pump.tracker.facts)
    events = stream_events(5)
    others = [b'data: {"type":"response.created","response":{"id":"r"}}\n\n', b"data: {x\n\n"]
    read = b"".join([*events[:2], *others, *events[2:]])
    pump._sse_step(stream, _Upstream(), read, 0.0)
    assert tracker.fed[:2] == ['{"type":"response.created","response":{"id":"r"}}', "{x"]


# --- generated streams -------------------------------------------------------------------

_raw_event = st.one_of(
    _serialised().map(lambda d: b"data: " + d.encode() + b"\n\n"),
    _serialised().map(lambda d: b"data: " + d.encode() + b',"usage":null}\n\n'),
    st.sampled_from(
        [
            b"data: [DONE]\n\n",
            b": keep-alive\n\n",
            b"\n",
            b'data:{"choices":[{"delta":{"content":"no space"}}]}\n\n',
            b'data: {"choices":[{"delta":{"content":"cr"}}]}\r\n\r\n',
            b'data: {"choices":[{"delta":{"content":"lone cr"}}]}\r\r',
            b'event: error\ndata: {"error":{"message":"boom"}}\n\n',
            b'data: {"choices":[{"delta":{"content":"two"}}],\ndata: "usage":null}\n\n',
            b'data: {"choices":[{"delta":{"content":"\xff\xfe bad utf-8"}}]}\n\n',
            b'data: {"choices":[{"delta":{"content":"\xed\xa0\x80"}}],"usage":null}\n\n',
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
            b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"completion_tokens":9}}\n\n',
            b'data: {"x":{"usage":null},"choices":[{"delta":{"content":"y"}}],"usage":null}\n\n',
            b'data: {"choices":[{"delta":{"content":"sk-secret-0123456789"}}]}\n\n',
            b"\xef\xbb\xbfdata: [DONE]\n\n",
            b"data: \n\n",
            b"id: 7\n\n",
            # JSON that is not an object (malformed: dropped), and nesting too deep to read
            b'data: [1,{"usage":null}]\n\n',
            b'data: "text"\n\n',
            b"data: null\n\n",
            b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n",
            # the stream's end: a finish with text, an in-band error, usage with choices
            b'data: {"choices":[{"index":0,"delta":{"content":"end"},"finish_reason":"stop"}]}\n\n',
            b'data: {"error":{"message":"overloaded"},"usage":null}\n\n',
            b'data: {"choices":[{"index":1,"delta":{}}],"usage":{"completion_tokens":2}}\n\n',
            b'data: {"type":"response.output_text.delta","delta":"x"}\n\n',
            # the usual chunk's shape (below) around texts the shape must not read itself
            b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"\xed\xa0\x80"},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"a\x01b"},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":""},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"a","content":"bc"},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"x":{"content":"a"},"choices":[{"index":0,"delta":{"content":"a"},'
            b'"finish_reason":null}],"usage":null}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"\xc3\xa9\xf0\x9f\x98\x80"},'
            b'"finish_reason":null}],"usage":null}\n\n',
        ]
    ),
    st.builds(  # the usual chunk: one choice, some text, `"usage":null` last
        lambda text, ascii: (
            b"data: "
            + json.dumps(
                {
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                    "usage": None,
                },
                ensure_ascii=ascii,
                separators=(",", ":"),
            ).encode()
            + b"\n\n"
        ),
        st.text(max_size=20),
        st.booleans(),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_raw_event, min_size=1, max_size=8), st.lists(st.integers(0, 10**4), max_size=6))
def test_generated_streams_agree(events: list[bytes], cuts: list[int]) -> None:
    data = b"".join(events)
    _agree("/v1/chat/completions", [data])
    _agree("/v1/chat/completions", _cut(data, cuts))


def _choice_chunk(text: str, index: int, ascii: bool, usage: bool = True) -> bytes:
    obj: dict[str, object] = {
        "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]
    }
    if usage:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, ensure_ascii=ascii).encode() + b"\n\n"


_one_read_event = st.one_of(
    _raw_event,
    # the usual chunk of other choices, whose texts are tallied by index (12: a longer lead)
    st.builds(
        _choice_chunk,
        st.text(max_size=12),
        st.sampled_from([0, 1, 2, 12]),
        st.booleans(),
        st.booleans(),  # with the closing usage or without (another trail)
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_one_read_event, min_size=1, max_size=10))
def test_generated_streams_agree_an_event_a_read(events: list[bytes]) -> None:
    """Each event its own read, as a generating model sends them: once a chunk's shape is
    known the next one of that shape takes the one-step path (`feed_shaped`), with whatever
    text, choice index or broken bytes it carries. The same events in one read: chunks of
    other choices change the stream's shape between blocks of one read (`feed_plain`)."""
    _agree("/v1/chat/completions", events)
    _agree("/v1/chat/completions", [b"".join(events)])


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The data of each typed decode of an event: `feed`'s `content_sizes` and `feed_plain`'s
    `read_chunk`, listed as they are made."""
    parsed: list[bytes] = []

    def counting(data: str | bytes) -> Any:
        parsed.append(data if isinstance(data, bytes) else data.encode())
        return content_sizes(data)

    def counting_fields(data: bytes) -> Any:
        parsed.append(data)
        return read_chunk(data)

    monkeypatch.setattr(stream_module, "content_sizes", counting)  # `feed`
    monkeypatch.setattr(plain_reads, "read_chunk", counting_fields)  # `feed_plain`
    return parsed


def test_a_stream_of_one_shape_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous either: chunks that differ only in their text are read through their
    `Shape`, without a typed decode (only the role chunk and the first content chunk are
    decoded), and count what the parse counts."""
    parsed = _count_decodes(monkeypatch)
    reads = stream_events(20)
    plain = _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=True)
    assert len([d for d in parsed if b'"content":"' in d]) == 2, parsed
    full = _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=False)
    assert plain == full


def test_huge_events_agree_however_they_are_cut() -> None:
    """Events over the filter's one-copy size and the write piece, among ordinary ones."""
    big = json.dumps(
        {"choices": [{"index": 0, "delta": {"content": "é" * 700_000}}], "usage": None},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    small = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    data = small + b"data: " + big + b"\n\n" + small + b"data: [DONE]\n\n"
    for cuts in ([], [1000], [len(small) + 10, 900_000], [70_000 * k for k in range(1, 25)]):
        _agree("/v1/chat/completions", _cut(data, cuts))


def test_a_run_of_blocks_is_edited_as_each_block_would_be() -> None:
    """`plain_bytes` on a run where one block has a nested `"usage"`: block by block."""
    run = (
        b'data: {"choices":[],"usage":null}\n\n'
        b'data: {"a":{"usage":null},"choices":[],"usage":null}\n\n'
        b'data: {"choices":[]}\n\n'
    )
    want = (
        b'data: {"choices":[]}\n\n'
        b'data: {"a":{"usage":null},"choices":[]}\n\n'
        b'data: {"choices":[]}\n\n'
    )
    assert UsageChunkFilter.plain_bytes(run) == want


class _Uncounted(bytes):
    """A run whose `count` or `replace` fails the test: `plain_bytes` is to split it where
    the closing nulls are (one pass; `replace` counts them first) and search the result."""

    def count(self, *args: Any) -> int:
        raise AssertionError("plain_bytes counted over the run")

    def replace(self, *args: Any) -> bytes:
        raise AssertionError("plain_bytes went over the run twice (replace)")


def test_a_run_of_closing_nulls_is_cut_in_one_split_without_counts() -> None:
    """`plain_bytes` of a read of several events (the benchmark's role, content and finish
    chunks, each closing with `,"usage":null}`): one `split` and a search of its result,
    where two counts over the run were; and a `"usage"` left after the cut (a usage
    chunk's) still sends the run block by block. `cut_null_usages` splits alike."""
    events = stream_events(8)
    run = _Uncounted(b"".join(events[:6]))
    want = b"".join(UsageChunkFilter().client_bytes(e, EventKind.OTHER) for e in _events(run))
    assert UsageChunkFilter.plain_bytes(run) == want
    assert want.count(b'"usage"') == 0 and want != run
    other = _Uncounted(
        b'data: {"choices":[],"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    )
    assert UsageChunkFilter.plain_bytes(other) == (
        b'data: {"choices":[]}\n\ndata: {"choices":[]}\n\n'
    )
    shaped = _Uncounted(b"".join(events[2:6]))
    ends = [len(b"".join(events[2:i])) for i in range(3, 7)]
    assert cut_null_usages(shaped, ends) == UsageChunkFilter.plain_bytes(bytes(shaped))


def _events(run: bytes) -> list[SSEEvent]:
    return SSEDecoder().feed(bytes(run))


def test_one_event_reads_of_one_shape_take_the_shaped_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: on the benchmark's paced stream every content read after the first is
    read through its `Shape` in one step (`feed_shaped`), and the client and the tracker see
    what the full path gives."""
    taken: list[bool] = []
    real = StreamUsageTracker.feed_shaped

    def counting(self: StreamUsageTracker, chunk: bytes) -> Any:
        shape = real(self, chunk)
        taken.append(shape is not None)
        return shape

    monkeypatch.setattr(StreamUsageTracker, "feed_shaped", counting)
    reads = stream_events(20)
    plain = _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=True)
    assert sum(taken) == 15, taken  # 16 content chunks; the first one learns the shape
    assert plain == _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=False)


def test_a_read_cut_mid_event_after_shaped_reads_goes_to_the_decoder() -> None:
    """Shaped reads leave the decoder empty and let the next read skip the plain path's
    checks (`StreamState.steady`); a read that ends mid-event hands its tail to the decoder,
    and the read after it must not be taken as a new block: not inside that event, nor a
    whole `data:` line that continues its block (an event of two data lines, malformed).
    Cuts of the fourth content event, with the events around it read one by one."""
    events = stream_events(20)
    cases = [[events[4][:-1], *events[5:]]]  # its line ended, its block not: the next joins
    cases += [[events[4][:cut], events[4][cut:], *events[5:]] for cut in range(1, 260, 7)]
    for rest in cases:
        reads = [*events[:4], *rest]
        for chunk_filter in _FILTERS:
            plain = _run("/v1/chat/completions", reads, chunk_filter, plain=True)
            full = _run("/v1/chat/completions", reads, chunk_filter, plain=False)
            assert plain == full, (rest[0], chunk_filter)


def test_a_declined_block_is_not_decoded_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finish and usage chunks are decoded once, by `feed_plain`'s typed decode; a block
    that decode and the full parse decline goes to the decoder, and `feed` parses it in full
    without trying the typed decode again; a block with invalid UTF-8, whose decoded text is
    not the bytes declined, is tried again as text. The client and the tracker see what the
    full path gives."""
    parsed = _count_decodes(monkeypatch)
    reads = stream_events(20)
    plain = _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=True)
    finish, usage = reads[-3][6:-2], reads[-2][6:-2]
    assert b'"finish_reason":"stop"' in finish and b'"usage":{' in usage
    assert parsed.count(finish) == 1 and parsed.count(usage) == 1, parsed
    assert plain == _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=False)
    parsed.clear()
    broken = reads[1].replace(b'"content":"', b'"content":"\xff')  # invalid UTF-8 in the text
    plain = _run("/v1/chat/completions", [reads[0], broken], None, plain=True)
    assert len(parsed) == 3, parsed  # the role chunk; the broken one as bytes, then as text
    assert plain == _run("/v1/chat/completions", [reads[0], broken], None, plain=False)


def test_the_reference_tracker_takes_no_read_the_plain_way_and_ends_the_same() -> None:
    """The reference tracker (`fast=False`, every event parsed in full) takes nothing through
    `feed_plain`: the pump then gives the whole read to the decoder. Fed the same events,
    it ends where the fast one does: terminated by `[DONE]`, with the same counts."""
    facts = inspect_request("/v1/chat/completions", {"model": "m", "stream": True})
    events = stream_events(8)
    read = b"".join(events)
    reference = StreamUsageTracker(facts, fast=False)
    assert reference.feed_plain(read) == (0, 0, None, None)
    fast = StreamUsageTracker(facts)
    for tracker in (reference, fast):
        decoder = SSEDecoder()
        for event in decoder.feed(read):
            tracker.feed(event)
    assert reference.terminated and fast.terminated
    assert reference.generated_tokens == fast.generated_tokens > 0


def test_reads_of_shaped_blocks_are_cut_where_they_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: reads of several blocks of the stream's shape (the benchmark's stream,
    five events a read) are cut at the ends `feed_plain` found, without `plain_bytes`'
    searches: the middle two reads (the first holds the role chunk, before any shape; the
    last the finish and usage chunks, edited around the usage chunk). The client's bytes
    are the full path's."""
    events = stream_events(20)
    reads = [b"".join(events[i : i + 5]) for i in range(0, len(events), 5)]
    searched: list[bytes] = []
    plain_bytes = UsageChunkFilter.plain_bytes

    def counting(run: bytes) -> bytes:
        searched.append(run)
        return plain_bytes(run)

    monkeypatch.setattr(UsageChunkFilter, "plain_bytes", staticmethod(counting))
    plain = _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=True)
    assert searched[0] == reads[0], searched  # no shape yet
    assert reads[1] not in searched and reads[2] not in searched  # they went by their ends
    assert plain == _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=False)
    tracker = StreamUsageTracker(inspect_request("/v1/chat/completions", {"stream": True}))
    assert tracker.feed_plain(reads[0])[2] is None
    taken, contents, ends, _ = tracker.feed_plain(reads[1])
    assert (taken, contents) == (len(reads[1]), 5)
    assert ends == [len(b"".join(events[5 : 5 + i])) for i in range(1, 6)]


_shaped_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters='"\\'), max_size=12
).filter(lambda t: not any(ord(c) < 0x20 for c in t))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_shaped_text, st.booleans()), min_size=1, max_size=8))
def test_cutting_at_the_ends_is_what_plain_bytes_does(texts: list[tuple[str, bool]]) -> None:
    """`cut_null_usages` against `plain_bytes` on runs of blocks that close with
    `,"usage":null}` (texts of any characters a shape can carry, ASCII-escaped or not)."""
    blocks = [
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":'
        + json.dumps(text, ensure_ascii=escaped).encode()
        + b'},"finish_reason":null}],"usage":null}\n\n'
        for text, escaped in texts
    ]
    run = b"".join(blocks)
    ends = [len(b"".join(blocks[: i + 1])) for i in range(len(blocks))]
    assert cut_null_usages(run, ends) == UsageChunkFilter.plain_bytes(run)


_run_text = st.one_of(
    st.text(max_size=30),  # any text: quotes, backslashes, controls, long ones, empty ones
    _shaped_text,
    st.sampled_from(["", "a" * 12, "b" * 13, "\u00e9" * 13, "\U0001f600", "x" * 200]),
)
# Bytes a text may hold that no JSON encoder writes: invalid UTF-8, a surrogate's bytes.
_RAW_TEXTS = [b"\xff\xfe", b"\xed\xa0\x80", b"ok\xc3", b"\xc3\xa9"]


def _run_block(text: str | bytes, ascii: bool, usage: bool) -> bytes:
    """The usual chunk, compact as the engines write it (a shape is taken from such)."""
    raw = isinstance(text, bytes)
    obj: dict[str, object] = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "\x00placeholder" if raw else text},
                "finish_reason": None,
            }
        ],
    }
    if usage:
        obj["usage"] = None
    block = b"data: " + json.dumps(obj, ensure_ascii=ascii, separators=(",", ":")).encode()
    if isinstance(text, bytes):  # raw bytes where the text goes
        block = block.replace(b"\\u0000placeholder", text).replace(b"\x00placeholder", text)
    return block + b"\n\n"


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(_run_text, st.sampled_from(_RAW_TEXTS)), min_size=1, max_size=12),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(0, 11), max_size=3),
)
def test_reads_of_many_blocks_of_one_shape_agree(
    texts: list[str | bytes], ascii: bool, usage: bool, splits: list[int]
) -> None:
    """A busy proxy reads several events at once: reads made of blocks of the stream's
    shape (`feed_plain`'s runs, `_shaped_run`), whatever their texts (long ones,
    empty ones, non-ASCII, escapes, invalid UTF-8: those the shape cannot take go to the
    block loop and the parse), against the full path; the first read gives the shape."""
    blocks = [_run_block(t, ascii, usage) for t in texts]
    reads = [_run_block("first", ascii, usage)]
    start = 0
    for split in [*sorted({s % len(blocks) for s in splits}), len(blocks)]:
        if split > start:
            reads.append(b"".join(blocks[start:split]))
            start = split
    _agree("/v1/chat/completions", reads)


def test_runs_of_shaped_blocks_are_taken_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: in reads of several events (the benchmark's stream, five a read) the
    blocks of the stream's shape go as runs (`_shaped_run`), not one by one: in the first
    read after the block that gives the shape, in the last one before the finish and usage
    chunks. A block the shape cannot take (an escape in its text) is the loop's, and a run
    begins after it."""
    events = stream_events(20)
    reads = [b"".join(events[i : i + 5]) for i in range(0, len(events), 5)]
    runs: list[int] = []
    shaped_run = plain_reads._shaped_run

    def counted(*args: Any) -> Any:
        run = shaped_run(*args)
        runs.append(0 if run is None else len(run[0]))
        return run

    monkeypatch.setattr(plain_reads, "_shaped_run", counted)
    assert _run("/v1/chat/completions", reads, UsageChunkFilter(), plain=True) == _run(
        "/v1/chat/completions", reads, UsageChunkFilter(), plain=False
    )
    # role, the first content (the shape), three in a run; five; five; two, then the end
    assert runs == [3, 5, 5, 2], runs
    tracker = StreamUsageTracker(inspect_request("/v1/chat/completions", {"stream": True}))
    tracker.feed_plain(reads[0])
    runs.clear()
    escaped = reads[1].replace(b'"content":"', b'"content":"\\u0041', 1)  # an escape
    taken, contents, _, _ = tracker.feed_plain(escaped)
    # The escaped block is parsed (and its shape taken: none, with an escape), the next one
    # gives the shape again, and the three after it go as a run.
    assert runs == [0, 3] and (taken, contents) == (len(escaped), 5)


def test_the_full_parse_reads_each_kind_of_delta() -> None:
    """`delta_chars` and `_chunk` (the dict-first type tests): a legacy `function_call`
    counts its name and arguments, a null one and a null delta nothing; tool calls count
    their function's; a usage-only chunk is told by its shape."""
    assert delta_chars({"function_call": {"name": "get", "arguments": '{"a":1}'}}) == (10, 0)
    assert delta_chars({"function_call": None, "content": "ab"}) == (2, 0)
    assert delta_chars({"function_call": None}) is None
    assert delta_chars({"tool_calls": [{"function": {"name": "f", "arguments": "xy"}}]}) == (3, 0)
    assert delta_chars({"tool_calls": [None, {"function": None}]}) == (0, 0)
    tracker = StreamUsageTracker(inspect_request("/v1/chat/completions", {"stream": True}))
    kinds = [
        tracker.feed(event)
        for event in SSEDecoder().feed(
            b'data: {"choices":[{"index":0,"delta":{"function_call":{"name":"get"}}}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":null,"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
            b'data: {"choices":[null],"usage":null}\n\n'
        )
    ]
    assert kinds == [EventKind.CONTENT, EventKind.OTHER, EventKind.USAGE_ONLY, EventKind.OTHER]
    assert tracker.content_chunks == 1 and tracker.finish_reason == "stop"
    assert tracker.generated == 2 and tracker.reported


def test_runs_of_other_choices_with_text_beyond_ascii_agree() -> None:
    """The plain read's own paths, not left to the draw of the generated tests: a compact
    stream (as providers write it: a `Shape` forms) of choice 1's or 2's chunks (tallied by
    index), their text UTF-8 beyond ASCII or plain ASCII, with and without the closing usage,
    several of one shape in a read and each in its own."""

    def chunk(delta: dict[str, str], index: int, usage: bool) -> bytes:
        obj: dict[str, object] = {
            "choices": [{"index": index, "delta": delta, "finish_reason": None}]
        }
        if usage:
            obj["usage"] = None
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return b"data: " + data.encode() + b"\n\n"

    for index in (1, 2, 0):
        for usage in (True, False):
            for texts in (["héllo", "wörld", "日本", "x", "ñ" * 40], ["a", "bc", "def"]):
                events = [
                    chunk({"role": "assistant", "content": ""}, index, usage),
                    *(chunk({"content": text}, index, usage) for text in texts),
                ]
                _agree("/v1/chat/completions", [b"".join(events)])
                _agree("/v1/chat/completions", events)


def test_blocks_whose_shape_has_another_usage_are_searched_by_the_filter() -> None:
    """A stream whose chunks hold a `"usage"` besides the closing null (here a member's
    name inside another object): its shape's blocks (a run of choice 0's, one by one for
    choice 1's) each keep that one and lose the closing null, as the full path edits them,
    after a block cut at its end in the same read."""
    for index in (0, 1):
        block = (
            b'data: {"x":{"usage":null},"choices":[{"index":%d,"delta":{"content":"y"}}],'
            b'"usage":null}\n\n' % index
        )
        read = b"".join([stream_events(5)[0], block, block, block, b"data: [DONE]\n\n"])
        for chunk_filter in _FILTERS:
            _agree_with(read, chunk_filter)


def _agree_with(read: bytes, chunk_filter: UsageChunkFilter | None) -> None:
    plain = _run("/v1/chat/completions", [read], chunk_filter, plain=True)
    assert plain == _run("/v1/chat/completions", [read], chunk_filter, plain=False)


def test_the_usual_end_is_answered_without_the_event_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body's end after whole events (the decoder holds nothing): the end checked, and
    what `_sse_events` answers for it (the scrubber's flush), without it; a stream still
    held (no content came) is not cut short of its failure."""
    events = stream_events(5)
    for chunk_filter in _FILTERS:
        pump, stream, _ = _pump("/v1/chat/completions", chunk_filter, plain=True)
        upstream = _Upstream()
        pump._sse_step(stream, upstream, b"".join(events), 0.0)
        pump.scrubber._held = b"sk-sec"  # (what a scrubber holds back that may begin a secret)

        def refused(*args: Any) -> Any:
            raise AssertionError("the event step ran for the usual end")

        with monkeypatch.context() as patched:
            patched.setattr(type(pump), "_sse_events", refused)
            assert pump._sse_step(stream, upstream, b"", 1.0) == b"sk-sec"
        assert upstream.ends == [False]
    pump, stream, _ = _pump("/v1/chat/completions", None, plain=True)
    stream.held = []
    with pytest.raises(AttemptFailed, match="ended the stream before any content"):
        pump._sse_step(stream, _Upstream(), b"", 0.0)
