"""Who sent a request, as far as the access log and traces are told: the peer address and the
User-Agent, bounded and made safe to print. The client *name* comes from `proxy.auth`.

Both are free text a client chose (or, for the address, a socket's), so they go nowhere that
must stay bounded: not into metric labels, only into log lines and span attributes.
"""

from __future__ import annotations

import re

from aiohttp import web

from proxy.outcome import RequestRecord

# Long enough for the longest real SDK user agents (~150 characters with platform details).
USER_AGENT_MAX = 256
# Printable ASCII only: no control characters (a newline could forge a text log line), no
# quotes or backslashes (they survive JSON but read badly in the text format).
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]|[\"\\]")


def sanitise_user_agent(value: str | None) -> str | None:
    """The User-Agent as logged: at most USER_AGENT_MAX printable ASCII characters."""
    if value is None:
        return None
    cut = value[:USER_AGENT_MAX]
    clean = _UNPRINTABLE.sub("?", cut)
    return clean + "..." if len(value) > USER_AGENT_MAX else clean


def note_caller(record: RequestRecord, request: web.Request) -> None:
    """Copy the peer address and User-Agent onto the record (the name is set by auth)."""
    record.client_address = request.remote
    record.user_agent = sanitise_user_agent(request.headers.get("user-agent"))
