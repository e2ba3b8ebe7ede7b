"""New request ids: 128 bits of the OS's random source as 32 hex digits, what
`os.urandom(16).hex()` gave each request before, drawn for 256 ids at a time: one getrandom()
syscall per 256 requests instead of one per request.

What an id is for: it names one request in the access log, in the upstream's logs (it is sent
as `x-request-id`) and in traces, across every worker, instance and restart. So it must not
repeat: 128 bits from `os.urandom`, as before (a repeat among 10^12 ids has odds of ~10^-15).
It stays as unguessable as before (the same source). A forked child must never hand out the
ids its parent has in hand: the child drops them (`os.register_at_fork`). hangup's own workers
are fresh interpreters (proxy/supervisor.py), so that is a guard for embedders, not a path.
"""

from __future__ import annotations

import os
from typing import Final

BATCH: Final = 256  # ids a draw: 4 KiB of random bytes
_ready: list[str] = []


def new_request_id() -> str:
    """A new id: 32 lowercase hex digits, random."""
    try:
        return _ready.pop()
    except IndexError:
        digits = os.urandom(16 * BATCH).hex()
        _ready.extend([digits[at : at + 32] for at in range(0, 32 * BATCH, 32)])
        return _ready.pop()


os.register_at_fork(after_in_child=_ready.clear)
