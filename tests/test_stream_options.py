"""Asking for usage in a large request body, a bounded step at a time (proxy/stream_options.py):
the steps find and build exactly what one search and one join did."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.request_fields import read_fields
from proxy.sim import SimulatedProvider
from proxy.stream_options import find_all, spliced, with_stream_usage
from proxy.usage import RequestFacts, inject_stream_usage, inspect_request
from proxy.usage.inject import needs_usage_request
from tests.conftest import StartProxy
from tests.connection_support import hostile_config
from tests.support import run_steps

NEEDLE = b'"stream_options"'
CHAT = "/v1/chat/completions"


pieces = st.lists(
    st.sampled_from([NEEDLE, b'"', b"stream_options", b"x" * 7, b" ", b'"stream_options"s"']),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(pieces, st.integers(1, 40), st.integers(1, 3))
def test_find_all_finds_what_count_counts(body: bytes, step: int, most: int) -> None:
    found, _ = run_steps(find_all(body, NEEDLE, most=most, step=step))
    expected = [m.start() for m in re.finditer(re.escape(NEEDLE), body)][:most]
    assert found == expected
    assert len(found) == min(body.count(NEEDLE), most)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.data(), st.binary(max_size=20), st.integers(1, 50))
def test_spliced_is_the_join(body: bytes, data: st.DataObject, insert: bytes, step: int) -> None:
    start = data.draw(st.integers(0, len(body)))
    end = data.draw(st.integers(start, len(body)))
    original = bytearray(body)
    out, steps = run_steps(spliced(original, start, end, insert, step=step))
    assert bytes(out) == b"".join((body[:start], insert, body[end:]))
    assert original == body  # not changed
    if len(body) > step:
        assert steps == -(-start // step) + -(-(len(body) - end) // step)


def before(body: bytes, facts: RequestFacts, raw: bytes, continuous: bool) -> bytes | None:
    """What admission did before (6e3bebf): one count, one search and one join."""
    if not facts.has_stream_options:
        return inject_stream_usage(body, facts, continuous=continuous)
    if not needs_usage_request(facts, continuous=continuous):
        return None
    if body.count(NEEDLE) != 1:
        return None
    match = re.search(rb'"stream_options"[ \t\r\n]*:[ \t\r\n]*' + re.escape(raw), body)
    if match is None:
        return None
    options: Any = json.loads(body).get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    if continuous:
        merged["continuous_usage_stats"] = True
    value = json.dumps(merged, separators=(",", ":")).encode()
    return b"".join((body[: match.end() - len(raw)], value, body[match.end() :]))


stream_options_values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.just({}),
    st.just({"include_usage": False}),
    st.just({"continuous_usage_stats": True, "x": "\\u00e9"}),
    st.just([1]),
)


@settings(max_examples=300, deadline=None)
@given(stream_options_values, st.booleans(), st.integers(0, 2), st.sampled_from(["", " ", "\n  "]))
def test_the_body_asks_for_usage_as_before(
    opts: Any, continuous: bool, mentions: int, space: str
) -> None:
    obj: dict[str, Any] = {"model": "m", "stream": True}
    if opts is not None:
        obj["stream_options"] = opts
    obj["messages"] = [{"role": "user", "content": "stream_options " * mentions}] * 40
    body = json.dumps(obj, indent=1 if space else None).encode()
    fields = read_fields(body)
    facts = inspect_request(CHAT, fields.members)
    expected = before(body, facts, fields.raw_stream_options, continuous)
    for step in (7, 64, 10**9):
        got, _ = run_steps(
            with_stream_usage(bytearray(body), fields, facts, continuous=continuous, step=step)
        )
        assert got == expected


async def test_a_large_streamed_body_reaches_the_upstream_asking_for_usage(
    big_sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """Bodies of 6-9 MiB (so the search and the build take several steps) with and without
    `stream_options`: the upstream gets the client's body with usage asked for."""
    assert big_sim.base_url is not None
    server, _ = await start_proxy(
        hostile_config(big_sim.base_url, defaults={"include_usage": True})
    )
    messages = [{"role": "user", "content": f"message {i}"} for i in range(300_000)]
    sent = [
        {"model": "normal:tokens=2,rate=0", "stream": True, "messages": messages},
        {"model": "normal:tokens=2,rate=0", "stream": True, "messages": messages,
         "stream_options": {"foo": 1}},
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for obj in sent:
            body = json.dumps(obj).encode()
            assert len(body) > 6 << 20
            async with session.post(
                f"http://127.0.0.1:{server.port}{CHAT}",
                data=io.BytesIO(body),
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 200, await response.text()
                assert b"[DONE]" in await response.read()
    first, second = (r.body for r in big_sim.requests)
    assert first == {**sent[0], "stream_options": {"include_usage": True}}
    assert second == {**sent[1], "stream_options": {"foo": 1, "include_usage": True}}
    assert next(iter(first)) == "stream_options"  # spliced in first, the rest as sent
