from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.outcome import Usage
from proxy.sse import SSEDecoder, SSEEvent
from proxy.usage import (
    ENDPOINTS,
    EventKind,
    RequestFacts,
    StreamUsageTracker,
    UsageChunkFilter,
    body_usage,
    chunk_tokens,
    endpoint_for,
    inject_stream_usage,
    inspect_request,
    strip_usage_member,
)
from proxy.usage.body import FULL_PARSE_MAX, decode_body, is_identity, tail_usage

FIXTURES = Path(__file__).parent / "fixtures"
CHAT = "/v1/chat/completions"
CONTENT, USAGE, DONE, ERROR, OTHER = (
    EventKind.CONTENT,
    EventKind.USAGE_ONLY,
    EventKind.DONE,
    EventKind.ERROR,
    EventKind.OTHER,
)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def events_of(data: bytes, *cuts: int) -> list[SSEEvent]:
    decoder = SSEDecoder()
    out: list[SSEEvent] = []
    for a, b in zip((0, *cuts), (*cuts, len(data)), strict=True):
        out += decoder.feed(data[a:b])
    return out + decoder.flush()


def track(
    data: bytes, facts: RequestFacts, *cuts: int
) -> tuple[list[EventKind], StreamUsageTracker]:
    tracker = StreamUsageTracker(facts)
    return [tracker.feed(e) for e in events_of(data, *cuts)], tracker


def stream_facts(path: str = CHAT, **body: Any) -> RequestFacts:
    return inspect_request(path, {"model": "m", "stream": True, **body})


def chunk(delta: dict[str, Any] | None = None, **extra: Any) -> SSEEvent:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": None}
    obj = {"id": "x", "object": "chat.completion.chunk", "choices": [choice], **extra}
    data = json.dumps(obj)
    return SSEEvent(data=data, raw=f"data: {data}\n\n".encode())


# --- request facts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat.completions"),
        ("/v1/chat/completions/?x=1", "chat.completions"),
        ("/openai/v1/completions", "completions"),
        ("/v1/responses", "responses"),
        ("/v1/responses/resp_1/cancel", "other"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/models", "other"),
    ],
)
def test_endpoint_for(path: str, endpoint: str) -> None:
    assert endpoint_for(path) == endpoint
    assert endpoint in ENDPOINTS


def test_inspect_request_reads_the_facts() -> None:
    facts = inspect_request(
        CHAT,
        {
            "model": "gpt-4o",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 100,
            "max_tokens": 50,
            "n": 2,
            "messages": [],
        },
    )
    assert facts.endpoint == "chat.completions"
    assert facts.model == "gpt-4o"
    assert facts.stream and facts.include_usage_requested and facts.has_stream_options
    assert not facts.continuous_usage_requested
    assert (facts.max_tokens, facts.n) == (100, 2)  # max_completion_tokens is the newer name
    responses = inspect_request("/v1/responses", {"max_output_tokens": 12, "background": True})
    assert (responses.max_tokens, responses.background, responses.stream) == (12, True, False)


def test_inspect_request_treats_wrong_types_as_absent() -> None:
    facts = inspect_request(
        CHAT,
        {
            "model": 5,
            "stream": "yes",
            "stream_options": "on",
            "max_tokens": True,
            "n": -1,
            "background": 1,
            "messages": {"not": "a list"},
        },
    )
    assert facts == RequestFacts(endpoint="chat.completions", has_stream_options=True)
    assert inspect_request(CHAT, None) == RequestFacts(endpoint="chat.completions")


