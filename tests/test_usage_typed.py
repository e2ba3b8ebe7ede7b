"""The typed reading of a non-streamed answer's usage (proxy/usage/reported.py `read_usage_at`)
agrees with the general one (`json` and `parse_usage`).

`tail_usage` reads each candidate usage object in place with a typed msgspec decoder and falls
back to `json` where that one refuses. Here it is compared with the general reading alone
(`_reference`, the way `tail_usage` read every candidate before) on generated answers: usage
objects with counts of every type, nested details, duplicate keys, braces inside strings,
decoy `"usage"` members after the real one, odd spacing, escapes, bytes that are not UTF-8,
answers cut short. A separate test shows the typed reading really takes the usual answers, so
the agreement is not vacuous.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fake_upstream import chat_body
from proxy.usage import body as body_module
from proxy.usage.body import TAIL_BYTES, _usual_usage, body_usage, tail_usage
from proxy.usage.facts import inspect_request
from proxy.usage.reported import UNREAD, Reported, parse_usage, read_usage_at

FIXTURES = Path(__file__).parent / "fixtures"
_USAGE_KEY = b'"usage"'
_SPACE = b" \t\r\n"
_DECODER = json.JSONDecoder()


def _reference(body: bytes, tail: int = TAIL_BYTES) -> Reported | None:
    """`tail_usage` reading every candidate with `json` and `parse_usage` (its general way)."""
    start = max(0, len(body) - tail)
    window = body[start:]
    end = len(window)
    while True:
        i = window.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return None
        end = i
        before = i - 1
        while before >= 0 and window[before] in _SPACE:
            before -= 1
        if before < 0 or window[before] not in b",{":
            continue
        j = i + len(_USAGE_KEY)
        while j < len(window) and window[j] in _SPACE:
            j += 1
        if j >= len(window) or window[j] != 0x3A:
            continue
        j += 1
        while j < len(window) and window[j] in _SPACE:
            j += 1
        if window[j : j + 1] != b"{":
            continue
        try:
            value, _ = _DECODER.raw_decode(window[j:].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            continue
        reported = parse_usage(value)
        if reported is not None:
            return reported


_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('"\\{}\n\x01é😀'),
    max_size=8,
)
_count = st.one_of(
    st.integers(0, 2000),
    st.integers(-3, 10**9 + 2),
    st.integers(2**63 - 2, 2**70),
    st.just(-(2**64)),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.just("12"),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=5,
)


def _usage_of(count: st.SearchStrategy[Any], details: st.SearchStrategy[Any]) -> Any:
    return st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": count,
            "input_tokens": count,
            "completion_tokens": count,
            "output_tokens": count,
            "total_tokens": count,
            "prompt_tokens_details": details,
            "input_tokens_details": details,
            "completion_tokens_details": details,
            "output_tokens_details": details,
        },
    )


def _details_of(count: st.SearchStrategy[Any]) -> Any:
    return st.fixed_dictionaries(
        {},
        optional={"cached_tokens": count, "reasoning_tokens": count, "audio_tokens": count},
    )


# Plain counts (what the typed decoder reads; out of range ones included) and odd ones.
_int = st.one_of(st.integers(0, 50), st.integers(-3, -1), st.integers(10**9 - 1, 10**9 + 2))
_plain_usage = _usage_of(_int | st.none(), _details_of(_int) | st.none())
_odd_usage = _usage_of(_count, _details_of(_count) | _json | st.none()).map(
    lambda usage: {**usage, "note": "}{"}
)
_usage = st.one_of(_plain_usage, _plain_usage, _odd_usage)


@st.composite
def _answers(draw: st.DrawFn) -> bytes:
    """A non-streamed answer as an upstream might write it."""
    usage: Any = draw(st.one_of(_usage, _usage, _usage, st.none(), _json))
    answer: dict[str, Any] = {
        "id": draw(_text),
        "choices": [{"message": {"content": draw(_text)}, "finish_reason": "stop"}],
    }
    where = draw(st.sampled_from(["last", "middle", "first", "nested", "none"]))
    if where == "first":
        answer = {"usage": usage, **answer}
    elif where == "nested":
        answer["metadata"] = {"usage": usage}
    elif where != "none":
        answer["usage"] = usage
    if where == "middle":
        answer["system_fingerprint"] = draw(_text)
    if draw(st.booleans()):  # a decoy: a later member named usage, deeper in the answer
        answer["extra"] = {"usage": draw(st.one_of(_usage, _json))}
    text = json.dumps(
        answer,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")])),
    )
    how = draw(st.sampled_from(["plain", "plain", "plain", "duplicate", "cut", "bytes", "nan"]))
    if how == "duplicate" and isinstance(usage, dict) and usage:
        key = draw(st.sampled_from(sorted(usage)))
        inner = json.dumps(usage)[:-1]
        duplicated = inner + ("," if usage else "") + json.dumps(key) + ":"
        duplicated += json.dumps(draw(_count)) + "}"
        text = text.replace(json.dumps(usage, separators=(",", ":")), duplicated, 1)
    elif how == "cut" and len(text) > 1:
        text = text[: draw(st.integers(1, len(text) - 1))]
    raw = text.encode()
    if how == "bytes":  # bytes that are not UTF-8, inside a string or anywhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\x80"])) + raw[at:]
    elif how == "nan":
        raw = raw.replace(b"0", b"NaN", 1)
    return raw


@settings(max_examples=1500, deadline=None)
@given(_answers(), st.sampled_from([TAIL_BYTES, TAIL_BYTES, 40, 7]))
def test_the_typed_reading_agrees_with_the_general_one(body: bytes, tail: int) -> None:
    assert tail_usage(body, tail) == _reference(body, tail)
    assert tail_usage(bytearray(body), tail) == _reference(body, tail)


@settings(max_examples=800, deadline=None)
@given(_usage)
def test_a_usage_object_read_in_place_is_what_parse_usage_reads(usage: dict[str, Any]) -> None:
    raw = b' {"usage": ' + json.dumps(usage).encode() + b', "x": "}"}'
    found = read_usage_at(raw, raw.index(b"{", 2))
    if found is not UNREAD:
        assert found == parse_usage(usage)


def test_the_usual_answers_are_read_the_typed_way() -> None:
    """The agreement above is not vacuous: answers as OpenAI, llama.cpp and the Responses API
    write them never need `json`."""
    answers = [
        chat_body(),
        (FIXTURES / "llama-cpp" / "chat.json").read_bytes(),
        (FIXTURES / "openai" / "responses.json").read_bytes(),
        (FIXTURES / "openai" / "embeddings.json").read_bytes(),
    ]
    for body in answers:
        at = body.rindex(b"{", 0, body.rindex(b'"usage"') + 12)
        usage = json.loads(body)["usage"]
        assert read_usage_at(body, at) == parse_usage(usage), body[:60]
        assert parse_usage(usage) is not None


def test_an_answer_nested_too_deep_is_estimated_not_an_error() -> None:
    """Nesting past Python's recursion limit (json raises RecursionError, msgspec too) makes
    the usage object unreadable, like any malformed one: an estimate, not an exception out of
    accounting (which logged a traceback for an upstream's input)."""
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"choices":[],"usage":{"completion_tokens":4,"x":' + deep + b"}}"
    assert tail_usage(body) is None
    facts = inspect_request("/v1/chat/completions", {"messages": []})
    usage = body_usage(body, facts, None)
    assert usage.prompt_estimated and usage.completion_estimated


def test_the_byte_before_the_window_is_not_looked_at() -> None:
    """A `"usage"` at the window's first byte has nothing before it in the window: not a
    member name there (the window is `tail` bytes, read in place, not copied)."""
    body = b'{"a":1,"usage":{"completion_tokens":3}}'
    edge = len(body) - body.index(b'"usage"')
    assert tail_usage(body, edge) is None
    found = tail_usage(body, edge + 1)
    assert found is not None and found.completion == 3


def test_the_first_look_takes_only_a_member_named_usage() -> None:
    """`tail_usage`'s first look (compact `,"usage":{`) refuses what the general way refuses: a
    `"usage"` after anything but `,` or `{` (no member name), or at the window's first byte
    (what came before it is not known)."""
    usage = b'"usage":{"prompt_tokens":1,"completion_tokens":2}'
    for body in (b"[" + usage + b"]", b'{"a":' + usage + b"}", b" " + usage, usage):
        assert tail_usage(body) is None, body
        assert _reference(body) is None, body
    assert tail_usage(b"{" + usage + b"}") == Reported(1, 2, None, None)
    assert tail_usage(b"{" + usage + b"}", len(usage) + 1) is None


class _NoCount(bytes):
    """An answer whose `count` fails: read without the walk's brace counts."""

    def count(self, *args: Any) -> int:
        raise AssertionError("walked")


def test_the_usual_usage_is_read_in_one_look() -> None:
    """OpenAI's compact usage and llama.cpp's end with a details object: their end is found
    at their first `}}`, without the walk (`_NoCount`); a usage without one is walked."""
    for body in [chat_body(), (FIXTURES / "llama-cpp" / "chat.json").read_bytes()]:
        at = body.rindex(b"{", 0, body.rindex(b'"usage"') + 12)
        found = read_usage_at(_NoCount(body), at)
        assert found == parse_usage(json.loads(body)["usage"]) and found is not None
    flat = b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"x":{"y":1}}'
    with pytest.raises(AssertionError, match="walked"):
        read_usage_at(_NoCount(flat), 9)
    assert read_usage_at(flat, 9) == Reported(1, 2, None, None)


# Usage objects that report both counts (most of them in range), with any details, as the
# last member of the answer or followed by others: the answers `body_usage`'s one look reads.
_both = st.fixed_dictionaries(
    {
        "prompt_tokens": st.sampled_from([True] * 3 + [False]).flatmap(
            lambda usual: st.integers(0, 50) if usual else _int
        ),
        "completion_tokens": st.sampled_from([True] * 3 + [False]).flatmap(
            lambda usual: st.integers(0, 50) if usual else _int
        ),
    },
    optional={
        "total_tokens": _count,
        "input_tokens": _int,
        "output_tokens": _int,
        "prompt_tokens_details": _details_of(_int) | st.none() | _json,
        "input_tokens_details": _details_of(_int) | st.none(),
        "completion_tokens_details": _details_of(_int) | st.none() | _json,
        "output_tokens_details": _details_of(_int) | st.none(),
    },
)


@st.composite
def _usual_answers(draw: st.DrawFn) -> bytes:
    usage = draw(_both)
    answer: dict[str, Any] = {"id": draw(_text), "choices": [], "usage": usage}
    for name in draw(st.lists(st.sampled_from(["system_fingerprint", "x", "usage2"]), max_size=2)):
        answer[name] = draw(_json)
    if draw(st.sampled_from([False, False, True])):  # nested in another object, or not
        answer = {"response": answer, **({"after": 1} if draw(st.booleans()) else {})}
    text = json.dumps(
        answer,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (",", ":"), (", ", ": ")])),
    )
    text += draw(st.sampled_from(["", "", "", "\n", " ", "x", "}"]))
    raw = text.encode()
    if draw(st.sampled_from([False] * 5 + [True])):  # cut short
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


