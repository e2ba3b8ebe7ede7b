"""A fallback's model rename and an engine's `rid` for a large body, a bounded step at a time
(proxy/member_edit.py): the steps build what the one-step functions built (the same bytes for
the `rid`; for the rename the same parse, with every byte the client sent kept)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Generator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engines.naming import append_member
from proxy.member_edit import appended, renamed, renamed_in_steps
from proxy.request_fields import read_fields
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.resilience_support import BACKUP_MODEL, fallback_config

CHAT = "/v1/chat/completions"
STEPS = (1, 2, 3, 7, 64, 10**9)


def run(steps: Generator[None, None, Any]) -> tuple[Any, int]:
    count = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, count
        count += 1


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
    got, _ = run(appended(original, member, step=step))
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
    style = draw(st.sampled_from(["compact", "spaced", "indent", "ascii"]))
    if style == "compact":
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    elif style == "spaced":
        text = json.dumps(obj, ensure_ascii=False)
    elif style == "indent":
        text = json.dumps(obj, ensure_ascii=False, indent=draw(st.integers(0, 3)))
    else:
        text = json.dumps(obj)
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
    got, _ = run(renamed_in_steps(original, fields, model, step=step))
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
    got, steps = run(renamed_in_steps(body, fields, "other"))
    # Two literal `"model"` keys: one step as before.
    assert bytes(got) == renamed(body, "other") and steps > 1
    del obj["tools"]
    body = bytearray(json.dumps(obj).encode())
    got, steps = run(renamed_in_steps(body, read_fields(body), "other"))
    assert bytes(got) == body.replace(b'"gpt-4o"', b'"other"', 1)
    assert steps >= 2 * len(body) // (4 << 20)


@pytest.fixture
async def big_backup() -> AsyncIterator[SimulatedProvider]:
    provider = SimulatedProvider(tokens_per_s=1000.0, default_tokens=4, body_limit=64 << 20)
    await provider.start(host="127.0.0.1", port=0)
    try:
        yield provider
    finally:
        await provider.stop()


async def test_a_large_body_reaches_the_fallback_renamed(
    sim: SimulatedProvider, big_backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """A 7 MiB body whose primary answers 503: the fallback gets it asked for its own model,
    every other member as the client sent it (and in its order)."""
    server, _ = await start_proxy(fallback_config(sim, big_backup, max_retries=0))
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
    (got,) = big_backup.requests
    assert got.body == {**sent, "model": BACKUP_MODEL}
    assert list(got.body) == ["messages", "model", "stream", "temperature"]