def test_prompt_estimate_chat() -> None:
    # The documented rule (docs/accounting.md, "Prompt tokens"), case by case; whether the rule
    # is any good is test_prompt_estimate_is_near_what_openai_reported's question.
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},  # 14 characters
            {"role": "user", "content": "Say hello in French."},  # 20 characters
        ]
    }
    # ceil(34 / 4) = 9, + 4 per message, + 3 to prime the reply
    assert inspect_request(CHAT, body).prompt_tokens_estimate == 9 + 2 * 4 + 3
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},  # 13 characters
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ]
    }
    assert inspect_request(CHAT, parts).prompt_tokens_estimate == 4 + 85 + 4 + 3
    tools = {
        "messages": [{"role": "user", "content": "hi"}],
        # keys and string values: type function function name get_weather parameters type object
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
    chars = 2 + len("typefunctionfunctionnameget_weatherparameters")
    assert inspect_request(CHAT, tools).prompt_tokens_estimate == -(-chars // 4) + 4 + 3


# Requests with the prompt_tokens the OpenAI API reported for them: the OpenAI cookbook's
# "How to count tokens with tiktoken" (sections 6 and 7, recorded outputs of the notebook).
COOKBOOK_PROMPTS: list[tuple[dict[str, Any], dict[str, int]]] = [
    (
        {
            "messages": [
                {
                    "role": "system",
                    "content": "You are a helpful, pattern-following assistant that translates "
                    "corporate jargon into plain English.",
                },
                {
                    "role": "system",
                    "name": "example_user",
                    "content": "New synergies will help drive top-line growth.",
                },
                {
                    "role": "system",
                    "name": "example_assistant",
                    "content": "Things working well together will increase revenue.",
                },
                {
                    "role": "system",
                    "name": "example_user",
                    "content": "Let's circle back when we have more bandwidth to touch base on "
                    "opportunities for increased leverage.",
                },
                {
                    "role": "system",
                    "name": "example_assistant",
                    "content": "Let's talk later when we're less busy about how to do better.",
                },
                {
                    "role": "user",
                    "content": "This late pivot means we don't have time to boil the ocean for "
                    "the client deliverable.",
                },
            ]
        },
        {"gpt-3.5-turbo": 129, "gpt-4": 129, "gpt-4o": 124, "gpt-4o-mini": 124},
    ),
    (
        {
            "messages": [
                {
                    "role": "system",
                    "content": "You are a helpful assistant that can answer to questions about "
                    "the weather.",
                },
                {"role": "user", "content": "What's the weather like in San Francisco?"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "description": "Get the current weather in a given location",
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "location": {
                                    "type": "string",
                                    "description": "The city and state, e.g. San Francisco, CA",
                                },
                                "unit": {
                                    "type": "string",
                                    "description": "The unit of temperature to return",
                                    "enum": ["celsius", "fahrenheit"],
                                },
                            },
                            "required": ["location"],
                        },
                    },
                }
            ],
        },
        {"gpt-3.5-turbo": 105, "gpt-4": 105, "gpt-4o": 101, "gpt-4o-mini": 101},
    ),
]


@pytest.mark.parametrize(("body", "reported"), COOKBOOK_PROMPTS, ids=["names", "tools"])
def test_prompt_estimate_is_near_what_openai_reported(
    body: dict[str, Any], reported: dict[str, int]
) -> None:
    """Not the formula again: the estimate against the provider's own counts. On these two it
    overshoots by 9-23 % (153 for 124-129, 114 for 101-105); the band below is that, rounded
    out. It fails a rule that drops the message text or the tools, or counts 3 or 5 characters
    per token instead of 4 (checked by making each of those changes)."""
    estimate = inspect_request(CHAT, body).prompt_tokens_estimate
    for model, count in reported.items():
        assert 0.9 * count <= estimate <= 1.3 * count, (model, estimate, count)


def test_prompt_estimate_other_endpoints() -> None:
    assert inspect_request("/v1/completions", {"prompt": [1, 2, 3]}).prompt_tokens_estimate == 3
    assert inspect_request("/v1/completions", {"prompt": [[1, 2], [3]]}).prompt_tokens_estimate == 3
    assert (
        inspect_request("/v1/embeddings", {"input": ["abcd", "efgh"]}).prompt_tokens_estimate == 2
    )
    story = "Tell me a three sentence bedtime story about a unicorn."  # 55 characters
    assert inspect_request("/v1/responses", {"input": story}).prompt_tokens_estimate == 14 + 4
    items = {
        "instructions": "Be brief.",  # 9
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},  # 8
            {"type": "function_call", "name": "get", "arguments": "{}"},  # 3 + 2
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},  # 5
        ],
    }
    assert inspect_request("/v1/responses", items).prompt_tokens_estimate == 7 + 3 * 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
_KEYS = ["model", "stream", "stream_options", "messages", "prompt", "input", "tools", "content"]
bodies = st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), json_values, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    path=st.sampled_from([CHAT, "/v1/completions", "/v1/responses", "/v1/embeddings"]),
    body=bodies,
)
def test_inspect_request_never_raises(path: str, body: dict[str, Any]) -> None:
    facts = inspect_request(path, body)
    assert facts.prompt_tokens_estimate >= 0
    assert facts.n >= 1


# --- include_usage injection -------------------------------------------------------------------


def test_inject_splices_after_the_brace() -> None:
    body = b'{"model":"m","stream":true,"messages":[]}'
    facts = inspect_request(CHAT, json.loads(body))
    out = inject_stream_usage(body, facts, continuous=False)
    assert (
        out == b'{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}'
    )
    out = inject_stream_usage(b'  {\n "stream": true}', stream_facts(), continuous=True)
    assert out is not None
    assert json.loads(out) == {
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def test_inject_merges_an_existing_stream_options() -> None:
    body = b'{"stream":true,"stream_options":{"include_obfuscation":false}}'
    out = inject_stream_usage(body, inspect_request(CHAT, json.loads(body)), continuous=False)
    assert out is not None
    assert json.loads(out)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }


