"""Log lines that an attacker can trigger at will, at most one per kind per interval.

A slowloris wave or a descriptor shortage happens thousands of times a second; the operator
needs to know that it happens and how often, not a line per event. The first event of a kind
is logged at once; later ones within the interval are counted and reported in the next line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Kind:
    last_at: float
    suppressed: int = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self.counts: dict[str, int] = {}  # every event, logged or not (for tests and stats)

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` unless `kind` was logged within the interval; True if logged."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now - state.last_at < self.interval_s:
            state.suppressed += 1
            return False
        suppressed = state.suppressed if state is not None else 0
        self._kinds[kind] = _Kind(last_at=now)
        if suppressed:
            message += " (and %d more like it in the last %gs)"
            args = (*args, suppressed, self.interval_s)
        self.logger.warning(
            message, *args, extra={"fields": {"event": kind, "suppressed": suppressed}}
        )
        return True
