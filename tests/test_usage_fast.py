"""The stream classification fast path (proxy/usage/fast.py) agrees with the full parse.

A tracker with the fast path and one without (`fast=False`: `json.loads` of every event) are
fed the same events; after every event their answers and everything they counted must be equal.
Events: every event of every recorded fixture (tests/fixtures and $HANGUP_SHARED/fixtures) and
generated ones (chunk-shaped objects with fields of every type, odd spacing, escapes, duplicate
keys, broken JSON). A separate test shows the fast path really takes the ordinary chunks, so
the agreement tests are not vacuous.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import SSEDecoder, SSEEvent
from proxy.usage import (
    EventKind,
    StreamUsageTracker,
    UsageChunkFilter,
    inspect_request,
    strip_usage_member,
)
from proxy.usage.fast import content_sizes, parse_json

HERE = Path(__file__).parent / "fixtures"
SHARED = Path(os.environ.get("HANGUP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURE_FILES = sorted(HERE.rglob("*.sse")) + sorted((SHARED / "fixtures").rglob("*.sse"))
PATHS = {"responses": "/v1/responses", "completions-": "/v1/completions"}


def _path_for(fixture: Path) -> str:
    for needle, path in PATHS.items():
        if needle in fixture.name:
            return path
    return "/v1/chat/completions"


def _events(data: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(data) + decoder.flush()


def _generated(tracker: StreamUsageTracker) -> int:
    """What `generated_tokens` means, from the counts it is kept from: the last reported
    completion count plus the estimate since that report, or the estimate alone."""
    r = tracker._reported
    if r is None or r.completion is None:
        return tracker._estimated
    return r.completion + tracker._est_since_report


def _state(tracker: StreamUsageTracker) -> tuple[Any, ...]:
    # The tracker keeps `generated` up to date as it counts (the pump reads it every write).
    assert tracker.generated == _generated(tracker), "generated_tokens out of step"
    return (
        tracker.content_chunks,
        dict(tracker.chunks_by_choice),
        dict(tracker.chars_by_choice),
        tracker.malformed_events,
        tracker.response_id,
        tracker.finish_reason,
        tracker.error,
        tracker.done,
        tracker.reported,
        tracker.generated_tokens,
        tracker.usage(),
    )


def _agree(events: list[SSEEvent], path: str = "/v1/chat/completions") -> None:
    facts = inspect_request(path, {"model": "m", "stream": True})
    fast, full = StreamUsageTracker(facts), StreamUsageTracker(facts, fast=False)
    for n, event in enumerate(events):
        got, want = fast.feed(event), full.feed(event)
        assert got is want, f"event {n} {event.data!r}: fast {got}, full parse {want}"
        assert _state(fast) == _state(full), f"after event {n} {event.data!r}"


def test_the_fixtures_are_found() -> None:
    names = {f.name for f in FIXTURE_FILES}
    assert "chat-stream-include-usage.sse" in names and len(FIXTURE_FILES) >= 8


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fast_path_agrees_on_every_recorded_event(fixture: Path) -> None:
    _agree(_events(fixture.read_bytes()), _path_for(fixture))


def test_fast_path_takes_the_ordinary_chunks() -> None:
    """Role and content chunks go the fast way; finish, usage, tool calls and [DONE] do not."""
    events = _events((HERE / "openai" / "chat-stream-include-usage.sse").read_bytes())
    fast = [e.data is not None and content_sizes(e.data) is not None for e in events]
    # role chunk + content chunks are fast; the finish chunk, the usage chunk and [DONE] are not
    assert fast == [True] * (len(events) - 3) + [False] * 3
    tools = _events((HERE / "openai" / "chat-stream-tool-call-include-usage.sse").read_bytes())
    assert not any(
        e.data is not None and '"tool_calls"' in e.data and content_sizes(e.data) is not None
        for e in tools
    )


# --- generated events -----------------------------------------------------------------------

_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('"\\\n\x01é😀'),
    max_size=12,
)
_scalar = st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | _text
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)


_str_or_odd = st.one_of(_text, st.none(), st.integers(0, 3), st.just(""), _json)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["assistant", None, 3]),
        "content": _str_or_odd,
        "refusal": _str_or_odd,
        "reasoning_content": _str_or_odd,
        "reasoning": _str_or_odd,
        "tool_calls": st.one_of(st.none(), st.just([]), _json),
        "function_call": st.one_of(st.none(), _json),
    },
)
_choice = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(
            st.integers(-2, 3), st.none(), st.booleans(), st.just("0"), st.just(1.0)
        ),
        "delta": st.one_of(_delta, st.none(), _text),
        "text": _str_or_odd,
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length"]), st.just(1)),
        "logprobs": st.none(),
    },
)
_chunk = st.fixed_dictionaries(
    {},
    optional={
        "id": _text,
        "object": st.just("chat.completion.chunk"),
        "choices": st.one_of(st.lists(st.one_of(_choice, _scalar), max_size=3), st.none(), _json),
        "usage": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"prompt_tokens": st.integers(0, 50), "completion_tokens": st.integers(0, 50)}
            ),
            _json,
        ),
        "error": st.one_of(st.none(), _text, st.fixed_dictionaries({"message": _text})),
        "type": st.one_of(st.none(), st.sampled_from(["response.output_text.delta", "error"])),
        "extra": _json,
    },
)


@st.composite
def _serialised(draw: st.DrawFn) -> str:
    """A chunk as an upstream might write it: compact or spaced, escaped or not, sometimes
    with a duplicated key or cut short."""
    obj = draw(_chunk)
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")])),
    )
    how = draw(st.sampled_from(["plain", "plain", "plain", "duplicate", "cut", "garbage"]))
    if how == "duplicate" and obj:
        key = draw(st.sampled_from(sorted(obj)))
        value = json.dumps(draw(_choice_or_json))
        text = text[:-1] + (", " if obj else "") + json.dumps(key) + ": " + value + "}"
    elif how == "cut" and len(text) > 1:
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif how == "garbage":
        text = text + draw(st.sampled_from([" ", "x", "}", "\n", " NaN"]))
    return text


_choice_or_json = st.one_of(st.lists(_choice, max_size=2), _json)


@settings(max_examples=400, deadline=None)
@given(st.lists(_serialised(), min_size=1, max_size=6))
def test_fast_path_agrees_on_generated_events(datas: list[str]) -> None:
    _agree([SSEEvent(data=d, raw=b"data: " + d.encode() + b"\n\n") for d in datas])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            list(
                {
                    e.data: e
                    for f in FIXTURE_FILES
                    for e in _events(f.read_bytes())
                    if e.data is not None and e.event is None
                }.values()
            )
        ),
        max_size=8,
    )
)
def test_fast_path_agrees_on_recorded_events_in_any_order(events: list[SSEEvent]) -> None:
    _agree(events)


def test_kinds_are_those_of_the_full_parse_on_a_plain_content_chunk() -> None:
    data = '{"choices":[{"index":1,"delta":{"content":"h\\u00e9\\n"},"finish_reason":null}]}'
    assert content_sizes(data) == [(1, 3, 0)]
    tracker = StreamUsageTracker(inspect_request("/v1/chat/completions", {"stream": True}))
    assert tracker.feed(SSEEvent(data=data)) is EventKind.CONTENT
    assert tracker.chars_by_choice == {1: 3}


# --- the usage filter's shortcut -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b'"usage":null', b',"usage":null}', b'"usage"', b",", b"{", b"}", b" ", b"x", b":"]
        ),
        max_size=8,
    ).map(b"".join),
    st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b""]),
)
def test_filter_shortcut_is_strip_usage_member(body: bytes, end: bytes) -> None:
    raw = b"data: " + body + end
    event = SSEEvent(data=body.decode(), raw=raw)
    assert UsageChunkFilter().client_bytes(event, EventKind.OTHER) == strip_usage_member(raw)


def test_filter_shortcut_strips_the_usual_null_usage() -> None:
    raw = b'data: {"choices":[],"usage":null}\n\n'
    got = UsageChunkFilter().client_bytes(SSEEvent(data="-", raw=raw), EventKind.CONTENT)
    assert got == b'data: {"choices":[]}\n\n'
    comment = SSEEvent(comment=True, raw=b': ,"usage":null}\n\n')
    assert UsageChunkFilter().client_bytes(comment, EventKind.OTHER) == comment.raw


# --- the full parse through msgspec ---------------------------------------------------------


def _loaded(parse: Any, text: str) -> str:
    try:
        return repr(("value", parse(text)))  # repr: NaN is not equal to itself
    except ValueError as exc:
        return repr(("refused", type(exc).__name__ == "JSONDecodeError"))


@settings(max_examples=500, deadline=None)
@given(
    _serialised()
    | st.sampled_from(
        [
            '{"a":NaN}',
            '{"a":-Infinity}',
            '{"a":1e400}',
            '{"a":"\\ud800"}',
            '{"a":' + "9" * 5000 + "}",
            '{"a":' + "9" * 400 + "}",
            '{"a":1,"a":{"b":2}}',
            '{"a":0.' + "1" * 500 + "}",
            ' {"a":[1,2.5e-400,-0]} ',
            '{"a":1}x',
            "[1]",
            '"text"',
        ]
    )
)
def test_parse_json_reads_what_json_loads_reads(text: str) -> None:
    assert _loaded(parse_json, text) == _loaded(json.loads, text)


# --- Responses lifecycle events: read for their `response`'s id, usage and error only -------

_LIFECYCLE = ["response.created", "response.in_progress", "response.completed",
              "response.incomplete", "response.failed", "response.cancelled"]  # fmt: skip
_logprob = st.fixed_dictionaries(
    {"token": _text, "logprob": st.floats(allow_nan=False, allow_infinity=False)},
    optional={"bytes": st.lists(st.integers(0, 255), max_size=3)},
)
_response = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(_text, st.none(), st.integers(0, 3)),
        "status": _text,
        "usage": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"input_tokens": st.integers(0, 50), "output_tokens": st.integers(0, 50)},
                optional={"total_tokens": st.integers(0, 100)},
            ),
            _json,
        ),
        "error": st.one_of(st.none(), _text, st.fixed_dictionaries({"message": _text}), _json),
        "output": st.lists(
            st.fixed_dictionaries(
                {"type": st.just("message")},
                optional={"text": _text, "logprobs": st.lists(_logprob, max_size=4)},
            ),
            max_size=3,
        ),
        "extra": _json,
    },
)
_lifecycle_kind = st.sampled_from(_LIFECYCLE)
_lifecycle = st.fixed_dictionaries(
    {
        "type": st.one_of(
            _lifecycle_kind,
            _lifecycle_kind,
            st.sampled_from(["response.output_text.delta", "error", "other", None, 1]),
        ),
        "response": st.one_of(_response, _response, st.none(), _json),
    },
    optional={
        "delta": _str_or_odd,
        "output_index": st.integers(0, 2),
        "model": _text,
        "usage": st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9)}),
        "choices": st.lists(_choice, max_size=1),
        "extra": _json,
    },
).map(lambda obj: {k: v for k, v in obj.items() if k != "type" or v is not None})


@st.composite
def _lifecycle_event(draw: st.DrawFn) -> SSEEvent:
    """A named Responses lifecycle event as an upstream might send it: its `type` the name's
    or another, with an output (logprobs too) to skip, duplicate members, cut or broken."""
    obj = draw(_lifecycle)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(["plain", "plain", "duplicate", "cut", "garbage", "nan"]))
    if how == "duplicate" and obj:
        key = draw(st.sampled_from(sorted(obj)))
        text = text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(draw(_response)) + "}"
    elif how == "cut" and len(text) > 1:
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif how == "garbage":
        text = text + draw(st.sampled_from([" ", "x", "}", " NaN"]))
    elif how == "nan" and text.endswith("}") and len(text) > 2:
        text = text[:-1] + ', "score": NaN, "big": 123456789012345678901234567890}'
    name = draw(st.sampled_from(_LIFECYCLE))
    return SSEEvent(event=name, data=text, raw=f"event: {name}\ndata: {text}\n\n".encode())


@settings(max_examples=400, deadline=None)
@given(st.lists(_lifecycle_event(), min_size=1, max_size=5))
def test_lifecycle_events_read_by_their_head_agree_with_the_full_parse(
    events: list[SSEEvent],
) -> None:
    _agree(events, "/v1/responses")


def test_a_completed_response_is_not_built_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """`response.completed` with megabytes of logprobs: its usage is read without the full
    parse of its output (which builds every logprob's objects, ~43 ms a MiB)."""
    import proxy.usage.stream as stream

    logprobs = [{"token": "tok", "logprob": -0.1, "bytes": [116, 111, 107]}] * 2000
    output = [{"type": "message", "content": [{"text": "x" * 500, "logprobs": logprobs}]}]
    usage = {"input_tokens": 5, "output_tokens": 2000, "total_tokens": 2005}
    data = json.dumps(
        {"type": "response.completed", "response": {"id": "r1", "output": output, "usage": usage}}
    )
    event = SSEEvent(event="response.completed", data=data, raw=b"")
    tracker = StreamUsageTracker(inspect_request("/v1/responses", {"model": "m", "stream": True}))

    def whole_parse(data: str) -> Any:
        raise AssertionError("the full parse was called")

    monkeypatch.setattr(stream, "parse_json", whole_parse)
    assert tracker.feed(event) is EventKind.DONE
    assert tracker.response_id == "r1"
    assert tracker.usage().completion_tokens == 2000


def test_a_lifecycle_events_skeleton_is_read_by_its_head() -> None:
    """`feed_skeleton` of a huge lifecycle event (proxy/sse_large.py): its head, restored,
    answers as `feed` of the whole event; a marker where a value is read, or a restored
    `type` that is no lifecycle kind, sends the whole event to `feed` (None)."""
    from proxy.usage.skeleton import restore

    usage = {"input_tokens": 3, "output_tokens": 7, "total_tokens": 10}
    response = {"id": "r1", "output": [{"type": "message", "content": []}], "usage": usage}
    data = json.dumps({"type": "response.completed", "response": response})
    event = SSEEvent(event="response.completed", data=data, raw=b"")
    facts = inspect_request("/v1/responses", {"model": "m", "stream": True})
    skeleton, whole = StreamUsageTracker(facts), StreamUsageTracker(facts, fast=False)
    assert skeleton.feed_skeleton(event, lambda obj: restore(obj, [])) is EventKind.DONE
    assert whole.feed(event) is EventKind.DONE
    assert _state(skeleton) == _state(whole)
    assert skeleton.response_id == "r1" and skeleton.usage().completion_tokens == 7
    marked = StreamUsageTracker(facts)
    assert marked.feed_skeleton(event, lambda obj: None) is None
    assert marked.feed_skeleton(event, lambda obj: {**obj, "type": "error"}) is None
    assert _state(marked) == _state(StreamUsageTracker(facts))  # nothing counted
