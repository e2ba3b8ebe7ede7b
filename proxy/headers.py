"""Which headers cross the proxy, in each direction (RFC 9110 sections 7.6 and 10.1.1).

Connection-specific fields (and any the Connection field names) stop here; the fields that
describe the message body are recomputed for the new connection; a `Via` entry is added both
ways (7.6.3). Nothing is added about the client: no X-Forwarded-For or Forwarded, since a
provider has no use for a pod's address and it would leak one. Credentials: see `proxy.auth`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.config import UpstreamConfig
from proxy.timeouts import CLIENT_DEADLINE_HEADERS

# Connection-specific headers never forwarded (RFC 9110 7.6.1), plus the non-standard ones
# that behave the same way in practice.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by aiohttp for the new connection, or decoded already by aiohttp's server
# (a compressed request body arrives here decompressed, so its Content-Encoding is stale).
# Expect: 100-continue was answered by our server when the relay read the body (RFC 9110
# 10.1.1); forwarded, it would make aiohttp's client wait for a 100 before sending the body
# we already have, forever against an upstream that does not send one.
_REQUEST_RECOMPUTED = frozenset({"host", "content-length", "content-encoding", "expect"})
# Alt-Svc advertises another way to reach the *upstream's* origin (e.g. HTTP/3 on its port
# 443); passed on, it would point the client at a port of the proxy's host (RFC 7838).
_RESPONSE_ORIGIN_SPECIFIC = frozenset({"alt-svc"})
# Ways clients send provider keys: replaced when the upstream has a server-side key.
_CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})
_CLIENT_DEADLINES = frozenset(CLIENT_DEADLINE_HEADERS) - {"x-stainless-timeout"}

VIA = "1.1 hangup"

# Header names as the multidicts keep them: one `istr` per distinct name, shared by every
# request. Given plain-`str` names, multidict makes a new `istr` for each name each time a
# CIMultiDict is iterated, and aiohttp's copies of our headers (its client request's, its
# response's) each keep their own: ~100 B per name per held stream, and the allocations.
# Bounded: the names are the client's and the upstream's choice.
_NAMES_KEPT = 1024
_lowered: dict[str, istr] = {}  # a name as received -> its lower-case spelling
_as_sent: dict[str, istr] = {}  # a name as received -> the same spelling (responses keep it)
_X_REQUEST_ID, _VIA, _AUTHORIZATION = istr("x-request-id"), istr("via"), istr("authorization")


def _lower(name: str) -> istr:
    known = _lowered.get(name)
    if known is None:
        known = istr(name.lower())
        if len(_lowered) < _NAMES_KEPT:
            _lowered[name] = known
    return known


def _spelled(name: str) -> istr:
    known = _as_sent.get(name)
    if known is None:
        known = istr(name)
        if len(_as_sent) < _NAMES_KEPT:
            _as_sent[name] = known
    return known


# The skip sets, built once rather than per request (a request adds only its Connection tokens
# and drops, usually none).
_REQUEST_SKIP = HOP_BY_HOP | _REQUEST_RECOMPUTED | _CLIENT_DEADLINES
_REQUEST_SKIP_CREDENTIALS = _REQUEST_SKIP | _CREDENTIAL_HEADERS
_RESPONSE_SKIP = HOP_BY_HOP | _RESPONSE_ORIGIN_SPECIFIC
_RESPONSE_SKIP_LENGTH = _RESPONSE_SKIP | {"content-length"}


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    if "connection" not in headers:
        return tokens
    for value in headers.getall("connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    upstream: UpstreamConfig,
    request_id: str,
    drop_client_credentials: bool,
    extra: Iterable[tuple[str, str]] = (),
    drop: Collection[str] = (),
) -> CIMultiDict[str]:
    """Headers for the upstream request.

    drop_client_credentials: the client's Authorization was a key for *this proxy*; it must
    never reach the provider.
    """
    credentials = upstream.api_key is not None or drop_client_credentials
    skip = _REQUEST_SKIP_CREDENTIALS if credentials else _REQUEST_SKIP
    # (Most requests name no connection option and drop nothing: no call, no set built.)
    if "connection" in incoming:
        skip = skip | _connection_tokens(incoming)
    if drop:
        skip = skip | {d.lower() for d in drop}
    # Names are lower-cased (as HTTP/2 requires anyway): aiohttp's ClientSession merges header
    # names case-sensitively and would let our `via` replace a client's `Via`, or one spelling
    # of a repeated field replace the other.
    out: CIMultiDict[str] = CIMultiDict()
    lowered = _lowered
    for name, value in incoming.items():
        lower = lowered.get(name) or _lower(name)  # (the call only for a name not seen yet)
        if lower not in skip:
            out.add(lower, value)
    out[_X_REQUEST_ID] = request_id
    out.add(_VIA, VIA)
    if upstream.api_key is not None:
        out[_AUTHORIZATION] = "Bearer " + upstream.api_key.get_secret_value()
    for name, value in upstream.headers.items():
        out[_lower(name)] = value
    for name, value in extra:
        out[_lower(name)] = value
    return out


def client_response_headers(
    upstream_headers: CIMultiDictProxy[str], *, request_id: str, keep_length: bool
) -> CIMultiDict[str]:
    skip = _RESPONSE_SKIP if keep_length else _RESPONSE_SKIP_LENGTH
    if "connection" in upstream_headers:  # (most answers: no call, no set built)
        skip = skip | _connection_tokens(upstream_headers)
    out: CIMultiDict[str] = CIMultiDict()
    lowered, as_sent = _lowered, _as_sent
    for name, value in upstream_headers.items():
        if (lowered.get(name) or _lower(name)) not in skip:
            out.add(as_sent.get(name) or _spelled(name), value)
    out[_X_REQUEST_ID] = request_id
    out.add(_VIA, VIA)
    return out
