"""One top-level member of a request body changed a bounded step at a time (sans-I/O
generators, run one step per loop iteration by `proxy.edge.body.in_steps`), as
`proxy.stream_options` asks for usage: a fallback's model rename and an engine's request name
(`proxy.engines.naming`). For a 60 MiB body, `json.loads` and `json.dumps` of it were 75 ms to
about a second in one step, and `append_member`'s strips and join four 60 MiB copies.

Bodies up to `STEP_BYTES` keep the one-step functions (no generator per ordinary request).
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from typing import Final

from proxy.request_body import RequestBody
from proxy.request_fields import RequestFields
from proxy.stream_options import STEP_BYTES, spliced

_WS: Final = b" \t\r\n"
_KEY_REST: Final = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_WS_RUN: Final = re.compile(rb"[ \t\r\n]*")
# A JSON string (the body is valid JSON here, so no control bytes are inside).
_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_LONGEST_VALUE: Final = 64 * 1024  # a model name longer than this: the one-step rename
_MODEL_KEY: Final = b'"model"'
_HITS_A_STEP: Final = 4096
_TAIL_BYTES: Final = 64 * 1024

Steps = Generator[None, None, RequestBody]


def renamed(body: RequestBody, model: str) -> bytes:
    """The request body with its `model` replaced (a fallback's rename); only the one key
    changes, everything else (injected usage options included) stays as it was."""
    obj = json.loads(body)  # valid: read_fields parsed it as an object
    obj["model"] = model
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def renamed_in_steps(
    body: RequestBody, fields: RequestFields, model: str, *, step: int = STEP_BYTES
) -> Steps:
    """`renamed` for a large body: its `model` value replaced in place (or the member added
    last when it has none), every other byte as the client sent it; the parse equals
    `renamed`'s. Where the top-level member cannot be told apart from a nested `"model"` key
    (several, or a key spelled with escapes) or its value is not a short string, the one-step
    `renamed` as before."""
    members = fields.members
    if members is None:  # not an object: as before (renamed raises)
        return renamed(body, model)
    spelled = yield from _search(body, spelling_escapes("model"), step)
    if spelled:
        return renamed(body, model)
    value = json.dumps(model, ensure_ascii=False).encode()
    if "model" not in members:  # added last, where `json.dumps` puts a new key
        added = yield from appended(body, b'"model":' + value, step=step)
        return renamed(body, model) if added is None else added
    keys = yield from _keys(body, _MODEL_KEY, most=2, step=step)
    # Every literal `"model"` key was counted, and the top-level one is literal (no escape
    # spells it): when there is one, it is the top-level one.
    if len(keys) != 1 or keys[0] < 0:
        return renamed(body, model)
    at = keys[0]
    string = _STRING.match(body, at, min(len(body), at + _LONGEST_VALUE))
    if string is None:
        return renamed(body, model)
    return (yield from spliced(body, at, string.end(), value, step=step))


def appended(
    body: RequestBody, member: bytes, *, step: int = STEP_BYTES
) -> Generator[None, None, RequestBody | None]:
    """`body` with `member` (`"name":value`) added as the last member of its top-level object,
    every other byte unchanged (what `proxy.engines.naming.append_member` builds), found and
    copied `step` bytes a step; None when `body` is not `{...}` around JSON whitespace."""
    start = yield from _first_other(body, 0, len(body), step)
    stripped_end = yield from _last_other(body, step)
    if start is None or stripped_end is None:
        return None
    end = stripped_end - 1  # the closing brace
    if body[start : start + 1] != b"{" or body[end : end + 1] != b"}" or end <= start:
        return None
    inside = yield from _first_other(body, start + 1, end, step)
    if inside is not None:
        member = b"," + member
    return (yield from spliced(body, end, end, member, step=step))


def _first_other(
    body: RequestBody, start: int, end: int, step: int
) -> Generator[None, None, int | None]:
    """Where the first byte other than JSON whitespace in `body[start:end]` is (None: none)."""
    for at in range(start, end, step):
        blank = _WS_RUN.match(body, at, min(at + step, end))
        if blank is not None and blank.end() < min(at + step, end):
            return blank.end()
        yield
    return None


def _last_other(body: RequestBody, step: int) -> Generator[None, None, int | None]:
    """The length of `body` without its trailing JSON whitespace (None: all whitespace);
    looked at `_TAIL_BYTES` a step (a slice is a copy)."""
    for end in range(len(body), 0, -_TAIL_BYTES):
        piece = body[max(0, end - _TAIL_BYTES) : end]
        kept = len(piece.rstrip(_WS))
        if kept:
            return end - len(piece) + kept
        yield
    return None


def spelling_escapes(name: str) -> re.Pattern[bytes]:
    """A `\\u` escape of a character of `name` (ASCII): a key spelled with escapes, such as
    `"mod\\u0065l"` for `model`, holds one (6 bytes)."""
    codes = sorted({f"{ord(c):04x}" for c in name})
    either = "|".join(
        "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in code) for code in codes
    )
    return re.compile(rf"\\u(?:{either})".encode())


def has_key_in_steps(
    body: RequestBody, name: str, *, step: int = STEP_BYTES
) -> Generator[None, None, bool]:
    """False when no member of any object in `body` can be named `name` (no literal key, no
    escape that could spell one); True when one may be (the caller then parses)."""
    if (yield from _keys(body, f'"{name}"'.encode(), most=1, step=step)):
        return True
    return (yield from _search(body, spelling_escapes(name), step))


def _search(
    body: RequestBody, pattern: re.Pattern[bytes], step: int
) -> Generator[None, None, bool]:
    """Whether `pattern` (a fixed length of 6 bytes) occurs in `body`, `step` bytes a step."""
    for at in range(0, len(body), step):
        if pattern.search(body, at, at + step + 5):
            return True
        yield
    return False


def _keys(
    body: RequestBody, name: bytes, *, most: int, step: int
) -> Generator[None, None, list[int]]:
    """Where the values of the first `most` members spelled `name` (quotes included) begin, at
    any depth, searched `step` bytes a step. Conservative: an occurrence inside a string (as
    the end of a key `"...\\"model"`) counts too, and so does one whose colon is not found
    within a step (so a caller that needs exactly one key refuses rather than guesses)."""
    found: list[int] = []
    pos, budget = 0, _HITS_A_STEP
    while len(found) < most:
        window_end = pos + step
        at = body.find(name, pos, window_end + len(name) - 1)
        if at < 0:
            if window_end >= len(body):
                break
            pos = window_end
            yield
            continue
        after = at + len(name)
        rest = _KEY_REST.match(body, after, after + step)
        if rest is not None:
            found.append(rest.end())
        else:
            blank = _WS_RUN.match(body, after, after + step)
            if blank is not None and blank.end() == min(after + step, len(body)):
                found.append(-1)  # whitespace to the end of a step: counted, never used
        pos, budget = after, budget - 1
        if not budget:  # many `"model"` values (not keys) in one step
            budget = _HITS_A_STEP
            yield
    return found
