"""Shared pieces of the resilience tests: a route with a fallback over two simulators, and a
client that returns what it got."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import HangupConfig
from proxy.sim import SimulatedProvider
from proxy.sim.records import RequestRecord as SimRequest
from tests.support import config_from, wait_until

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


class ThreadedSim:
    """A simulated provider on its own event loop in its own thread.

    In-process simulators share the proxy's event loop, so when the proxy does work right after
    closing a socket (relaying a hedge winner), the simulator only sees the close once that work
    is done: the measurement would charge the proxy's relaying to the close. On its own loop the
    simulator observes the close as a separate process would (CLOCK_MONOTONIC throughout).
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim", daemon=True)
        self.sim = SimulatedProvider(tokens_per_s=200.0, default_tokens=16)

    def __enter__(self) -> ThreadedSim:
        # Two threads share the GIL; at the default 5 ms switch interval the simulator could
        # wait that long to run at all. A process of its own would not wait: 0.1 ms is closer.
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0001)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        sys.setswitchinterval(self._switch)

    def record(self, request_id: str) -> SimRequest | None:
        """A snapshot read from another thread: the records are only appended to."""
        return self.sim.recorder.get(request_id)

    async def wait(
        self, request_id: str, probe: Callable[[SimRequest], bool], what: str
    ) -> SimRequest:
        found: list[SimRequest] = []

        def check() -> bool:
            rec = self.record(request_id)
            if rec is not None and probe(rec):
                found.append(rec)
                return True
            return False

        await wait_until(check, 5.0, what)
        return found[0]
