"""A continuation's request (`continuation_body`) for a large body, a bounded step at a time
(a sans-I/O generator, run one step per loop iteration by `proxy.edge.body.in_steps`).

`json.loads` and `json.dumps` of a 60 MiB body took 75 ms to about a second in one step. Here
the body is first shortened, as its parse at admission was (`proxy/request_fields.py`): the
middles of its long plain runs (`proxy/body_scan.py`, fed a megabyte a step) or the checked
middle of its large array (`proxy/array_cut.py`, a piece a step) are replaced by markers. The
shortened body, small, is walked member by member with `json`'s own decoder (one character a
byte, as `array_cut` does), which gives what `json.loads` of the whole would: the last value
of each top-level member, and whether the body can be continued at all. The edits (the prefix
message before the `messages` array's closing bracket, `continue_final_message`,
`add_generation_prompt`, the reduced token limits) are made at the last occurrence of each
member, or appended before the closing brace, and the new body is copied 4 MiB a step.

The result parses to the members `continuation_body` builds, in the same order; its other
bytes are the client's (whitespace, escapes, spelling of numbers) where `json.dumps`
re-encoded them. A body whose shortened form is still large or does not walk (its bulk is
neither long strings nor one array, or a marker lands outside a string or an array) takes
`continuation_body`'s one step, as before.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

from proxy.array_cut import PIECE_BYTES, WINDOW, check_array
from proxy.body_scan import RUN_MIN, BodyScan
from proxy.request_body import RequestBody
from proxy.resilience.continuation import PrefixStyle, continuation_body
from proxy.stream_options import STEP_BYTES

# Bodies smaller than this keep `continuation_body`'s one step (~3 ms at most).
IN_STEPS_FROM: Final = 64 * 1024
_MARGIN: Final = 8  # run bytes kept on each side of a marker (as request_fields does)
_BOM: Final = "\xef\xbb\xbf"  # in one-character-a-byte text
_WS: Final = " \t\r\n"
_JSON: Final = json.JSONDecoder()
_LIMITS: Final = ("max_completion_tokens", "max_tokens")

# [from, to) of the body left out, and the marker standing for it in the shortened body.
_Cut = tuple[int, int, bytes]
# [from, to) of the body replaced by the bytes.
Edit = tuple[int, int, bytes]
Steps = Generator[None, None, RequestBody | None]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much is done in one step (tests make them small, to reach every path)."""

    in_steps_from: int = IN_STEPS_FROM
    scan: int = 1024 * 1024  # scanned for runs a step (translate and a UTF-8 check)
    # A run this long is left out of the walk: longer than every name looked up (a key
    # holding a run is read with a marker in it, so it is none of them).
    run_min: int = RUN_MIN
    piece: int = PIECE_BYTES  # of the large array, checked a step
    window: int = WINDOW
    walk: int = 256 * 1024  # a shortened body larger than this is not walked (~3 ms)
    copy: int = STEP_BYTES  # of the new body, copied a step


def continuation_in_steps(
    body: RequestBody,
    delivered: str,
    style: PrefixStyle,
    delivered_tokens: int,
    *,
    sizes: Sizes = Sizes(),
) -> Steps:
    """`continuation_body`, a bounded step at a time (the same parse; None when it is None)."""
    if style == "none" or not delivered:
        return None
    if len(body) < sizes.in_steps_from:
        return continuation_body(body, delivered, style, delivered_tokens)
    edits = yield from _edits_in_steps(body, delivered, style, delivered_tokens, sizes)
    if edits is None:  # could not be told in steps: one step, as before
        return continuation_body(body, delivered, style, delivered_tokens)
    if not edits:
        return None  # not continuable (what `continuation_body` says too)
    yield
    return (yield from spliced_all(body, edits, step=sizes.copy))


def _edits_in_steps(
    body: RequestBody, delivered: str, style: PrefixStyle, delivered_tokens: int, sizes: Sizes
) -> Generator[None, None, list[Edit] | None]:
    """The edits to `body` (empty: it cannot be continued), or None when it cannot be
    shortened and walked."""
    scan = BodyScan(sizes.run_min)
    for at in range(0, len(body), sizes.scan):
        scan.feed(bytes(body[at : at + sizes.scan]))
        yield
    scan.finish()
    if not scan.utf8_ok:  # (admission refused such a body; the walk reads bytes as latin-1)
        return None
    if scan.runs:
        cuts = [
            (start + _MARGIN, end - _MARGIN, b"\xff%08x" % i)
            for i, (start, end) in enumerate(scan.runs)
        ]
        edits = _walked_edits(body, cuts, delivered, style, delivered_tokens, sizes.walk)
        if edits is not None:
            return edits
        yield
    cut = yield from check_array(body, piece_bytes=sizes.piece, window=sizes.window)
    yield
    # Without a cut, a body no larger than what is walked in a step is walked whole.
    marked = [] if cut is None else [(cut.start, cut.end, b'"\xff%08x"' % 0)]
    return _walked_edits(body, marked, delivered, style, delivered_tokens, sizes.walk)


