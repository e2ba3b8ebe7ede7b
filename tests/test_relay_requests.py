"""What crosses the proxy on the way in: bodies (large, over the limit, non-JSON), ids and
headers, and the OpenAI-shaped answers to requests the proxy refuses."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import socket
from collections.abc import Iterable

import aiohttp
import pytest
from aiohttp import web

from proxy import relay
from proxy.outcome import Outcome
from proxy.request_body import RequestBody, release_in_turns
from proxy.routing import Router
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.support import config_from, make_config, serving

CHAT = "/v1/chat/completions"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def test_a_prompt_far_above_aiohttp_s_1_mib_default_is_relayed(
    sim: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[RequestBody] = []

    def release_in_turns_seen(
        loop: asyncio.AbstractEventLoop, bodies: Iterable[RequestBody]
    ) -> None:
        bodies = list(bodies)
        released.extend(bodies)
        release_in_turns(loop, bodies)

    monkeypatch.setattr(relay, "release_in_turns", release_in_turns_seen)
    server, sink = await start_proxy(make_config(sim.base_url))
    body = chat("normal:tokens=3", stream=False)
    body["messages"] = [{"role": "user", "content": "word " * (4 * 1024 * 1024)}]  # 20 MiB
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            data=io.BytesIO(raw),
            headers={"content-type": "application/json", "x-request-id": "big"},
        ) as response:
            assert response.status == 200
    request = await sim.wait_finished("big", timeout=10.0)
    assert request.body_bytes == len(raw)
    assert (await sink.wait_for("big")).bytes_from_client == len(raw)
    # The relay handed the large body it ended holding to be freed in turns (one per loop
    # iteration): the request's, the primary target's and the attempt's, here one object.
    assert len(released) == 3 and all(body is released[0] for body in released)
    assert len(released[0]) == len(raw)


async def test_a_body_over_the_limit_is_refused_413_before_any_upstream_work(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    config = config_from(
        {
            "upstreams": {"sim": {"base_url": sim.base_url}},
            "routes": [{"name": "default", "upstream": "sim"}],
            "limits": {"max_request_body_mb": 1},
        }
    )
    server, sink = await start_proxy(config)
    raw = b'{"model":"m","prompt":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}/v1/completions",
            data=io.BytesIO(raw),
            headers={"content-type": "application/json", "x-request-id": "too-big"},
        ) as response:
            assert response.status == 413
            error = (await response.json())["error"]
    assert error["code"] == "request_too_large" and "max_request_body_mb" in error["message"]
    assert (await sink.wait_for("too-big")).outcome is Outcome.REJECTED
    assert sim.request("too-big") is None


async def test_multipart_uploads_pass_through_byte_identical(start_proxy: StartProxy) -> None:
    # A transcription endpoint that reads the whole upload and says what it got.
    received: dict[str, str] = {}

    async def transcribe(request: web.Request) -> web.Response:
        body = await request.read()
        received["content-type"] = request.headers["content-type"]
        return web.json_response(
            {"text": "ok", "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
        )

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    async with serving(app) as port:
        server, sink = await start_proxy(make_config(f"http://127.0.0.1:{port}/v1"))
        audio = bytes(range(256)) * 8192  # 2 MiB of every byte value
        boundary = "hangup-test-boundary"
        upload = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
                f'whisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
            ).encode()
            + audio
            + f"\r\n--{boundary}--\r\n".encode()
        )
        content_type = f"multipart/form-data; boundary={boundary}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.base_url}/v1/audio/transcriptions",
                data=io.BytesIO(upload),
                headers={"content-type": content_type, "x-request-id": "upload"},
            ) as response:
                assert response.status == 200
                answer = await response.json()
        assert answer["bytes"] == len(upload)
        assert answer["sha256"] == hashlib.sha256(upload).hexdigest()
        assert received["content-type"] == content_type
        record = await sink.wait_for("upload")
        assert record.outcome is Outcome.COMPLETED and record.endpoint == "other"


async def test_request_ids_and_headers(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    server, _ = await start_proxy(make_config(sim.base_url))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat("normal:tokens=2", stream=False),
            headers={
                "x-request-id": "mine-1",
                "x-custom": "kept",
                "Connection": "x-hop",
                "x-hop": "dropped",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "TE": "trailers",
                "Keep-Alive": "timeout=5",
                "x-hangup-timeout": "30",
            },
        ) as response:
            assert response.headers["x-request-id"] == "mine-1"
            assert "1.1 hangup" in response.headers.getall("via")
        async with session.post(
            f"{server.base_url}{CHAT}", json=chat("normal:tokens=2", stream=False)
        ) as response:
            generated = response.headers["x-request-id"]
            assert len(generated) == 32
    seen = {k.lower(): v for k, v in (await sim.wait_request("mine-1")).headers.items()}
    assert seen["x-request-id"] == "mine-1" and seen["x-custom"] == "kept"
    for hop in ("x-hop", "proxy-authorization", "te", "x-hangup-timeout", "keep-alive"):
        assert hop not in seen, hop
    assert (await sim.wait_request(generated)).request_id == generated


async def test_refusals_are_openai_shaped(sim: SimulatedProvider, start_proxy: StartProxy) -> None:
    config = config_from(
        {
            "upstreams": {"sim": {"base_url": sim.base_url}},
            "routes": [{"name": "only-gpt", "match": {"model": "gpt-*"}, "upstream": "sim"}],
        }
    )
    server, sink = await start_proxy(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens once this closes
    dead, _ = await start_proxy(make_config(f"http://127.0.0.1:{dead_port}/v1"))
    cases = [
        (server.base_url, CHAT, b"{not json", 400, "invalid_request"),
        (
            server.base_url,
            CHAT,
            json.dumps(chat("claude", stream=False)).encode(),
            404,
            "not_found",
        ),
        (server.base_url, "/v2/models", b"{}", 404, "not_found"),
        (
            dead.base_url,
            CHAT,
            json.dumps(chat("m", stream=False)).encode(),
            502,
            "upstream_unreachable",
        ),
    ]
    async with aiohttp.ClientSession() as session:
        for base, path, raw, status, code in cases:
            async with session.post(
                f"{base}{path}", data=raw, headers={"content-type": "application/json"}
            ) as response:
                assert response.status == status, (path, status)
                assert response.content_type == "application/json"
                error = (await response.json())["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["code"] == code
    outcomes = [r.outcome for r in sink.records]
    assert outcomes.count(Outcome.REJECTED) == 3


async def test_a_bug_of_ours_is_a_plain_500_and_a_logged_traceback(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception the proxy did not expect: the client gets an OpenAI-shaped 500 naming the
    request id, never the exception or its traceback; the log gets the traceback at ERROR."""
    server, sink = await start_proxy(make_config(sim.base_url))

    def broken_match(self: Router, path: str, model: str | None) -> None:
        raise RuntimeError("boom: sk-planted-in-the-exception")

    monkeypatch.setattr(Router, "match", broken_match)
    with caplog.at_level(logging.ERROR):
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.base_url}{CHAT}",
                json=chat("normal:tokens=2", stream=False),
                headers={"x-request-id": "our-bug"},
            ) as response:
                assert response.status == 500
                raw = await response.text()
        record = await sink.wait_for("our-bug")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and "our-bug" in error["message"]
    for leak in ("Traceback", "boom", "sk-planted", "RuntimeError"):
        assert leak not in raw, leak
    assert record.outcome is Outcome.INTERNAL_ERROR
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(logged) == 1 and "our-bug" in logged[0].getMessage()
    assert sim.request("our-bug") is None  # it failed before anything was sent upstream
