"""What a web browser may do with hangup: by default, nothing.

hangup on loopback with an injected provider key and no `auth.keys` is an open door to any web
page the developer visits: a page can POST to http://127.0.0.1:8080 (a "simple" cross-site
request needs no preflight), or rebind its own DNS name to 127.0.0.1 and read the answers as
same-origin. Three checks close it, for every path:

- `Host` must name this listener: an IP literal (a page cannot rebind an address), `localhost`
  or `*.localhost`, the configured `listen.host`, or a name in `listen.allowed_hosts`. A
  rebinding page's requests carry its own name, so they get 421 (Misdirected Request).
- a request with an `Origin` (browsers send it on every cross-site request and on every POST)
  is refused (403) unless the origin is in `cors.allowed_origins`. Non-browser clients send none.
- CORS preflights are answered here (204 for an allowed origin, else 403), never forwarded with
  the key; the upstream's `Access-Control-*` headers are dropped (`cors.relay_upstream_headers`
  keeps them) and an allowed origin gets our own.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from proxy.config import HangupConfig
from proxy.errors import ProxyError
from proxy.refusal import refuse

_PREFLIGHT_METHODS = "GET, POST, DELETE, OPTIONS"
_PREFLIGHT_MAX_AGE_S = "600"
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_HEADER_LIST = re.compile(rf"{_TOKEN}(?:[ \t]*,[ \t]*{_TOKEN})*")


class MisdirectedRequest(ProxyError):
    status = 421
    error_type = "invalid_request_error"
    code = "host_not_allowed"


class OriginNotAllowed(ProxyError):
    status = 403
    error_type = "invalid_request_error"
    code = "origin_not_allowed"


def host_name(authority: str) -> str | None:
    """The host of a `Host` value (port dropped, lower case, no trailing dot); None if it is
    not a plain host[:port]."""
    value = authority.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
    else:
        host, _, port = value.partition(":")
        rest = ":" + port if port else ""
    if rest and not re.fullmatch(r":[0-9]{0,5}", rest):
        return None
    if rest[1:] and int(rest[1:]) > 65535:
        return None
    host = host.rstrip(".")
    if not host or not re.fullmatch(r"[a-z0-9._:%-]+", host):
        return None
    return host


_ALLOWED_VALUES_KEPT = 256


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BrowserPolicy:
    def __init__(self, config: HangupConfig, listen_host: str) -> None:
        names = {n.lower().rstrip(".") for n in config.listen.allowed_hosts}
        self._any_host = "*" in names
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self._names = {n for n in names if not n.startswith("*")} | {listen_host.lower()}
        origins = config.cors.allowed_origins
        self._any_origin = "*" in origins
        self._origins = {o.lower().rstrip("/") for o in origins}
        self.relay_upstream_headers = config.cors.relay_upstream_headers
        # Host values already found allowed: a client sends the same one on every request, and
        # parsing it (ipaddress, two regexes) cost ~12 us a request. Bounded: a client cycling
        # through made-up hosts only ever fills it with refusals, which are not kept.
        self._allowed_values: set[str] = set()

    def host_allowed(self, host: str) -> bool:
        return (
            self._any_host
            or _is_ip(host)
            or host == "localhost"
            or host in self._names
            or host.endswith((".localhost", *self._suffixes))
        )

    def origin_allowed(self, origin: str) -> bool:
        return self._any_origin or origin.lower().rstrip("/") in self._origins

    def check_host(self, request: web.Request) -> None:
        values = request.headers.getall("host", [])
        if len(values) > 1:
            raise MisdirectedRequest("more than one Host header")
        self._check_host_values(values)
        # Only now may `request.url` be built: aiohttp builds it from the Host value with
        # yarl, which raises (a 500 and an ERROR traceback) on `localhost:99999`.
        if request.raw_path[:1] != "/" and request.url.is_absolute():
            self._check_host_values([request.host])  # an absolute-form target names its own host

    def _check_host_values(self, values: list[str]) -> None:
        for value in values:
            if value in self._allowed_values:
                continue
            host = host_name(value)
            if host is None or not self.host_allowed(host):
                raise MisdirectedRequest(
                    "this Host is not served here (add it to listen.allowed_hosts)"
                )
            if len(self._allowed_values) < _ALLOWED_VALUES_KEPT:
                self._allowed_values.add(value)

    def check_origin(self, request: web.Request) -> str | None:
        """The request's allowed Origin, None without one; refuse others."""
        origins = request.headers.getall("origin", [])
        if not origins:
            return None
        if len(origins) == 1 and self.origin_allowed(origins[0]):
            return origins[0]
        raise OriginNotAllowed(
            "requests from web pages are refused unless their origin is in cors.allowed_origins"
        )


def preflight_response(request: web.Request, origin: str) -> web.Response:
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": _PREFLIGHT_METHODS,
        "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE_S,
        "Vary": "Origin",
    }
    asked = request.headers.get("access-control-request-headers", "")
    if asked and len(asked) <= 1024 and _HEADER_LIST.fullmatch(asked.strip()):
        headers["Access-Control-Allow-Headers"] = asked.strip()
    return web.Response(status=204, headers=headers)


def refusal(policy: BrowserPolicy, request: web.Request) -> web.StreamResponse | None:
    """The answer to a request a browser must not get through (a Host not served, an Origin
    not allowed), or to a CORS preflight; None for a request to serve."""
    # The usual request: one Host value already found allowed, an origin-form target, no
    # Origin, not OPTIONS. What `checked_refusal` finds for it (None), without its calls and
    # lists (tests/test_browser_refusal.py draws requests and compares the two).
    headers = request.headers
    hosts = headers.getall("host", ())
    if (
        len(hosts) == 1
        and hosts[0] in policy._allowed_values
        and "origin" not in headers
        and request.raw_path[:1] == "/"
        and request.method != "OPTIONS"
    ):
        return None
    return checked_refusal(policy, request)


def checked_refusal(policy: BrowserPolicy, request: web.Request) -> web.StreamResponse | None:
    """`refusal`, every check made."""
    try:
        policy.check_host(request)
        origin = policy.check_origin(request)
    except ProxyError as err:
        return refuse(request, err)
    if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
        if origin is None:
            return refuse(request, OriginNotAllowed("a CORS preflight without an Origin"))
        return preflight_response(request, origin)
    return None


def fix_cors_headers(
    policy: BrowserPolicy, request: web.Request, response: web.StreamResponse
) -> None:
    """Before any response goes out: no upstream CORS grants unless configured, and ours for
    an allowed origin."""
    if response.status == 204 and "Access-Control-Allow-Methods" in response.headers:
        return  # our own preflight answer
    # The names joined and lowered in one step (C), searched at once: almost no answer has an
    # Access-Control-* field, and the per-name loop is for those that do (a superset check:
    # a name that starts so always shows as "\naccess-control-" here).
    if (
        not policy.relay_upstream_headers
        and "\naccess-control-" in "\n".join(("", *response.headers)).lower()
    ):
        for name in [n for n in response.headers if n.lower().startswith("access-control-")]:
            response.headers.popall(name, None)
    origin = request.headers.get("origin")
    if origin is not None and policy.origin_allowed(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