def test_inject_only_when_needed() -> None:
    body = b'{"stream":true,"stream_options":{"include_usage":true}}'
    asked = inspect_request(CHAT, json.loads(body))
    assert inject_stream_usage(body, asked, continuous=False) is None
    assert inject_stream_usage(body, asked, continuous=True) is not None  # adds continuous stats
    plain = b'{"stream":false}'
    assert (
        inject_stream_usage(plain, inspect_request(CHAT, {"stream": False}), continuous=True)
        is None
    )
    facts = inspect_request("/v1/responses", {"stream": True})
    assert inject_stream_usage(b'{"stream":true}', facts, continuous=False) is None
    assert inject_stream_usage(b"[1]", stream_facts(stream_options=1), continuous=False) is None


_STREAM_OPTIONS = st.sampled_from(
    [
        "absent",
        None,
        "junk",
        {},
        {"include_usage": False},
        {"include_obfuscation": False},
        {"include_usage": True},
        {"include_usage": True, "continuous_usage_stats": True},
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
    options=_STREAM_OPTIONS,
    continuous=st.booleans(),
    endpoint=st.sampled_from([CHAT, "/v1/completions"]),
    indent=st.sampled_from([None, 2]),
    compact=st.booleans(),
    ascii_only=st.booleans(),
    lead=st.sampled_from(["", " ", "\n\t", "\ufeff"]),
)
def test_inject_always_gives_the_expected_json(
    extra: dict[str, Any],
    options: Any,
    continuous: bool,
    endpoint: str,
    indent: int | None,
    compact: bool,
    ascii_only: bool,
    lead: str,
) -> None:
    obj = {k: v for k, v in extra.items() if k != "stream_options"}
    obj["stream"] = True
    if options != "absent":
        obj["stream_options"] = options
    separators = (",", ":") if compact else None
    text = json.dumps(obj, indent=indent, separators=separators, ensure_ascii=ascii_only)
    body = (lead + text).encode()
    facts = inspect_request(endpoint, obj)
    out = inject_stream_usage(body, facts, continuous=continuous)
    asked = isinstance(options, dict) and options.get("include_usage") is True
    asked_continuous = isinstance(options, dict) and options.get("continuous_usage_stats") is True
    if asked and (asked_continuous or not continuous):
        assert out is None
        return
    assert out is not None
    want = dict(options) if isinstance(options, dict) else {}
    want["include_usage"] = True
    if continuous:
        want["continuous_usage_stats"] = True
    assert json.loads(out) == {**obj, "stream_options": want}
    if options == "absent":
        # The rest of the body is untouched (prompts can be megabytes).
        brace = body.index(b"{") + 1
        assert out.startswith(body[:brace]) and out.endswith(body[brace:])


# --- the stream tracker on the fixtures ----------------------------------------------------------


def test_llama_cpp_chat_with_usage() -> None:
    kinds, tracker = track(fixture("llama-cpp/chat-stream-include-usage.sse"), stream_facts())
    # role chunk, 12 content chunks, finish chunk, usage chunk, [DONE]
    assert kinds == [OTHER, *[CONTENT] * 12, OTHER, USAGE, DONE]
    assert tracker.content_chunks == 12 and tracker.chunks_by_choice == {0: 12}
    assert tracker.finish_reason == "length" and tracker.done
    assert tracker.usage() == Usage(prompt_tokens=23, completion_tokens=12, cached_tokens=5)


def test_llama_cpp_chat_without_usage_is_estimated_exactly() -> None:
    facts = stream_facts(messages=[{"role": "user", "content": "x" * 40}])
    kinds, tracker = track(fixture("llama-cpp/chat-stream.sse"), facts)
    assert kinds == [OTHER, *[CONTENT] * 12, OTHER, DONE]
    # The sibling recording with include_usage reports completion_tokens 12 for the same request.
    assert tracker.usage() == Usage(
        prompt_tokens=facts.prompt_tokens_estimate,
        completion_tokens=12,
        prompt_estimated=True,
        completion_estimated=True,
    )


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("llama-cpp/chat-stream-include-usage.sse", CHAT),
        ("llama-cpp/completions-stream-include-usage.sse", "/v1/completions"),
        ("llama-cpp/responses-stream.sse", "/v1/responses"),
    ],
)
def test_estimate_before_the_report_matches_it(name: str, path: str) -> None:
    """On every llama.cpp fixture the chunk-count estimate equals the reported 12."""
    tracker = StreamUsageTracker(stream_facts(path))
    for event in events_of(fixture(name)):
        before = tracker.generated_tokens
        tracker.feed(event)
        if tracker.reported:
            assert before == 12 == tracker.generated_tokens
            return
    pytest.fail("no usage reported")


def test_llama_cpp_completions_usage_on_the_finish_chunk() -> None:
    kinds, tracker = track(
        fixture("llama-cpp/completions-stream-include-usage.sse"), stream_facts("/v1/completions")
    )
    assert kinds == [
        *[CONTENT] * 12,
        OTHER,
        DONE,
    ]  # the usage rides on a chunk with choices: not USAGE_ONLY
    assert tracker.usage() == Usage(prompt_tokens=7, completion_tokens=12, cached_tokens=1)


