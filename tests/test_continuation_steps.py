"""A continuation's request for a large body, a bounded step at a time
(proxy/resilience/continuation_steps.py): the steps build what `continuation_body` built (the
same members in the same order, the client's bytes elsewhere), say None where it said None,
and admission's `continuable` tells that without parsing the body again."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import request_fields, targets
from proxy.attempts import AttemptResult
from proxy.errors import BadRequest
from proxy.request_fields import read_fields
from proxy.resilience import continuation_steps
from proxy.resilience.continuation import PrefixStyle, continuable, continuation_body
from proxy.resilience.continuation_steps import Sizes, continuation_in_steps
from proxy.sim import SimulatedProvider, completion_text
from tests.conftest import StartProxy
from tests.resilience_support import BACKUP_MODEL, CHAT, Answer, seen
from tests.support import json_in_a_style, run_steps
from tests.test_resilience_continue import WHOLE, continue_config

STYLES: list[PrefixStyle] = ["prefix", "continue_final_message"]
# Small and odd steps, so that a few hundred bytes take every path the 60 MiB body takes.
SMALL = [
    Sizes(in_steps_from=0, scan=7, run_min=23, piece=64, window=64, walk=1 << 20, copy=3),
    Sizes(in_steps_from=0, scan=1, run_min=10**9, piece=40, window=32, walk=1 << 20, copy=1),
    Sizes(in_steps_from=0, scan=64, run_min=24, piece=10**6, window=10**6, walk=1 << 20),
]


@contextmanager
def no_one_step() -> Iterator[None]:
    """Fail if the steps (or the chooser) fall back on `continuation_body`'s whole parse."""

    def refused(*_: object) -> bytes | None:
        raise AssertionError("continuation_body called")

    with (
        mock.patch.object(continuation_steps, "continuation_body", refused),
        mock.patch.object(targets, "continuation_body", refused),
    ):
        yield


def same_parse(got: bytes | bytearray | None, expected: bytes | None) -> None:
    """The same members in the same order (the top level's and the new message's)."""
    if expected is None:
        assert got is None
        return
    assert got is not None
    mine, theirs = json.loads(got), json.loads(expected)
    assert mine == theirs
    assert list(mine) == list(theirs)
    assert list(mine["messages"][-1]) == list(theirs["messages"][-1])


texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
long_texts = st.one_of(texts, st.integers(16, 80).map(lambda n: "lorem ipsum " * n))
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": long_texts}),
    max_size=12,
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.sampled_from([1.0, 2.5, "1", "x", 0])
)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": texts,
    "messages": st.one_of(messages, messages, messages, scalars, long_texts),
    "n": scalars,
    "tools": st.one_of(scalars, st.just([]), st.just([{"type": "function"}]), st.just("")),
    "max_tokens": scalars,
    "max_completion_tokens": scalars,
    "continue_final_message": scalars,
    "add_generation_prompt": scalars,
    "stream": st.booleans(),
    "numbers": st.lists(st.integers(0, 10**6), max_size=30),
}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON objects with the members a continuation reads or changes (some of the wrong
    type, some repeated), written compact, spaced, indented or ASCII-escaped."""
    keys = draw(st.lists(st.sampled_from(sorted(VALUES)), unique=True))
    obj: dict[str, Any] = {key: draw(VALUES[key]) for key in keys}
    text = json_in_a_style(draw, obj)
    if draw(st.booleans()) and obj:  # a member repeated: json.loads keeps the last value
        key = draw(st.sampled_from(sorted(VALUES)))
        repeat = f'"{key}": {json.dumps(draw(VALUES[key]))}, '
        at = draw(st.sampled_from(["first", "last"]))
        if at == "first":
            text = "{" + repeat + text[1:]
        else:
            end = text.rindex("}")
            text = text[:end] + ", " + repeat[:-2] + text[end:]
    if draw(st.booleans()):
        text = (
            draw(st.sampled_from([" ", "\n", "\ufeff"])) + text + draw(st.sampled_from([" \n", ""]))
        )
    return text.encode()


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    body = draw(bodies())
    at = draw(st.integers(0, len(body)))
    how = draw(st.sampled_from(["cut", "insert", "drop"]))
    if how == "cut":
        return body[:at]
    if how == "insert":
        return (
            body[:at]
            + draw(st.sampled_from([b"}", b"]", b",", b'"', b"\\", b"\xff", b"x"]))
            + body[at:]
        )
    return body[:at] + body[at + 1 :]


@settings(max_examples=600, deadline=None)
@given(bodies(), texts, st.sampled_from(STYLES), st.integers(0, 60), st.sampled_from(SMALL))
def test_the_steps_parse_as_the_one_step_continuation(
    body: bytes, delivered: str, style: PrefixStyle, tokens: int, sizes: Sizes
) -> None:
    expected = continuation_body(body, delivered, style, tokens)
    original = bytearray(body)
    with no_one_step():  # every valid body is walked: never the whole parse
        got, _ = run_steps(continuation_in_steps(original, delivered, style, tokens, sizes=sizes))
    assert original == body  # not changed: a hedge or another continuation may resend it
    same_parse(got, expected)


@settings(max_examples=600, deadline=None)
@given(damaged(), st.sampled_from(STYLES), st.sampled_from(SMALL))
def test_damaged_bodies_get_the_one_step_answer(
    body: bytes, style: PrefixStyle, sizes: Sizes
) -> None:
    expected = continuation_body(body, "go on", style, 3)
    got, _ = run_steps(continuation_in_steps(body, "go on", style, 3, sizes=sizes))
    same_parse(got, expected)


@settings(max_examples=400, deadline=None)
@given(bodies(), st.sampled_from([1 << 20, 8, 64]))
def test_admission_tells_whether_a_body_can_be_continued(body: bytes, decode_limit: int) -> None:
    """`continuable` from the fields admission read (prompt members too large to decode
    included) says what `continuation_body` says, or None (then it is asked)."""
    with mock.patch.object(request_fields, "PROMPT_DECODE_LIMIT", decode_limit):
        try:
            fields = read_fields(body)
        except BadRequest:
            return
    told = continuable(fields)
    if told is not None:
        assert told == (continuation_body(body, "x", "prefix", 1) is not None)


def test_continuable_is_not_told_for_a_large_tools_array() -> None:
    body = json.dumps({"messages": [], "tools": [" " * 64]}).encode()
    with mock.patch.object(request_fields, "PROMPT_DECODE_LIMIT", 8):
        assert continuable(read_fields(body)) is None
        spaced = b'{"messages": [], "tools": "' + b"t" * 64 + b'"}'
        assert continuable(read_fields(spaced)) is False


def large_body(messages: int, content: str = "hello") -> bytes:
    sent = [{"role": "user", "content": f"{content} {i}"} for i in range(messages)]
    obj = {"model": "m", "messages": sent, "max_tokens": 100, "stream": True}
    return json.dumps(obj).encode()


@pytest.mark.parametrize("shape", ["many messages", "one long string"])
def test_a_large_body_is_continued_in_bounded_steps(shape: str) -> None:
    """8 MiB: the array's middle checked (or the long string left out) and the copy made a
    piece a step; the walk's shortened body is small."""
    if shape == "many messages":
        body = large_body(300_000)
    else:
        body = large_body(1, "x" * (8 << 20))
    with no_one_step():
        got, steps = run_steps(continuation_in_steps(body, "déjà", "continue_final_message", 7))
    expected = continuation_body(body, "déjà", "continue_final_message", 7)
    same_parse(got, expected)
    assert steps >= len(body) // (4 << 20) + len(body) // (1 << 20)
    # Every byte but the edits is the client's: the new members before the closing brace,
    # the limit reduced, the prefix before the array's end.
    prefix = b',{"role":"assistant","content":"d\xc3\xa9j\xc3\xa0"}'
    end = body.rindex(b"]")
    assert bytes(got) == (
        body[:end] + prefix + body[end:-1].replace(b'"max_tokens": 100', b'"max_tokens": 93')
        + b',"continue_final_message":true,"add_generation_prompt":false}'
    )  # fmt: skip


def test_a_large_body_that_cannot_be_walked_takes_one_step() -> None:
    """Its bulk is neither long strings nor an array: the whole parse, as before."""
    body = json.dumps({f"k{i}": i for i in range(20_000)} | {"messages": []}).encode()
    got, steps = run_steps(continuation_in_steps(body, "go", "prefix", 1))
    assert got == continuation_body(body, "go", "prefix", 1) and steps > 0


@pytest.fixture
async def big_backup() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(
        tokens_per_s=200.0, default_tokens=16, body_limit=64 << 20
    ) as provider:
        yield provider


async def test_a_large_body_is_continued_after_a_stall(
    sim: SimulatedProvider, big_backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A 7 MiB body whose stream stalls after three tokens: the fallback is asked to go on
    from what the client has, every member as sent but the continuation's."""
    config = continue_config(
        sim, big_backup, backup_prefix="continue_final_message", timeouts={"idle_s": 0.4}
    )
    server, sink = await start_proxy(config)
    sent = [{"role": "user", "content": f"message {i}"} for i in range(300_000)]
    stack = ExitStack()
    stack.enter_context(no_one_step())  # neither to tell whether, nor to build
    body = {"model": "stall:after=3", "stream": True, "messages": sent, "max_tokens": 16}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            data=io.BytesIO(json.dumps(body).encode()),
            headers={"x-request-id": "c-large", "content-type": "application/json"},
        ) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            answer = Answer(response.status, headers, await response.read())
    stack.close()
    assert answer.status == 200 and answer.text() == WHOLE
    (asked,) = seen(big_backup, "c-large")
    assert asked.body_bytes > 6 << 20
    prefix = {"role": "assistant", "content": completion_text(3)}
    assert asked.body == {
        **body,
        "model": BACKUP_MODEL,
        "messages": [*sent, prefix],
        "max_tokens": 13,
        "stream_options": {"include_usage": True},  # asked for by hangup (include_usage)
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    added = ["continue_final_message", "add_generation_prompt"]
    assert list(asked.body) == ["stream_options", *body, *added]  # (injected first)
    record = await sink.wait_for("c-large")
    assert [(a.result, a.delivered) for a in record.attempts] == [
        (AttemptResult.TIMEOUT, True),
        (AttemptResult.OK, True),
    ]
