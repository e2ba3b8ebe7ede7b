"""A chunk read by its typed fields (`read_chunk`, `StreamUsageTracker._fields`: the plain
reads' way with a stream's finish and usage chunks) against the full parse (`parse_object`,
`_chunk`): whatever the typed decoder accepts, the same answer and the same tracker after it,
on generated chunks (odd models, choices, deltas, usage objects, errors, Responses types,
duplicate keys). And not vacuous: the usual finish and usage chunks are accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bench.fake_upstream import stream_events
from proxy.sse import SSEDecoder
from proxy.usage import RequestFacts, StreamUsageTracker, inspect_request, plain_reads
from proxy.usage.event_kind import EVENT_CONTENT, EVENT_OTHER, EVENT_USAGE_ONLY
from proxy.usage.fast import choice_sizes, content_sizes, parse_object, read_chunk
from tests.test_usage_fast import _choice, _json, _scalar, _state, _text
from tests.test_usage_typed import _usage

FIXTURES = Path(__file__).parent / "fixtures"
_FACTS: RequestFacts = inspect_request("/v1/chat/completions", {"model": "m", "stream": True})

_texts = st.one_of(st.text(min_size=1, max_size=12), _text, st.none(), st.just(""))
# Choices the typed decoder takes (tests/test_usage_fast.py's `_choice` is mostly odd ones).
_usual_choice = st.fixed_dictionaries(
    {"finish_reason": st.sampled_from([None, "stop", "length"])},
    optional={
        "index": st.integers(0, 3) | st.none(),
        "delta": st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "role": st.just("assistant"),
                "content": _texts,
                "refusal": _texts,
                "reasoning_content": _texts,
                "reasoning": _texts,
                "tool_calls": st.none(),
            },
        ),
        "text": _texts,
        "logprobs": st.none(),
    },
)
_chunk = st.fixed_dictionaries(
    {},
    optional={
        "id": _text,
        "model": st.one_of(_text, st.none(), st.integers(0, 3), st.just("m" * 300), _json),
        "choices": st.one_of(
            st.lists(st.one_of(_usual_choice, _usual_choice, _choice, _scalar), max_size=3),
            st.none(),
            _json,
        ),
        "usage": st.one_of(st.none(), _usage, _usage, _json),
        "error": st.one_of(st.none(), _text, st.fixed_dictionaries({"message": _text})),
        "type": st.one_of(st.none(), st.sampled_from(["response.output_text.delta", "error"])),
        "extra": _json,
    },
)


# Chunks the typed decoder mostly takes: a stream's finish and usage chunks and their kin.
_usual_chunk = st.fixed_dictionaries(
    {"choices": st.lists(_usual_choice, max_size=3)},
    optional={
        "id": _text,
        "model": _text | st.none(),
        "usage": st.none() | _usage,
        "error": st.none(),
        "extra": _json,
    },
)


@st.composite
def _chunks(draw: st.DrawFn) -> bytes:
    """A chunk as an upstream might write it: compact or spaced, escaped or not, sometimes
    with a key written twice (the last one counts, for both readers)."""
    obj = draw(_usual_chunk | _chunk)
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    if obj and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(obj)))
        value = draw(st.one_of(_json, _usage, st.lists(_choice, max_size=2)))
        text = text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(value) + "}"
    return text.encode()


def _tracker(model: str | None) -> StreamUsageTracker:
    tracker = StreamUsageTracker(_FACTS)
    tracker.response_model = model
    tracker.generated = tracker._estimated = tracker._est_since_report = 3  # counted before
    return tracker


def _slots(tracker: StreamUsageTracker) -> dict[str, Any]:
    return {name: getattr(tracker, name) for name in StreamUsageTracker.__slots__}


@settings(max_examples=1500, deadline=None)
@given(_chunks(), st.sampled_from([None, "earlier"]))
def test_the_typed_fields_read_a_chunk_as_its_full_parse(data: bytes, model: str | None) -> None:
    fields = read_chunk(data)
    if fields is None:
        event("refused: the full parse reads it")
        return
    obj = parse_object(data)
    assert obj is not None  # (what the typed decoder reads is an object the parse reads too)
    typed, full = _tracker(model), _tracker(model)
    kind = typed._fields(fields)
    assert kind is full._chunk(obj)
    assert _slots(typed) == _slots(full)
    event(f"{kind.name}, usage {'read' if fields.usage is not None else 'none'}")
    sizes = None if fields.usage is not None else choice_sizes(fields.choices)
    if sizes is not None:
        # The plain reads' way with a content chunk's sizes: what the parse counts, but for
        # the model name that only the full parse reads (`feed_plain`, `feed`).
        plain = _tracker(model)
        assert plain._content(sizes) is kind
        assert {**_slots(plain), "response_model": None} == {**_slots(full), "response_model": None}
        known = content_sizes(data)
        assert known is None or known == sizes


def test_the_usual_finish_and_usage_chunks_take_the_typed_way() -> None:
    """fake_upstream's stream (OpenAI's shape) and the recorded include_usage fixtures: each
    chunk with a finish or usage is read by its fields, as its full parse reads it."""
    datas = [e[len(b"data: ") : -2] for e in stream_events(5)[:-1]]
    for path in sorted(FIXTURES.glob("*/chat-stream*include-usage*.sse")):
        datas += [
            line[len(b"data: ") :]
            for line in path.read_bytes().split(b"\n")
            if line.startswith(b"data: {")
        ]
    ends = [d for d in datas if b'"finish_reason":"' in d or b'"usage":{' in d]
    assert len(ends) >= 4
    kinds = set()
    for data in ends:
        fields = read_chunk(data)
        assert fields is not None, data
        obj = parse_object(data)
        assert obj is not None
        typed, full = _tracker(None), _tracker(None)
        kinds.add(typed._fields(fields))
        assert kinds >= {full._chunk(obj)}
        assert _slots(typed) == _slots(full)
        assert typed.response_model is not None
    assert EVENT_USAGE_ONLY in kinds and (EVENT_OTHER in kinds or EVENT_CONTENT in kinds)


def test_a_usual_stream_read_whole_is_counted_without_the_full_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`feed_plain` of a whole stream in one read (role, content, finish, usage, [DONE]):
    no dict of any chunk is built, and the counts are the full parse's (the reference
    tracker's, every event parsed in full)."""
    read = b"".join(stream_events(6))
    reference = StreamUsageTracker(_FACTS, fast=False)
    for sse in SSEDecoder().feed(read):
        reference.feed(sse)

    def refused(data: bytes) -> None:
        raise AssertionError(f"a full parse of {data!r}")

    monkeypatch.setattr(plain_reads, "parse_object", refused)
    typed = StreamUsageTracker(_FACTS)
    taken, contents, _, usage_only = typed.feed_plain(read)
    assert taken == len(read) and contents == reference.content_chunks and usage_only
    assert _state(typed) == _state(reference) and typed.reported and typed.terminated
