"""What aiohttp's client exceptions mean for an attempt, mapped to ours once, here:
`AttemptFailed` carries how an attempt failed (for the failover policy) and what the client
gets; `map_open_error` maps a failure to send or to get response headers; `READ_ERRORS` and
`OPEN_ERRORS` are the exceptions a body read and a control call may raise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Final

import aiohttp

from proxy.attempts import AttemptResult
from proxy.errors import ProxyError, UpstreamFailed, UpstreamUnreachable

log = logging.getLogger("hangup.upstream")


class AttemptFailed(Exception):
    """An attempt failed at the upstream: `result` says how (for the failover policy), `error`
    is what the client gets if nothing else is tried."""

    def __init__(self, result: AttemptResult, error: ProxyError) -> None:
        super().__init__(error.message)
        self.result = result
        self.error = error


# What a body read raises when the upstream's body broke (not a deadline or a hang-up).
READ_ERRORS: Final = (aiohttp.ClientError, OSError, asyncio.IncompleteReadError)


def map_open_error(exc: Exception, upstream: str) -> AttemptFailed:
    """An exception raised while sending the request or awaiting response headers."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # strerror can quote the address ("Connect call failed ('10.0.0.1', 443)"): by errno.
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else type(exc.os_error).__name__
        # The address is for the operator's log, not for the client's error body.
        log.warning(
            'cannot connect to upstream "%s" (%s:%s): %s', upstream, exc.host, exc.port, reason
        )
        return AttemptFailed(
            AttemptResult.CONNECT_ERROR,
            UpstreamUnreachable(f'cannot connect to upstream "{upstream}": {reason}'),
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return AttemptFailed(
            AttemptResult.RESET,
            UpstreamFailed(f'upstream "{upstream}" closed the connection without a response'),
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        return AttemptFailed(
            AttemptResult.INVALID_RESPONSE,
            UpstreamFailed(f'upstream "{upstream}" sent an invalid HTTP response'),
        )
    return AttemptFailed(
        AttemptResult.RESET,
        UpstreamFailed(f'upstream "{upstream}" connection failed: {type(exc).__name__}'),
    )


# For control calls made outside an attempt (background cancels).
OPEN_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, OSError)
