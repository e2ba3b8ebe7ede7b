"""The Responses API's stream events (`/v1/responses`): which ones the stream tracker reads,
and what each means to it (output counted, usage reported, the response's id, its end or
failure). The tracker, proxy/usage/stream.py's `StreamUsageTracker`, owns the counts; chat
completions chunks are read there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

import msgspec

from proxy.usage.event_kind import (
    EVENT_CONTENT,
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_OTHER,
    EventKind,
    error_message,
)
from proxy.usage.facts import as_int
from proxy.usage.reported import Reported, parse_usage

_RESPONSES_NEEDED: Final = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "response.cancelled",
    }
)
# The named events read by `response_head` (their `response` only for its id, usage, error).
RESPONSE_HEAD_EVENTS: Final = _RESPONSES_NEEDED
_RESPONSES_DONE: Final = frozenset(
    {"response.completed", "response.incomplete", "response.cancelled"}
)


def repeats_text(name: str | None) -> bool:
    """A Responses event that only repeats text already counted (`*.done`, `*.added`): not
    parsed."""
    return (
        name is not None
        and name.startswith("response.")
        and name not in _RESPONSES_NEEDED
        and not name.endswith(".delta")
    )


_ABSENT: Any = msgspec.UNSET


class _ResponseHead(msgspec.Struct):
    """The members of an event's `response` that `_responses_event` reads."""

    id: Any = _ABSENT
    usage: Any = _ABSENT
    error: Any = _ABSENT


class _HeadEvent(msgspec.Struct):
    type: Any = _ABSENT
    response: _ResponseHead | None = _ABSENT


_HEAD_DECODER: Final = msgspec.json.Decoder(_HeadEvent)


def lifecycle_kind(kind: Any) -> str | None:
    """`kind` when `_responses_event` reads an event of that type only for its `response`'s
    id, usage and error."""
    if isinstance(kind, str) and kind.startswith("response.") and not kind.endswith(".delta"):
        return kind
    return None


def response_head(data: str) -> dict[str, Any] | None:
    """A Responses lifecycle event (`response.created` ... `response.completed`) as
    `_responses_event` reads it, without the rest of its `response`: `response.completed`
    repeats the whole output, and with logprobs that is megabytes of small objects, ~43 ms a
    MiB to build and 2.5 to validate and skip. None, and the caller parses the whole event,
    unless the event is an object whose `type` is a lifecycle kind (`response.`, not a
    `.delta`: those read other members) and whose `response`, if any, is an object or null;
    also for whatever msgspec refuses (NaN, big integers...), where `json.loads` decides.
    The JSON is checked whole as the full parse checks it (duplicate members: the last)."""
    try:
        event = _HEAD_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError):  # (a ValidationError too)
        return None
    kind = lifecycle_kind(event.type)
    if kind is None:
        return None
    head: dict[str, Any] = {"type": kind}
    response = event.response
    if response is None:
        head["response"] = None
    elif response is not _ABSENT:
        head["response"] = {
            name: value
            for name in ("id", "usage", "error")
            if (value := getattr(response, name)) is not _ABSENT
        }
    return head


class _Tracker(Protocol):
    """What a Responses event reads and sets: `StreamUsageTracker`'s state."""

    content_chunks: int
    error: str | None
    response_id: str | None
    done: bool

    def _count(self, index: int, chars: int, reasoning: int) -> None: ...

    def _report(self, reported: Reported) -> None: ...


class ResponsesEvents:
    """`StreamUsageTracker`'s reading of a Responses event: a mixin, whose state is the
    tracker's (`_Tracker`)."""

    __slots__ = ()

    # The tracker's slots this sets, as the tracker types them.
    error: str | None
    response_id: str | None

    def _responses_event(self: _Tracker, kind: str, obj: dict[str, Any]) -> EventKind:
        if kind.endswith(".delta"):
            delta = obj.get("delta")
            if not isinstance(delta, str) or not delta:
                return EVENT_OTHER
            # Audio deltas are base64, not text: one chunk, whatever its length.
            chars = 0 if kind == "response.audio.delta" else len(delta)
            reasoning = chars if kind.startswith("response.reasoning") else 0
            self._count(as_int(obj.get("output_index")) or 0, chars - reasoning, reasoning)
            self.content_chunks += 1
            return EVENT_CONTENT
        if kind == "error":
            self.error = error_message(obj)
            return EVENT_ERROR
        response = obj.get("response")
        if not isinstance(response, Mapping):
            return EVENT_OTHER
        rid = response.get("id")
        if isinstance(rid, str) and self.response_id is None:
            self.response_id = rid
        reported = parse_usage(response.get("usage"))
        if reported is not None:
            self._report(reported)
        if kind == "response.failed":
            # A failed generation is not a completed one: the relay settles it as an upstream
            # error, while still accounting the usage it carries.
            self.error = error_message(response.get("error"))
            return EVENT_ERROR
        if kind in _RESPONSES_DONE:
            self.done = True
            return EVENT_DONE
        return EVENT_OTHER
