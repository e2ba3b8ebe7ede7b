"""Inbound auth: a sidecar that injects a provider key must not become an open relay.

The rules, each proven over real sockets against the simulated provider (which records a
fingerprint of the bearer token it received, never the token):

- an upstream with a server-side `api_key` on a non-loopback listener: clients must present one
  of `auth.keys`; without keys the proxy refuses to start, unless
  `auth.allow_unauthenticated: true` says so explicitly;
- on a loopback-only listener no key is needed (only the pod or host can reach it);
- `auth.keys` set: always required, and the proxy key never reaches the provider;
- no server-side key and no `auth.keys`: the client's own Authorization passes through.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.__main__ import main
from proxy.app import create_app
from proxy.auth import Auth
from proxy.config import HangupConfig
from proxy.sim import SimulatedProvider, key_fingerprint
from proxy.state import STATE
from tests.support import RecordSink, config_from, serving

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
PROXY_KEYS = ["hangup-key-one-0123456789", "hangup-key-two-9876543210"]
CHAT = {"model": "normal:tokens=2,rate=0", "messages": [{"role": "user", "content": "hi"}]}

Serve = Callable[..., Awaitable[tuple[str, RecordSink]]]


def config(sim_url: str, *, api_key: str | None = None, **top: Any) -> HangupConfig:
    upstream: dict[str, Any] = {"base_url": sim_url}
    if api_key is not None:
        upstream["api_key"] = api_key
    return config_from(
        {
            "upstreams": {"sim": upstream},
            "routes": [{"name": "default", "upstream": "sim"}],
            **top,
        }
    )


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """The app with handler cancellation (as in production), bound to loopback, while `Auth`
    is told the listener is `listen_host`: a test can check the rules for 0.0.0.0 without
    exposing a port to the network."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(cfg: HangupConfig, listen_host: str) -> tuple[str, RecordSink]:
            app = create_app(cfg, listen_host=listen_host)
            sink = RecordSink()
            app[STATE].listeners.append(sink)
            port = await stack.enter_async_context(serving(app, handler_cancellation=True))
            return f"http://127.0.0.1:{port}", sink

        yield start


async def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/v1/chat/completions", json=CHAT, headers=headers or {}
        ) as resp:
            return resp.status, await resp.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_injected_key_behind_non_loopback_requires_a_proxy_key(
    sim: SimulatedProvider, serve: Serve
) -> None:
    assert sim.base_url is not None
    cfg = config(sim.base_url, api_key=UPSTREAM_KEY, auth={"keys": PROXY_KEYS})
    url, sink = await serve(cfg, "0.0.0.0")
    refused = [
        {},
        bearer("not-a-key"),
        {"Authorization": f"Basic {PROXY_KEYS[0]}"},
        {"Authorization": "Bearer "},
        bearer(PROXY_KEYS[0] + "x"),
        {"api-key": PROXY_KEYS[0]},  # keys are accepted as bearer tokens only
    ]
    for headers in refused:
        status, body = await post(url, headers)
        assert status == 401, headers
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
    assert sim.requests == [], "a refused request reached the provider"
    assert [r.outcome.value for r in sink.records if r.outcome] == ["rejected"] * len(refused)

    # Either key, any case of the scheme; client-sent provider keys are dropped too.
    for i, headers in enumerate(
        [
            bearer(PROXY_KEYS[0]),
            {"Authorization": f"bearer {PROXY_KEYS[1]}", "api-key": "c", "x-api-key": "d"},
        ]
    ):
        status, _ = await post(url, {**headers, "x-request-id": f"ok-{i}"})
        assert status == 200
        seen = sim.request(f"ok-{i}")
        assert seen is not None
        assert seen.auth_fingerprint == key_fingerprint(UPSTREAM_KEY)
        assert "api-key" not in seen.headers and "x-api-key" not in seen.headers