def test_llama_cpp_responses() -> None:
    kinds, tracker = track(fixture("llama-cpp/responses-stream.sse"), stream_facts("/v1/responses"))
    assert kinds == [OTHER, OTHER, OTHER, OTHER, *[CONTENT] * 12, OTHER, OTHER, OTHER, DONE]
    assert tracker.response_id == "resp_7hupZOim5bvRP51cy7vXdu8XqunagwNt"
    assert tracker.usage() == Usage(prompt_tokens=23, completion_tokens=12, cached_tokens=22)


def test_openai_chat_with_usage() -> None:
    kinds, tracker = track(fixture("openai/chat-stream-include-usage.sse"), stream_facts())
    assert kinds == [
        OTHER,
        *[CONTENT] * 9,
        OTHER,
        USAGE,
        DONE,
    ]  # role chunk with content "" is not content
    assert tracker.usage() == Usage(prompt_tokens=8, completion_tokens=9)


def test_openai_tool_call_deltas_are_content() -> None:
    kinds, tracker = track(
        fixture("openai/chat-stream-tool-call-include-usage.sse"), stream_facts()
    )
    # the delta with id and name, then 5 argument fragments
    assert kinds == [*[CONTENT] * 6, OTHER, USAGE, DONE]
    assert tracker.finish_reason == "tool_calls"
    assert tracker.usage() == Usage(prompt_tokens=62, completion_tokens=15)


def test_openai_responses_reasoning() -> None:
    data = fixture("openai/responses-stream-reasoning.sse")
    kinds, tracker = track(data, stream_facts("/v1/responses"))
    assert kinds.count(CONTENT) == 6 and kinds[-1] is DONE and set(kinds) == {CONTENT, DONE, OTHER}
    assert tracker.usage() == Usage(
        prompt_tokens=10, completion_tokens=150, reasoning_tokens=128, cached_tokens=0
    )
    # Cut before response.completed: 3 summary deltas + 3 text deltas, one token each.
    cut = StreamUsageTracker(stream_facts("/v1/responses"))
    for event in events_of(data)[:-1]:
        cut.feed(event)
    usage = cut.usage()
    assert (usage.completion_tokens, usage.reasoning_tokens) == (6, 3)
    assert usage.completion_estimated and usage.prompt_estimated


def test_vllm_continuous_usage_is_exact_at_every_chunk() -> None:
    data = fixture("vllm/chat-stream-continuous-usage.sse")
    tracker = StreamUsageTracker(stream_facts())
    content = 0
    for event in events_of(data):
        if tracker.feed(event) is CONTENT:
            content += 1
            assert tracker.generated_tokens == content
            usage = tracker.usage()
            assert (usage.prompt_tokens, usage.completion_tokens) == (30, content)
            assert not (usage.prompt_estimated or usage.completion_estimated)
    assert content == 9


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(
        [
            "llama-cpp/chat-stream-include-usage.sse",
            "llama-cpp/chat-stream.sse",
            "llama-cpp/completions-stream-include-usage.sse",
            "llama-cpp/responses-stream.sse",
            "openai/responses-stream-reasoning.sse",
            "vllm/chat-stream-continuous-usage.sse",
        ]
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30),
)
def test_any_chunking_gives_the_same_counts(name: str, cuts: list[int]) -> None:
    data = fixture(name)
    facts = stream_facts("/v1/responses" if "responses" in name else CHAT)
    points = sorted({c % (len(data) + 1) for c in cuts})
    kinds, tracker = track(data, facts, *points)
    whole_kinds, whole = track(data, facts)
    assert kinds == whole_kinds
    assert tracker.usage() == whole.usage()
    assert tracker.chars_by_choice == whole.chars_by_choice


def test_splits_at_awkward_boundaries_give_the_same_usage() -> None:
    data = fixture("llama-cpp/chat-stream-include-usage.sse")
    want_kinds, want = track(data, stream_facts())
    # either side of every line end and every colon: inside "data:", "\n\n" and JSON members
    awkward = [i for i in range(1, len(data)) if data[i - 1] in b"\n:" or data[i] in b"\n:"]
    assert len(awkward) > 300
    for i in awkward:
        kinds, tracker = track(data, stream_facts(), i)
        assert (kinds, tracker.usage()) == (want_kinds, want.usage()), f"split at byte {i}"


# --- classification rules ------------------------------------------------------------------------


