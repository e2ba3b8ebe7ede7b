"""End to end over real sockets: client -> hangup -> Debian's nginx -> the simulator as SGLang.

nginx runs with `proxy_ignore_client_abort on` and `proxy_buffering on`: when hangup closes its
connection, nginx keeps reading the answer from the engine, so the engine never learns that
anyone left. That is the case a socket close cannot reach. For a *stream* those two directives
are not enough: nginx closes the upstream at its next failed write to the client, unless it is
also storing or caching the answer (nginx src/http/ngx_http_upstream.c, "downstream error":
`if (!u->cacheable && !u->store && u->peer.connection) finalize`). So streams go through a
second location that adds `proxy_store`, a buffering intermediary that reads every answer to
the end; non-streamed requests use the two directives alone (nginx writes nothing to the client
before the answer is complete, so it never notices). Without `engine: sglang` generation
runs on after the hang-up (counted at the simulator); with it, hangup's abort (through the same
nginx) reaches the engine for the right rid within 50 ms and generation stops there. For
streamed and non-streamed requests, and for a deadline that fires.

nginx is started per test module on a free port with its own temporary prefix and config;
scripts/test installs it (`apt-get install nginx-light`); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.outcome import EngineAbort, Outcome, TimeoutKind
from proxy.sim import SimulatedProvider
from proxy.sim.records import RequestRecord as SimRecord
from tests.conftest import StartProxy
from tests.support import RawClient, config_from, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test)")

CHAT = "/v1/chat/completions"
ABORT_BOUND_S = 0.05
DEADLINE_S = 0.4
# Long enough that only an abort ends it during a test; fast enough to count many tokens.
LONG = "normal:tokens=100000,rate=1000"
FINITE = "normal:tokens=800,rate=1000"  # the control: 0.8 s of generation, all of it runs

_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream engine {{
        server 127.0.0.1:{upstream_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 120s;
        # The intermediary the issue names: the client's close is not passed on, and the
        # answer is buffered.
        proxy_ignore_client_abort on;
        proxy_buffering on;
        location / {{
            proxy_pass http://engine;
        }}
        # The same, storing each answer: nginx then reads every answer to its end even after
        # a failed write to its client (the case of streams).
        location /store/ {{
            root {prefix}/stored;
            proxy_store on;
            proxy_pass http://engine/;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Nginx:
    """One nginx process in front of `upstream_port`, with its own prefix directory."""

    def __init__(self, prefix: Path, upstream_port: int) -> None:
        self.prefix, self.upstream_port = prefix, upstream_port
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    def url(self, *, store: bool) -> str:
        return f"http://127.0.0.1:{self.port}{'/store' if store else ''}/v1"

    async def start(self) -> Nginx:
        assert NGINX is not None
        for _ in range(3):  # a port picked free may be taken before nginx binds it
            self.port = _free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(
                _CONF.format(prefix=self.prefix, port=self.port, upstream_port=self.upstream_port)
            )
            self.process = await asyncio.create_subprocess_exec(
                NGINX,
                "-p",
                f"{self.prefix}/",
                "-c",
                str(conf),
                "-e",
                str(self.prefix / "error.log"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            process = self.process

            def up(process: asyncio.subprocess.Process = process) -> bool:
                return process.returncode is not None or _accepts(self.port)

            try:
                await wait_until(
                    up,
                    5.0,
                    "nginx listening",
                )
            except AssertionError:
                await self.stop()
                raise
            if process.returncode is None:
                return self
        log = (self.prefix / "error.log").read_text(errors="replace")
        raise RuntimeError(f"nginx did not start:\n{log[-2000:]}")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def sglang() -> AsyncIterator[SimulatedProvider]:
    # The default close semantics: here it is nginx that never passes the close on.
    async with SimulatedProvider(engine="sglang", tokens_per_s=1000.0) as sim:
        yield sim


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "nginx"
    (path / "stored").mkdir(parents=True)
    yield path


@pytest.fixture
async def nginx(sglang: SimulatedProvider, prefix: Path) -> AsyncIterator[Nginx]:
    assert sglang.base_url is not None
    upstream_port = int(sglang.base_url.rsplit(":", 1)[1].split("/")[0])
    server = await Nginx(prefix, upstream_port).start()
    try:
        yield server
    finally:
        await server.stop()


def config(nginx: Nginx, engine: str, *, store: bool, **route: Any) -> Any:
    """Streams through the storing location (see the module docstring)."""
    return config_from(
        {
            "upstreams": {"engine": {"base_url": nginx.url(store=store), "engine": engine}},
            "routes": [{"name": "default", "upstream": "engine", **route}],
        }
    )


def chat(model: str, *, stream: bool) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def generating(sim: SimulatedProvider, request_id: str, tokens: int = 20) -> SimRecord:
    """The engine's record once it has generated `tokens` tokens of the request."""
    rec = await sim.wait_request(request_id)
    await wait_until(lambda: rec.progress.generated >= tokens, 2.0, f"{tokens} tokens")
    return rec


