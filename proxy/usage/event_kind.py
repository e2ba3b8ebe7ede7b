"""What one SSE event of an answer means to the relay (`EventKind`), and the message of an
error event: shared by the chat-completions reader (proxy/usage/stream.py) and the Responses
API one (proxy/usage/responses_events.py)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final


class EventKind(enum.StrEnum):
    """What one SSE event means to the relay. Only CONTENT resets first-token and idle timers."""

    CONTENT = "content"  # carries generated output: text, reasoning, refusal or tool-call deltas
    USAGE_ONLY = "usage_only"  # the `"choices": []` + usage chunk that include_usage produces
    DONE = "done"  # `[DONE]`, or a Responses terminal event that is not a failure
    ERROR = "error"  # `{"error": ...}`, Responses `error` or `response.failed`
    OTHER = "other"  # role-only / empty / finish chunks, comments, keep-alives, lifecycle events


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us). Modules
# that test them import these names.
EVENT_CONTENT: Final = EventKind.CONTENT
EVENT_OTHER: Final = EventKind.OTHER
EVENT_USAGE_ONLY: Final = EventKind.USAGE_ONLY
EVENT_DONE: Final = EventKind.DONE
EVENT_ERROR: Final = EventKind.ERROR


def error_message(error: object) -> str:
    """The message of an upstream's error event or error member, whatever its shape."""
    if isinstance(error, Mapping):
        message = error.get("message")
        if isinstance(message, str):
            return message
    if isinstance(error, str):
        return error
    return "upstream error event"
