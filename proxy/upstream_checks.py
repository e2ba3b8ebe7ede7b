"""What an upstream's response head must look like before any of it is passed on.

aiohttp's client parser is lenient where its server writer is strict: a header value with a
control byte parses, then fails to serialise when we relay it (an internal error before this
check). A status outside 200-599 cannot be relayed as the answer either: 1xx is interim (101
would switch our client's connection to a protocol we do not speak), and 600+ is not HTTP.
Both are the upstream's fault: 502, and the exchange is recorded as an upstream error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.errors import UpstreamFailed

# RFC 9110 5.5: field values are visible characters, SP and HTAB (obs-text allowed).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_response_head(
    status: int, reason: str | None, headers: Iterable[tuple[str, str]], upstream: str
) -> None:
    """Raise UpstreamFailed when the head cannot be relayed as it is."""
    if not 200 <= status <= 599:
        raise UpstreamFailed(f'upstream "{upstream}" answered with status {status}')
    if reason and _BAD_VALUE.search(reason):
        raise UpstreamFailed(f'upstream "{upstream}" sent a malformed status line')
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise UpstreamFailed(f'upstream "{upstream}" sent a malformed response header')
