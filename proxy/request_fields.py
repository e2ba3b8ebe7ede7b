"""The few top-level members of a JSON request body that hangup reads, extracted without
materialising the rest.

`json.loads` of a 60 MiB body builds every string, number, list and dict of it: about 1 GiB of
Python objects for a body of many small values. hangup needs a handful of scalars (`model`,
`stream`, `stream_options`, `max_tokens`, `n`, `background`) and, for the prompt estimate, the
prompt members. msgspec decodes the body into a Struct with only those members as `Raw` spans
(unknown members are validated and skipped in C, never built), then each span is decoded on its
own. A prompt member larger than `PROMPT_DECODE_LIMIT` is not decoded: its size in bytes stands
in for its characters (the estimate is only used when the upstream reports no count).

A large body (read with a `BodyScan`) is parsed with its long runs left out
(`_read_shortened`): text inside strings, and stretches of spaces between values.

The whole body is still checked to be JSON: malformed syntax, invalid UTF-8 and lone
surrogates are refused (400), and nesting deeper than the decoder's recursion limit is refused
as such rather than crashing the request.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Generator
from itertools import compress, repeat
from operator import is_not
from typing import Any

import msgspec

from proxy.array_cut import PIECE_BYTES, WINDOW, check_array
from proxy.body_cuts import (
    ERROR_AT,
    MARGIN,
    SPACES_MIN,
    WS_MARK,
    Cut,
    marker_at,
    marks,
    numbered,
    space_stretches,
    with_markers,
)
from proxy.body_scan import BodyScan
from proxy.errors import BadRequest
from proxy.request_body import RequestBody
from proxy.usage import RequestFacts

PROMPT_DECODE_LIMIT = 1024 * 1024
# No model generates more in one answer; a larger limit (`max_tokens: 10**18`) must not become
# a "tokens saved" upper bound of 10**18 in accounting. The body is forwarded unchanged.
MAX_TOKENS_BOUND = 1_000_000
_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_UTF8_STEP = 1024 * 1024
_BOM = b"\xef\xbb\xbf"

_SCALARS = (
    "model",
    "stream",
    "stream_options",
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "n",
    "background",
)
_PROMPT = ("messages", "tools", "functions", "prompt", "suffix", "input", "instructions")


class _Members(msgspec.Struct):
    """The members read, as undecoded spans (empty when absent)."""

    model: msgspec.Raw = msgspec.Raw()
    stream: msgspec.Raw = msgspec.Raw()
    stream_options: msgspec.Raw = msgspec.Raw()
    max_completion_tokens: msgspec.Raw = msgspec.Raw()
    max_tokens: msgspec.Raw = msgspec.Raw()
    max_output_tokens: msgspec.Raw = msgspec.Raw()
    n: msgspec.Raw = msgspec.Raw()
    background: msgspec.Raw = msgspec.Raw()
    messages: msgspec.Raw = msgspec.Raw()
    tools: msgspec.Raw = msgspec.Raw()
    functions: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    suffix: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    instructions: msgspec.Raw = msgspec.Raw()


_OBJECT_DECODER = msgspec.json.Decoder(_Members)
_SKIP_DECODER = msgspec.json.Decoder(msgspec.Raw)  # validates, builds nothing
_ABSENT: Any = msgspec.UNSET


class _Values(msgspec.Struct):
    """The members read, decoded in the same pass (a small body: `_read_small`)."""

    model: Any = _ABSENT
    stream: Any = _ABSENT
    stream_options: msgspec.Raw = msgspec.Raw()  # also kept as sent
    max_completion_tokens: Any = _ABSENT
    max_tokens: Any = _ABSENT
    max_output_tokens: Any = _ABSENT
    n: Any = _ABSENT
    background: Any = _ABSENT
    messages: Any = _ABSENT
    tools: Any = _ABSENT
    functions: Any = _ABSENT
    prompt: Any = _ABSENT
    suffix: Any = _ABSENT
    input: Any = _ABSENT
    instructions: Any = _ABSENT


_VALUES_DECODER = msgspec.json.Decoder(_Values)


class RequestFields(msgspec.Struct):
    """What the body says, as far as hangup reads it."""

    # The members read, decoded (prompt members only up to PROMPT_DECODE_LIMIT); None when the
    # body is JSON but not an object.
    members: dict[str, Any] | None
    # Bytes of prompt members too large to decode (their estimate is bytes / 4).
    undecoded_prompt_bytes: int = 0
    # The `stream_options` value exactly as sent, for a byte-faithful replacement.
    raw_stream_options: bytes = b""
    # The first byte of each prompt member too large to decode (what kind of value it is).
    undecoded_first: dict[str, bytes] | None = None


def _check_utf8(body: RequestBody) -> None:
    """Strict UTF-8 over the whole body, a megabyte at a time (the decoded text is dropped):
    msgspec does not look inside the strings of members it skips."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    try:
        for start in range(0, len(view), _UTF8_STEP):
            decoder.decode(view[start : start + _UTF8_STEP])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not valid UTF-8") from exc


