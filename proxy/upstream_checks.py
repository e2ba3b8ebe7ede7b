"""What an upstream's response head must look like before any of it is passed on.

aiohttp's client parser is lenient where its server writer is strict: a header value with a
control byte parses, then fails to serialise when we relay it (an internal error before this
check). A status outside 200-599 cannot be relayed as the answer either: 1xx is interim (101
would switch our client's connection to a protocol we do not speak), and 600+ is not HTTP.
Both are the upstream's fault: 502, and the exchange is recorded as an upstream error.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from proxy.errors import UpstreamFailed

# RFC 9110 5.5: field values are visible characters, SP and HTAB (obs-text allowed).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKENS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?: [!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


def check_response_head(
    status: int,
    reason: str | None,
    headers: CIMultiDictProxy[str],
    upstream: str,
    *,
    event_stream: bool = False,
) -> None:
    """Raise UpstreamFailed when the head cannot be relayed as it is."""
    if not 200 <= status <= 599:
        raise UpstreamFailed(f'upstream "{upstream}" answered with status {status}')
    if reason and _BAD_VALUE.search(reason):
        raise UpstreamFailed(f'upstream "{upstream}" sent a malformed status line')
    # Every name and every value checked in one regex call each: names joined by a space (no
    # token's character; the count of spaces tells a name holding one), values by a tab
    # (which a value may hold). A head that passes needs nothing more; one that fails, is
    # empty or repeats a name (`keys()` shows a repeated name once) goes through the fields
    # in order, which names the first fault as before.
    # An upstream sends the same names in the same order on every answer of a kind: a joined
    # string of names that passed the regex is remembered (a set lookup, not a scan of ~100
    # characters; the count of spaces is still checked, as it must agree with this head's
    # number of names).
    keys = headers.keys()
    names = " ".join(keys)
    if (
        len(keys) != len(headers)
        or names.count(" ") != len(headers) - 1
        or (names not in _GOOD_NAMES and not _good_names(names))
        or _BAD_VALUE.search("\t".join(headers.values())) is not None
    ):
        _check_each(headers.items(), upstream, event_stream=event_stream)
        return
    if event_stream:
        for value in headers.getall("content-encoding", ()):
            if value.strip().lower() not in ("", "identity"):
                raise UpstreamFailed(f'upstream "{upstream}" sent a compressed event stream')


# Joined names of heads that passed: the upstreams' choice, so bounded (a full set is
# cleared; the usual heads come back at once).
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_KEPT = 64


def _good_names(names: str) -> bool:
    """Every name in `names` (joined by spaces) is a token; remembered when so."""
    if _TOKENS.fullmatch(names) is None:
        return False
    if len(_GOOD_NAMES) >= _GOOD_NAMES_KEPT:
        _GOOD_NAMES.clear()
    _GOOD_NAMES.add(names)
    return True


def _check_each(headers: Iterable[tuple[str, str]], upstream: str, *, event_stream: bool) -> None:
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise UpstreamFailed(f'upstream "{upstream}" sent a malformed response header')
        compressed = value.strip().lower() not in ("", "identity")
        if event_stream and compressed and name.lower() == "content-encoding":
            # We asked for identity (`ask_identity`): a compressed stream could be neither
            # parsed for usage and deadlines nor scrubbed of secrets.
            raise UpstreamFailed(f'upstream "{upstream}" sent a compressed event stream')


def ask_identity(headers: Any, stream: bool) -> None:
    """A stream is parsed as it passes (usage, first-token and idle deadlines, secrets): ask
    for it uncompressed, whatever the client accepts."""
    if stream:
        headers["accept-encoding"] = "identity"


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def unframed_close(response: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """For a response without Content-Length or chunking, which ends when its connection
    does (aiohttp reports a reset connection there as a normal end): the connection's close
    to watch, so that a reset, or a stream that stops in the middle of an event, is a cut,
    not an answer (`check_unframed_end`). None when there is no connection to watch."""
    connection = response.connection
    if connection is None or connection.protocol is None:
        return None
    closed = connection.protocol.closed
    if closed is not None:
        closed.add_done_callback(_retrieve)  # a reset must not log "never retrieved"
    return closed


def check_unframed_end(
    closed: asyncio.Future[None], upstream: str, *, mid_event: bool = False
) -> None:
    """At the end of an unframed body: raise UpstreamFailed if the connection was cut."""
    reset = closed.done() and not closed.cancelled() and closed.exception() is not None
    if reset or mid_event:
        raise UpstreamFailed(f'upstream "{upstream}" connection was cut before the end')
