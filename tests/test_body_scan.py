"""A large body's fields are read from a shortened parse (proxy/body_scan.py and
`request_fields._read_shortened`): the answer must equal the whole-body parse's on every body,
valid or hostile. Runs are made short here (`RUN_MIN`) so that small generated bodies have many;
chunking is random, so runs and UTF-8 sequences cross chunk edges."""

from __future__ import annotations

import codecs
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.body_scan import BodyScan
from proxy.edge.body import at_once
from proxy.errors import BadRequest
from proxy.request_fields import RequestFields, _read_shortened, read_fields, read_fields_in_steps

RUN_MIN = 24


def scanned(body: bytes, seed: int, run_min: int = RUN_MIN) -> BodyScan:
    rng = random.Random(seed)
    scan = BodyScan(run_min)
    pos = 0
    while pos < len(body):
        step = rng.choice((1, 3, 7, 30, 64, 500))
        scan.feed(body[pos : pos + step])
        pos += step
    scan.finish()
    return scan


def answer(body: bytes, scan: BodyScan | None) -> RequestFields | str:
    try:
        return read_fields(body, scan)
    except BadRequest as exc:
        return f"400 {exc}"


def assert_same(body: bytes, seed: int) -> BodyScan:
    scan = scanned(body, seed)
    assert answer(body, scan) == answer(body, None), body
    return scan


# Text that makes long runs, breaks them, or breaks JSON: escapes, surrogate pairs (escaped and
# raw), lone surrogates, control bytes, multi-byte UTF-8, quotes.
PIECES = [
    "x" * 40,
    "ab",
    "é",
    "😀",
    "漢字" * 10,
    "\\n",
    '\\"',
    "\\\\",
    "\\u00e9",
    "\\ud83d\\ude00",
    "\\ud83d",
    "\\ude00",
    "\\q",
    "\n",
    "\x01",
    '"',
    "stream_options",
    ",1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
]
text = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)
scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False), text
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["a", "role", "x"]), inner)
    ),
    max_leaves=12,
)
NAMES = ["model", "stream", "stream_options", "max_tokens", "n", "messages", "prompt", "input",
         "tools", "other", "MODEL"]  # fmt: skip


def render(members: list[tuple[str, Any, str]]) -> bytes:
    """An object (duplicate names allowed); a member's raw text, when given, goes in unescaped
    (so it can hold what json.dumps would escape: control bytes, lone quotes)."""
    parts = []
    for name, val, raw in members:
        encoded = json.dumps(val, ensure_ascii=False) if not raw else '"' + raw + '"'
        parts.append(json.dumps(name) + ":" + encoded)
    return ("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass")


members = st.lists(st.tuples(st.sampled_from(NAMES), value, text | st.just("")), max_size=6)


def damaged(body_members: list[Any], data: st.DataObject) -> bytes:
    """A rendered body with one to three cuts, insertions or flipped bytes: JSON's breakers,
    invalid UTF-8, a truncated multi-byte sequence."""
    return damaged_bytes(render(body_members), data)


def damaged_bytes(rendered: bytes, data: st.DataObject) -> bytes:
    body = bytearray(rendered)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        how = data.draw(st.sampled_from(["cut", "insert", "flip"]))
        junk = data.draw(st.sampled_from([b'"', b"\\", b"\xff", b"\xc3", b"\x00", b"]", b"x"]))
        if how == "cut":
            del body[at:]
        elif how == "insert":
            body[at:at] = junk
        elif at < len(body):
            body[at] = junk[0]
    return bytes(body)


@settings(max_examples=600, deadline=None)
@given(members, st.integers(0, 2**32))
def test_generated_bodies_get_the_same_answer(body_members: list[Any], seed: int) -> None:
    assert_same(render(body_members), seed)


@settings(max_examples=600, deadline=None)
@given(members, st.integers(0, 2**32), st.data())
def test_damaged_bodies_get_the_same_answer(
    body_members: list[Any], seed: int, data: st.DataObject
) -> None:
    assert_same(damaged(body_members, data), seed)


