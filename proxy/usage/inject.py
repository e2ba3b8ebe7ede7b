"""Asking the upstream for a usage chunk on a stream (`stream_options.include_usage`)."""

from __future__ import annotations

import json
import re

from proxy.request_body import RequestBody
from proxy.usage.facts import RequestFacts

_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{([ \t\r\n]*\}?)")


def needs_usage_request(facts: RequestFacts, *, continuous: bool) -> bool:
    """Whether the body must be changed to ask for usage (only chat and legacy completions
    take `stream_options`)."""
    if not facts.stream or facts.endpoint not in ("chat.completions", "completions"):
        return False
    add_continuous = continuous and not facts.continuous_usage_requested
    return not (facts.include_usage_requested and not add_continuous)


def inject_stream_usage(
    body: RequestBody,
    facts: RequestFacts,
    *,
    continuous: bool,
) -> bytes | None:
    """A request body that asks the upstream for usage on a stream, or None if none is needed.

    Without a usage chunk a streamed answer has no token counts at all; with it (and with vLLM's
    `continuous_usage_stats`, counts on every chunk) we can account exactly even when we hang up.
    Only chat and legacy completions take `stream_options`.
    """
    if not needs_usage_request(facts, continuous=continuous):
        return None
    insert = usage_member_insert(body, facts, continuous=continuous)
    if insert is not None:
        at, member = insert
        return b"".join((body[:at], member, body[at:]))
    # A `stream_options` member exists (a duplicate key would be ambiguous), or the body does not
    # start like an object: decode, merge, re-encode.
    try:
        obj = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(obj, dict):
        return None
    options = obj.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    if continuous:
        merged["continuous_usage_stats"] = True
    obj["stream_options"] = merged
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def usage_member_insert(
    body: RequestBody, facts: RequestFacts, *, continuous: bool
) -> tuple[int, bytes] | None:
    """Where and what `inject_stream_usage` splices into a body without `stream_options`
    (None: it would not splice), for a caller that builds a large body in steps
    (`proxy/stream_options.py`); `needs_usage_request` is the caller's to check first."""
    if facts.has_stream_options:
        return None
    # Prompts can be megabytes: splice the member in after `{` instead of re-encoding.
    m = _OBJECT_START.match(body)
    if m is None:
        return None
    member = (
        b'"stream_options":{"include_usage":true,"continuous_usage_stats":true}'
        if continuous
        else b'"stream_options":{"include_usage":true}'
    )
    sep = b"" if m.group(1).endswith(b"}") else b","
    return m.start(1), member + sep