def test_keep_alives_and_empty_chunks_are_never_content() -> None:
    tracker = StreamUsageTracker(stream_facts())
    quiet = [
        SSEEvent(comment=True, raw=b": ping\n\n"),
        SSEEvent(raw=b"\n"),
        chunk({"role": "assistant"}),
        chunk({"role": "assistant", "content": None}),
        chunk({"content": ""}),
        chunk({"reasoning_content": ""}),
        chunk({"tool_calls": []}),
        chunk({}),
        chunk({}, usage=None),
        SSEEvent(event="response.in_progress", data='{"type":"response.in_progress"}'),
        SSEEvent(data='{"type":"response.output_text.delta","delta":""}'),
    ]
    assert [tracker.feed(e) for e in quiet] == [OTHER] * len(quiet)
    assert tracker.generated_tokens == 0


@settings(max_examples=150, deadline=None)
@given(
    delta=st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["assistant", None]),
            "content": st.sampled_from(["", None]),
            "reasoning_content": st.sampled_from(["", None]),
            "refusal": st.sampled_from(["", None]),
            "tool_calls": st.sampled_from([[], None]),
        },
    ),
    finish=st.sampled_from([None, "stop", "length"]),
)
def test_no_output_no_content(delta: dict[str, Any], finish: str | None) -> None:
    event = chunk(delta)
    if finish is not None:
        data = (event.data or "").replace('"finish_reason": null', f'"finish_reason": "{finish}"')
        event = SSEEvent(data=data, raw=data.encode())
    assert StreamUsageTracker(stream_facts()).feed(event) is OTHER


def test_reasoning_and_refusal_deltas_are_content() -> None:
    tracker = StreamUsageTracker(stream_facts())
    assert tracker.feed(chunk({"reasoning_content": "Let me think"})) is CONTENT
    assert tracker.feed(chunk({"reasoning": "hm"})) is CONTENT
    assert tracker.feed(chunk({"refusal": "No."})) is CONTENT
    usage = tracker.usage()
    assert (usage.completion_tokens, usage.reasoning_tokens) == (3, 2)


def test_chunk_tokens_rule() -> None:
    # One token up to 12 characters, then one more per 4 characters or part.
    assert [chunk_tokens(n) for n in (0, 1, 12, 13, 16, 17, 52)] == [1, 1, 1, 2, 2, 3, 11]
    tracker = StreamUsageTracker(stream_facts())
    tracker.feed(chunk({"content": "x" * 52}))  # an upstream that batches ~13 tokens per chunk
    assert tracker.generated_tokens == 11


def test_choices_are_counted_separately() -> None:
    tracker = StreamUsageTracker(stream_facts(n=2))
    for index, text in [(0, "a"), (1, "bb"), (1, "c")]:
        choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
        data = json.dumps({"choices": [choice]})
        tracker.feed(SSEEvent(data=data, raw=data.encode()))
    assert tracker.chunks_by_choice == {0: 1, 1: 2}
    assert tracker.chars_by_choice == {0: 1, 1: 3}
    assert tracker.generated_tokens == 3


def test_malformed_events_are_other_and_counted() -> None:
    tracker = StreamUsageTracker(stream_facts())
    for data in ['{"choices": [', "null", "[1, 2]", '"text"', "\ufffd"]:
        assert tracker.feed(SSEEvent(data=data)) is OTHER
    assert tracker.malformed_events == 5


def test_errors() -> None:
    tracker = StreamUsageTracker(stream_facts())
    error = '{"error": {"message": "overloaded", "type": "server_error"}}'
    assert tracker.feed(SSEEvent(data=error)) is ERROR
    assert tracker.error == "overloaded"
    assert tracker.feed(SSEEvent(event="error", data="not json")) is ERROR
    responses = StreamUsageTracker(stream_facts("/v1/responses"))
    failed = {
        "type": "response.failed",
        "response": {
            "id": "resp_1",
            "error": {"code": "server_error", "message": "boom"},
            "usage": {"input_tokens": 5, "output_tokens": 2},
        },
    }
    assert responses.feed(SSEEvent(data=json.dumps(failed))) is ERROR
    assert (responses.error, responses.response_id) == ("boom", "resp_1")
    assert responses.usage() == Usage(prompt_tokens=5, completion_tokens=2)
    err = '{"type": "error", "code": "rate_limit", "message": "slow down"}'
    assert responses.feed(SSEEvent(event="error", data=err)) is ERROR
    incomplete = '{"type": "response.incomplete", "response": {"id": "resp_1"}}'
    assert responses.feed(SSEEvent(data=incomplete)) is DONE


