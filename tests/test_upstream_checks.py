"""check_response_head's one-pass check of names and values answers as the field-by-field
check does: the same fault named, and nothing refused that the latter passes."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from functools import partial

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import upstream_checks
from proxy.errors import UpstreamFailed
from proxy.upstream_checks import _check_each, check_response_head

FIELDS = [
    ("Content-Type", "application/json"),
    ("content-length", "12"),
    ("X-Tab", "a\tb"),
    ("X-Empty", ""),
    ("Content-Encoding", "gzip"),
    ("content-encoding", " Identity "),
    ("X-Bad", "a\x01b"),
    ("X-Newline", "a\nb"),
    ("X-Del", "a\x7f"),
    ("Bad Name", "v"),
    ("", "v"),
    ("X-Obs", "caf\xe9"),
    ("N\xe4me", "v"),
    ("K", "v"),
    ("\u212a", "v"),  # KELVIN SIGN: the same name as "K" case-insensitively, not a token
]


def _answer(check: Callable[[], None]) -> str | None:
    try:
        check()
    except UpstreamFailed as err:
        return err.message
    return None


@pytest.mark.parametrize("event_stream", [False, True])
def test_the_one_pass_check_names_the_same_fault_as_each_field(event_stream: bool) -> None:
    checked = 0
    for size in range(4):
        for fields in itertools.permutations(FIELDS, size):
            headers = CIMultiDictProxy(CIMultiDict(fields))
            fast = _answer(
                partial(check_response_head, 200, "OK", headers, "u", event_stream=event_stream)
            )
            each = _answer(partial(_check_each, fields, "u", event_stream=event_stream))
            assert fast == each, fields
            checked += 1
    n = len(FIELDS)
    assert checked == 1 + n + n * (n - 1) + n * (n - 1) * (n - 2)


class _CountedTokens:
    """`_TOKENS` with its full matches counted."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.calls = 0

    def fullmatch(self, text: str) -> re.Match[str] | None:
        self.calls += 1
        return self.pattern.fullmatch(text)


def test_a_heads_names_are_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names of a head that passed are not scanned again for the next answer with the
    same names; a head whose names join to the same string but split otherwise (a name with
    a space) is still refused, and a full memory starts again."""
    counted = _CountedTokens(upstream_checks._TOKENS)
    monkeypatch.setattr(upstream_checks, "_TOKENS", counted)
    monkeypatch.setattr(upstream_checks, "_GOOD_NAMES", set())
    for length in ("1", "22"):
        head = CIMultiDictProxy(CIMultiDict([("a", "x"), ("b", length), ("c", "y")]))
        check_response_head(200, "OK", head, "u")
    assert counted.calls == 1
    joined_alike = CIMultiDictProxy(CIMultiDict([("a b", "x"), ("c", "y")]))
    assert _answer(partial(check_response_head, 200, "OK", joined_alike, "u")) == (
        'upstream "u" sent a malformed response header'
    )
    for n in range(upstream_checks._GOOD_NAMES_KEPT + 1):
        check_response_head(200, "OK", CIMultiDictProxy(CIMultiDict([(f"x{n}", "v")])), "u")
    assert "a b c" not in upstream_checks._GOOD_NAMES
    assert len(upstream_checks._GOOD_NAMES) < upstream_checks._GOOD_NAMES_KEPT
