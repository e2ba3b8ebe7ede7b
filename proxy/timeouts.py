"""The timeout taxonomy as pure, absolute deadlines (no asyncio here; `watchdog.py` enforces).

Five phases, each measured from its own start point:

| phase        | starts at                          | ends at                              |
|--------------|------------------------------------|--------------------------------------|
| connect      | each upstream attempt begins       | request headers written upstream     |
| headers      | request headers written upstream   | response headers received            |
| first_token  | the request arrived at the proxy   | first content-bearing SSE event      |
| idle         | each content-bearing SSE event     | the next one (non-SSE: next body read)|
| total        | the request arrived at the proxy   | the exchange ends                    |

first_token applies to streamed requests from the start (it also bounds the connect and headers
waits of a stream). Only *content* resets first_token and idle: SSE comments, keep-alive pings,
role-only chunks and empty deltas do not, or a silent stream would live until total_s.
At any moment the deadline in force is the earliest of the active ones; that one is reported.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import TimeoutsConfig
from proxy.outcome import TimeoutKind

# Headers a client may use to tell us its own deadline, in seconds. x-stainless-timeout is sent
# by the Stainless-generated OpenAI SDKs (Node); x-hangup-timeout is ours, for any client.
CLIENT_DEADLINE_HEADERS = ("x-hangup-timeout", "x-stainless-timeout")


def client_deadline(headers: Mapping[str, str]) -> tuple[float, str] | None:
    """The tightest positive deadline the client announced, with the header it came from."""
    best: tuple[float, str] | None = None
    for name in CLIENT_DEADLINE_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if not math.isfinite(seconds) or seconds <= 0:
            continue
        if best is None or seconds < best[0]:
            best = (seconds, name)
    return best


@dataclass(frozen=True, slots=True)
class Budget:
    """The effective timeouts of one request: the route's policy, total capped by the client."""

    connect_s: float | None
    headers_s: float | None
    first_token_s: float | None
    idle_s: float | None
    total_s: float | None
    total_source: str | None = None  # None: the route; else the client header that capped it

    @classmethod
    def for_request(
        cls,
        policy: TimeoutsConfig,
        client: tuple[float, str] | None,
        *,
        honor_client_deadline: bool,
    ) -> Budget:
        total, source = policy.total_s, None
        # A client deadline may only shorten the route's policy, never extend it.
        if honor_client_deadline and client is not None and (total is None or client[0] < total):
            total, source = client
        return cls(
            policy.connect_s, policy.headers_s, policy.first_token_s, policy.idle_s, total, source
        )

    def seconds(self, kind: TimeoutKind) -> float | None:
        value: float | None = getattr(self, kind.config_key.removeprefix("timeouts."))
        return value


class Phase(enum.Enum):
    CONNECT = "connect"
    HEADERS = "headers"
    AWAIT_CONTENT = "await_content"  # SSE response open, no content yet
    STREAMING = "streaming"  # SSE, content flowing
    BODY = "body"  # non-SSE body
    BACKOFF = "backoff"  # between retry attempts
    DONE = "done"


_BEFORE_CONTENT = frozenset({Phase.CONNECT, Phase.HEADERS, Phase.BACKOFF, Phase.AWAIT_CONTENT})


