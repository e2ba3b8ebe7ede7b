"""A large body whose bulk is one array of small values is checked a piece at a time
(proxy/array_cut.py) and parsed with that array's middle left out
(`request_fields.read_fields_in_steps`): the answer must equal the whole-body parse's on every
body, valid or hostile. Pieces and windows are made tiny here so that small generated bodies
are cut into many pieces."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import array_cut
from proxy.array_cut import ArrayCut, check_array
from proxy.errors import BadRequest
from proxy.request_fields import RequestFields, read_fields, read_fields_in_steps
from tests.support import run_steps
from tests.test_body_scan import NAMES, scanned, text, value

PIECE = 40
WINDOW = 120


def stepwise(body: bytes, seed: int, run_min: int) -> RequestFields | str:
    try:
        fields, _ = run_steps(
            read_fields_in_steps(
                body, scanned(body, seed, run_min), piece_bytes=PIECE, window=WINDOW
            )
        )
    except BadRequest as exc:
        return f"400 {exc}"
    assert isinstance(fields, RequestFields)
    return fields


def whole(body: bytes) -> RequestFields | str:
    try:
        return read_fields(body)
    except BadRequest as exc:
        return f"400 {exc}"


def cut_of(body: bytes) -> ArrayCut | None:
    cut, _ = run_steps(check_array(body, piece_bytes=PIECE, window=WINDOW))
    assert cut is None or isinstance(cut, ArrayCut)
    return cut


small = st.one_of(
    st.integers(-1000, 1000),
    st.sampled_from([{"role": "user", "content": "hi"}, {"role": "user", "content": "x,y"}]),
    st.fixed_dictionaries({"role": st.just("user"), "content": text}),
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.lists(st.integers(0, 9), max_size=3),
    value,
)
arrays = st.lists(small, min_size=3, max_size=60)
shapes = st.sampled_from(["top", "in message", "pretty"])


def render(members: list[tuple[str, Any]], big: list[Any], shape: str, where: int) -> bytes:
    """An object with `big` as the value of one member (or, "in message", as the content of
    the first of its messages); duplicate names allowed."""
    inner: Any = big
    if shape == "in message":
        inner = [{"role": "user", "content": big}, {"role": "user", "content": "end"}]
    all_members = list(members)
    all_members.insert(min(where, len(all_members)), ("messages", inner))
    indent = 1 if shape == "pretty" else None
    parts = [json.dumps(k) + ":" + json.dumps(v, ensure_ascii=False, indent=indent)
             for k, v in all_members]  # fmt: skip
    return ("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass")


members = st.lists(st.tuples(st.sampled_from(NAMES), value), max_size=4)


@settings(max_examples=500, deadline=None)
@given(members, arrays, shapes, st.integers(0, 4), st.integers(0, 2**32))
def test_generated_bodies_get_the_same_answer(
    body_members: list[Any], big: list[Any], shape: str, where: int, seed: int
) -> None:
    body = render(body_members, big, shape, where)
    assert stepwise(body, seed, 10**9) == whole(body), body
    assert stepwise(body, seed, 24) == whole(body), body  # with long runs too


@settings(max_examples=700, deadline=None)
@given(members, arrays, shapes, st.integers(0, 4), st.integers(0, 2**32), st.data())
def test_damaged_bodies_get_the_same_answer(
    body_members: list[Any],
    big: list[Any],
    shape: str,
    where: int,
    seed: int,
    data: st.DataObject,
) -> None:
    body = bytearray(render(body_members, big, shape, where))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        how = data.draw(st.sampled_from(["cut", "insert", "flip"]))
        junk = data.draw(
            st.sampled_from(
                [b'"', b"\\", b"\xff", b"\x00", b"]", b"[", b"}", b"{", b",", b":", b"\n", b"1"]
            )
        )
        if how == "cut":
            del body[at:]
        elif how == "insert":
            body[at:at] = junk
        elif at < len(body):
            body[at] = junk[0]
    assert stepwise(bytes(body), seed, 10**9) == whole(bytes(body)), bytes(body)


def test_the_middle_of_a_large_array_is_really_left_out() -> None:
    """The cut is taken (not the fallback) and every answer comes from the original bytes."""
    messages = [{"role": "user", "content": f"message {i}"} for i in range(200)]
    body = json.dumps(
        {"model": "m", "messages": messages, "stream": True, "stream_options": {"a": 1}}
    ).encode()
    cut = cut_of(body)
    assert cut is not None and cut.pieces >= 10 and cut.wrong_guesses == 0
    assert cut.end - cut.start > len(body) * 3 // 4
    fields, steps = run_steps(read_fields_in_steps(body, scanned(body, 1, 10**9), piece_bytes=PIECE,
                                             window=WINDOW))  # fmt: skip
    assert steps >= cut.pieces
    assert fields == read_fields(body)
    assert fields.members["messages"] == messages  # put back whole from the original
    assert fields.raw_stream_options == b'{"a": 1}'


def test_wrong_guesses_end_the_cut_and_keep_the_answer() -> None:
    """Elements whose text holds the separator (here `, `): the guesses inside strings fail
    their piece."""
    values = [i if i % 2 else "p, q, r, s, t, u, v" for i in range(300)]
    body = json.dumps({"model": "m", "input": values}).encode()
    cut = cut_of(body)
    assert cut is not None and cut.wrong_guesses > 0
    assert stepwise(body, 2, 10**9) == whole(body)


@pytest.mark.parametrize(
    "tail",
    [
        b"1,,2]}",  # an empty element in the cut middle
        b'1,"\x01",2]}',  # a raw control byte in a string
        b"1,2",  # cut short
        b'1,2],"k"}',  # a member without a value after the array
        b"1,2]} x",  # trailing junk
    ],
)
def test_invalid_bodies_get_the_whole_parse_error(tail: bytes) -> None:
    body = b'{"model":"m","input":[' + b"12345," * 60 + tail
    assert str(stepwise(body, 3, 10**9)).startswith("400 request body is not valid JSON")
    assert stepwise(body, 3, 10**9) == whole(body)


@pytest.mark.parametrize("depth", [800, 2000])
def test_nesting_is_refused_alike(depth: int) -> None:
    """Pieces are checked as deep as the original (the array here is 11 levels down): a deep
    element passes or is refused as in the whole parse. (Right at msgspec's limit the answer
    depends on the Python stack's depth at the call, for the whole parse as much.)"""
    deep = "[" * depth + "]" * depth
    big = "[" + "1," * 200 + deep + "," + "1," * 200 + "1]"
    body = ('{"model":"m","input":' + "[" * 9 + big + "]" * 9 + "}").encode()
    cut = cut_of(body)
    assert cut is not None and cut.pieces > 5  # the path is taken for this shape
    got, expected = stepwise(body, 4, 10**9), whole(body)
    assert isinstance(got, str) is isinstance(expected, str)  # (a deep value has no repr)
    if isinstance(got, str):
        assert got == expected == "400 request body is nested too deeply"


class _Counting(bytearray):
    """A body that counts the bytes and slices Python code takes from it one by one."""

    looked = 0

    def __getitem__(self, key: Any) -> Any:
        _Counting.looked += 1
        return super().__getitem__(key)


@pytest.mark.parametrize(
    "where",
    ["before the closing brace", "between members", "after an array's first element"],
)
def test_a_long_run_of_whitespace_ends_the_walk_without_a_byte_by_byte_look(where: str) -> None:
    """A body padded with whitespace (40 MiB of spaces before its closing brace held one loop
    step ~4 s in bench.cancel's request-body window): the walk looks at a window of it at most
    and gives up, and the body gets the whole parse's answer."""
    pad = b" \n\t" * (4 * array_cut.WINDOW)
    messages = b'[{"role":"user","content":"a"},{"role":"user","content":"b"}]'
    if where == "before the closing brace":
        raw = b'{"model":"m","messages":' + messages + b',"stream":true' + pad + b"}"
    elif where == "between members":
        raw = b'{"model":"m",' + pad + b'"messages":' + messages + b"}"
    else:
        raw = (
            b'{"model":"m","messages":[{"role":"user","content":"a"}'
            + pad
            + b","
            + messages[1:]
            + b"}"
        )
    body = _Counting(raw)
    _Counting.looked = 0
    assert run_steps(check_array(body, piece_bytes=64))[0] is None
    assert _Counting.looked < 200  # slices at the walk's steps, not one look a byte
    whole = read_fields(raw)
    fields, _ = run_steps(read_fields_in_steps(raw, scanned(raw, seed=1), piece_bytes=64))
    assert fields.members == whole.members
