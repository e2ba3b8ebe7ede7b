"""A fallback's model rename and an engine's `rid` for a large body, a bounded step at a time
(proxy/member_edit.py): the steps build what the one-step functions built (the same bytes for
the `rid`; for the rename the same parse, with every byte the client sent kept)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.engines import protocols
from proxy.engines.naming import (
    append_member,
    append_member_in_steps,
    has_member,
    has_member_in_steps,
)
from proxy.member_edit import appended, renamed, renamed_in_steps
from proxy.request_fields import read_fields
from proxy.sim import SimulatedProvider
from proxy.usage import inspect_request
from tests.conftest import StartProxy
from tests.connection_support import hostile_config
from tests.resilience_support import BACKUP_MODEL, fallback_config
from tests.support import json_in_a_style, run_steps

CHAT = "/v1/chat/completions"
STEPS = (1, 2, 3, 7, 64, 10**9)


def pairs(body: bytes | bytearray) -> Any:
    """The parse with every object as its list of members (order and duplicates kept)."""
    return json.loads(body, object_pairs_hook=list)


object_pieces = st.lists(
    st.sampled_from([b"{", b"}", b" ", b"\n", b'"a":1', b",", b'"}"', b"[", b"]", b"x", b"\t"]),
    max_size=25,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(object_pieces, st.sampled_from(STEPS))
def test_appended_is_append_member(body: bytes, step: int) -> None:
    member = json.dumps({"rid": "X"}, separators=(",", ":")).encode()[1:-1]
    original = bytearray(body)
    got, _ = run_steps(appended(original, member, step=step))
    expected = append_member(body, "rid", "X")
    assert (None if got is None else bytes(got)) == expected
    assert original == body  # not changed


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "a", "messages", "b"]), inner, max_size=3)
    ),
    max_leaves=10,
)
model_values = st.one_of(
    st.text(max_size=10), st.just('a "quoted" \\ model'), st.just("é\u2028"), st.integers()
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON objects with and without a top-level `model`, nested `model` keys and values,
    written compact, indented or ASCII-escaped, some with a key spelled with escapes."""
    obj: dict[str, Any] = {}
    keys = draw(st.lists(st.sampled_from(["model", "messages", "a", "b"]), unique=True))
    for key in keys:
        obj[key] = draw(model_values if key == "model" else json_values)
    text = json_in_a_style(draw, obj)
    if draw(st.booleans()):
        text = text.replace('"model"', '"mod\\u0065l"', 1)
    if draw(st.booleans()):
        text = draw(st.sampled_from([" ", "\n", ""])) + text + draw(st.sampled_from([" \n", ""]))
    return text.encode()


@settings(max_examples=600, deadline=None)
@given(bodies(), st.sampled_from(["backup", 'b"\\ack\u00e9', ""]), st.sampled_from(STEPS))
def test_the_rename_in_steps_parses_as_the_one_step_rename(
    body: bytes, model: str, step: int
) -> None:
    fields = read_fields(body)
    expected = renamed(body, model)
    original = bytearray(body)
    got, _ = run_steps(renamed_in_steps(original, fields, model, step=step))
    assert original == body  # not changed
    assert pairs(got) == pairs(expected)  # the same members, in the same order
    if bytes(got) != expected:  # done in place: only the model's value changed, or added
        assert bytes(got) == in_place(body, model)


def in_place(body: bytes, model: str) -> bytes:
    """The body with its one literal top-level `"model"` value replaced, or the member added
    before the closing brace: written out here with `re` and `raw_decode`, not in steps."""
    value = json.dumps(model, ensure_ascii=False).encode()
    if "model" not in json.loads(body):
        end = len(body.rstrip(b" \t\r\n")) - 1
        inside = body[body.index(b"{") + 1 : end].strip(b" \t\r\n")
        return body[:end] + (b"," if inside else b"") + b'"model":' + value + body[end:]
    (key,) = re.finditer(rb'"model"[ \t\r\n]*:[ \t\r\n]*', body)
    text = body[key.end() :].decode()
    _, length = json.JSONDecoder().raw_decode(text)
    old_end = key.end() + len(text[:length].encode())
    return body[: key.end()] + value + body[old_end:]


def test_a_large_body_is_renamed_in_bounded_steps() -> None:
    """4 MiB steps over a 20 MiB body: several steps, the bytes the client sent kept."""
    messages = [{"role": "user", "content": f'a "model" here {i}'} for i in range(400_000)]
    obj = {"model": "gpt-4o", "messages": messages, "tools": [{"model": "nested"}]}
    body = bytearray(json.dumps(obj).encode())
    fields = read_fields(body)
    got, steps = run_steps(renamed_in_steps(body, fields, "other"))
    # Two literal `"model"` keys: one step as before.
    assert bytes(got) == renamed(body, "other") and steps > 1
    del obj["tools"]
    body = bytearray(json.dumps(obj).encode())
    got, steps = run_steps(renamed_in_steps(body, read_fields(body), "other"))
    assert bytes(got) == body.replace(b'"gpt-4o"', b'"other"', 1)
    assert steps >= 2 * len(body) // (4 << 20)


