"""Continuing a cut chat stream on a target that accepts an assistant prefix (pure).

When a stream was cut or stalled after content reached the client, the relay may ask a target
to go on from what was already sent: the original messages plus an assistant message holding
the delivered text, marked the way that target's API expects:

- `prefix` (DeepSeek, Mistral): `{"role": "assistant", "content": ..., "prefix": true}`;
- `continue_final_message` (vLLM): the body gets `continue_final_message: true` and
  `add_generation_prompt: false`.

A target configured `none` (the default, and OpenAI's case) is never asked. Requests with
several choices (`n` > 1) or tools are not continued: only one text answer can be spliced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Literal

from proxy.request_body import RequestBody
from proxy.request_fields import RequestFields

PrefixStyle = Literal["none", "prefix", "continue_final_message"]


def continuation_body(
    body: RequestBody, delivered: str, style: PrefixStyle, delivered_tokens: int
) -> bytes | None:
    """The request that continues `delivered`, or None when it cannot be continued."""
    if style == "none" or not delivered:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    messages = obj.get("messages")
    n = obj.get("n")
    if not isinstance(messages, list) or (n is not None and n != 1) or obj.get("tools"):
        return None
    prefix: dict[str, object] = {"role": "assistant", "content": delivered}
    if style == "prefix":
        prefix["prefix"] = True
    else:
        obj["continue_final_message"] = True
        obj["add_generation_prompt"] = False
    obj["messages"] = [*messages, prefix]
    for key in ("max_completion_tokens", "max_tokens"):
        limit = obj.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            # What was delivered counts against the client's limit.
            obj[key] = max(1, limit - delivered_tokens)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def continuable(fields: RequestFields) -> bool | None:
    """What `continuation_body` would say of the body (with text delivered and a style)
    without parsing it again, from what admission read: an object whose `messages` is an
    array, with no `n` other than 1 and no `tools` (`json.loads` and msgspec both keep a
    repeated member's last value). None when that cannot be told (a `tools` member too large
    to decode that is not a string: `[ ]` with a megabyte of blanks is empty)."""
    members = fields.members
    if members is None:
        return False
    n = members.get("n")
    if n is not None and n != 1:
        return False
    large = fields.undecoded_first or {}
    if "tools" in large:
        if large["tools"] != b'"':
            return None
        return False  # a string of a megabyte is not empty
    if members.get("tools"):
        return False
    if "messages" in large:
        return large["messages"] == b"["
    return isinstance(members.get("messages"), list)


def continuation_target(
    styles: Sequence[PrefixStyle],
    upstreams: Sequence[str],
    index: int,
    available: Callable[[str], bool],
) -> int | None:
    """The same target if it accepts a prefix, else the next available one that does."""
    candidates: list[int] = [index, *range(index + 1, len(styles))]
    for j in candidates:
        if styles[j] != "none" and available(upstreams[j]):
            return j
    return None
