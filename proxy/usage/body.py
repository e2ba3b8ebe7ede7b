"""Usage of non-streamed answers."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Final

from proxy.outcome import Usage
from proxy.usage.facts import Endpoint, RequestFacts
from proxy.usage.prompt import CHARS_PER_TOKEN, Tally
from proxy.usage.reported import (
    UNREAD,
    Reported,
    detail_counts,
    parse_usage,
    read_last_member,
    read_usage_at,
)
from proxy.usage.stream import delta_chars

_MAX_DECODED_BODY: Final = 64 * 1024 * 1024


def _decode(body: bytes | bytearray, content_encoding: str | None) -> bytes | bytearray | None:
    if content_encoding is None:  # most answers
        return body
    encoding = content_encoding.strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # RFC 9110 deflate is zlib-wrapped, but some servers send raw deflate.
        wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
    else:
        return None  # br, zstd: not decodable with the standard library
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, _MAX_DECODED_BODY)
    except zlib.error:
        return None
    return None if decoder.unconsumed_tail else out


def _output_chars(endpoint: Endpoint, obj: Mapping[str, Any]) -> int:
    t = Tally()
    if endpoint == "responses":
        output = obj.get("output")
        for item in output if isinstance(output, list) else ():
            if isinstance(item, Mapping):
                t.content(item.get("content"))
                t.content(item.get("summary"))
                t.strings(item.get("arguments"))
        return t.chars
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, Mapping):
            continue
        t.strings(choice.get("text"))
        message = choice.get("message")
        if isinstance(message, Mapping):
            sizes = delta_chars(message)
            if sizes is not None:
                t.chars += sizes[0] + sizes[1]
    return t.chars


# Where `usage` is looked for: the last bytes of the answer. OpenAI, vLLM, llama.cpp and the
# Responses API all write it after the (possibly huge) output, within a few hundred bytes of the
# end (Responses: before `user` and `metadata`); 64 KiB leaves room for long metadata.
TAIL_BYTES: Final = 64 * 1024
# Answers up to this size may be parsed whole when the tail holds no usage (about 2 ms); a larger
# one is never parsed on the event loop (a 6 MB answer took 155 ms, during which nothing moved).
FULL_PARSE_MAX: Final = 256 * 1024
_USAGE_KEY: Final = b'"usage"'
_SPACE: Final = b" \t\r\n"
_DECODER: Final = json.JSONDecoder()


def tail_usage(body: bytes | bytearray, tail: int = TAIL_BYTES) -> Reported | None:
    """The answer's `usage`, found in its last `tail` bytes without parsing the rest.

    From the end backwards, each `"usage"` that is a member name (preceded by `{` or `,`: inside
    a JSON string a quote is always escaped, so that cannot be text) and followed by `:` and an
    object is decoded on its own. The last one wins: the answer's own usage comes after its
    output. Bounded: at most `tail` bytes are searched, and only the usage object is decoded
    (in place, `read_usage_at`; with `json` when that one cannot read it).
    """
    start = max(0, len(body) - tail)
    size = end = len(body)
    # The usual answer ends `,"usage":{...}...` (compact JSON): its last candidate is tried in
    # one look, before the loop below walks blanks byte by byte (and tries it again when this
    # one finds nothing there). tests/test_usage_typed.py checks the two ways agree.
    i = body.rfind(_USAGE_KEY, start)
    if i > start and body[i - 1] in b",{" and body[i + 7 : i + 9] == b":{":
        reported = read_usage_at(body, i + 8)
        if reported is not None and reported is not UNREAD:
            return reported
    while True:
        i = body.rfind(_USAGE_KEY, start, end)
        if i < 0:
            return None
        end = i
        before = i - 1
        while before >= start and body[before] in _SPACE:
            before -= 1
        if before < start or body[before] not in b",{":
            continue
        j = i + len(_USAGE_KEY)
        while j < size and body[j] in _SPACE:
            j += 1
        if j >= size or body[j] != 0x3A:  # ":"
            continue
        j += 1
        while j < size and body[j] in _SPACE:
            j += 1
        if j >= size or body[j] != 0x7B:  # "{"
            continue
        reported = read_usage_at(body, j)
        if reported is UNREAD:
            try:
                value, _ = _DECODER.raw_decode(body[j:].decode("utf-8", "replace"))
            except (ValueError, RecursionError):  # RecursionError: nested too deep to read
                continue
            reported = parse_usage(value)
        if reported is not None:
            return reported


def decode_body(body: bytes, content_encoding: str | None) -> bytes | bytearray | None:
    """The body with gzip or deflate undone (bounded); None if it cannot be decoded here."""
    return _decode(body, content_encoding)


def is_identity(content_encoding: str | None) -> bool:
    return (content_encoding or "identity").strip().lower() in ("identity", "")


def body_usage(body: bytes | bytearray, facts: RequestFacts, content_encoding: str | None) -> Usage:
    """Usage of a non-streamed JSON answer; estimated (and flagged) where the answer has none.

    The usage object is found in the answer's tail (`tail_usage`); the whole answer is parsed
    only when it is small and has no usage. Without a reported count, completion tokens are
    ceil(output characters / 4) (small answers) or ceil(body bytes / 4) (large ones, an
    overestimate by the JSON around the text): there are no chunks to count in a whole answer.
    Embeddings generate nothing, so 0 completion is exact. Compressed bodies must be decoded
    first (`decode_body`, off the event loop for large ones).
    """
    if content_encoding is None:  # most answers: the usual usage read in one look
        usage = _usual_usage(body)
        if usage is not None:
            return usage
    no_completion = facts.endpoint == "embeddings"
    decoded = _decode(body, content_encoding)
    if decoded is None:
        return _estimate(facts, completion=None)
    r = tail_usage(decoded)
    obj: object = None
    if (r is None or r.completion is None) and len(decoded) <= FULL_PARSE_MAX:
        try:
            obj = json.loads(decoded)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to read
            obj = None
        if isinstance(obj, Mapping) and r is None:
            r = parse_usage(obj.get("usage"))
    r = r or Reported(None, None, None, None)
    if r.completion is not None:
        completion, completion_estimated = r.completion, False
    elif no_completion:
        completion, completion_estimated = 0, False
    elif isinstance(obj, Mapping):
        completion = -(-_output_chars(facts.endpoint, obj) // CHARS_PER_TOKEN)
        completion_estimated = True
    elif len(decoded) > FULL_PARSE_MAX:
        completion = -(-len(decoded) // CHARS_PER_TOKEN)
        completion_estimated = True
    else:
        return _estimate(facts, completion=None)
    return Usage(  # positional (the fields in order): ~0.5 us less than by keyword
        facts.prompt_tokens_estimate if r.prompt is None else r.prompt,  # prompt_tokens
        completion,  # completion_tokens
        r.cached or 0,  # cached_tokens
        r.reasoning or 0,  # reasoning_tokens
        r.prompt is None,  # prompt_estimated
        completion_estimated,
    )


def _usual_usage(body: bytes | bytearray) -> Usage | None:
    """`body_usage` of an uncompressed answer whose last usage object, a member of the object
    that ends the body, reports both counts (the usual answer), or None (then the general way
    decides). The candidate `tail_usage` tries first, decoded with the rest of the body
    (`read_last_member`: no look for the object's end, no `Reported`), and the `Usage` built
    from it as `body_usage` builds it from `tail_usage`'s reading. tests/test_usage_typed.py
    checks this against the general way."""
    start = len(body) - TAIL_BYTES
    if start < 0:
        start = 0
    i = body.rfind(_USAGE_KEY, start)
    if i <= start or body[i - 1] not in b",{" or body[i + 7 : i + 9] != b":{":
        return None
    usage = read_last_member(body, i)
    if usage is None:
        return None
    prompt = usage.prompt_tokens
    completion = usage.completion_tokens
    if prompt is None or completion is None:  # Responses' names, or a count missing
        return None
    cached, reasoning = detail_counts(usage)
    return Usage(prompt, completion, cached or 0, reasoning or 0, False, False)


def _estimate(facts: RequestFacts, *, completion: int | None) -> Usage:
    no_completion = facts.endpoint == "embeddings"
    return Usage(
        prompt_tokens=facts.prompt_tokens_estimate,
        completion_tokens=completion or 0,
        prompt_estimated=True,
        completion_estimated=not no_completion,
    )
