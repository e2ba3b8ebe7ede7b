"""Shared pieces of the resilience tests: a route with a fallback over two simulators, and a
client that returns what it got."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from proxy.config import HangupConfig
from proxy.sim import SimulatedProvider
from proxy.sim.records import RequestRecord as SimRequest
from tests.support import config_from

CHAT = "/v1/chat/completions"
BACKUP_MODEL = "backup-model"


def fallback_config(
    primary: SimulatedProvider,
    backup: SimulatedProvider,
    *,
    fallback: dict[str, Any] | None = None,
    **route: Any,
) -> HangupConfig:
    """Route "chat": upstream "primary", falling back to "backup" asked for BACKUP_MODEL."""
    assert primary.base_url is not None and backup.base_url is not None
    route.setdefault("circuit_failures", 0)  # each test sees its own failures only
    return config_from(
        {
            "upstreams": {
                "primary": {"base_url": primary.base_url},
                "backup": {"base_url": backup.base_url},
            },
            "routes": [
                {
                    "name": "chat",
                    "upstream": "primary",
                    "fallbacks": [fallback or {"upstream": "backup", "model": BACKUP_MODEL}],
                    **route,
                }
            ],
        }
    )


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def events(self) -> list[dict[str, Any]]:
        """The JSON data events of an SSE body."""
        out = []
        for line in self.body.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(json.loads(line[6:]))
        return out

    def json(self) -> dict[str, Any]:
        obj = json.loads(self.body)
        assert isinstance(obj, dict)
        return obj

    def text(self) -> str:
        """The assistant text of a stream or a plain answer."""
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            parts = []
            for event in self.events():
                for choice in event.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
            return "".join(parts)
        return str(self.json()["choices"][0]["message"]["content"])


async def post(
    base: str, body: dict[str, Any], request_id: str, headers: dict[str, str] | None = None
) -> Answer:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}{CHAT}",
            json=body,
            headers={"x-request-id": request_id, **(headers or {})},
        ) as response:
            data = await response.read()
            return Answer(
                response.status, {k.lower(): v for k, v in response.headers.items()}, data
            )


def seen(sim: SimulatedProvider, request_id: str) -> list[SimRequest]:
    """The requests with this id the simulator received (one per attempt it saw)."""
    return [r for r in sim.requests if r.request_id == request_id]
