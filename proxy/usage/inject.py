"""Asking the upstream for a usage chunk on a stream (`stream_options.include_usage`)."""

from __future__ import annotations

import json
import re

from proxy.request_body import RequestBody
from proxy.usage.facts import RequestFacts

_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{([ \t\r\n]*\}?)")


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
    if not facts.stream or facts.endpoint not in ("chat.completions", "completions"):
        return None
    add_continuous = continuous and not facts.continuous_usage_requested
    if facts.include_usage_requested and not add_continuous:
        return None
    if not facts.has_stream_options:
        # Prompts can be megabytes: splice the member in after `{` instead of re-encoding.
        m = _OBJECT_START.match(body)
        if m is not None:
            member = (
                b'"stream_options":{"include_usage":true,"continuous_usage_stats":true}'
                if continuous
                else b'"stream_options":{"include_usage":true}'
            )
            brace = m.start(1)
            sep = b"" if m.group(1).endswith(b"}") else b","
            return b"".join((body[:brace], member, sep, body[brace:]))
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
