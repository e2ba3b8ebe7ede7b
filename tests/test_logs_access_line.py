"""The access line's own JSON writer (proxy/logs.py `_access_json_line`) writes what the
general one (`_json_line`) writes, for any fields: the usual ones, secrets in any free-text
field (in any case, with the characters IGNORECASE matches for s and k), values that are not
text, fields named like the line's head members, no fields at all. And it leaves the caller's
fields as they were."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logs import (
    _FREE_TEXT_FIELDS,
    ACCESS_LOGGER,
    _access_json_line,
    _json_line,
    access_fields,
)
from tests.metrics_support import make_record

_words = st.sampled_from(
    [
        "Bearer abc",
        "bEaReR x",
        "sk-abcdef123",
        "\u017fk-abcdef123",
        "api_key=v",
        "apiKey: v",
        "\u212aey",
        "key",
        "\0",
        "é",
        "\n",
        '"',
    ]
)
_text = st.lists(st.one_of(_words, st.text(max_size=6)), max_size=4).map("".join)
_value = st.one_of(
    _text,
    st.none(),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.dictionaries(st.text(max_size=3), _text, max_size=2),
)
_names = st.sampled_from(
    [*_FREE_TEXT_FIELDS, "ts", "level", "logger", "msg", "outcome", "status", "tokens", "x"]
)


@st.composite
def _fields(draw: st.DrawFn) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if draw(st.booleans()):
        base = access_fields(
            make_record(
                path=draw(_text),
                model=draw(_text),
                user_agent=draw(_text),
                error_message=draw(st.none() | _text),
            )
        )
    extra = draw(st.dictionaries(_names, _value, max_size=5))
    return {**base, **extra} if draw(st.booleans()) else {**extra, **base}


def _outcome(write: Callable[[], str]) -> tuple[str, str]:
    try:
        return ("line", write())
    except AttributeError as exc:  # the general writer redacts a "msg" that is not text
        return ("raised", type(exc).__name__)


@settings(max_examples=1500, deadline=None)
@given(_fields(), st.booleans())
def test_the_access_writer_writes_what_the_general_one_writes(
    fields: dict[str, Any], error: bool
) -> None:
    before = copy.deepcopy(fields)
    level = "error" if error else "info"
    ts = "2026-11-30T18:33:37.502Z"
    fast = _outcome(lambda: _access_json_line(ts, error, fields))
    assert fast == _outcome(lambda: _json_line(ts, level, ACCESS_LOGGER, "request", fields))
    assert fields == before


def test_a_secret_in_each_free_text_field_is_redacted() -> None:
    for name in _FREE_TEXT_FIELDS:
        fields = access_fields(make_record())
        fields[name] = "upstream said: Bearer sk-abcdef123456"
        line = _access_json_line("t", False, fields)
        assert "abcdef" not in line and "[redacted]" in line, name
