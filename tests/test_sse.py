from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import SSEDecoder, SSEEvent, ends_block

FIXTURES = sorted((Path(__file__).parent / "fixtures").rglob("*.sse"))
BOM = b"\xef\xbb\xbf"


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def reference(data: bytes) -> list[SSEEvent]:
    """A whole-input reading of the WHATWG rules, independent of the decoder's bookkeeping."""
    events: list[SSEEvent] = []
    body = data[len(BOM) :] if data.startswith(BOM) else data
    raw = data[: len(data) - len(body)]
    block: list[bytes] = []
    pieces = re.split(rb"(\r\n|\r|\n)", body)
    lines = [(pieces[i], pieces[i + 1]) for i in range(0, len(pieces) - 1, 2)]
    if pieces[-1]:
        lines.append((pieces[-1], b""))

    def emit(raw: bytes) -> None:
        fields = [ln for ln in block if not ln.startswith(b":")]
        values: dict[bytes, list[bytes]] = {}
        for ln in fields:
            name, _, value = ln.partition(b":")
            values.setdefault(name, []).append(value[1:] if value.startswith(b" ") else value)
        data_lines = values.get(b"data")
        ids = [v for v in values.get(b"id", []) if b"\0" not in v]
        retries = [v for v in values.get(b"retry", []) if v.isdigit()]
        events.append(
            SSEEvent(
                event=values[b"event"][-1].decode() if b"event" in values else None,
                data=b"\n".join(data_lines).decode() if data_lines else None,
                id=ids[-1].decode() if ids else None,
                retry=int(retries[-1]) if retries else None,
                comment=bool(block) and not fields,
                raw=raw,
            )
        )
        block.clear()

    for line, end in lines:
        raw += line + end
        if line:
            block.append(line)
        elif end:
            emit(raw)
            raw = b""
    if raw:
        emit(raw)
    return events


# --- the fixtures ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_split_at_every_byte(path: Path) -> None:
    data = path.read_bytes()
    whole = decode(data)
    assert whole == reference(data)
    assert b"".join(e.raw for e in whole) == data
    for i in range(1, len(data)):
        assert decode(data[:i], data[i:]) == whole, f"split at byte {i}"


def test_llama_cpp_chat_stream_events() -> None:
    data = (Path(__file__).parent / "fixtures/llama-cpp/chat-stream-include-usage.sse").read_bytes()
    events = decode(data)
    # 1 role chunk + 12 content chunks + finish chunk + usage chunk + [DONE]
    assert len(events) == 16
    assert all(e.raw.endswith(b"\n\n") and e.event is None for e in events)
    assert events[-1].data == "[DONE]"
    assert events[1].data is not None and '"content":" kind"' in events[1].data


def test_responses_fixture_keeps_event_names() -> None:
    data = (Path(__file__).parent / "fixtures/llama-cpp/responses-stream.sse").read_bytes()
    names = [e.event for e in decode(data)]
    assert names[0] == "response.created"
    assert names.count("response.output_text.delta") == 12
    assert names[-1] == "response.completed"


@settings(max_examples=150, deadline=None)
@given(
    path=st.sampled_from(FIXTURES),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40),
)
def test_fixture_any_chunking(path: Path, cuts: list[int]) -> None:
    data = path.read_bytes()
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert decode(*chunks) == decode(data)


# --- arbitrary streams: any chunking, same events, raw adds up ----------------------------------