def test_usage_only_chunk_with_null_or_missing_choices() -> None:
    for extra in ({"choices": None}, {}):
        data = json.dumps(
            {"id": "x", **extra, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        )
        tracker = StreamUsageTracker(stream_facts())
        assert tracker.feed(SSEEvent(data=data)) is USAGE
        assert tracker.generated_tokens == 4


def test_content_after_a_report_is_added_to_it() -> None:
    tracker = StreamUsageTracker(stream_facts())
    tracker.feed(chunk({"content": "a"}, usage={"prompt_tokens": 9, "completion_tokens": 1}))
    tracker.feed(chunk({"content": "b"}))
    assert tracker.generated_tokens == 2
    usage = tracker.usage()
    assert (usage.prompt_tokens, usage.prompt_estimated) == (9, False)
    assert usage.completion_estimated  # one of the two tokens is an estimate


# --- hiding injected usage from the client ---------------------------------------------------


def filtered(data: bytes, facts: RequestFacts, flt: UsageChunkFilter, *cuts: int) -> bytes:
    tracker = StreamUsageTracker(facts)
    return b"".join(flt.client_bytes(e, tracker.feed(e)) for e in events_of(data, *cuts))


@pytest.mark.parametrize(
    ("injected", "plain", "continuous"),
    [
        ("openai/chat-stream-include-usage.sse", "openai/chat-stream.sse", False),
        ("vllm/chat-stream-continuous-usage.sse", "vllm/chat-stream.sse", True),
    ],
)
def test_filter_gives_back_the_plain_stream(injected: str, plain: str, continuous: bool) -> None:
    facts = stream_facts()  # the client asked for no usage
    flt = UsageChunkFilter.needed(facts, continuous=continuous)
    assert flt is not None
    data = fixture(injected)
    assert filtered(data, facts, flt) == fixture(plain)
    step = len(data) // 7
    assert filtered(data, facts, flt, *range(3, len(data), step)) == fixture(plain)


def test_filter_keeps_the_usage_chunk_the_client_asked_for() -> None:
    facts = stream_facts(stream_options={"include_usage": True})
    flt = UsageChunkFilter.needed(facts, continuous=True)
    assert flt is not None
    events = events_of(fixture("vllm/chat-stream-continuous-usage.sse"))
    usage_chunk = events[-2].raw
    plain = fixture("vllm/chat-stream.sse")
    want = plain.replace(b"data: [DONE]", usage_chunk + b"data: [DONE]")
    assert filtered(fixture("vllm/chat-stream-continuous-usage.sse"), facts, flt) == want
    asked_all = stream_facts(stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert UsageChunkFilter.needed(asked_all, continuous=True) is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b'data: {"a":1,"usage":null}\n\n', b'data: {"a":1}\n\n'),
        (b'data: {"a":1, "usage" : null, "b":2}\n\n', b'data: {"a":1, "b":2}\n\n'),
        (b'data: {"usage":null,"a":1}\n\n', b'data: {"a":1}\n\n'),
        (b'data: { "usage": {"x": {"y": 1}} }\n\n', b"data: {}\n\n"),
        (
            b'data: {"a":{"usage":1},"usage":{"p":1,"d":{"c":0}}}\n\n',
            b'data: {"a":{"usage":1}}\n\n',
        ),
        # not members: text inside a string, a string value, a value we do not know how to skip
        (b'data: {"c":"say \\"usage\\":null","u":"usage"}\n\n', None),
        (b'data: {"a":1,"usage":"n/a"}\n\n', None),
        (b"data: [DONE]\n\n", None),
    ],
)
def test_strip_usage_member(raw: bytes, want: bytes | None) -> None:
    out = strip_usage_member(raw)
    assert out == (raw if want is None else want)


# --- non-streamed answers ----------------------------------------------------------------------


def test_body_usage_llama_cpp_chat() -> None:
    body = fixture("llama-cpp/chat.json")
    facts = inspect_request(CHAT, {"model": "tiny"})
    want = Usage(prompt_tokens=23, completion_tokens=12, cached_tokens=22)
    assert body_usage(body, facts, None) == want
    assert body_usage(gzip.compress(body), facts, "gzip") == want
    assert body_usage(zlib.compress(body), facts, "deflate") == want
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert body_usage(raw_deflate.compress(body) + raw_deflate.flush(), facts, "Deflate") == want


def test_body_usage_responses_and_embeddings() -> None:
    responses = inspect_request("/v1/responses", {"input": "hi"})
    assert body_usage(fixture("openai/responses.json"), responses, None) == Usage(
        prompt_tokens=36, completion_tokens=13
    )
    embeddings = inspect_request("/v1/embeddings", {"input": "hi"})
    assert body_usage(fixture("openai/embeddings.json"), embeddings, None) == Usage(prompt_tokens=8)


def test_body_usage_estimates_when_missing() -> None:
    obj = json.loads(fixture("llama-cpp/chat.json"))
    del obj["usage"]
    facts = inspect_request(CHAT, {"messages": [{"role": "user", "content": "abcd"}]})
    # the answer's 63 characters -> ceil(63 / 4); the prompt: 1 + 4 + 3
    assert body_usage(json.dumps(obj).encode(), facts, None) == Usage(
        prompt_tokens=8, completion_tokens=16, prompt_estimated=True, completion_estimated=True
    )
    resp = json.loads(fixture("openai/responses.json"))
    del resp["usage"]
    r_facts = inspect_request("/v1/responses", {})
    # "In a quiet glade, a unicorn slept under silver stars." is 53 characters -> 14
    assert body_usage(json.dumps(resp).encode(), r_facts, None).completion_tokens == 14