_CHAT_FACTS = inspect_request(
    "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
)
_EMBEDDING_FACTS = inspect_request("/v1/embeddings", {"input": "hello"})


@settings(max_examples=1500, deadline=None)
@given(_usual_answers() | _answers(), st.booleans())
def test_the_usual_usage_is_the_general_ways(body: bytes, embeddings: bool) -> None:
    """`body_usage`'s one look (`_usual_usage`) gives what its general way gives: the general
    way is `body_usage` with `identity` as the content encoding (no look: decoded as it is)."""
    facts = _EMBEDDING_FACTS if embeddings else _CHAT_FACTS
    general = body_usage(body, facts, "identity")
    assert body_usage(body, facts, None) == general
    assert body_usage(bytearray(body), facts, None) == general
    usual = _usual_usage(body)
    assert usual is None or usual == general


def test_the_usual_answers_take_the_one_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: OpenAI's and llama.cpp's chat answers are read by `_usual_usage`, without
    `tail_usage`; a usage nested in another object, or without a count, is not."""

    def no_tail(*args: object) -> None:
        raise AssertionError("tail_usage was called")

    monkeypatch.setattr(body_module, "tail_usage", no_tail)
    for body in [chat_body(), (FIXTURES / "llama-cpp" / "chat.json").read_bytes()]:
        usage = json.loads(body)["usage"]
        found = body_usage(body, _CHAT_FACTS, None)
        assert (found.prompt_tokens, found.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert not found.prompt_estimated and not found.completion_estimated
    assert _usual_usage(b'{"a":{"usage":{"prompt_tokens":1,"completion_tokens":2}},"b":1}') is None
    assert _usual_usage(b'{"a":1,"usage":{"prompt_tokens":1}}') is None


@pytest.mark.parametrize(
    ("usage", "one_look"),
    [
        ('{"prompt_tokens":3,"completion_tokens":4}', True),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"input_tokens_details":{"cached_tokens":2}}',
            True,
        ),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"audio_tokens":1},'
            '"input_tokens_details":{"cached_tokens":2}}',
            True,
        ),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":null,'
            '"input_tokens_details":{"cached_tokens":2},"output_tokens_details":{"reasoning_tokens":1}}',
            True,
        ),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"completion_tokens_details":{},'
            '"output_tokens_details":{"reasoning_tokens":1}}',
            True,
        ),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":1},'
            '"input_tokens_details":{"cached_tokens":2}}',
            True,
        ),
        ('{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":[1]}', False),
        (
            '{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":-1}}',
            False,
        ),
        ('{"input_tokens":3,"output_tokens":4}', False),
    ],
)
def test_the_usual_usage_reads_each_details_object_as_the_general_way(
    usage: str, one_look: bool
) -> None:
    body = ('{"id":"x","usage":' + usage + ',"system_fingerprint":"fp"}').encode()
    general = body_usage(body, _CHAT_FACTS, "identity")
    assert body_usage(body, _CHAT_FACTS, None) == general
    assert _usual_usage(body) == (general if one_look else None)