async def hang_up(
    proxy_port: int, sim: SimulatedProvider, request_id: str, model: str, *, stream: bool
) -> tuple[SimRecord, float, int]:
    """Start a request through hangup and nginx, let the engine generate, then hang up.
    Returns the engine's record, the hang-up time and the tokens generated by then."""
    client = await RawClient.connect("127.0.0.1", proxy_port)
    await client.post_json(CHAT, chat(model, stream=stream), {"x-request-id": request_id})
    rec = await generating(sim, request_id)
    closed_at = client.close()
    return rec, closed_at, rec.progress.generated


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_without_engine_setting_generation_runs_on_behind_nginx(
    sglang: SimulatedProvider, nginx: Nginx, start_proxy: StartProxy, stream: bool
) -> None:
    server, sink = await start_proxy(config(nginx, "generic", store=stream))
    _, _, at_hang_up = await hang_up(server.port, sglang, "ctl", FINITE, stream=stream)
    record = await sink.wait_for("ctl")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.cancel_propagation_s is not None  # hangup closed its socket to nginx...
    done = await sglang.wait_finished("ctl", timeout=5.0)
    # ...but nginx kept the engine's connection, and the engine generated to the end.
    assert done.peer_closed_at is None and done.end == "completed"
    assert done.progress.generated == 800
    assert 800 - at_hang_up > 500, at_hang_up  # tokens generated after the hang-up
    assert sglang.abort_calls == [] and record.engine_abort is None


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_with_engine_sglang_the_abort_reaches_the_engine_through_nginx(
    sglang: SimulatedProvider, nginx: Nginx, start_proxy: StartProxy, stream: bool
) -> None:
    server, sink = await start_proxy(config(nginx, "sglang", store=stream))
    rec, closed_at, at_hang_up = await hang_up(server.port, sglang, "abt", LONG, stream=stream)
    call = await sglang.wait_abort_call(timeout=1.0)
    lag = call.at - closed_at
    assert lag < ABORT_BOUND_S, f"the abort reached the engine {lag * 1000:.1f} ms after hang-up"
    assert rec.engine_id is not None and call.ids == [rec.engine_id] == call.stopped
    done = await sglang.wait_finished("abt", timeout=2.0)
    assert done.end == "aborted" and done.peer_closed_at is None  # nginx never closed
    assert done.progress.generated == done.generated_at_abort  # not one token after the abort
    after = done.progress.generated - at_hang_up
    assert after <= lag * 1000 + 5, after  # at 1000 tok/s: the tokens of the abort's lag
    record = await sink.wait_for("abt")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.engine_request_id == rec.engine_id
    assert record.engine_abort is EngineAbort.ACKNOWLEDGED


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("engine", ["generic", "sglang"])
async def test_a_deadline_that_fires_behind_nginx(
    sglang: SimulatedProvider, nginx: Nginx, start_proxy: StartProxy, engine: str, stream: bool
) -> None:
    """total_s fires: the client gets its 504 (or, mid-stream, the in-band timeout error)
    either way; only with `engine: sglang` does the engine stop (within 50 ms of the
    deadline)."""
    timeouts = {"total_s": DEADLINE_S, "connect_s": None, "headers_s": None}
    server, sink = await start_proxy(config(nginx, engine, store=stream, timeouts=timeouts))
    model = LONG if engine == "sglang" else FINITE
    request_id = f"dl-{engine}-{stream}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{CHAT}",
            json=chat(model, stream=stream),
            headers={"x-request-id": request_id},
        ) as response:
            body = await response.read()
    if stream:
        assert response.status == 200 and b"total_timeout" in body
    else:
        assert response.status == 504
    record = await sink.wait_for(request_id, timeout=3.0)
    assert record.outcome is Outcome.TIMEOUT and record.timeout_kind is TimeoutKind.TOTAL
    deadline_at = record.started_at + DEADLINE_S  # loop.time() is time.monotonic()
    rec = sglang.request(request_id)
    assert rec is not None
    if engine == "generic":
        done = await sglang.wait_finished(request_id, timeout=5.0)
        assert done.end == "completed" and done.progress.generated == 800
        assert sglang.abort_calls == [] and record.engine_abort is None
        return
    call = await sglang.wait_abort_call(timeout=1.0)
    assert 0 <= call.at - deadline_at < ABORT_BOUND_S, call.at - deadline_at
    assert call.stopped == [rec.engine_id]
    done = await sglang.wait_finished(request_id, timeout=2.0)
    assert done.end == "aborted" and done.progress.generated == done.generated_at_abort
    assert done.peer_closed_at is None  # nginx never passed the close on
    assert record.engine_abort is EngineAbort.ACKNOWLEDGED
    # With 1000 tok/s for DEADLINE_S and the abort's lag: far below the 100000 it would make.
    assert done.progress.generated < (DEADLINE_S + ABORT_BOUND_S) * 1000 + 50