def test_long_strings_are_left_out_and_members_come_back_whole() -> None:
    """The shortened parse is really taken (not the fallback) and gives the original values."""
    content = "a" * 100 + "\\n" + "é" * 50 + "\\ud83d\\ude00" + "b" * 100
    body = (
        b'\xef\xbb\xbf{"model":"' + b"m" * 60 + b'","messages":[{"role":"user","content":"'
        + content.encode() + b'"}],"stream_options":{"k":"' + b"v" * 40 + b'"}}'
    )  # fmt: skip
    scan = scanned(body, 1)
    assert len(scan.runs) >= 4
    shortened = at_once(_read_shortened(body, scan.runs))
    assert shortened is not None
    assert shortened == read_fields(body)
    assert shortened.members is not None
    assert shortened.members["model"] == "m" * 60
    assert shortened.raw_stream_options == b'{"k":"' + b"v" * 40 + b'"}'


def test_runs_outside_strings_fall_back_to_the_whole_parse() -> None:
    body = b'{"model":"m","input":[' + b"1," * 100 + b"1,,2]}"
    scan = scanned(body, 2)
    assert scan.runs
    assert at_once(_read_shortened(body, scan.runs)) is None
    assert answer(body, scan) == answer(body, None)
    assert str(answer(body, scan)).startswith("400 request body is not valid JSON")


# Whitespace a client may put between a body's values: spaces long enough to make runs (and
# their middles all spaces, or not: beside digits or brackets), line breaks, a carriage return.
PADS = ["", " ", " " * 30, " " * 90, "\n" + " " * 60, "\r\n" + " " * 40, " " * 50 + "\n", " " * 130]


def padded(body_members: list[Any], data: st.DataObject) -> bytes:
    """`render`, with generated whitespace between tokens, inside member values too."""
    pad = st.sampled_from(PADS)
    parts = []
    for name, val, raw in body_members:
        if raw:
            encoded = '"' + raw + '"'
        else:
            indent = data.draw(st.sampled_from([None, 0, 30, " " * 70]))
            encoded = json.dumps(val, ensure_ascii=False, indent=indent)
        parts.append(data.draw(pad) + json.dumps(name) + data.draw(pad) + ":" + data.draw(pad)
                     + encoded + data.draw(pad))  # fmt: skip
    body = data.draw(pad) + "{" + ",".join(parts) + data.draw(pad) + "}" + data.draw(pad)
    return body.encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(members, st.integers(0, 2**32), st.data())
def test_bodies_padded_with_whitespace_get_the_same_answer(
    body_members: list[Any], seed: int, data: st.DataObject
) -> None:
    body = padded(body_members, data)
    if data.draw(st.booleans()):
        body = damaged_bytes(body, data)
    scan = scanned(body, seed)
    whole = answer(body, None)
    assert answer(body, scan) == whole, body
    if scan.utf8_ok and scan.runs:  # stretches of spaces as short as the pads cut out too
        shortened = at_once(_read_shortened(body, scan.runs, spaces_min=20))
        assert shortened is None or shortened == whole, body
    try:
        stepped: RequestFields | str = at_once(read_fields_in_steps(body, scan))
    except BadRequest as exc:
        stepped = f"400 {exc}"
    assert stepped == whole, body