def read_fields(body: RequestBody, scan: BodyScan | None = None) -> RequestFields:
    """The members hangup reads from a JSON body; BadRequest when it is not JSON.

    With the `scan` of a large body (taken as it arrived), its UTF-8 is already checked and its
    long runs are left out of the parse (`_read_shortened`); the answer is the same."""
    if scan is None and len(body) <= PROMPT_DECODE_LIMIT:
        return _read_small(body)
    if scan is None:
        _check_utf8(body)
    elif not scan.utf8_ok:
        raise BadRequest("request body is not valid UTF-8")
    if scan is not None and scan.runs:
        steps = _read_shortened(body, scan.runs)
        while True:  # all its steps in this one (`edge.body.at_once`, without the import)
            try:
                next(steps)
            except StopIteration as done:
                fields: RequestFields | None = done.value
                break
        if fields is not None:
            return fields
    return _read(body)


def _read_small(body: RequestBody) -> RequestFields:
    """`_check_utf8` and `_read` of a body no prompt member of which can pass
    `PROMPT_DECODE_LIMIT`, in two C calls: the UTF-8 checked whole, the members decoded in
    the parse that checks the JSON (`_read` decodes each member's span again, ~2 us a request
    more). Whatever this parse refuses goes through `_read`, for the same answer or error."""
    try:
        str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not valid UTF-8") from exc
    view = memoryview(body)
    if body.startswith(_BOM):
        view = view[len(_BOM) :]
    try:
        values = _VALUES_DECODER.decode(view)
    except (msgspec.DecodeError, RecursionError):  # also not an object (a ValidationError)
        return _read(body)
    # The members in one C call, and the absent ones dropped in C too (`compress` keeps the
    # items whose value `is_not` _ABSENT): not a Python step per name.
    read = msgspec.structs.asdict(values)
    members = dict(compress(read.items(), map(is_not, read.values(), repeat(_ABSENT))))
    options = values.stream_options
    if len(options):
        members["stream_options"] = msgspec.json.decode(options)  # (keeps its place)
    else:
        del members["stream_options"]
    for name in _LIMITS:
        value = members.get(name)
        if value is not None:
            members[name] = _bounded(name, value)
    return RequestFields(
        members=members, raw_stream_options=bytes(options) if len(options) else b""
    )


def _read(body: RequestBody) -> RequestFields:
    view = memoryview(body)
    if body.startswith(_BOM):
        view = view[len(_BOM) :]
    try:
        try:
            raw = _OBJECT_DECODER.decode(view)
        except msgspec.ValidationError:
            # Valid JSON so far, but not an object at the top (an array, a string...).
            _SKIP_DECODER.decode(view)
            return RequestFields(members=None)
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    return _members(raw, _Span)


def _read_shortened(
    body: RequestBody, runs: list[tuple[int, int]], spaces_min: int = SPACES_MIN
) -> Generator[None, None, RequestFields | None]:
    """`_read` of the body with the middle of each long run replaced by a marker; None when that
    does not parse as an object (then the caller parses the original: same answer, one step).

    Why the answer is the same: a run has no quote, backslash or control byte, so inside a
    string its middle is plain text whose removal changes nothing msgspec checks (escapes and
    surrogate pairs are never cut: the kept margins hold no backslash; UTF-8 was checked whole,
    as the body arrived); outside strings the marker's 0xFF byte is invalid JSON, so the
    shortened body fails and the original is parsed. The members read are taken from the
    original's bytes (`_ShortenedSpan`).

    One failure is taken further: the parse stopping at a marker's own first byte. Everything
    before that byte parsed as in the original (each marker passed stood inside a string, or
    is whitespace, below), so the middle it stands for starts outside every string, and as a
    run holds no quote, no string starts in it: it is JSON between values (a body padded with
    spaces). Its middle is then kept but for its stretches of `spaces_min` spaces or more
    (found with memchr and memcmp, a few MiB a step), each replaced by a whitespace marker
    (`WS_MARK`), and the shortened body is parsed again, once a step."""
    kinds = [(start + MARGIN, end - MARGIN, False) for start, end in runs]
    while True:
        cuts = numbered(kinds)
        spaced = any(ws for _, _, ws in kinds)
        shortened, at = with_markers(body, cuts)
        read = _parse_cut(body, shortened, cuts, spaced)
        if isinstance(read, RequestFields):
            return read
        index = marker_at(at, read)
        if index is None or kinds[index][2]:  # (whitespace never fails: a bound on the loop)
            return None
        if not spaced and WS_MARK in shortened:
            return None  # a carriage return of the body's own: a marker could not be found
        cut_from, cut_to, _ = kinds[index]
        stretches = yield from space_stretches(body, cut_from, cut_to, spaces_min)
        if not stretches:
            return None
        kinds[index : index + 1] = [(a, b, True) for a, b in stretches]
        yield


