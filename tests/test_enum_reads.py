"""Per-event and per-stream functions read no enum member from its class: on Python 3.11 such
a read goes through `EnumType.__getattr__`'s hook (~0.15 us, ~1.1k instructions, against a
module global's ~0.01 us), so the members are bound once as module constants
(`EVENT_CONTENT`, `PHASE_STREAMING`, `_TIMEOUT_FIRST_TOKEN`...). A static check of the
functions' source: a member read from its class there fails it (but in a `raise`)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from proxy.event_relay import EventRelay
from proxy.sse_relay import SSERelay
from proxy.timeouts import Deadlines
from proxy.usage.filter import UsageChunkFilter
from proxy.usage.responses_events import ResponsesEvents
from proxy.usage.stream import StreamUsageTracker

_ENUMS = {"EventKind", "Phase", "TimeoutKind", "Outcome", "AttemptResult"}

_HOT: list[Callable[..., Any]] = [
    EventRelay._sse_events,
    SSERelay._sse_step,
    StreamUsageTracker.feed,
    StreamUsageTracker._content,
    StreamUsageTracker._chunk,
    ResponsesEvents._responses_event,
    UsageChunkFilter.client_bytes,
    Deadlines.next,
]


def _member_reads(function: Callable[..., Any]) -> list[str]:
    """The `Enum.MEMBER` reads of a function, but those in a `raise` (a failure's path)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    raised = {id(n) for r in ast.walk(tree) if isinstance(r, ast.Raise) for n in ast.walk(r)}
    return [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in _ENUMS
        and node.attr.isupper()
        and id(node) not in raised
    ]


@pytest.mark.parametrize("function", _HOT, ids=lambda f: f.__qualname__)
def test_no_enum_member_is_read_from_its_class(function: Callable[..., Any]) -> None:
    assert _member_reads(function) == []


def test_the_check_sees_a_member_read_from_its_class() -> None:
    """Not vacuous: a function that reads one is caught."""

    def reads() -> object:
        from proxy.usage.event_kind import EventKind

        return EventKind.CONTENT

    assert _member_reads(reads) == ["EventKind.CONTENT"]
