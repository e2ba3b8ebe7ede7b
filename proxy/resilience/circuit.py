"""A circuit breaker per upstream (pure: the caller passes the time).

closed --(failures consecutive failed attempts)--> open --(cooldown_s)--> half_open
half_open: one probe attempt is let through; its success closes the circuit, its failure
opens it again for another cooldown. While open, routes skip the upstream and go straight to
their next target; a route whose only target is open still tries it (skipping would turn a
sick upstream into a certain error).

Only failures that say the upstream is unwell count: connect errors, resets, 5xx, 429 and
per-attempt timeouts. A 4xx is the client's problem; an attempt we abandoned says nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from proxy.attempts import RESULT_CLIENT_ERROR, RESULT_CUT, RESULT_OK, AttemptResult

UNWELL = frozenset(
    {
        AttemptResult.CONNECT_ERROR,
        AttemptResult.RESET,
        AttemptResult.INVALID_RESPONSE,
        AttemptResult.RATE_LIMITED,
        AttemptResult.SERVER_ERROR,
        AttemptResult.TIMEOUT,
        AttemptResult.STREAM_ERROR,
    }
)


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us).
_CIRCUIT_CLOSED: Final = CircuitState.CLOSED
_CIRCUIT_HALF_OPEN: Final = CircuitState.HALF_OPEN
_CIRCUIT_OPEN: Final = CircuitState.OPEN


@dataclass(slots=True)
class Circuit:
    failures_to_open: int  # 0: never opens
    cooldown_s: float
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False  # a half-open probe is in flight
    transitions: list[CircuitState] = field(default_factory=list)

    def allows(self, now: float) -> bool:
        """May an attempt go to this upstream now? In half-open, only one at a time (the
        probe); the caller must then report its result."""
        if self.state is _CIRCUIT_OPEN:
            if now - self.opened_at < self.cooldown_s:
                return False
            self._to(CircuitState.HALF_OPEN)
        if self.state is _CIRCUIT_HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
        return True

    def would_allow(self, now: float) -> bool:
        """`allows` without taking the probe slot (for planning)."""
        if self.state is CircuitState.OPEN:
            return now - self.opened_at >= self.cooldown_s
        return not (self.state is CircuitState.HALF_OPEN and self.probing)

    def report(self, result: AttemptResult, now: float) -> None:
        """The end of an attempt that `allows` let through."""
        probe, self.probing = self.probing, False
        if result in UNWELL:
            self.failures += 1
            if self.failures_to_open and (
                probe
                or self.state is CircuitState.HALF_OPEN
                or self.failures >= self.failures_to_open
            ):
                self.opened_at = now
                self._to(CircuitState.OPEN)
        elif result is RESULT_OK or result is RESULT_CLIENT_ERROR or result is RESULT_CUT:
            self.failures = 0
            if self.state is not _CIRCUIT_CLOSED:
                self._to(CircuitState.CLOSED)
        # ABANDONED / SKIPPED say nothing about the upstream's health.

    def _to(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            self.transitions.append(state)
            del self.transitions[:-16]  # only the recent history is kept


class Circuits:
    """The breakers of all upstreams, created on first use with the route's settings."""

    def __init__(self) -> None:
        self._by_upstream: dict[str, Circuit] = {}

    def get(self, upstream: str, failures_to_open: int, cooldown_s: float) -> Circuit:
        circuit = self._by_upstream.get(upstream)
        if circuit is None:
            circuit = self._by_upstream[upstream] = Circuit(failures_to_open, cooldown_s)
        return circuit

    def states(self) -> dict[str, CircuitState]:
        return {name: c.state for name, c in self._by_upstream.items()}