def test_whitespace_outside_strings_is_left_out_and_counted_back() -> None:
    """Spaces between values, at the top and inside a prompt member over the decode limit:
    the shortened parse is taken (the whole one is not needed) and the member's size is the
    original's, its value the original's."""
    from proxy.request_fields import PROMPT_DECODE_LIMIT

    pad = b" " * 200
    message = b'{"role":"user","content":"' + b"x" * 1000 + b'"}'
    messages = b"[" + (message + b"," + pad) * (PROMPT_DECODE_LIMIT // 1000) + message + b"]"
    body = b'{"model":' + pad + b'"m",' + pad + b'"messages":' + messages + pad + b"}"
    scan = scanned(body, 4, run_min=100)
    fields = at_once(_read_shortened(body, scan.runs, spaces_min=50))
    assert fields is not None
    assert fields == read_fields(body)
    assert fields.undecoded_prompt_bytes == len(messages)
    small = b'{"model":' + pad + b'"m",' + pad + b'"stream":' + pad + b"true" + pad + b"}"
    fields = at_once(_read_shortened(small, scanned(small, 5, run_min=100).runs, spaces_min=50))
    assert fields is not None
    assert fields == read_fields(small)
    assert fields.members == {"model": "m", "stream": True}


def test_whitespace_beside_a_carriage_return_of_the_body_falls_back() -> None:
    """A carriage return of the body's own would be taken for a marker: the whole parse."""
    body = b'{"model":"m",\r\n' + b" " * 200 + b'"stream":true}'
    scan = scanned(body, 6, run_min=100)
    assert scan.runs
    assert at_once(_read_shortened(body, scan.runs, spaces_min=50)) is None
    assert read_fields(body, scan) == read_fields(body)


def test_a_body_padded_with_megabytes_of_spaces_is_read_in_short_steps() -> None:
    """bench.cancel's request-body window sends a small request padded with spaces before its
    closing brace: its fields come from the shortened parse, checked a few MiB a step, and
    the whole body is never parsed in one step."""
    import proxy.request_fields as request_fields

    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    body = raw[:-1] + b" " * (20 * 1024 * 1024) + b"}"
    scan = BodyScan()
    for at in range(0, len(body), 256 * 1024):
        scan.feed(body[at : at + 256 * 1024])
    scan.finish()
    whole = read_fields(raw)
    steps = read_fields_in_steps(body, scan)
    read_whole = request_fields._read
    request_fields._read = None  # type: ignore[assignment]  # must not be called
    try:
        count = 0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                assert done.value == whole
                break
            count += 1
    finally:
        request_fields._read = read_whole
    assert count == 6  # 20 MiB of spaces compared 4 MiB a step, then the shortened parse again


def test_a_prompt_member_over_the_decode_limit_counts_its_original_bytes() -> None:
    from proxy.request_fields import PROMPT_DECODE_LIMIT

    text = "x" * (PROMPT_DECODE_LIMIT + 10)
    body = json.dumps({"model": "m", "messages": [{"content": text}]}).encode()
    scan = scanned(body, 3, run_min=64 * 1024)
    assert scan.runs
    fields = read_fields(body, scan)
    assert fields == read_fields(body)
    assert fields.undecoded_prompt_bytes == len(json.dumps([{"content": text}]))


@pytest.mark.parametrize(
    "body",
    [
        "é".encode() * 30,
        b"\xc3",
        b"ok\xc3",
        b"\xed\xa0\x80",  # a surrogate in UTF-8
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        "😀".encode()[:3] + b"x" * 30,
    ],
)
def test_utf8_is_checked_as_the_incremental_decoder_does(body: bytes) -> None:
    def valid(data: bytes) -> bool:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(data, final=True)
        except UnicodeDecodeError:
            return False
        return True

    for seed in range(20):
        assert scanned(body, seed).utf8_ok is valid(body)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a" * 10, b"b", b'"', b"\\", b"\x00", b"\xc3\xa9"]), max_size=60
    ).map(b"".join),
    st.integers(0, 2**32),
)
def test_runs_are_exactly_the_long_stretches_without_breakers(data: bytes, seed: int) -> None:
    """Every maximal stretch of run_min bytes or more with no quote, backslash or control byte
    is found, whatever the chunking, and nothing else."""
    scan = scanned(data, seed)
    expected: list[tuple[int, int]] = []
    start = 0
    for i, byte in enumerate([*data, 0]):
        if byte < 0x20 or byte in b'"\\':
            if i - start >= RUN_MIN:
                expected.append((start, i))
            start = i + 1
    assert scan.runs == expected


def test_the_prompt_estimate_counts_the_members_too_large_to_decode() -> None:
    """`with_size_estimate` adds their bytes / 4 to the estimate of what was decoded, on a
    copy of the request's facts (a frozen msgspec Struct)."""
    from proxy.request_fields import PROMPT_DECODE_LIMIT, with_size_estimate
    from proxy.usage import inspect_request

    text = "x" * (PROMPT_DECODE_LIMIT + 10)
    body = json.dumps({"model": "m", "messages": [{"content": text}]}).encode()
    fields = read_fields(body)
    facts = inspect_request("/v1/chat/completions", {"model": "m", "messages": []})
    estimated = with_size_estimate(facts, fields)
    extra = -(-fields.undecoded_prompt_bytes // 4)
    assert estimated.prompt_tokens_estimate == facts.prompt_tokens_estimate + extra
    assert (estimated.model, estimated.endpoint) == (facts.model, facts.endpoint)
