"""The runner whose server makes guarded connections (`GuardedRequestHandler`,
proxy/edge/connections.py), and the aiohttp handler settings the guard relies on.

It relies on aiohttp internals (`AppRunner._make_server`, the server's `_kwargs`); the tests in
tests/test_hostile_connections.py fail if an aiohttp upgrade moves them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.config import ConnectionsConfig
from proxy.edge.capacity import ConnectionGuard
from proxy.edge.connections import GuardedRequestHandler
from proxy.edge.gate import UnroutedAnswered


class GuardedServer(web.Server):
    """aiohttp's low-level server, making `GuardedRequestHandler`s."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        # aiohttp keeps the RequestHandler settings it was given in `_kwargs`.
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server makes guarded connections."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            UnroutedAnswered(self.app),
            request_factory=plain.request_factory,
            guard=self.guard,
            **self._kwargs,
        )


def handler_kwargs(config: ConnectionsConfig) -> dict[str, Any]:
    """The aiohttp `RequestHandler` settings the guard relies on."""
    return {
        "keepalive_timeout": config.keepalive_timeout_s,
        # After an early answer (401, 413, 415, 408...) close instead of reading the rest of
        # the body for up to 10 s (aiohttp's lingering close).
        "lingering_time": 0,
        # Never inflate on the event loop: bodies arrive as sent; proxy/edge/body.py decides.
        "auto_decompress": False,
    }