_TOKENS = [
    b"data",
    b"data:",
    b"data: ",
    b"event: ",
    b"id: ",
    b"retry: ",
    b":",
    b": ping",
    b" ",
    b"x",
    b"12",
    b"\0",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\xc3\xa9",
    BOM,
]
streams = st.lists(st.sampled_from(_TOKENS), max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=streams, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_any_stream_any_chunking(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    events = decode(*chunks)
    assert events == reference(data)
    assert b"".join(e.raw for e in events) == data


@settings(max_examples=100, deadline=None)
@given(data=streams)
def test_byte_at_a_time(data: bytes) -> None:
    assert decode(*(data[i : i + 1] for i in range(len(data)))) == decode(data)


# --- the rules, one by one ---------------------------------------------------------------------


def test_line_endings_are_equivalent() -> None:
    lf = decode(b"event: a\ndata: 1\n\n")
    crlf = decode(b"event: a\r\ndata: 1\r\n\r\n")
    cr = decode(b"event: a\rdata: 1\r\r")
    assert [(e.event, e.data) for e in lf] == [("a", "1")]
    assert [(e.event, e.data) for e in crlf] == [("a", "1")]
    assert [(e.event, e.data) for e in cr] == [("a", "1")]
    assert crlf[0].raw == b"event: a\r\ndata: 1\r\n\r\n"


def test_crlf_split_across_reads_is_one_line_end() -> None:
    # Read as two line ends, "\r" + "\n" would be a blank line and end the block early.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r\n\r") == []  # the final "\r" may still be half of "\r\n"
    [event] = decoder.feed(b"\n")
    assert event.data == "a\nb"
    assert event.raw == b"data: a\r\ndata: b\r\n\r\n"
    assert decoder.flush() == []


def test_cr_at_end_of_read_is_resolved_by_the_next_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    [event] = decoder.feed(b"data: b")  # not "\n": the held "\r" was a line end of its own
    assert (event.data, event.raw) == ("a", b"data: a\r\r")
    [last] = decoder.flush()
    assert (last.data, last.raw) == ("b", b"data: b")


def test_bom_is_skipped_even_when_split() -> None:
    [event] = decode(BOM[:1], BOM[1:2], BOM[2:] + b"data: x\n\n")
    assert event.data == "x"
    assert event.raw == BOM + b"data: x\n\n"
    # Only at the very start: a second BOM is part of a field name, so the line is ignored.
    first, second = decode(BOM + b"data: 1\n\n" + BOM + b"data: 2\n\n")
    assert (first.data, second.data) == ("1", None)


def test_comment_blocks_are_keep_alives() -> None:
    events = decode(b": ping\n\n:\n\ndata: 1\n: inline\n\n")
    assert [(e.comment, e.data) for e in events] == [(True, None), (True, None), (False, "1")]


def test_multiline_data_joined_with_newline() -> None:
    [event] = decode(b'data: {\ndata:  "a": 1\ndata: }\n\n')
    assert event.data == '{\n "a": 1\n}'  # only the first space after the colon is dropped


def test_field_forms() -> None:
    [a, b, c] = decode(b"data:x\n\ndata\n\ndata:\ndata:\n\n")
    assert a.data == "x"
    assert b.data == ""  # a field name without colon has an empty value
    assert c.data == "\n"


def test_id_retry_and_unknown_fields() -> None:
    [event] = decode(b"id: 7\nretry: 3000\nfoo: bar\nevent: e\ndata: d\n\n")
    assert (event.id, event.retry, event.event, event.data) == ("7", 3000, "e", "d")
    [event] = decode(b"id: a\0b\nretry: 3s\ndata: d\n\n")
    assert (event.id, event.retry) == (None, None)  # NUL in id and non-digit retry are ignored
    [event] = decode(b"foo: bar\n\n")
    assert (event.data, event.comment) == (None, False)


def test_stray_blank_lines_become_empty_events() -> None:
    # They carry no data, but keeping them as events makes `raw` add up to the input.
    events = decode(b"\n\ndata: 1\n\n\n")
    assert [e.data for e in events] == [None, None, "1", None]
    assert b"".join(e.raw for e in events) == b"\n\ndata: 1\n\n\n"


def test_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.flush() == []
    assert decoder.feed(b"data: 1\n\ndata: 2") == [SSEEvent(data="1", raw=b"data: 1\n\n")]
    assert decoder.flush() == [SSEEvent(data="2", raw=b"data: 2")]
    assert decoder.flush() == []


def test_invalid_utf8_is_replaced_not_raised() -> None:
    [event] = decode(b"data: \xff\xfe\n\n")
    assert event.data == "\ufffd\ufffd"
    assert event.raw == b"data: \xff\xfe\n\n"
    # In every decoded field: an upstream's bad bytes in an event name or id must not raise.
    raw = b"event: a\xffb\nid: \xfe1\ndata: x\n\n"
    [event] = decode(raw)
    assert (event.event, event.id, event.data) == ("a\ufffdb", "\ufffd1", "x")
    assert event.raw == raw


def test_long_line_in_small_reads() -> None:
    line = b"data: " + b"x" * 100_000 + b"\n\n"
    events = decode(*(line[i : i + 7] for i in range(0, len(line), 7)))
    assert [len(e.data or "") for e in events] == [100_000]


def test_whole_data_blocks_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of whole `data: ...` blocks never reach the general line parser (it is the slow
    part); the first block of another shape and everything after it do."""
    decoder = SSEDecoder()
    decoder.feed(b"data: warm\n\n")  # the first read settles the BOM question
    general: list[bytes] = []
    real = SSEDecoder._feed

    def spy(self: SSEDecoder, chunk: bytes) -> list[SSEEvent]:
        general.append(chunk)
        return real(self, chunk)

    monkeypatch.setattr(SSEDecoder, "_feed", spy)
    events = decoder.feed(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == ['{"a":1}', "[DONE]"] and general == []
    events = decoder.feed(b"data: x\n\n: ping\n\ndata: y\n\n")
    assert [e.data for e in events] == ["x", None, "y"]
    assert general == [b": ping\n\ndata: y\n\n"]
    # A read that ends inside a block: the next read's rest goes the fast way again.
    general.clear()
    assert decoder.feed(b"data: sp") == []
    events = decoder.feed(b'lit\n\ndata: {"b":2}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == ["split", '{"b":2}', "[DONE]"]
    assert general == [b"data: sp", b"lit\n\n"]


@pytest.mark.parametrize(
    ("stream", "complete"),
    [
        (b"data: x\r\r", True),  # CR-only line endings: the block is whole
        (b"data: x\n\r", True),
        (b"data: x\r\n\r", True),
        (b"data: x\n\n\r", True),  # a stray CR after a whole block
        (b"data: x", False),  # cut before the line ended
        (b"data: x\r", False),  # the line ended, the blank line never came
        (b"data: x\n", False),
        (b"data: x\r\n", False),
    ],
)
def test_ends_block_tells_a_whole_last_block_from_a_cut_one(stream: bytes, complete: bool) -> None:
    decoder = SSEDecoder()
    events = decoder.feed(stream) + decoder.flush()
    flushed = [e for e in events if e.raw]
    assert all(ends_block(e.raw) for e in flushed[:-1])
    assert ends_block(flushed[-1].raw) is complete
