"""W3C Trace Context (https://www.w3.org/TR/trace-context/), sans-I/O: read a client's
`traceparent`, name the spans of one request, and write the header the upstream gets.

Ids are chosen here, before the first upstream byte, because the upstream must be told its
parent span's id then; the spans themselves are built from the finished record later
(`proxy.tracing.spans`), with these same ids.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.attempts import Attempt

# version "00": exactly four fields. A higher version may append fields after a "-"; its first
# four keep this shape (the spec's forward-compatibility rule). Version "ff" is invalid.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
    r"(?P<rest>-.*)?"
)
SAMPLED = 0x01
# A client's tracestate is passed on as it came; one longer than this is not ours to relay
# (the spec lets a vendor list grow to 32 entries of at most 256 characters each).
TRACESTATE_MAX = 512


@dataclass(frozen=True, slots=True)
class Parent:
    """The client's span, as its `traceparent` named it."""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str | None = None


def parse_traceparent(value: str | None, tracestate: str | None = None) -> Parent | None:
    """The parent a `traceparent` header names, or None when it is absent or malformed (the
    spec: then start a new trace)."""
    if value is None or len(value) > 512:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version = m.group("version")
    if version == "ff" or (version == "00" and m.group("rest") is not None):
        return None
    trace_id, span_id = int(m.group("trace"), 16), int(m.group("span"), 16)
    if trace_id == 0 or span_id == 0:
        return None
    if tracestate is not None and len(tracestate) > TRACESTATE_MAX:
        tracestate = None
    return Parent(trace_id, span_id, bool(int(m.group("flags"), 16) & SAMPLED), tracestate)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{SAMPLED if sampled else 0:02x}"


# Our own generator (seeded from os.urandom): ids never draw on, or disturb, the global
# `random` state that other code in the process (and Hypothesis in the tests) relies on.
_IDS = random.Random()
# A forked child starts with a copy of its state, so it would draw the very ids its parent draws
# next: reseeded there, from os.urandom again. hangup's own workers are fresh interpreters
# (proxy/supervisor.py): a guard for embedders, as proxy/request_ids.py's for its batch.
os.register_at_fork(after_in_child=_IDS.seed)


def new_trace_id() -> int:
    while True:
        value = _IDS.getrandbits(128)
        if value:
            return value


def new_span_id() -> int:
    while True:
        value = _IDS.getrandbits(64)
        if value:
            return value


@dataclass(slots=True)
class AttemptSpan:
    """The CLIENT span of one upstream attempt: its id (sent upstream in `traceparent`) and the
    record's `Attempt` it belongs to (timings, status and result are read from it at the end,
    so retries, fallbacks and parallel hedges are all described by their own attempt)."""

    span_id: int
    attempt: Attempt


@dataclass(slots=True)
class TraceIds:
    """The trace of one request: set on the record when it arrives, one attempt span added
    before each upstream request is sent."""

    trace_id: int
    span_id: int  # the request's SERVER span
    parent: Parent | None  # the client's span, when it sent a valid traceparent
    sampled: bool
    attempts: list[AttemptSpan] = field(default_factory=list)

    def begin_attempt(self, attempt: Attempt) -> str:
        """A new span for `attempt`; the `traceparent` its upstream request must carry."""
        span = AttemptSpan(new_span_id(), attempt)
        self.attempts.append(span)
        return format_traceparent(self.trace_id, span.span_id, self.sampled)
