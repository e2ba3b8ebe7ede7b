"""Usage of non-streamed answers."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Final

from proxy.outcome import Usage
from proxy.usage.facts import Endpoint, RequestFacts
from proxy.usage.prompt import CHARS_PER_TOKEN, Tally
from proxy.usage.reported import Reported, parse_usage
from proxy.usage.stream import delta_chars

_MAX_DECODED_BODY: Final = 64 * 1024 * 1024


def _decode(body: bytes, content_encoding: str | None) -> bytes | None:
    encoding = (content_encoding or "identity").strip().lower()
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


def body_usage(body: bytes, facts: RequestFacts, content_encoding: str | None) -> Usage:
    """Usage of a non-streamed JSON answer; estimated (and flagged) where the answer has none.

    Without a reported count, completion tokens are ceil(output characters / 4): there are no
    chunks to count in a whole answer. Embeddings generate nothing, so 0 completion is exact.
    """
    no_completion = facts.endpoint == "embeddings"
    decoded = _decode(body, content_encoding)
    obj: object = None
    if decoded is not None:
        try:
            obj = json.loads(decoded)
        except ValueError:
            obj = None
    if not isinstance(obj, Mapping):
        return Usage(
            prompt_tokens=facts.prompt_tokens_estimate,
            prompt_estimated=True,
            completion_estimated=not no_completion,
        )
    r = parse_usage(obj.get("usage")) or Reported(None, None, None, None)
    if r.completion is not None:
        completion, completion_estimated = r.completion, False
    elif no_completion:
        completion, completion_estimated = 0, False
    else:
        completion = -(-_output_chars(facts.endpoint, obj) // CHARS_PER_TOKEN)
        completion_estimated = True
    return Usage(
        prompt_tokens=facts.prompt_tokens_estimate if r.prompt is None else r.prompt,
        completion_tokens=completion,
        cached_tokens=r.cached or 0,
        reasoning_tokens=r.reasoning or 0,
        prompt_estimated=r.prompt is None,
        completion_estimated=completion_estimated,
    )
