"""Inbound authentication: who may use this proxy.

A sidecar that injects a server-side provider key must not become an open relay: when any
upstream has an `api_key`, clients must present one of `auth.keys` as a bearer token, unless
the listener is loopback-only or `auth.allow_unauthenticated: true` says otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from aiohttp import web

from proxy.config import HangupConfig
from proxy.errors import Unauthorized


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_relay(config: HangupConfig, listen_host: str) -> bool:
    """An injected provider key, reachable beyond loopback, by anyone: what we refuse."""
    injects_key = any(u.api_key is not None for u in config.upstreams.values())
    return (
        injects_key
        and not config.auth.keys
        and not config.auth.allow_unauthenticated
        and not _is_loopback(listen_host)
    )


# The client name of every request when the proxy asks for no key.
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the client name (never the key) and whether the client's
    Authorization carried a key for this proxy (it must then not be forwarded)."""

    name: str
    used_proxy_key: bool


class Auth:
    def __init__(self, config: HangupConfig, *, listen_host: str | None = None) -> None:
        self._keys = tuple(
            (entry.key.get_secret_value().encode(), Caller(entry.name, used_proxy_key=True))
            for entry in config.auth.keys
        )
        self._anonymous = Caller(ANONYMOUS, used_proxy_key=False)
        host = config.listen.host if listen_host is None else listen_host
        # startup_problem() stops the CLI in this case; an app built another way refuses all.
        self._refuse_all = _open_relay(config, host)

    @staticmethod
    def startup_problem(config: HangupConfig, listen_host: str) -> str | None:
        """Why this config must not start on this listener, or None."""
        if _open_relay(config, listen_host):
            return (
                f"auth.keys: an upstream injects a server-side api_key and the listener "
                f"{listen_host} is not loopback-only: set auth.keys (bearer tokens clients must "
                f"present) or auth.allow_unauthenticated: true"
            )
        return None

    def client_names(self) -> tuple[str, ...]:
        """Every name `identify` can return: the configured clients, or "anonymous"."""
        if not self._keys:
            return (ANONYMOUS,)
        return tuple(caller.name for _, caller in self._keys)

    def identify(self, request: web.Request) -> Caller:
        """The caller, by the proxy key it presented; Unauthorized if one is required and
        missing or unknown."""
        if not self._keys:
            if self._refuse_all:
                raise Unauthorized("this proxy requires an API key")
            return self._anonymous
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            # Worded so the log's secret redaction (which blanks the word after "Bearer ")
            # leaves it readable.
            raise Unauthorized(
                "missing API key: this proxy wants one of its auth.keys in the Authorization "
                "header (scheme Bearer)"
            )
        # surrogateescape: non-UTF-8 bytes (kept by aiohttp as lone surrogates) are a wrong key.
        presented = token.strip().encode("utf-8", "surrogateescape")
        found: Caller | None = None
        for key, caller in self._keys:
            # Every key is compared (no early exit), so timing does not tell which one matched.
            if hmac.compare_digest(presented, key) and found is None:
                found = caller
        if found is None:
            raise Unauthorized("invalid API key for this proxy")
        return found
