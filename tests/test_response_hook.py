"""The response hook (`app._before_response`) scrubs response headers only where secrets are
configured: without any, it takes no scrubbing step at all (decided once, at app creation),
and with some, every response's headers go through it."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proxy import secrets
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.hostile_support import chat_body, exchange_raw, request_bytes
from tests.support import config_from


async def _scrubs_a_response(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Mapping[str, object],
) -> int:
    """How many times one relayed answer's headers were scrubbed."""
    calls: list[int] = []
    scrub = secrets.scrub_response_headers

    def counted(scrubbed: secrets.Secrets, response: object) -> None:
        calls.append(1)
        scrub(scrubbed, response)  # type: ignore[arg-type]

    monkeypatch.setattr(secrets, "scrub_response_headers", counted)
    config = config_from(
        {
            "upstreams": {"sim": {"base_url": sim.base_url, **upstream}},
            "routes": [{"name": "default", "upstream": "sim"}],
        }
    )
    server, _ = await start_proxy(config)
    request = request_bytes("POST", "/v1/chat/completions", body=chat_body("normal:tokens=2"))
    response = await exchange_raw(server.port, request)
    assert response.status == 200
    return len(calls)


async def test_no_secret_configured_no_scrubbing_step(
    sim: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await _scrubs_a_response(sim, start_proxy, monkeypatch, {}) == 0


async def test_a_configured_secret_scrubs_every_response(
    sim: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = {"api_key": "sk-upstream-secret-0123456789"}
    assert await _scrubs_a_response(sim, start_proxy, monkeypatch, key) == 1
