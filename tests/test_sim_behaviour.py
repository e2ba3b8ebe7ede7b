"""Pure parts of the simulator: the behaviour grammar, token arithmetic and chunk shapes."""

from __future__ import annotations

import json

import pytest

from proxy.sim.behaviour import Behaviour, BehaviourError, Name, parse_behaviour
from proxy.sim.formats import ChatStream
from proxy.sim.responses import ResponsesStream
from proxy.sim.tokens import WORDS, Plan, completion_text, make_plan, prompt_tokens

# -- grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini", "normal", "llama3:8b", "ft:gpt-4o:org:x1", ""])
def test_plain_and_unknown_names_are_normal(model: str) -> None:
    assert parse_behaviour(model) == Behaviour()


def test_common_parameters_on_an_unknown_name() -> None:
    b = parse_behaviour("gpt-4o-mini:rate=5,tokens=3,cached=2")
    assert (b.name, b.rate, b.tokens, b.cached) == (Name.NORMAL, 5.0, 3, 2)


def test_unknown_name_with_non_parameter_suffix_stays_opaque() -> None:
    assert parse_behaviour("model:rate=fast") == Behaviour()
    assert parse_behaviour("model:foo=1") == Behaviour()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("slow-headers", Behaviour(name=Name.SLOW_HEADERS, delay=1.0)),
        ("slow-headers:delay=0.25", Behaviour(name=Name.SLOW_HEADERS, delay=0.25)),
        (
            "slow-first-token:delay=2,keepalive=0.5",
            Behaviour(name=Name.SLOW_FIRST_TOKEN, delay=2.0, keepalive=0.5),
        ),
        ("stall", Behaviour(name=Name.STALL, after=0)),
        (
            "stall:after=5,keepalive=0.2",
            Behaviour(name=Name.STALL, after=5, keepalive=0.2),
        ),
        ("steady:interval=0.5", Behaviour(name=Name.STEADY, rate=2.0)),
        ("error", Behaviour(name=Name.ERROR, status=500)),
        ("error:status=429", Behaviour(name=Name.ERROR, status=429)),
        ("error:status=500,after=3", Behaviour(name=Name.ERROR, status=500, after=3)),
        ("reset", Behaviour(name=Name.RESET, after=0)),
        ("reset:after=4", Behaviour(name=Name.RESET, after=4)),
        ("malformed:after=2", Behaviour(name=Name.MALFORMED, after=2)),
        ("slow-body", Behaviour(name=Name.SLOW_BODY, body_rate=1000.0)),
        ("slow-body:rate=50", Behaviour(name=Name.SLOW_BODY, body_rate=50.0)),
        ("empty-deltas:count=4", Behaviour(name=Name.EMPTY_DELTAS, empty_deltas=4)),
        ("reasoning:tokens=3", Behaviour(name=Name.REASONING, reasoning_tokens=3)),
        ("reasoning", Behaviour(name=Name.REASONING, reasoning_tokens=8)),
        ("tool-call:tokens=2", Behaviour(name=Name.TOOL_CALL, tokens=2)),
        ("normal:rate=0", Behaviour(rate=0.0)),
        (" stall : after = 1 ", Behaviour(name=Name.STALL, after=1)),
    ],
)
def test_behaviours(model: str, expected: Behaviour) -> None:
    assert parse_behaviour(model) == expected


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("stall:after=-1", "after must be >= 0"),
        ("stall:after=x", "after must be an integer"),
        ("stall:after", "expected key=value"),
        ("stall:after=1,after=2", "given twice"),
        ("stall:delay=1", "'stall' does not take delay"),
        ("error:status=200", "status must be 400..599"),
        ("steady:interval=0", "interval must be > 0"),
        ("steady:interval=1,rate=2", "either rate or interval"),
        ("slow-headers:delay=inf", "finite number"),
        ("slow-headers:delay=nan", "finite number"),
        ("slow-body:rate=0", "rate must be > 0"),
    ],
)
def test_bad_parameters_are_rejected(model: str, message: str) -> None:
    with pytest.raises(BehaviourError, match=message):
        parse_behaviour(model)


