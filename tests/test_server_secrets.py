"""No key ever reaches a log line or /metrics.

Keys are planted everywhere a key can be: the upstream's server-side `api_key` (through an
environment variable), `auth.keys`, `metrics.bearer_token`, the client's Authorization (right
and wrong), the client's own provider-key headers, Proxy-Authorization, and a key pasted into
the model field. Then the real process, at DEBUG level, serves traffic that takes every path
that logs something: completions streamed and not, 401s, 404, 400, 413, heads over aiohttp's
line limit (its parser logs the offending line), upstream 429 and 500,
an in-band upstream error, an upstream reset, a client that hangs up, an idle timeout, scrapes
with and without the token, and a drain on SIGTERM. Every byte the process wrote, and every
scrape, is then searched for every key.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from proxy.sim import SimulatedProvider, key_fingerprint
from tests.cli_support import HangupProcess, sim_config, wait_ready, write_config

UPSTREAM_KEY = "sk-proj-PLANTEDupstreamKey7f3a9c01"
PROXY_KEY = "hk-PLANTEDproxyKey5b1e77d2"
WRONG_KEY = "hk-PLANTEDwrongKey88aa13f0"
SCRAPE_TOKEN = "mt-PLANTEDscrapeToken42c9e1"
CLIENT_PROVIDER_KEY = "sk-PLANTEDclientHeaderKey0d4f"
PROXY_AUTH = "PLANTEDproxyAuthorization9e2b"
MODEL_KEY = "sk-PLANTEDinTheModelField31ab"
PLANTED = [
    UPSTREAM_KEY,
    PROXY_KEY,
    WRONG_KEY,
    SCRAPE_TOKEN,
    CLIENT_PROVIDER_KEY,
    PROXY_AUTH,
    MODEL_KEY,
]


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def test_no_key_in_any_log_line_or_scrape(sim: SimulatedProvider, tmp_path: Path) -> None:
    assert sim.base_url is not None
    data = sim_config(
        sim.base_url,
        auth={"keys": [PROXY_KEY]},
        metrics={"bearer_token": SCRAPE_TOKEN},
        limits={"max_request_body_mb": 0.01},
        defaults={"include_usage": True, "timeouts": {"idle_s": 0.3}},
        logging={"level": "DEBUG", "health_checks": True},
    )
    data["upstreams"]["sim"]["api_key"] = "${HANGUP_TEST_UPSTREAM_KEY}"
    config = write_config(tmp_path / "hangup.yaml", data)
    proc = HangupProcess("--config", str(config), env={"HANGUP_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    scrapes: list[str] = []
    try:
        await proc.start()
        url = await proc.listening_url()
        await wait_ready(url)
        ok = {
            "Authorization": f"Bearer {PROXY_KEY}",
            "api-key": CLIENT_PROVIDER_KEY,
            "x-api-key": CLIENT_PROVIDER_KEY,
            "Proxy-Authorization": f"Basic {PROXY_AUTH}",
        }
        api = url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:

            async def call(
                body: Any, headers: dict[str, str], rid: str, want: int, **kw: Any
            ) -> bytes:
                async with session.post(
                    api, headers={**headers, "x-request-id": rid}, **kw, json=body
                ) as resp:
                    assert resp.status == want, (rid, resp.status, await resp.text())
                    return await resp.read()

            await call(chat("normal:tokens=5,rate=0", stream=True), ok, "stream", 200)
            await call(chat("normal:tokens=5,rate=0"), ok, "plain", 200)
            await call(chat(MODEL_KEY), ok, "model-key", 200)
            await call(chat("normal"), {}, "no-key", 401)
            await call(chat("normal"), {"Authorization": f"Bearer {WRONG_KEY}"}, "wrong", 401)
            await call(chat("error:status=429"), ok, "e429", 429)
            await call(chat("error:status=500"), ok, "e500", 500)
            await call(chat("error:status=500,after=2", stream=True), ok, "inband", 200)
            await call(chat("stall:after=1", stream=True), ok, "idle", 200)
            await call(chat("x" * 20_000), ok, "too-big", 413)
            async with session.post(
                api, data=b"{not json", headers={**ok, "content-type": "application/json"}
            ) as resp:
                assert resp.status == 400
            async with session.get(url + "/v2/nope", headers=ok) as resp:
                assert resp.status == 404
            # Heads over aiohttp's 8190-byte line limit: refused by its parser, which logs the
            # start of the offending line itself.
            for name, value in (
                ("Authorization", f"Bearer {PROXY_KEY}"),
                ("x-api-key", CLIENT_PROVIDER_KEY),
                ("Proxy-Authorization", f"Basic {PROXY_AUTH}"),
            ):
                reader, writer = await asyncio.open_connection(*url[7:].split(":"))
                writer.write(
                    f"GET /v1/models HTTP/1.1\r\nHost: h\r\n{name}: {value}{'a' * 9000}"
                    "\r\n\r\n".encode()
                )
                assert (await reader.readline()).startswith(b"HTTP/1.0 400")
                writer.close()
            try:
                await call(chat("reset:after=1", stream=True), ok, "reset", 200)
            except aiohttp.ClientPayloadError:
                pass  # the upstream reset mid-stream; the client sees the cut
            # A client that hangs up mid-stream.
            async with session.post(
                api,
                json=chat("normal:tokens=500,rate=20", stream=True),
                headers={**ok, "x-request-id": "hangs-up"},
            ) as resp:
                await resp.content.readany()
                resp.close()
            await sim.recorder.wait_closed("hangs-up", timeout=5)

            async with session.get(url + "/metrics", headers=ok) as resp:
                assert resp.status == 401  # the proxy key is not the scrape token
            async with session.get(
                url + "/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}
            ) as resp:
                assert resp.status == 200
                scrapes.append(await resp.text())

            # A stream in flight at SIGTERM, cut when the grace runs out.
            async with session.post(
                api,
                json=chat("normal:tokens=500,rate=20", stream=True),
                headers={**ok, "x-request-id": "at-shutdown"},
            ) as resp:
                await resp.content.readany()
                proc.signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await resp.read()
                except aiohttp.ClientPayloadError:
                    pass
        assert await proc.wait_exit(timeout=10) == 0
    finally:
        await proc.close()

    # The keys were really in play: the provider got the injected one.
    seen = sim.request("stream")
    assert seen is not None and seen.auth_fingerprint == key_fingerprint(UPSTREAM_KEY)
    outcomes = {ln["request_id"]: ln["outcome"] for ln in proc.access_lines() if "outcome" in ln}
    assert outcomes["idle"] == "timeout" and outcomes["hangs-up"] == "client_cancelled"
    assert outcomes["at-shutdown"] == "shutdown" and outcomes["wrong"] == "rejected"
    # The parser's refusals are one rejected access line each, without the client's bytes
    # (proxy/unparsed.py), and aiohttp logs nothing of its own about them.
    assert not [ln for ln in proc.lines if ln.get("logger") == "aiohttp.server"]
    refused = [
        ln for ln in proc.access_lines() if "could not be parsed" in str(ln.get("error", ""))
    ]
    assert [(ln["status"], ln["outcome"], ln["error"]) for ln in refused] == [
        (400, "rejected", "the request could not be parsed (LineTooLong)")
    ] * 3
    # Every request was logged (one line each), probes too (health_checks: true), at DEBUG.
    assert {
        "stream",
        "plain",
        "model-key",
        "no-key",
        "e429",
        "e500",
        "inband",
        "reset",
        "too-big",
    } <= set(outcomes)
    assert {ln["path"] for ln in proc.lines if ln.get("msg") == "probe"} >= {"/readyz", "/metrics"}
    assert any(ln.get("level") == "debug" for ln in proc.lines)

    written = bytes(proc.raw)
    for key in PLANTED:
        assert key.encode() not in written, f"{key} in the process output"
        for scrape in scrapes:
            assert key not in scrape, f"{key} in /metrics"
    # Nor a recognisable part of one (a log line cut mid-key would still leak it).
    for key in PLANTED:
        assert key[-12:].encode() not in written
