"""The cap on client connections, shared by every connection of one server (`ConnectionGuard`):
which `Tier` a new connection gets (a slot, probes only, or a 503 at once), which idle or
silent connection gives its slot up to it, and the count; it also carries the limits and the
rate-limited log the connections share. The connections themselves are
proxy/edge/connections.py's.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Final

from proxy.config import ConnectionsConfig
from proxy.edge.ratelog import RateLimitedLog
from proxy.errors import Overloaded

if TYPE_CHECKING:
    from proxy.edge.connections import GuardedRequestHandler

log = logging.getLogger("hangup.connections")


class Tier(enum.Enum):
    NORMAL = "normal"
    PROBES_ONLY = "probes_only"  # over max_connections, within probe_headroom
    REFUSED = "refused"  # past the headroom too: 503 at once, nothing read


# Members read on every request, bound once: on Python 3.11 a member read from its class
# goes through `EnumType.__getattr__`'s hook (~0.11 us, a module global ~0.01 us). Modules
# that test them import these names.
TIER_NORMAL: Final = Tier.NORMAL
TIER_PROBES_ONLY: Final = Tier.PROBES_ONLY
TIER_REFUSED: Final = Tier.REFUSED


class ConnectionGuard:
    """Shared by every connection of one server: the count, the limits, the log.

    Over the cap, a new connection first takes the slot of the longest-idle keep-alive
    connection (nothing in flight, no byte of a next request: nginx reclaims these the same
    way when it runs out of connections); failing that it is admitted for probes only, within
    `probe_headroom`; past that, it takes the place of the oldest probes-only connection that
    has not sent its request yet; failing that, it gets a 503 at once. A probe sends its
    request as soon as it connects, so a crowd of silent or slow sockets cannot keep one out.
    """

    def __init__(self, config: ConnectionsConfig, *, probe_paths: frozenset[str]) -> None:
        self.config = config
        self.probe_paths = probe_paths
        self.max_connections = config.max_connections  # lowered by `fit_to_descriptors`
        self.open = 0
        self.log = RateLimitedLog(log)
        # Reclaimable connections, oldest first (dicts keep insertion order).
        self.idle: dict[GuardedRequestHandler, None] = {}
        self.probation: dict[GuardedRequestHandler, None] = {}

    @property
    def max_head_bytes(self) -> int:
        return self.config.max_head_kb * 1024

    def admit(self) -> Tier:
        self.open += 1
        if self.open > self.max_connections:
            self._reclaim(self.idle, "idle keep-alive")
        if self.open <= self.max_connections:
            return TIER_NORMAL
        ceiling = self.max_connections + self.config.probe_headroom
        if self.open > ceiling:
            self._reclaim(self.probation, "silent probes-only")
        return Tier.PROBES_ONLY if self.open <= ceiling else Tier.REFUSED

    def _reclaim(self, pool: dict[GuardedRequestHandler, None], what: str) -> None:
        if not pool:
            return
        victim = next(iter(pool))
        victim.evict()
        self.closed(
            "connection_reclaimed",
            "closed the oldest %s connection to make room for a new one "
            "(connections.max_connections: %d)",
            what,
            self.max_connections,
        )

    def released(self, handler: GuardedRequestHandler) -> None:
        self.open -= 1
        self.idle.pop(handler, None)
        self.probation.pop(handler, None)

    def closed(self, kind: str, message: str, *args: object) -> None:
        self.log.warning(kind, message, *args)


def over_capacity(guard: ConnectionGuard) -> Overloaded:
    return Overloaded(
        f"hangup holds its maximum of {guard.max_connections} client connections "
        "(connections.max_connections); retry shortly"
    )
