"""Where a request goes upstream, decided from the decoded path, never from the client's bytes.

The upstream URL carries the injected key, so its scheme, host and port must be the configured
upstream's whatever the client sent. aiohttp routes on the *decoded* path, so a target such as
`/v%31/x` reaches the `/v1/` handler while its raw form starts with `/v%31`; gluing the raw tail
onto `base_url` (`http://10.0.0.1` + `31/x`) would send the key to 10.0.0.131. Hence:

- the raw target must begin with a literal `/v1/` (no encoding in the prefix we route on);
- the decoded path is checked segment by segment (no `.`/`..`, also when split by `\\` or
  followed by `;params`, which some servers treat as separators; no control characters);
- the URL is built with yarl from the base URL's parts and the decoded tail (yarl encodes it
  again), and is compared with the configured upstream's scheme, host and port before use;
- ids that come from an upstream (a background response id) must match a strict pattern
  before they become a path segment.
"""

from __future__ import annotations

import functools
import re

from yarl import URL

from proxy.errors import BadRequest, ProxyError

V1_PREFIX = "/v1/"
_SEGMENT_SPLIT = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# OpenAI ids look like `resp_68a1...`; vLLM and others use uuids. Nothing needs more.
_UPSTREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")


class TargetMismatch(ProxyError):
    """The URL we built does not point at the configured upstream: a bug of ours or a hostile
    input we failed to refuse earlier. Nothing is sent."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_target"


def check_raw_target(raw_path: str) -> None:
    """The target's path as sent (percent-encoding intact) must begin with a literal /v1/."""
    if not raw_path.startswith(V1_PREFIX):
        raise BadRequest(
            "the request path must begin with a literal /v1/ (no percent-encoding in the prefix)"
        )


def check_decoded_path(path: str) -> None:
    """Refuse paths an upstream (or a server in front of it) could resolve outside base_url."""
    if _CONTROL.search(path):
        raise BadRequest("the path must not contain control characters")
    if "." not in path:  # no segment can be `.` or `..` (most paths: no split, no loop)
        return
    for segment in _SEGMENT_SPLIT.split(path):
        # `..;x` is `..` to servlet containers; `..\` is `..` to Windows and some normalisers.
        if segment.split(";", 1)[0] in (".", ".."):
            raise BadRequest("the path must not contain '.' or '..' segments")


def same_origin(url: URL, base: URL) -> bool:
    return (
        url.scheme == base.scheme
        and url.host == base.host
        and url.port == base.port
        and url.user is None
        and url.password is None
    )


def checked(url: URL, base_url: str) -> URL:
    """`url` if it points at the configured upstream (scheme, host and port); else refuse."""
    if not same_origin(url, URL(base_url)):
        raise TargetMismatch("refused: the upstream URL does not match the configured upstream")
    return url


def upstream_url(base_url: str, raw_path: str, path: str, raw_query: str) -> URL:
    """The upstream URL for a client target: `raw_path` as sent, `path` decoded by the server,
    `raw_query` as sent (a query cannot change the authority).

    Remembered per target and base URL (URLs are immutable): most requests ask for the same
    few paths, and building and checking one is ~3 us. Only URLs that passed every check are
    remembered (a refusal raises, and is not); targets are clients' strings, so only short
    ones are, at most 256, the least recently used dropped first (~0.5 MB at most)."""
    if len(raw_path) + len(raw_query) > _REMEMBERED_TARGET_CHARS:
        return _build(base_url, raw_path, path, raw_query)
    return _remembered(base_url, raw_path, path, raw_query)


_REMEMBERED_TARGET_CHARS = 512


def _build(base_url: str, raw_path: str, path: str, raw_query: str) -> URL:
    check_raw_target(raw_path)
    check_decoded_path(path)
    base = URL(base_url)
    tail = URL.build(path=path[len(V1_PREFIX) - 1 :]).raw_path  # re-encoded by yarl
    url = URL.build(
        scheme=base.scheme,
        host=base.host_subcomponent or "",
        port=base.explicit_port,
        path=base.raw_path.rstrip("/") + tail,
        query_string=raw_query,
        encoded=True,
    )
    return checked(url, base_url)


_remembered = functools.lru_cache(maxsize=256)(_build)


def safe_upstream_id(value: str) -> bool:
    """An id an upstream gave us (e.g. a background response id) that may become one path
    segment: letters, digits, `_` and `-` only, at most 200 characters."""
    return _UPSTREAM_ID.fullmatch(value) is not None