@pytest.mark.parametrize(
    ("body", "encoding"),
    [(b"not json", None), (b"[]", None), (b"\x1f\x8b garbage", "gzip"), (b"{}", "br")],
)
def test_body_usage_never_raises(body: bytes, encoding: str | None) -> None:
    facts = inspect_request(CHAT, {"messages": [{"role": "user", "content": "abcd"}]})
    usage = body_usage(body, facts, encoding)
    assert (usage.prompt_tokens, usage.completion_tokens) == (8, 0)
    assert usage.prompt_estimated and usage.completion_estimated


# --- found by mutation testing (scripts/mutation): behaviour no test pinned --------------------


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 9, "max_tokens": 7}, 9),  # the newer name wins
        ({"max_output_tokens": 5}, 5),
        ({"max_tokens": 1}, 1),
        ({"max_tokens": 0}, None),  # no room at all is no limit to estimate savings from
    ],
)
def test_the_request_limit_is_read_from_each_of_its_names(
    body: dict[str, Any], limit: int | None
) -> None:
    assert inspect_request(CHAT, {"model": "m", **body}).max_tokens == limit


def test_reported_usage_with_only_completion_tokens_is_kept() -> None:
    from proxy.usage.reported import Reported, parse_usage

    assert parse_usage({"completion_tokens": 5}) == Reported(None, 5, None, None)
    assert parse_usage({"prompt_tokens": 3}) == Reported(3, None, None, None)
    assert parse_usage({"total_tokens": 8}) is None


def test_chat_reasoning_tokens_come_from_completion_tokens_details() -> None:
    from proxy.usage.reported import parse_usage

    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 40,
        "completion_tokens_details": {"reasoning_tokens": 32},
    }
    reported = parse_usage(usage)
    assert reported is not None and reported.reasoning == 32


def test_a_delta_with_content_and_reasoning_counts_both_and_is_not_all_reasoning() -> None:
    tracker = StreamUsageTracker(stream_facts())
    tracker.feed(chunk({"content": "a", "reasoning_content": "r" * 20}))  # 21 characters
    usage = tracker.usage()
    assert usage.completion_tokens == chunk_tokens(21) == 4
    assert usage.reasoning_tokens == 0  # not a reasoning-only chunk


def test_an_sse_error_event_ends_the_stream_as_an_error_whatever_its_payload() -> None:
    tracker = StreamUsageTracker(stream_facts())
    assert tracker.feed(chunk({"content": "hi"})) is CONTENT
    raw = b"event: error\ndata: upstream overloaded\n\n"
    [event] = SSEDecoder().feed(raw)
    assert tracker.feed(event) is EventKind.ERROR
    assert tracker.error == "upstream overloaded"


TEXT = "forty characters of prompt text, exactly"  # len 40: 10 tokens at 4 per token
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("path", "without", "with_text"),
    [
        (CHAT, {"messages": [USER]}, {"messages": [{**USER, "name": TEXT}]}),
        (
            CHAT,
            {"messages": [USER]},
            {"messages": [{**USER, "tool_calls": [{"function": {"arguments": TEXT}}]}]},
        ),
        (CHAT, {"messages": [USER]}, {"messages": [USER], "tools": [{"description": TEXT}]}),
        (CHAT, {"messages": [USER]}, {"messages": [USER], "functions": [{"description": TEXT}]}),
        (CHAT, {"messages": [USER]}, {"messages": [5, USER, {**USER, "content": TEXT}]}),
        ("/v1/completions", {"prompt": "hi"}, {"prompt": "hi", "suffix": TEXT}),
        ("/v1/responses", {"input": "hi"}, {"input": "hi", "instructions": TEXT}),
        ("/v1/responses", {"input": "hi"}, {"input": "hi", "tools": [{"description": TEXT}]}),
        (
            "/v1/responses",
            {"input": [{"type": "function_call", "name": "f"}]},
            {"input": [{"type": "function_call", "name": "f", "arguments": TEXT}]},
        ),
        (
            "/v1/responses",
            {"input": [{"type": "reasoning", "summary": []}]},
            {"input": [{"type": "reasoning", "summary": [{"text": TEXT}]}]},
        ),
        (
            "/v1/responses",
            {"input": [5, {"role": "user", "content": "hi"}]},
            {"input": [5, {"role": "user", "content": "hi"}, {"role": "user", "content": TEXT}]},
        ),
    ],
)
def test_every_documented_part_of_a_prompt_counts(
    path: str, without: dict[str, Any], with_text: dict[str, Any]
) -> None:
    """docs/accounting.md lists what the estimate counts; 40 more characters in any of those
    places must raise it by at least the 10 tokens they are worth."""
    before = inspect_request(path, without).prompt_tokens_estimate
    after = inspect_request(path, with_text).prompt_tokens_estimate
    assert after - before >= 10, (before, after)