async def test_a_large_body_reaches_the_fallback_renamed(
    sim: SimulatedProvider, big_sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A 7 MiB body whose primary answers 503: the fallback gets it asked for its own model,
    every other member as the client sent it (and in its order)."""
    server, _ = await start_proxy(fallback_config(sim, big_sim, max_retries=0))
    sim.set_fault("gpt-4o", "error:status=503")
    messages = [{"role": "user", "content": f"message {i}"} for i in range(300_000)]
    sent = {"messages": messages, "model": "gpt-4o", "stream": False, "temperature": 0.5}
    body = json.dumps(sent).encode()
    assert len(body) > 6 << 20
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{server.port}{CHAT}",
            data=io.BytesIO(body),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["model"] == BACKUP_MODEL
    (got,) = big_sim.requests
    assert got.body == {**sent, "model": BACKUP_MODEL}
    assert list(got.body) == ["messages", "model", "stream", "temperature"]


rid_pieces = st.lists(
    st.sampled_from(
        [b'{"rid":1}', b'{"r\\u0069d":1}', b'{"\\u0052id":1}', b'"rid"', b'"r\\u0069d"',
         b'"r\\u0049d"', b"rid", b'{"a":', b"}", b"[", b"]", b",", b" ", b'"x"', b":",
         b'"\\\\"', b'{"b":{"rid":2}}', b"1"]
    ),
    max_size=20,
).map(b"".join)  # fmt: skip


def as_rid(body: bytes) -> bytes:
    return body.replace(b"model", b"rid").replace(b"mod\\u0065l", b"r\\u0069d")


@settings(max_examples=600, deadline=None)
@given(st.one_of(rid_pieces, bodies().map(as_rid)), st.data())
def test_has_member_in_steps_is_has_member(body: bytes, data: st.DataObject) -> None:
    """Generated and damaged bodies (invalid JSON included) at small and odd steps."""
    step = data.draw(st.sampled_from(STEPS))
    got, _ = run_steps(has_member_in_steps(bytearray(body), "rid", step=step))
    assert got == has_member(body, "rid")


@settings(max_examples=300, deadline=None)
@given(st.one_of(rid_pieces, object_pieces), st.sampled_from(STEPS))
def test_append_member_in_steps_is_append_member(body: bytes, step: int) -> None:
    got, _ = run_steps(append_member_in_steps(bytearray(body), "rid", "0f" * 16, step=step))
    assert (None if got is None else bytes(got)) == append_member(body, "rid", "0f" * 16)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, b'{"model":"m","messages":[],"rid":"client-rid"}'),
        (CHAT, b'{"model":"m","messages":[],"r\\u0069d":"client-rid"}'),
        (CHAT, b'{"model":"m","messages":[{"rid":1}]}'),
        (CHAT, b'{"model":"m","messages":[],"n":2}'),
        (CHAT, b' {"model":"m","messages":["\\u00e9"]} '),
        ("/v1/completions", b'{"model":"m","prompt":"p"}\n'),
        ("/v1/embeddings", b'{"model":"m","input":"x"}'),
    ],
)
def test_sglang_names_in_steps_as_in_one(
    path: str, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocols, "fresh_id", lambda: "0f" * 16)
    sglang = protocols.SGLang()
    facts = inspect_request(path, json.loads(body))
    headers: CIMultiDict[str] = CIMultiDict()
    expected = sglang.name_attempt(facts, body, headers)
    for step in STEPS:
        got, _ = run_steps(sglang.name_attempt_in_steps(facts, bytearray(body), headers, step=step))
        assert (bytes(got.body), got.engine_id) == (bytes(expected.body), expected.engine_id)


@pytest.fixture
async def big_sglang() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(
        engine="sglang", tokens_per_s=1000.0, default_tokens=4, body_limit=64 << 20
    ) as provider:
        yield provider


async def test_a_large_body_is_named_at_sglang(
    big_sglang: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A 7 MiB body to an SGLang upstream: it arrives with the rid hangup records, every other
    member as the client sent it; one with its own `rid` arrives as sent."""
    assert big_sglang.base_url is not None
    url = big_sglang.base_url
    upstreams = {"sim": {"base_url": url, "engine": "sglang"}}
    server, sink = await start_proxy(hostile_config(url, upstreams=upstreams))
    messages = [{"role": "user", "content": f"message {i}"} for i in range(300_000)]
    sent: list[dict[str, Any]] = [
        {"model": "normal:tokens=2,rate=0", "messages": messages, "stream": True},
        {"model": "normal:tokens=2,rate=0", "messages": messages, "rid": "client-own"},
    ]
    async with aiohttp.ClientSession() as session:
        for i, obj in enumerate(sent):
            body = json.dumps(obj).encode()
            assert len(body) > 6 << 20
            async with session.post(
                f"http://127.0.0.1:{server.port}{CHAT}",
                data=io.BytesIO(body),
                headers={"Content-Type": "application/json", "x-request-id": f"big-{i}"},
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
    first, second = big_sglang.requests
    record = await sink.wait_for("big-0")
    assert record.engine_request_id is not None
    assert first.body == {**sent[0], "rid": record.engine_request_id}
    assert list(first.body)[-1] == "rid"
    assert second.body == sent[1]
