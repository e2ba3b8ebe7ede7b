"""A small body's fields are read in one decode (`request_fields._read_small`): the answer,
errors included, must equal the general path's (`_check_utf8`, then each member's span
decoded on its own) on every body, valid or hostile."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import request_fields
from proxy.errors import BadRequest
from proxy.request_fields import RequestFields, _check_utf8, _read, read_fields
from tests.test_body_scan import damaged, members, render


def general(body: bytes) -> RequestFields | str:
    try:
        _check_utf8(body)
        return _read(body)
    except BadRequest as exc:
        return f"400 {exc}"


def small(body: bytes) -> RequestFields | str:
    try:
        return read_fields(body)
    except BadRequest as exc:
        return f"400 {exc}"


@settings(max_examples=600, deadline=None)
@given(members)
def test_generated_bodies_get_the_same_answer(body_members: list[Any]) -> None:
    body = render(body_members)
    assert small(body) == general(body), body


@settings(max_examples=600, deadline=None)
@given(members, st.data())
def test_damaged_bodies_get_the_same_answer(body_members: list[Any], data: st.DataObject) -> None:
    body = damaged(body_members, data)
    assert small(body) == general(body), body


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","max_tokens":10000000000,"n":2,"stream":true}',
        b'{"max_completion_tokens":1e400,"max_output_tokens":99999999999999999999999}',
        b'\xef\xbb\xbf{"model":"m","stream_options": {"include_usage" :true} }',
        b'{"stream_options":null,"messages":[{"role":"user","content":"hi"}],"other":[1,{}]}',
        b'{"model":"a","model":"b","stream_options":1,"stream_options":{"x":[]}}',
        b'["model"]',
        b'"text"',
        b"",
        b'{"model":"\xed\xa0\x80"}',
        b'{"other":"\xc3"}',
        b'{"messages":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"other":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"model":"m",}',
        b'{"n":-0,"background":true,"suffix":"s","input":["a",[1,2]],"instructions":"i"}',
    ],
)
def test_edge_bodies_get_the_same_answer(body: bytes) -> None:
    assert small(body) == general(body)


def test_the_one_decode_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid small body is read without the general path (which would fail here)."""

    def no_general(body: bytes) -> RequestFields:
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(request_fields, "_read", no_general)
    fields = read_fields(b'{"model":"m","max_tokens":5,"stream_options":{"include_usage":true}}')
    assert fields.members == {
        "model": "m",
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
    }
    assert fields.raw_stream_options == b'{"include_usage":true}'