def test_describe_lists_only_non_defaults() -> None:
    assert parse_behaviour("stall:after=2").describe() == {"name": "stall", "after": 2}


# -- tokens and plans ------------------------------------------------------------------------


def test_completion_text_is_one_word_per_token() -> None:
    assert completion_text(3) == WORDS[0] + WORDS[1] + WORDS[2]
    assert len(completion_text(len(WORDS) + 2).split()) == len(WORDS) + 2
    assert all(w.startswith(" ") and '"' not in w and "\\" not in w for w in WORDS)


def test_prompt_token_rules() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a b c"},
        ]
    }
    assert prompt_tokens("chat", chat) == 3 + (3 + 2) + (3 + 3)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x y"}]}]}
    assert prompt_tokens("chat", parts) == 3 + 3 + 2
    assert prompt_tokens("completions", {"prompt": "one two three"}) == 3
    assert prompt_tokens("completions", {"prompt": [1, 2, 3, 4]}) == 4
    assert prompt_tokens("embeddings", {"input": ["a b", "c"]}) == 3
    responses = {"instructions": "sys", "input": "hello world"}
    assert prompt_tokens("responses", responses) == 3 + (3 + 1) + (3 + 2)


def _plan(body: dict[str, object], model: str = "x", default: int = 16) -> Plan:
    return make_plan(
        "chat",
        {"messages": [], **body},
        parse_behaviour(model),
        default_tokens=default,
        default_rate=100.0,
    )


def test_length_rules() -> None:
    assert (_plan({}).content_tokens, _plan({}).finish_reason) == (16, "stop")
    assert (_plan({"max_tokens": 5}).content_tokens, _plan({"max_tokens": 5}).finish_reason) == (
        5,
        "length",
    )
    assert _plan({"max_completion_tokens": 4, "max_tokens": 9}).content_tokens == 4
    assert (_plan({}, "x:tokens=3").content_tokens, _plan({}, "x:tokens=3").finish_reason) == (
        3,
        "stop",
    )
    capped = _plan({"max_tokens": 2}, "x:tokens=3")
    assert (capped.content_tokens, capped.finish_reason) == (2, "length")
    reasoning = _plan({"max_tokens": 5}, "reasoning:tokens=3")
    assert (reasoning.reasoning_tokens, reasoning.content_tokens) == (3, 2)
    assert _plan({}, "tool-call").finish_reason == "tool_calls"
    assert _plan({}, "x:rate=0").first_token_delay == 0.0
    assert _plan({}, "slow-first-token:delay=0.3").first_token_delay == 0.3


# -- chunk shapes ----------------------------------------------------------------------------


def _compact(line: bytes) -> bool:
    text = line.decode().removeprefix("data: ").rstrip("\n")
    return json.dumps(json.loads(text), separators=(",", ":")) == text


def test_chat_chunks_are_compact_json_with_usage_null_last() -> None:
    plan = _plan({}, default=2)
    fmt = ChatStream(model='we"ird', plan=plan, include_usage=True)
    chunks = [*fmt.head(), fmt.empty(), fmt.content(0), fmt.content(1), *fmt.tail()]
    assert chunks[-1] == b"data: [DONE]\n\n"
    for chunk in chunks[:-1]:
        assert chunk.endswith(b"\n\n") and _compact(chunk)
        obj = json.loads(chunk[6:])
        assert list(obj)[-1] == "usage"
    usage = json.loads(chunks[-2][6:])["usage"]
    assert usage["completion_tokens"] == 2


def test_responses_events_are_compact_and_sequenced() -> None:
    fmt = ResponsesStream(model="m", plan=_plan({}, default=1), body={})
    events = [*fmt.head(), fmt.content(0), fmt.malformed(), *fmt.tail()]
    seqs = []
    for event in events:
        name, _, data = event.decode().partition("\ndata: ")
        if data.startswith("{not json"):
            continue
        obj = json.loads(data)
        assert name == f"event: {obj['type']}"
        assert json.dumps(obj, separators=(",", ":")) == data.rstrip("\n")
        seqs.append(obj["sequence_number"])
    assert seqs == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # the malformed event used number 5