def _walked_edits(
    body: RequestBody,
    cuts: list[_Cut],
    delivered: str,
    style: PrefixStyle,
    delivered_tokens: int,
    walk_most: int,
) -> list[Edit] | None:
    """The edits, found on `body` shortened by `cuts`; None when that is too large to walk
    or does not walk as an object."""
    if len(body) - sum(end - start - len(mark) for start, end, mark in cuts) > walk_most:
        return None
    pieces: list[RequestBody] = []
    done = 0
    for start, end, mark in cuts:
        pieces += [body[done:start], mark]
        done = end
    pieces.append(body[done:])
    shortened = b"".join(pieces)
    members = _walk(shortened.decode("latin-1"))  # one character a byte: the same offsets
    if members is None:
        return None
    edits = continuation_edits(members, delivered, style, delivered_tokens)
    return [(_unshortened(a, cuts), _unshortened(b, cuts), new) for a, b, new in edits]


def _unshortened(at: int, cuts: list[_Cut]) -> int:
    """Where offset `at` of the shortened body is in the body (`at` is never in a marker)."""
    shift = 0
    for start, end, mark in cuts:
        if at < start - shift + len(mark):
            break
        shift += end - start - len(mark)
    return at + shift


# A top-level member: its (decoded) name, where its value starts and ends, and the value.
Member = tuple[str, int, int, Any]


def _walk(text: str) -> list[Member] | None:
    """The top-level members of the JSON object `text`, in order (duplicates kept); None when
    `text` is not one object (a marker outside a string or an array, for one)."""
    pos = _skip(text, len(_BOM) if text.startswith(_BOM) else 0)
    if text[pos : pos + 1] != "{":
        return None
    members: list[Member] = []
    pos = _skip(text, pos + 1)
    if text[pos : pos + 1] == "}":
        return members if _skip(text, pos + 1) == len(text) else None
    try:
        while True:
            if text[pos : pos + 1] != '"':
                return None
            name, pos = _JSON.raw_decode(text, pos)  # a string: it starts with a quote
            pos = _skip(text, pos)
            if text[pos : pos + 1] != ":":
                return None
            start = _skip(text, pos + 1)
            value, end = _JSON.raw_decode(text, start)
            members.append((name, start, end, value))
            pos = _skip(text, end)
            if text[pos : pos + 1] == "}":
                return members if _skip(text, pos + 1) == len(text) else None
            if text[pos : pos + 1] != ",":
                return None
            pos = _skip(text, pos + 1)
    except (ValueError, RecursionError):
        return None


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def continuation_edits(
    members: list[Member], delivered: str, style: PrefixStyle, delivered_tokens: int
) -> list[Edit]:
    """What `continuation_body` changes, as edits of the walked object's text (empty: it
    cannot be continued). `json.loads` keeps the last value of a repeated member, where it
    was first seen: each edit is made at the last occurrence, and a new member goes last."""
    last: dict[str, Member] = {}
    for member in members:
        last[member[0]] = member
    value = {name: member[3] for name, member in last.items()}
    messages, n = value.get("messages"), value.get("n")
    if not isinstance(messages, list) or (n is not None and n != 1) or value.get("tools"):
        return []
    prefix: dict[str, object] = {"role": "assistant", "content": delivered}
    if style == "prefix":
        prefix["prefix"] = True
    edits: list[Edit] = []
    _, _, end, _ = last["messages"]
    encoded = json.dumps(prefix, ensure_ascii=False, separators=(",", ":")).encode()
    edits.append((end - 1, end - 1, b"," + encoded if messages else encoded))
    added = b""
    if style == "continue_final_message":
        for name, new in (("continue_final_message", b"true"), ("add_generation_prompt", b"false")):
            if name in last:
                _, start, end, _ = last[name]
                edits.append((start, end, new))
            else:
                added += b',"%s":%s' % (name.encode(), new)
    for key in _LIMITS:
        limit = value.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            _, start, end, _ = last[key]
            edits.append((start, end, b"%d" % max(1, limit - delivered_tokens)))
    if added:
        closing = members[-1][2]  # the closing brace is the first non-blank after it
        edits.append((closing, closing, added))
    edits.sort(key=lambda edit: edit[0])
    return edits


def spliced_all(
    body: RequestBody, edits: list[Edit], *, step: int = STEP_BYTES
) -> Generator[None, None, RequestBody]:
    """A new body with each edit made (sorted, not overlapping), copied `step` bytes a step
    into a growing bytearray (the original is not changed: a hedge may resend it)."""
    if len(body) <= step:
        pieces: list[RequestBody | bytes] = []
        done = 0
        for start, end, new in edits:
            pieces += [body[done:start], new]
            done = end
        pieces.append(body[done:])
        return b"".join(pieces)
    out = bytearray()
    done = 0
    with memoryview(body) as view:
        for start, end, new in [*edits, (len(body), len(body), b"")]:
            for at in range(done, start, step):
                out += view[at : min(at + step, start)]
                yield
            out += new
            done = end
    return out
