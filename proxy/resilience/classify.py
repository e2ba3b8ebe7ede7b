"""What an upstream's answer means for the failover policy (pure).

A status is a failure worth another target only when the upstream refused or broke the request
without doing it (429, 500/502/503/504); every other status is the answer, passed on as is.
A 400 is read for one thing only: `context_length_exceeded` (a bigger-context fallback may take
it). A content-policy refusal is the answer, whoever would be asked next.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping

from proxy.attempts import AttemptResult

FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})
# The only statuses the same target is asked again for (after a backoff): it said it did not
# take the request (overloaded, unavailable, rate limited). A 500 or 504 may follow work done.
SAME_TARGET_STATUSES = frozenset({429, 502, 503})
# An error body is read this far to classify it; a longer one is passed on unread.
ERROR_BODY_CAP = 64 * 1024
CONTEXT_LENGTH = "context_length_exceeded"
CONTENT_POLICY = "content_policy"


def status_result(status: int) -> AttemptResult | None:
    """The attempt's failure for a status, or None when the status is the answer."""
    if status == 429:
        return AttemptResult.RATE_LIMITED
    if status in FAILOVER_STATUSES:
        return AttemptResult.SERVER_ERROR
    return None


def error_code(body: bytes) -> str | None:
    """`context_length_exceeded`, `content_policy` or None, from an OpenAI-shaped error body.

    Providers spell these differently (OpenAI `code`, vLLM and llama.cpp `type` or only the
    message); the message test is a fallback for those, never a reason to retry a refusal."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        return None
    fields = " ".join(str(error.get(key) or "") for key in ("code", "type", "message")).lower()
    if "content_policy" in fields or "content_filter" in fields or "safety" in fields:
        return CONTENT_POLICY
    if (
        CONTEXT_LENGTH in fields
        or "context length" in fields
        or "context window" in fields
        or "maximum context" in fields
    ):
        return CONTEXT_LENGTH
    return None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait: `retry-after-ms` (OpenAI), then `Retry-After`
    as seconds or an HTTP date. None when absent or unreadable; never negative."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