class Deadlines:
    """Which deadline is in force, as absolute `loop.time()` values. Mutated by the relay at
    phase transitions; read by the watchdog only when its timer fires (so an idle reset per
    chunk costs one float store)."""

    __slots__ = (
        "_first_token_at",
        "_phase_deadline",
        "_total_at",
        "budget",
        "last_progress",
        "phase",
        "started",
        "watch_first_token",
    )

    def __init__(self, budget: Budget, started: float, *, watch_first_token: bool) -> None:
        self.budget = budget
        self.started = started
        self.watch_first_token = watch_first_token
        self.phase = Phase.CONNECT
        self.last_progress = started
        self._total_at = None if budget.total_s is None else started + budget.total_s
        self._first_token_at = (
            None if budget.first_token_s is None else started + budget.first_token_s
        )
        self._phase_deadline = self._after(started, budget.connect_s)

    @staticmethod
    def _after(start: float, seconds: float | None) -> float | None:
        return None if seconds is None else start + seconds

    # --- transitions -------------------------------------------------------------------------
    def connecting(self, now: float) -> None:
        """A new upstream attempt (first or retry) begins."""
        self.phase = Phase.CONNECT
        self._phase_deadline = self._after(now, self.budget.connect_s)

    def next_target(self, now: float) -> None:
        """A fallback attempt begins: it gets its own connect, headers and first-token time
        (the previous target used up its share); only `total` is one budget for them all."""
        self.connecting(now)
        self._first_token_at = self._after(now, self.budget.first_token_s)

    def backing_off(self) -> None:
        """Waiting before a retry: only first_token (streams) and total run."""
        self.phase = Phase.BACKOFF
        self._phase_deadline = None

    def headers_sent(self, now: float) -> None:
        if self.phase is Phase.CONNECT:
            self.phase = Phase.HEADERS
            self._phase_deadline = self._after(now, self.budget.headers_s)

    def response_started(self, now: float, *, sse: bool) -> None:
        self.last_progress = now
        self.phase = Phase.AWAIT_CONTENT if sse else Phase.BODY
        if sse:
            self.watch_first_token = True

    def content(self, now: float) -> None:
        """A content-bearing event (SSE) or any body bytes (non-SSE) arrived."""
        self.last_progress = now
        if self.phase is Phase.AWAIT_CONTENT:
            self.phase = Phase.STREAMING

    def done(self) -> None:
        self.phase = Phase.DONE

    # --- query -------------------------------------------------------------------------------
    def next(self) -> tuple[float, TimeoutKind] | None:
        """The earliest deadline in force and its kind; ties go to the phase, not `total`."""
        phase = self.phase
        if phase is Phase.DONE:
            return None
        best: tuple[float, TimeoutKind] | None = None

        def consider(when: float | None, kind: TimeoutKind) -> None:
            nonlocal best
            if when is not None and (best is None or when < best[0]):
                best = (when, kind)

        if phase is Phase.CONNECT:
            consider(self._phase_deadline, TimeoutKind.CONNECT)
        elif phase is Phase.HEADERS:
            consider(self._phase_deadline, TimeoutKind.HEADERS)
        if self.watch_first_token and phase in _BEFORE_CONTENT:
            consider(self._first_token_at, TimeoutKind.FIRST_TOKEN)
        if phase in (Phase.STREAMING, Phase.BODY) and self.budget.idle_s is not None:
            consider(self.last_progress + self.budget.idle_s, TimeoutKind.IDLE)
        consider(self._total_at, TimeoutKind.TOTAL)
        return best

    def remaining(self, now: float) -> float | None:
        """Seconds left of the total budget (for deadline propagation upstream)."""
        return None if self._total_at is None else max(0.0, self._total_at - now)

    def describe(self, kind: TimeoutKind, route: str) -> str:
        """The message a client sees; it names the config key that fired."""
        budget = self.budget
        if kind is TimeoutKind.TOTAL and budget.total_source is not None:
            return (
                f"client deadline of {budget.total_s:g}s ({budget.total_source}) exceeded on "
                f'route "{route}" (it caps timeouts.total_s)'
            )
        seconds = budget.seconds(kind)
        what = {
            TimeoutKind.CONNECT: "connecting to the upstream",
            TimeoutKind.HEADERS: "waiting for the upstream's response headers",
            TimeoutKind.FIRST_TOKEN: "waiting for the first content token",
            TimeoutKind.IDLE: "waiting for the next content chunk",
            TimeoutKind.TOTAL: "for the whole request",
        }[kind]
        return f'{kind.config_key}={seconds:g} exceeded on route "{route}" ({what})'
