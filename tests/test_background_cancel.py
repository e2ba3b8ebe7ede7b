"""Responses API `background: true`: closing the stream's socket stops nothing at the provider,
so hangup cancels the job itself (`POST {upstream}/responses/{id}/cancel`) when the client
leaves or the route's deadline fires, and records what came of it.

Against the simulated provider, whose background jobs run in their own task and whose cancel
endpoint stops generation before it answers; a small trap upstream (below) answers cancels
badly on purpose. Every request goes through the production runner (`ProxyServer`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import proxy.engines.background
from proxy.outcome import BackgroundCancel, Outcome, RequestRecord, TimeoutKind
from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider, key_fingerprint
from tests.conftest import StartProxy
from tests.support import RawClient, RecordSink, access_line, config_from

RESPONSES = "/v1/responses"
CANCEL_BOUND_S = 1.0  # the bound: hang-up -> the provider records the cancel call
LONG = "normal:tokens=100000,rate=200"  # a job that will not end by itself during a test
UPSTREAM_KEY = "sk-upstream-server-side"
CLIENT_KEY = "sk-client-own-key"
_RESPONSE_ID = re.compile(rb'"type":"response\.created".*?"id":"(resp_[A-Za-z0-9_]+)"')


def background(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": "Tell me a story.",
        "stream": stream,
        "background": True,
        **extra,
    }


def sim_config(sim: SimulatedProvider, *, api_key: str | None = None, **route: Any) -> Any:
    upstream: dict[str, Any] = {"base_url": sim.base_url}
    if api_key is not None:
        upstream["api_key"] = api_key
    return config_from(
        {
            "upstreams": {"sim": upstream},
            "routes": [{"name": "default", "upstream": "sim", **route}],
        }
    )


async def open_stream(
    server: ProxyServer,
    body: dict[str, Any],
    request_id: str,
    headers: dict[str, str] | None = None,
) -> tuple[RawClient, str]:
    """Start a background stream through the proxy; return the client and the job's id (read
    from the `response.created` event the client received, as the proxy reads it)."""
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(RESPONSES, body, {"x-request-id": request_id, **(headers or {})})
    raw = await client.read_until(lambda b: _RESPONSE_ID.search(b) is not None)
    match = _RESPONSE_ID.search(raw)
    assert match is not None, raw[:500]
    return client, match.group(1).decode()


def tasks_inside(function: Any) -> list[asyncio.Task[Any]]:
    """The unfinished tasks of this loop suspended somewhere inside a call of `function`
    (walking each task's chain of awaited coroutines)."""
    code = function.__code__
    found = []
    for task in asyncio.all_tasks():
        awaited: Any = task.get_coro()
        while awaited is not None and not task.done():
            frame = getattr(awaited, "cr_frame", None)
            if frame is not None and frame.f_code is code:
                found.append(task)
                break
            awaited = getattr(awaited, "cr_await", None)
    return found


def cancel_requests(sim: SimulatedProvider, response_id: str) -> list[Any]:
    """The simulator's request records of cancel calls for this job."""
    return [r for r in sim.requests if r.path == f"/v1/responses/{response_id}/cancel"]


async def background_counter(server: ProxyServer) -> dict[tuple[str, str], float]:
    """hangup_background_cancels_total by (route, result), read from /metrics."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hangup_background_cancels_total":
                found[(sample.labels["route"], sample.labels["result"])] = sample.value
    return found


def only_record(sink: RecordSink, request_id: str) -> RequestRecord:
    records = sink.by_id(request_id)
    assert len(records) == 1, records  # recorded exactly once
    return records[0]


# --- the client hangs up ---------------------------------------------------------------------


@pytest.mark.parametrize("credentials", ["upstream_api_key", "client_authorization"])
async def test_hang_up_cancels_the_job_at_the_provider(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    credentials: str,
) -> None:
    """The provider sees the cancel call within 1 s, with the request's credentials, and the
    job stops generating; one record, one log line, one count."""
    caplog.set_level(logging.INFO, logger="hangup.access")
    if credentials == "upstream_api_key":
        server, sink = await start_proxy(sim_config(sim, api_key=UPSTREAM_KEY))
        expected_key = UPSTREAM_KEY
    else:
        server, sink = await start_proxy(sim_config(sim))
        expected_key = CLIENT_KEY
    client, response_id = await open_stream(
        server, background(LONG), "bg-hangup", {"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    await client.read_until(lambda b: b.count(b"response.output_text.delta") >= 5)
    closed_at = client.close()

    call = await sim.wait_cancel_call(response_id, timeout=CANCEL_BOUND_S)
    lag = call.at - closed_at
    assert lag < CANCEL_BOUND_S, f"cancel reached the provider {lag * 1000:.1f} ms after hang-up"
    assert call.found and call.status_before == "in_progress" and call.status_after == "cancelled"

    # Same credentials as the stream itself.
    (stream_request,) = [r for r in sim.requests if r.path == RESPONSES]
    (cancel_request,) = cancel_requests(sim, response_id)
    assert cancel_request.method == "POST"
    assert cancel_request.auth_fingerprint == key_fingerprint(expected_key)
    assert cancel_request.auth_fingerprint == stream_request.auth_fingerprint
    assert cancel_request.body_bytes == 0

    # The job stopped producing: it ended as cancelled, at the cancel call, and stays put.
    job = await sim.wait_job_done(response_id, timeout=1.0)
    assert job.status == "cancelled"
    assert job.cancelled_at is not None and job.cancelled_at - closed_at < CANCEL_BOUND_S
    assert job.tokens_generated == call.tokens_generated < 100_000
    assert job.task is not None and job.task.done()  # its generator has ended: no more tokens

    record = await sink.wait_for("bg-hangup")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.background is BackgroundCancel.CANCELLED
    assert record.background_response_id == response_id
    assert record.savings is not None and record.savings.tokens_saved > 0  # it did stop
    only_record(sink, "bg-hangup")
    assert access_line(caplog, "bg-hangup")["background"] == "cancelled"
    assert await background_counter(server) == {("default", "cancelled"): 1.0}
    assert len(sim.cancel_calls) == 1


async def test_route_timeout_cancels_the_job(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """total_s fires mid-stream on a background job: the client gets the in-band timeout error
    and the provider gets the cancel."""
    timeouts = {"total_s": 0.4, "connect_s": None, "headers_s": None, "first_token_s": None}
    server, sink = await start_proxy(sim_config(sim, timeouts=timeouts))
    sent_at = time.monotonic()
    client, response_id = await open_stream(server, background(LONG), "bg-timeout")
    raw = await client.read_until(lambda b: b"total_timeout" in b, timeout=2.0)
    assert b'data: {"error"' in raw
    client.close()

    call = await sim.wait_cancel_call(response_id, timeout=CANCEL_BOUND_S)
    assert 0.4 <= call.at - sent_at < 0.4 + CANCEL_BOUND_S
    job = await sim.wait_job_done(response_id, timeout=1.0)
    assert job.status == "cancelled"

    record = await sink.wait_for("bg-timeout")
    assert record.outcome is Outcome.TIMEOUT and record.timeout_kind is TimeoutKind.TOTAL
    assert record.background is BackgroundCancel.CANCELLED
    assert record.background_response_id == response_id
    only_record(sink, "bg-timeout")
    assert await background_counter(server) == {("default", "cancelled"): 1.0}


async def test_keep_leaves_the_job_running(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hangup.access")
    server, sink = await start_proxy(sim_config(sim, on_disconnect_background="keep"))
    body = background("normal:tokens=60,rate=200")  # ends by itself after ~0.3 s
    client, response_id = await open_stream(server, body, "bg-keep")
    await client.read_until(lambda b: b.count(b"response.output_text.delta") >= 3)
    client.close()

    record = await sink.wait_for("bg-keep")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.background is BackgroundCancel.KEPT
    assert record.background_response_id == response_id
    job = await sim.wait_job_done(response_id, timeout=2.0)
    assert job.status == "completed" and job.tokens_generated == 60
    assert sim.cancel_calls == [] and cancel_requests(sim, response_id) == []
    only_record(sink, "bg-keep")
    assert access_line(caplog, "bg-keep")["background"] == "kept"
    assert await background_counter(server) == {("default", "kept"): 1.0}


async def test_job_already_finished_before_the_hang_up(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The job can end while the stream is still being relayed: the client reads slowly (here:
    not at all, through a 4 KiB receive buffer), so the proxy is stuck writing to it while the
    provider's job, which does not wait for any reader, runs to the end. A cancel then finds
    the job finished: `already_finished`, nothing stopped."""
    server, sink = await start_proxy(sim_config(sim))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = RawClient(reader, writer)
    # 50k tokens of ~230 bytes: far more than every socket buffer on the way can hold.
    await client.post_json(
        RESPONSES, background("normal:tokens=50000,rate=0"), {"x-request-id": "bg-finished"}
    )
    # Read just far enough for the job's id, then stop reading.
    raw = await client.read_until(lambda b: _RESPONSE_ID.search(b) is not None)
    match = _RESPONSE_ID.search(raw)
    assert match is not None
    response_id = match.group(1).decode()
    job = await sim.wait_job_done(response_id, timeout=10.0)
    assert job.status == "completed"
    assert sink.by_id("bg-finished") == []  # the proxy is still relaying the stream
    client.close()

    record = await sink.wait_for("bg-finished")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.background is BackgroundCancel.ALREADY_FINISHED
    assert record.background_response_id == response_id
    (call,) = sim.cancel_calls
    assert call.status_before == "completed" and call.status_after == "completed"
    assert await background_counter(server) == {("default", "already_finished"): 1.0}


async def test_a_background_stream_whose_id_never_arrived_is_not_cancelled(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """Hang-up before `response.created`: hangup cannot name the job, so it calls nothing.
    (Here the provider has not created it yet either: slow-headers delays the job's start.)"""
    server, sink = await start_proxy(sim_config(sim))
    client = await RawClient.connect("127.0.0.1", server.port)
    await client.post_json(
        RESPONSES, background("slow-headers:delay=0.3"), {"x-request-id": "bg-no-id"}
    )
    await sim.wait_request("bg-no-id")
    client.close()
    record = await sink.wait_for("bg-no-id")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.background is None and record.background_response_id is None
    assert sim.cancel_calls == []
    assert await background_counter(server) == {}


# --- cancels that fail ------------------------------------------------------------------------


def sse_event(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"))
    return f"event: {obj['type']}\ndata: {data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class CancelAttempt:
    at: float  # time.monotonic() when the cancel request arrived
    response_id: str
    authorization: str | None


@dataclass(eq=False)
class CancelTrap:
    """An upstream whose background streams run until their client leaves, and whose cancel
    endpoint misbehaves as the job's id says (the id is `resp_<model>_<n>`):

    - `resp_500_*`: answers 500;
    - `resp_reset_*`: resets the connection (a transport error) on every attempt;
    - `resp_resetonce_*`: resets the first attempt, answers `cancelled` to the next;
    - `resp_hang_*`: never answers.

    It counts every cancel attempt, the witness for "retried exactly once"."""

    attempts: list[CancelAttempt] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> CancelTrap:
        app = web.Application()
        app.router.add_post("/v1/responses", self._stream)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def attempts_for(self, response_id: str) -> list[CancelAttempt]:
        return [a for a in self.attempts if a.response_id == response_id]

    async def wait_attempts(self, response_id: str, count: int, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.attempts_for(response_id)) < count:
                self._changed.clear()
                await self._changed.wait()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._ids += 1
        response_id = f"resp_{body['model']}_{self._ids}"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        created = {
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": response_id, "status": "queued", "background": True},
        }
        await response.write(sse_event(created))
        seq = 1
        while True:  # until the proxy closes the connection (handler_cancellation)
            delta = {"type": "response.output_text.delta", "sequence_number": seq, "delta": " w"}
            await response.write(sse_event(delta))
            seq += 1
            await asyncio.sleep(0.01)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        response_id = request.match_info["id"]
        self.attempts.append(
            CancelAttempt(time.monotonic(), response_id, request.headers.get("Authorization"))
        )
        self._changed.set()
        mode = response_id.split("_")[1]
        tries = len(self.attempts_for(response_id))
        if mode == "reset" or (mode == "resetonce" and tries == 1):
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if mode == "hang":
            await asyncio.Event().wait()  # cancelled when the proxy gives up and hangs up
        if mode == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        return web.json_response({"id": response_id, "status": "cancelled"})


@pytest.fixture
async def trap() -> AsyncIterator[CancelTrap]:
    upstream = await CancelTrap().start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def trap_config(trap: CancelTrap, sim: SimulatedProvider) -> Any:
    """Route "sim" (models normal*) to the simulator, everything else to the trap."""
    return config_from(
        {
            "upstreams": {
                "sim": {"base_url": sim.base_url},
                "trap": {"base_url": trap.url, "api_key": UPSTREAM_KEY},
            },
            "routes": [
                {"name": "sim", "upstream": "sim", "match": {"model": "normal*"}},
                {"name": "trap", "upstream": "trap"},
            ],
        }
    )


@pytest.mark.parametrize(
    ("model", "attempts", "result"),
    [
        ("500", 1, BackgroundCancel.FAILED),  # an answer, even an error, is not retried
        ("reset", 2, BackgroundCancel.FAILED),  # a transport error is retried exactly once
        ("resetonce", 2, BackgroundCancel.CANCELLED),  # ... and the retry can succeed
    ],
)
async def test_failing_cancel_is_reported_and_retried_at_most_once(
    trap: CancelTrap,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    model: str,
    attempts: int,
    result: BackgroundCancel,
) -> None:
    caplog.set_level(logging.INFO, logger="hangup.access")
    server, sink = await start_proxy(trap_config(trap, sim))
    client, response_id = await open_stream(server, background(model), f"trap-{model}")
    closed_at = client.close()
    record = await sink.wait_for(f"trap-{model}")
    assert record.outcome is Outcome.CLIENT_CANCELLED
    assert record.background is result
    assert record.background_response_id == response_id
    assert time.monotonic() - closed_at < CANCEL_BOUND_S
    tries = trap.attempts_for(response_id)
    assert len(tries) == attempts
    assert all(t.authorization == f"Bearer {UPSTREAM_KEY}" for t in tries)
    # Nothing keeps trying once the record is written: no task is still inside the cancel
    # call (a further attempt could only come from one).
    assert tasks_inside(proxy.engines.background.cancel_background) == []
    assert len(trap.attempts_for(response_id)) == attempts
    only_record(sink, f"trap-{model}")
    assert access_line(caplog, f"trap-{model}")["background"] == result.value
    assert await background_counter(server) == {("trap", result.value): 1.0}


async def test_a_hanging_cancel_is_bounded_and_blocks_no_one(
    trap: CancelTrap,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider never answers the cancel: hangup gives up after CANCEL_CALL_S (shortened
    here to 1 s, read at call time), records `failed`, and requests in flight meanwhile run as
    fast as without it."""
    bound = 1.0
    monkeypatch.setattr(proxy.engines.background, "CANCEL_CALL_S", bound)
    server, sink = await start_proxy(trap_config(trap, sim))

    async def others(tag: str) -> list[float]:
        async def one(i: int) -> float:
            started = time.monotonic()
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{server.base_url}{RESPONSES}",
                    json={"model": "normal:tokens=40,rate=400", "input": "hi", "stream": True},
                    headers={"x-request-id": f"{tag}-{i}"},
                ) as response:
                    body = await response.read()
            assert response.status == 200 and b"response.completed" in body
            return time.monotonic() - started

        return list(await asyncio.gather(*(one(i) for i in range(8))))

    baseline = await others("before")
    client, response_id = await open_stream(server, background("hang"), "trap-hang")
    closed_at = client.close()
    await trap.wait_attempts(response_id, 1)
    during = await others("during")
    assert sink.by_id("trap-hang") == []  # the cancel is still hanging while they ran
    # Had they waited on the hanging cancel, they would have taken a second longer.
    assert max(during) < max(baseline) + 0.5, (baseline, during)

    record = await sink.wait_for("trap-hang", timeout=bound + 1.0)
    gave_up_after = time.monotonic() - closed_at
    assert bound <= gave_up_after < bound + 0.5
    assert record.background is BackgroundCancel.FAILED
    assert len(trap.attempts_for(response_id)) == 1  # the bound covers both tries
    assert await background_counter(server) == {("trap", "failed"): 1.0}


# --- non-streamed background requests ---------------------------------------------------------


async def test_non_streamed_background_is_left_alone_and_polling_is_relayed(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """The queued answer comes back at once and the client goes away: the job is the client's
    to poll, so nothing is cancelled. Polling by id (plain and as a resumed stream) goes
    through the proxy and gets a record each."""
    server, sink = await start_proxy(sim_config(sim))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base_url}{RESPONSES}",
            json=background("normal:tokens=30,rate=200", stream=False),
            headers={"x-request-id": "bg-queued"},
        ) as response:
            queued = await response.json()
    # The session is closed: the client has gone away.
    assert queued["status"] == "queued" and queued["background"] is True
    response_id = queued["id"]
    record = await sink.wait_for("bg-queued")
    assert record.outcome is Outcome.COMPLETED
    assert record.background is None

    job = await sim.wait_job_done(response_id, timeout=2.0)
    assert job.status == "completed" and job.tokens_generated == 30
    assert sim.cancel_calls == []

    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{server.base_url}{RESPONSES}/{response_id}", headers={"x-request-id": "bg-poll"}
        ) as response:
            polled = await response.json()
        async with session.get(
            f"{server.base_url}{RESPONSES}/{response_id}?stream=true&starting_after=-1",
            headers={"x-request-id": "bg-resume"},
        ) as response:
            replay = await response.read()
    assert polled["id"] == response_id and polled["status"] == "completed"
    assert polled["usage"]["output_tokens"] == 30
    assert replay.count(b"event: response.output_text.delta") == 30
    assert b"event: response.completed" in replay

    for request_id in ("bg-poll", "bg-resume"):
        poll = await sink.wait_for(request_id)
        assert poll.method == "GET" and poll.path == f"{RESPONSES}/{response_id}"
        assert poll.outcome is Outcome.COMPLETED and poll.status == 200
        assert poll.route == "default" and poll.background is None
        only_record(sink, request_id)
    assert sim.cancel_calls == []
    assert await background_counter(server) == {}


async def test_the_timeout_error_is_not_held_back_by_the_cancel_call(
    trap: CancelTrap, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When total_s fires on a background stream, the client should get its in-band timeout
    error at the deadline, whatever the provider does with the cancel call that follows."""
    bound = 1.0
    monkeypatch.setattr(proxy.engines.background, "CANCEL_CALL_S", bound)
    timeouts = {"total_s": 0.3, "connect_s": None, "headers_s": None, "first_token_s": None}
    config = config_from(
        {
            "upstreams": {"trap": {"base_url": trap.url, "api_key": UPSTREAM_KEY}},
            "routes": [{"name": "trap", "upstream": "trap", "timeouts": timeouts}],
        }
    )
    server, sink = await start_proxy(config)
    sent_at = time.monotonic()
    client, _ = await open_stream(server, background("hang"), "trap-timeout")
    await client.read_until(lambda b: b"total_timeout" in b, timeout=bound + 1.0)
    late = time.monotonic() - (sent_at + 0.3)
    client.close()
    record = await sink.wait_for("trap-timeout", timeout=bound + 1.0)
    assert record.outcome is Outcome.TIMEOUT and record.background is BackgroundCancel.FAILED
    assert late < 0.1, f"the timeout error reached the client {late * 1000:.0f} ms late"


async def test_no_tokens_are_counted_saved_for_a_job_left_running(
    sim: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """With `keep` the provider generates the whole answer after the client left: nothing was
    saved, whatever the estimator expected. (The cancelled control is in the first test.)"""
    server, sink = await start_proxy(sim_config(sim, on_disconnect_background="keep"))
    client, response_id = await open_stream(server, background(LONG), "bg-keep-savings")
    await client.read_until(lambda b: b.count(b"response.output_text.delta") >= 3)
    client.close()
    record = await sink.wait_for("bg-keep-savings")
    assert record.background is BackgroundCancel.KEPT
    assert sim.jobs[response_id].status == "in_progress"  # still generating, as asked
    assert record.savings is not None
    assert record.savings.tokens_saved == 0, record.savings