def test_each_responses_input_item_costs_its_overhead() -> None:
    one = inspect_request("/v1/responses", {"input": [{"role": "user"}]})
    three = inspect_request("/v1/responses", {"input": [{"role": "user"}] * 3})
    assert three.prompt_tokens_estimate > one.prompt_tokens_estimate > 0


def _responses_delta(kind: str, delta: str) -> SSEEvent:
    data = json.dumps({"type": kind, "output_index": 0, "delta": delta})
    return SSEEvent(event=kind, data=data, raw=f"event: {kind}\ndata: {data}\n\n".encode())


def test_an_audio_delta_is_one_chunk_whatever_its_base64_length() -> None:
    tracker = StreamUsageTracker(stream_facts("/v1/responses"))
    assert tracker.feed(_responses_delta("response.audio.delta", "QUJD" * 100)) is CONTENT
    assert tracker.feed(_responses_delta("response.output_text.delta", "x" * 52)) is CONTENT
    assert tracker.usage().completion_tokens == 1 + chunk_tokens(52)


def test_a_long_tool_call_fragment_counts_its_characters() -> None:
    tracker = StreamUsageTracker(stream_facts())
    call = {"index": 0, "function": {"name": "get_weather", "arguments": "x" * 41}}
    tracker.feed(chunk({"tool_calls": [call]}))
    assert tracker.usage().completion_tokens == chunk_tokens(len("get_weather") + 41)


def test_a_usage_string_value_is_not_taken_for_the_usage_member() -> None:
    raw = b'{"id":"x","model":"usage","choices":[]}'
    assert strip_usage_member(raw) == raw
    with_usage = b'{"model":"usage","choices":[],"usage":{"completion_tokens":3}}'
    assert strip_usage_member(with_usage) == b'{"model":"usage","choices":[]}'


# --- tail_usage: only a member named "usage" whose value is an object counts ----------------

_USAGE = '{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}'


@pytest.mark.parametrize(
    ("answer", "completion"),
    [
        (f'{{"id":"x" ,\n "usage" :\t{_USAGE} }}', 5),  # whitespace around the key and colon
        (f'{{"a":"mentions \\"usage\\": {{}}","usage":{_USAGE}}}', 5),  # text first, then it
        (f'{{"usage":{_USAGE},"x":"text \\"usage\\":{{\\"completion_tokens\\":99}}"}}', 5),
        ('{"text":"the word usage" }', None),  # a value, not a member name
        ('{"x":["usage"]}', None),  # an array element, not a member
        ('{"usage" "oops"}', None),  # no colon
        ('{"usage":null}', None),  # not an object
        ('{"usage":{"completion_tokens":', None),  # cut off: not decodable
        ('{"usage"', None),  # nothing after the key
        ('"usage":', None),  # nothing before the key
    ],
)
def test_tail_usage_reads_only_a_usage_member_with_an_object(
    answer: str, completion: int | None
) -> None:
    found = tail_usage(answer.encode())
    assert (found.completion if found is not None else None) == completion


def test_tail_usage_looks_only_at_the_tail() -> None:
    answer = f'{{"usage":{_USAGE},"pad":"{"x" * 200}"}}'.encode()
    assert tail_usage(answer) is not None
    assert tail_usage(answer, tail=100) is None  # the usage lies before the last 100 bytes


def test_body_helpers_decode_gzip_and_raw_deflate_and_name_identity() -> None:
    body = json.dumps({"usage": json.loads(_USAGE)}).encode()
    assert decode_body(gzip.compress(body), "gzip") == body
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_body(raw.compress(body) + raw.flush(), "deflate") == body
    assert decode_body(body, "br") is None  # not decodable with the standard library
    assert is_identity(None) and is_identity(" Identity ") and not is_identity("gzip")


def test_a_large_answer_without_usage_is_estimated_from_its_size() -> None:
    facts = inspect_request("/v1/chat/completions", {"model": "m", "messages": []})
    text = "y" * (FULL_PARSE_MAX + 4000)
    usage = body_usage(json.dumps({"choices": [{"text": text}]}).encode(), facts, None)
    assert usage.completion_estimated
    assert usage.completion_tokens == -(-(len(text) + 26) // 4)  # ceil(bytes / 4), no parse


def test_legacy_completions_text_counts_towards_the_estimate() -> None:
    facts = inspect_request("/v1/completions", {"model": "m", "prompt": "hi"})
    answer = {"choices": ["not a choice", {"text": "abcdefgh"}]}
    usage = body_usage(json.dumps(answer).encode(), facts, None)
    assert (usage.completion_tokens, usage.completion_estimated) == (2, True)
