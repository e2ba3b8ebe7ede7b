"""Inbound authentication: who may use this proxy.

A sidecar that injects a server-side provider key must not become an open relay: when any
upstream has an `api_key`, clients must present one of `auth.keys` as a bearer token, unless
the listener is loopback-only or `auth.allow_unauthenticated: true` says otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress

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


class Auth:
    def __init__(self, config: HangupConfig, *, listen_host: str | None = None) -> None:
        self._keys = tuple(k.get_secret_value().encode() for k in config.auth.keys)
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

    def check(self, request: web.Request) -> bool:
        """Raise Unauthorized if required and missing; True when the client's Authorization
        carried a proxy key (it must then not be forwarded)."""
        if not self._keys:
            if self._refuse_all:
                raise Unauthorized("this proxy requires an API key")
            return False
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer token: send Authorization: Bearer <hangup key>")
        # surrogateescape: non-UTF-8 bytes (kept by aiohttp as lone surrogates) are a wrong key.
        presented = token.strip().encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(presented, key) for key in self._keys):
            raise Unauthorized("invalid API key for this proxy")
        return True