def read_fields_in_steps(
    body: RequestBody,
    scan: BodyScan | None,
    *,
    piece_bytes: int = PIECE_BYTES,
    window: int = WINDOW,
) -> Generator[None, None, RequestFields]:
    """`read_fields`, a bounded step at a time (the caller runs one step per loop iteration):
    when neither long strings can be left out nor the body is small, the middle of its large
    array is checked piece by piece (`proxy/array_cut.py`) and left out of the parse. The
    answer is the same as `read_fields`'s, errors included: whatever fails is parsed whole."""
    if scan is None:
        return read_fields(body)
    if not scan.utf8_ok:
        raise BadRequest("request body is not valid UTF-8")
    if scan.runs:
        fields = yield from _read_shortened(body, scan.runs)
        if fields is not None:
            return fields
        yield
    cut = yield from check_array(body, piece_bytes=piece_bytes, window=window)
    if cut is not None:
        yield
        cuts = [(cut.start, cut.end, b'"\xff%08x"' % 0)]
        read = _parse_cut(body, with_markers(body, cuts)[0], cuts, False)
        if isinstance(read, RequestFields):
            return read
    yield
    return _read(body)


def _parse_cut(
    body: RequestBody, shortened: bytes, cuts: list[Cut], spaced: bool
) -> RequestFields | str:
    """The members of the shortened body, read as the original's; or why it did not parse."""
    view = memoryview(shortened)
    if shortened.startswith(_BOM):
        view = view[len(_BOM) :]
    try:
        raw = _OBJECT_DECODER.decode(view)
    except msgspec.DecodeError as exc:  # (a ValidationError too: not an object)
        message = str(exc)
        if shortened.startswith(_BOM) and (found := ERROR_AT.search(message)):
            offset = int(found.group(1)) + len(_BOM)  # as an offset in `shortened`
            message = message[: found.start()] + f"(byte {offset})"
        return message
    except RecursionError:
        return "nested too deeply"
    return _members(raw, lambda span: _ShortenedSpan(span, body, cuts, spaced))


class _Span:
    """A member's bytes as msgspec found them."""

    def __init__(self, span: msgspec.Raw) -> None:
        self.span = span

    def size(self) -> int:
        return len(self.span)

    def data(self) -> bytes | msgspec.Raw:
        return self.span


class _ShortenedSpan(_Span):
    """A member's span in the shortened body, read as the original's bytes."""

    def __init__(self, span: msgspec.Raw, body: RequestBody, cuts: list[Cut], spaced: bool) -> None:
        super().__init__(span)
        self.body = body
        self.cuts = cuts
        self.marks = marks(bytes(span), cuts, spaced)

    def size(self) -> int:
        size = len(self.span)
        for _, _, i in self.marks:
            cut_from, cut_to, marker = self.cuts[i]
            size += cut_to - cut_from - len(marker)
        return size

    def data(self) -> bytes | msgspec.Raw:
        if not self.marks:
            return self.span
        pieces: list[RequestBody] = []
        done, span = 0, bytes(self.span)
        for start, end, i in self.marks:
            cut_from, cut_to, _ = self.cuts[i]
            pieces += [span[done:start], self.body[cut_from:cut_to]]
            done = end
        pieces.append(span[done:])
        return b"".join(pieces)


def _bounded(name: str, value: Any) -> Any:
    """A member's value as read: a token limit past `MAX_TOKENS_BOUND` is the bound."""
    if name in _LIMITS and type(value) is int and value > MAX_TOKENS_BOUND:
        return MAX_TOKENS_BOUND
    return value


def _members(raw: _Members, span_of: Callable[[msgspec.Raw], _Span]) -> RequestFields:
    members: dict[str, Any] = {}
    undecoded = 0
    undecoded_first: dict[str, bytes] | None = None
    for name in _SCALARS + _PROMPT:
        found: msgspec.Raw = getattr(raw, name)
        if not len(found):
            continue
        span = span_of(found)
        if name in _PROMPT and span.size() > PROMPT_DECODE_LIMIT:
            undecoded += span.size()
            # A marker never starts a member's span: its first byte is the original's.
            undecoded_first = undecoded_first or {}
            undecoded_first[name] = bytes(memoryview(found)[:1])
            continue
        try:
            value = msgspec.json.decode(span.data())
        except (msgspec.DecodeError, RecursionError) as exc:  # e.g. a number out of range
            raise BadRequest(f"request body member {name!r} cannot be read: {exc}") from exc
        members[name] = _bounded(name, value)
    options = raw.stream_options
    return RequestFields(
        members=members,
        undecoded_prompt_bytes=undecoded,
        raw_stream_options=bytes(span_of(options).data()) if len(options) else b"",
        undecoded_first=undecoded_first,
    )


def with_size_estimate(facts: RequestFacts, fields: RequestFields) -> RequestFacts:
    """Add the prompt members too large to decode to the estimate, as bytes / 4 characters."""
    if not fields.undecoded_prompt_bytes:
        return facts
    from msgspec.structs import replace

    from proxy.usage.prompt import CHARS_PER_TOKEN

    extra = -(-fields.undecoded_prompt_bytes // CHARS_PER_TOKEN)
    return replace(facts, prompt_tokens_estimate=facts.prompt_tokens_estimate + extra)
