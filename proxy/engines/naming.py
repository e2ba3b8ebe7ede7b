"""Naming a request at the engine, so that hangup can abort it later by that name (pure).

SGLang takes the id from a `rid` member of the JSON body; hangup adds one as the body's last
member and leaves every other byte as the client sent it. The id is fresh (32 hex digits from
uuid4), never the client's own: SGLang matches an abort's rid as a *prefix* of the rids it
runs, so aborting by an id a client chose could stop other requests, and fixed-width random
ids are never a prefix of one another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator
from typing import Final

from proxy.member_edit import appended, has_key_in_steps
from proxy.request_body import RequestBody
from proxy.stream_options import STEP_BYTES

# A larger body is named in steps (`SGLang.name_attempt_in_steps`): `json.loads` of a body
# with a `\u` escape, and the strips and join of `append_member`, took one step each (a 1.3
# MiB body of short messages with escapes: 44 ms); as `admission.RENAME_ONE_STEP_BYTES`.
NAME_ONE_STEP_BYTES: Final = 64 * 1024

_JSON_SPACE = b" \t\r\n"


def fresh_id() -> str:
    return uuid.uuid4().hex


def has_member(body: RequestBody, name: str) -> bool:
    """Whether the top-level JSON object in `body` has a member `name` (its key may be spelled
    with escapes, so any body that could hold it is parsed)."""
    if f'"{name}"'.encode() not in body and b"\\u" not in body:
        return False
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(parsed, dict) and name in parsed


def has_member_in_steps(
    body: RequestBody, name: str, *, step: int = STEP_BYTES
) -> Generator[None, None, bool]:
    """`has_member` for a large body: searched `step` bytes a step; a body that holds a key
    `name` at any depth (or an escape that could spell it) is parsed whole, as before."""
    if not (yield from has_key_in_steps(body, name, step=step)):
        return False
    return has_member(body, name)


def append_member_in_steps(
    body: RequestBody, name: str, value: str, *, step: int = STEP_BYTES
) -> Generator[None, None, RequestBody | None]:
    """`append_member` for a large body (the same bytes), found and copied `step` bytes a
    step."""
    return (yield from appended(body, _member(name, value), step=step))


def _member(name: str, value: str) -> bytes:
    return json.dumps({name: value}, separators=(",", ":")).encode()[1:-1]


def append_member(body: RequestBody, name: str, value: str) -> bytes | None:
    """`body` with `"name":"value"` added as the last member of its top-level object, every
    other byte unchanged; None when `body` is not a JSON object in an ASCII-compatible
    encoding. The caller makes sure `name` is not a member yet (JSON parsers disagree on
    duplicate keys)."""
    stripped = body.rstrip(_JSON_SPACE)
    start = len(body) - len(body.lstrip(_JSON_SPACE))
    if not stripped.endswith(b"}") or body[start : start + 1] != b"{":
        return None
    end = len(stripped) - 1  # the closing brace
    inside = stripped[start + 1 : end].strip(_JSON_SPACE)
    member = _member(name, value)
    if inside:
        member = b"," + member
    return b"".join((stripped[:end], member, body[end:]))