async def test_injected_key_without_keys_is_refused_on_non_loopback(
    sim: SimulatedProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sim.base_url is not None
    cfg = config(sim.base_url, api_key=UPSTREAM_KEY)
    for host in ("0.0.0.0", "::", "10.1.2.3", "hangup.internal"):
        problem = Auth.startup_problem(cfg, host)
        assert problem is not None and problem.startswith("auth.keys: an upstream injects")
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert Auth.startup_problem(cfg, host) is None

    # The CLI refuses before binding (in-process is safe: it returns before listening).
    path = tmp_path / "hangup.yaml"
    path.write_text(
        f"upstreams:\n  sim:\n    base_url: {sim.base_url}\n    api_key: {UPSTREAM_KEY}\n"
        "routes:\n  - name: default\n    upstream: sim\n"
    )
    assert main(["run", "--config", str(path), "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "auth.keys: an upstream injects a server-side api_key" in err
    assert "0.0.0.0 is not loopback-only" in err
    assert UPSTREAM_KEY not in err


async def test_explicit_open_relay_is_allowed(sim: SimulatedProvider, serve: Serve) -> None:
    assert sim.base_url is not None
    cfg = config(sim.base_url, api_key=UPSTREAM_KEY, auth={"allow_unauthenticated": True})
    assert Auth.startup_problem(cfg, "0.0.0.0") is None
    url, _ = await serve(cfg, "0.0.0.0")
    status, _ = await post(url, {"x-request-id": "open"})
    assert status == 200
    seen = sim.request("open")
    assert seen is not None and seen.auth_fingerprint == key_fingerprint(UPSTREAM_KEY)


async def test_loopback_listener_needs_no_key_and_hides_the_clients(
    sim: SimulatedProvider, serve: Serve
) -> None:
    assert sim.base_url is not None
    url, _ = await serve(config(sim.base_url, api_key=UPSTREAM_KEY), "127.0.0.1")
    status, _ = await post(url, {"x-request-id": "anon"})
    assert status == 200
    # A client that sends its own key still gets the injected one used, never its own.
    status, _ = await post(url, {**bearer("sk-client-own"), "x-request-id": "own"})
    assert status == 200
    for rid in ("anon", "own"):
        seen = sim.request(rid)
        assert seen is not None and seen.auth_fingerprint == key_fingerprint(UPSTREAM_KEY)


async def test_proxy_keys_never_reach_a_provider_without_injection(
    sim: SimulatedProvider, serve: Serve
) -> None:
    assert sim.base_url is not None
    url, _ = await serve(config(sim.base_url, auth={"keys": PROXY_KEYS}), "127.0.0.1")
    assert (await post(url))[0] == 401  # keys configured: required even on loopback
    status, _ = await post(url, {**bearer(PROXY_KEYS[1]), "x-request-id": "k"})
    assert status == 200
    seen = sim.request("k")
    assert seen is not None and not seen.auth_present


async def test_without_injection_or_keys_the_clients_key_passes_through(
    sim: SimulatedProvider, serve: Serve
) -> None:
    assert sim.base_url is not None
    cfg = config(sim.base_url)
    assert Auth.startup_problem(cfg, "0.0.0.0") is None  # nothing of ours to give away
    url, _ = await serve(cfg, "0.0.0.0")
    status, _ = await post(url, {**bearer("sk-client-own"), "x-request-id": "pass"})
    assert status == 200
    seen = sim.request("pass")
    assert seen is not None and seen.auth_fingerprint == key_fingerprint("sk-client-own")


async def test_probes_need_no_key_and_metrics_its_own_token(
    sim: SimulatedProvider, serve: Serve
) -> None:
    assert sim.base_url is not None
    cfg = config(
        sim.base_url,
        api_key=UPSTREAM_KEY,
        auth={"keys": PROXY_KEYS},
        metrics={"bearer_token": "scrape-token-123"},
    )
    url, _ = await serve(cfg, "0.0.0.0")
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(url + path) as resp:
                assert resp.status == 200, path
        async with session.get(url + "/metrics", headers=bearer(PROXY_KEYS[0])) as resp:
            assert resp.status == 401  # a client key is not a scrape token
        async with session.get(url + "/metrics", headers=bearer("scrape-token-123")) as resp:
            assert resp.status == 200
