"""Hostile clients over raw sockets against the production runner: compressed bodies, early
answers, `100 Continue`, connection deadlines, oversized heads and the connection cap.

Every test asserts the exact status, that no ERROR line was logged, and one access line for
each request that was made (a connection closed before its head was complete made none)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.server import ProxyServer
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy
from tests.connection_support import (
    CHAT,
    Conn,
    access_lines,
    big_bomb,
    errors_in,
    gzipped,
    head,
    hostile_config,
)

BODY = json.dumps(CHAT).encode()


@pytest.fixture(autouse=True)
async def _capture(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    caplog.set_level(logging.INFO)
    yield
    await Conn.close_all()


def clean_log(caplog: pytest.LogCaptureFixture, requests: int) -> list[dict[str, Any]]:
    assert errors_in(caplog.records) == []
    lines = access_lines(caplog.records)
    assert len(lines) == requests, lines
    return lines


async def start(start_proxy: StartProxy, sim: SimulatedProvider, **sections: Any) -> ProxyServer:
    assert sim.base_url is not None
    server, _ = await start_proxy(hostile_config(sim.base_url, **sections))
    return server


# --- compressed request bodies --------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, gzip"])
async def test_an_encoded_body_is_refused_before_it_is_read(
    encoding: str,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await start(start_proxy, sim)
    bomb = big_bomb(64)
    conn = await Conn.open(server.port)
    # Only the head and a first slice: the answer must not wait for the rest.
    await conn.send(head(length=len(bomb), extra={"Content-Encoding": encoding}) + bomb[:1024])
    response = await conn.response()
    assert response.status == 415
    assert response.error()["code"] == "unsupported_content_encoding"
    assert response.header("x-should-retry") == "false"
    await conn.eof()  # closed at once: the rest of the body is never read
    assert sim.requests == []
    (line,) = clean_log(caplog, 1)
    assert line["status"] == 415 and line["outcome"] == "rejected"


async def test_an_accepted_encoding_is_inflated_and_sent_on_plain(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(start_proxy, sim, route={"request_encodings": ["gzip", "deflate"]})
    conn = await Conn.open(server.port)
    bodies = {"gzip": gzipped(BODY), "deflate": zlib.compress(BODY)}
    for name, encoded in bodies.items():
        await conn.send(head(length=len(encoded), extra={"Content-Encoding": name}) + encoded)
        response = await conn.response()
        assert response.status == 200, response.body
    assert [r.body for r in sim.requests] == [CHAT, CHAT]
    lines = clean_log(caplog, 2)
    assert [line["bytes_in"] for line in lines] == [len(b) for b in bodies.values()]


async def test_large_compressed_bodies_get_the_answers_of_plain_ones(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A body inflating past 1 MiB is scanned as it inflates and parsed in steps, as a plain
    one (`proxy/edge/body.py`, `proxy/array_cut.py`): the upstream gets it whole, and invalid
    UTF-8 or JSON gets the error the whole parse gives."""
    from proxy.request_fields import read_fields

    server = await start(start_proxy, sim, route={"request_encodings": ["gzip"]})
    conn = await Conn.open(server.port)
    # (random enough to stay under limits.max_inflate_ratio)
    long_text = {**CHAT, "messages": [{"role": "user", "content": random.randbytes(1 << 20).hex()}]}
    many = {**CHAT, "messages": [{"role": "user", "content": f"a short one {random.random()}"}
                                 for _ in range(40_000)]}  # fmt: skip
    plain = [json.dumps(chat).encode() for chat in (long_text, many)]
    for body in plain:
        encoded = gzipped(body)
        await conn.send(head(length=len(encoded), extra={"Content-Encoding": "gzip"}) + encoded)
        response = await conn.response()
        assert response.status == 200, response.body
    # (the simulator keeps no body this large: its size, and the model the route went by)
    assert [r.body_bytes for r in sim.requests] == [len(body) for body in plain]
    bad_json = json.dumps(many).encode()[:-30] + b"},]}"
    with pytest.raises(Exception) as parsed:
        read_fields(bad_json)
    bad_utf8 = json.dumps(many).encode().replace(b"a short one", b"a sh\xc3rt one", 1)
    for bad, message in ((bad_json, str(parsed.value)), (bad_utf8, "not valid UTF-8")):
        encoded = gzipped(bad)
        await conn.send(head(length=len(encoded), extra={"Content-Encoding": "gzip"}) + encoded)
        response = await conn.response()
        assert response.status == 400, response.body
        assert message in response.error()["message"]
    assert len(sim.requests) == 2
    clean_log(caplog, 4)


async def test_the_matched_route_must_accept_the_encoding(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The route depends on the model inside the body: a body is inflated when some route for
    the path accepts its encoding, and refused if the route its model picks does not."""
    assert sim.base_url is not None
    routes = [
        {
            "name": "zipped",
            "upstream": "sim",
            "match": {"model": "zipped-*"},
            "request_encodings": ["gzip"],
        },
        {"name": "plain", "upstream": "sim"},
    ]
    server = await start(start_proxy, sim, routes=routes)
    conn = await Conn.open(server.port)
    encoded = gzipped(BODY)  # model "normal:...": the "plain" route
    await conn.send(head(length=len(encoded), extra={"Content-Encoding": "gzip"}) + encoded)
    response = await conn.response()
    assert response.status == 415
    assert response.error()["code"] == "unsupported_content_encoding"
    assert sim.requests == []
    (line,) = clean_log(caplog, 1)
    assert line["route"] == "plain"


@pytest.mark.parametrize(
    ("inflated_mb", "limit_mb", "bound"),
    [(512, 64, "max_inflate_ratio"), (3, 2, "max_request_body_mb")],
    ids=["ratio", "size"],
)
async def test_a_body_inflating_past_a_bound_gets_413_and_a_closed_connection(
    inflated_mb: int,
    limit_mb: float,
    bound: str,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits: dict[str, Any] = {"max_request_body_mb": limit_mb}
    if bound == "max_request_body_mb":
        limits["max_inflate_ratio"] = 100_000  # only the size bound can fire
    server = await start(start_proxy, sim, route={"request_encodings": ["deflate"]}, limits=limits)
    bomb = big_bomb(inflated_mb)
    conn = await Conn.open(server.port)
    await conn.send(head(length=len(bomb), extra={"Content-Encoding": "deflate"}) + bomb)
    response = await conn.response()
    assert response.status == 413
    assert bound in response.error()["message"]
    assert sim.requests == []
    if bound == "max_inflate_ratio":
        await conn.eof()  # most of the body is unread: closed, never drained
        clean_log(caplog, 1)
    else:
        # The whole (small) wire body was read before the bound fired: the connection is
        # still in step and may carry the next request.
        await conn.send(head(length=len(BODY)) + BODY)
        assert (await conn.response()).status == 200
        clean_log(caplog, 2)


async def test_invalid_gzip_is_a_400(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(start_proxy, sim, route={"request_encodings": ["gzip"]})
    bad = gzipped(BODY)[:-12] + b"garbage-tail"
    conn = await Conn.open(server.port)
    await conn.send(head(length=len(bad), extra={"Content-Encoding": "gzip"}) + bad)
    response = await conn.response()
    assert response.status == 400
    assert "not valid gzip" in response.error()["message"]
    assert sim.requests == []
    clean_log(caplog, 1)


# --- early answers and 100 Continue ---------------------------------------------------------


async def test_an_early_401_closes_instead_of_reading_the_body(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(start_proxy, sim, auth={"keys": ["right-key"]})
    conn = await Conn.open(server.port)
    await conn.send(head(length=50_000_000, extra={"Authorization": "Bearer wrong"}) + b"{")
    response = await conn.response()
    assert response.status == 401
    await conn.eof()
    clean_log(caplog, 1)


async def test_a_client_still_sending_its_body_reads_the_early_answer(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing with unread bytes would make the kernel reset the connection, and a client
    that sends its whole body before reading would see "connection reset", not the 401.
    hangup lingers (FIN, discard unread, close) for connections.linger_s."""
    server = await start(start_proxy, sim, auth={"keys": ["right-key"]})
    body = b"x" * (16 * 1024 * 1024)
    conn = await Conn.open(server.port)
    began = time.monotonic()
    await conn.send(head(length=len(body), extra={"Authorization": "Bearer wrong"}) + body)
    response = await conn.response()
    assert response.status == 401
    await conn.eof()
    assert time.monotonic() - began < 1.5
    clean_log(caplog, 1)


# More than the kernel's socket buffers on both ends hold (~7 MiB on loopback, measured): a
# server that stops reading leaves a client that sends it all before reading blocked.
_OVER_BUFFERS = 40 * 1024 * 1024


def _early_answer(case: str) -> tuple[dict[str, Any], bytes, dict[str, str], int]:
    """Sections, body, headers and status of an answer given before the body is read."""
    if case == "401-before-reading":
        auth = {"auth": {"keys": ["right-key"]}}
        return auth, b"x" * _OVER_BUFFERS, {"Authorization": "Bearer wrong"}, 401
    # 413 partway: after the first step of a bomb (aiohttp has paused reading by then, its
    # body buffer full while the step was being inflated).
    sections: dict[str, Any] = {"route": {"request_encodings": ["deflate"]}}
    return sections, big_bomb(_OVER_BUFFERS // 1024), {"Content-Encoding": "deflate"}, 413


EARLY_ANSWERS = ["401-before-reading", "413-while-inflating"]


@pytest.mark.parametrize("case", EARLY_ANSWERS)
async def test_after_an_early_answer_the_rest_of_the_body_is_discarded_not_left_unread(
    case: str, sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends its whole body before it reads (most do) finishes sending and
    reads the answer: hangup discards what arrives after it answered, then closes. (It once
    left reading paused: the client blocked on a full socket buffer for good.)"""
    sections, body, extra, status = _early_answer(case)
    connections = {"linger_s": 10.0}  # time enough to take it all, even on a busy machine
    server = await start(start_proxy, sim, connections=connections, **sections)
    conn = await Conn.open(server.port)
    try:
        await asyncio.wait_for(conn.send(head(length=len(body), extra=extra) + body), 8)
    except TimeoutError:
        pytest.fail("the body's send never finished: hangup answered, then stopped reading")
    response = await conn.response()
    assert response.status == status
    await conn.eof()  # FIN right after the answer; the client sent nothing more
    clean_log(caplog, 1)


@pytest.mark.parametrize("case", EARLY_ANSWERS)
async def test_a_client_that_never_stops_sending_after_an_early_answer_is_cut_off(
    case: str, sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The discarding is bounded by connections.linger_s: then the connection is closed,
    however long the client goes on sending."""
    sections, body, extra, status = _early_answer(case)
    linger_s = 0.5
    server = await start(start_proxy, sim, connections={"linger_s": linger_s}, **sections)
    conn = await Conn.open(server.port)
    answer = asyncio.create_task(conn.response(timeout=10))
    junk = bytes(1024 * 1024)
    began = time.monotonic()
    try:
        async with asyncio.timeout(linger_s + 5):
            await conn.send(head(length=len(body), extra=extra) + body)
            while True:  # past the body: more bytes, as long as the connection takes them
                await conn.send(junk)
    except ConnectionError:
        pass
    except TimeoutError:
        pytest.fail(f"still connected {linger_s + 5:g}s on: the discard was never bounded")
    cut_off = time.monotonic() - began
    assert (await answer).status == status  # read before the close
    assert cut_off < linger_s + 3, cut_off
    clean_log(caplog, 1)


async def test_100_continue_is_sent_only_after_auth(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(start_proxy, sim, auth={"keys": ["right-key"]})
    expect = {"Expect": "100-continue"}
    refused = await Conn.open(server.port)
    await refused.send(head(length=len(BODY), extra={**expect, "Authorization": "Bearer no"}))
    first = await refused.response()
    assert first.status == 401  # not 100: the body was never invited
    await refused.eof()
    admitted = await Conn.open(server.port)
    key = {**expect, "Authorization": "Bearer right-key"}
    await admitted.send(head(length=len(BODY), extra=key))
    assert (await admitted.response()).status == 100
    await admitted.send(BODY)
    assert (await admitted.response()).status == 200
    too_big = await Conn.open(server.port)
    await too_big.send(head(length=10**10, extra=key))
    assert (await too_big.response()).status == 413
    clean_log(caplog, 3)


# --- deadlines ------------------------------------------------------------------------------

FAST = {"header_timeout_s": 0.4, "keepalive_timeout_s": 0.4, "body_timeout_s": 0.4}


@pytest.mark.parametrize("kept_alive", [False, True], ids=["first-request", "kept-alive"])
async def test_a_slow_head_gets_408_on_its_deadline(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    kept_alive: bool,
) -> None:
    """header_timeout_s runs from accept for a connection's first head, and from the first
    byte of each later head on a kept-alive connection (armed once a read leaves it open)."""
    server = await start(start_proxy, sim, connections=FAST)
    conn = await Conn.open(server.port)
    if kept_alive:
        await conn.send(head(length=len(BODY)) + BODY)
        assert (await conn.response()).status == 200
    began = time.monotonic()
    await conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a header line every 0.1 s: progress, but never a complete head
        await asyncio.sleep(0.1)
        await conn.send(b"X-Slow: a\r\n")
    response = await conn.response()
    took = await conn.eof() - began
    assert response.status == 408
    assert "header_timeout_s" in response.error()["message"]
    assert 0.35 < took < 1.5
    clean_log(caplog, 1 if kept_alive else 0)  # no request was made: its head never completed


async def test_a_kept_alive_slow_head_outlives_the_keepalive_timeout(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's keep-alive timer stays armed across requests and fires while a later head
    is arriving: from a head's first byte the connection is not idle, so it gets its 408 on
    header_timeout_s, not a quiet close on keepalive_timeout_s."""
    connections = {"header_timeout_s": 0.9, "keepalive_timeout_s": 0.2}
    server = await start(start_proxy, sim, connections=connections)
    conn = await Conn.open(server.port)
    await conn.send(head(length=len(BODY)) + BODY)
    assert (await conn.response()).status == 200
    began = time.monotonic()
    await conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(4):  # through the keep-alive deadline, never a complete head
        await asyncio.sleep(0.1)
        await conn.send(b"X-Slow: a\r\n")
    response = await conn.response()
    took = await conn.eof() - began
    assert response.status == 408
    assert "header_timeout_s" in response.error()["message"]
    assert 0.85 < took < 2.0
    clean_log(caplog, 1)


async def test_silent_and_idle_connections_are_closed_on_their_deadlines(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # Different deadlines, so each close is known to come from its own.
    connections = {"header_timeout_s": 0.3, "keepalive_timeout_s": 0.9}
    server = await start(start_proxy, sim, connections=connections)
    silent = await Conn.open(server.port)
    kept = await Conn.open(server.port)
    began = time.monotonic()
    await kept.send(head(length=len(BODY)) + BODY)
    assert (await kept.response()).status == 200
    answered = time.monotonic()
    silent_closed = await silent.eof()  # sent nothing: header_timeout_s from accept
    kept_closed = await kept.eof()  # idle after a response: keepalive_timeout_s
    assert 0.25 < silent_closed - began < 0.8
    assert 0.85 < kept_closed - answered < 1.8
    clean_log(caplog, 1)


@pytest.mark.parametrize("pace", ["stalled", "trickle"])
async def test_a_slow_body_gets_408_on_its_deadline(
    pace: str,
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    connections = {**FAST, "body_min_rate_bytes_s": 1000}
    server = await start(start_proxy, sim, connections=connections)
    conn = await Conn.open(server.port)
    began = time.monotonic()
    await conn.send(head(length=len(BODY)) + BODY[:10])

    async def trickle() -> None:
        for i in range(10, len(BODY)):  # 1 byte per 50 ms: never silent 0.4 s, 20 B/s
            await asyncio.sleep(0.05)
            await conn.send(BODY[i : i + 1])

    feeder = asyncio.create_task(trickle()) if pace == "trickle" else None
    try:
        response = await conn.response()
    finally:
        if feeder is not None:
            feeder.cancel()
    took = time.monotonic() - began
    assert response.status == 408
    key = "body_timeout_s" if pace == "stalled" else "body_min_rate_bytes_s"
    assert key in response.error()["message"]
    assert 0.35 < took < 1.6
    assert sim.requests == []
    (line,) = clean_log(caplog, 1)
    assert line["status"] == 408


async def test_a_head_over_max_head_kb_gets_431(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(start_proxy, sim, connections={"max_head_kb": 4})
    fits = await Conn.open(server.port)
    await fits.send(head(length=len(BODY), extra={"X-Pad": "a" * 3000}) + BODY)
    assert (await fits.response()).status == 200
    # In one piece, and dribbled in many pieces of well-formed header lines (each under
    # aiohttp's own 8 KiB line limit).
    for pieces in (1, 40):
        data = head(length=len(BODY), extra={f"X-Pad-{i}": "b" * 100 for i in range(40)})
        conn = await Conn.open(server.port)
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            conn.writer.write(data[i : i + step])
            await conn.writer.drain()
        response = await conn.response()
        assert response.status == 431
        assert "max_head_kb" in response.error()["message"]
        await conn.eof()
    clean_log(caplog, 1)


@pytest.mark.parametrize("behind", [True, False], ids=["third-behind", "last"])
async def test_a_pipelined_head_over_max_head_kb_gets_431_and_stops_the_connection(
    sim: SimulatedProvider,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    behind: bool,
) -> None:
    """A head behind a request in progress escapes the byte count of the head phase; it is
    measured once parsed: parsing stops, it is answered 431 in turn, then the connection
    closes (a third request behind it is never read). Also when it is the second and last
    head of the read (the first one was counted: only the others are measured)."""
    server = await start(start_proxy, sim, connections={"max_head_kb": 4})
    conn = await Conn.open(server.port)
    big = head(length=len(BODY), extra={f"X-Pad-{i}": "b" * 100 for i in range(60)}) + BODY
    small = head(length=len(BODY)) + BODY
    await conn.send(small + big + (small if behind else b""))
    assert (await conn.response()).status == 200
    refused = await conn.response()
    assert refused.status == 431
    assert refused.error()["code"] == "request_header_fields_too_large"
    await conn.eof()
    assert len(sim.requests) == 1
    assert [line["status"] for line in clean_log(caplog, 2)] == [200, 431]


# --- the connection cap ---------------------------------------------------------------------


async def test_over_the_cap_requests_get_503_and_probes_still_answer(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    connections = {"max_connections": 2, "probe_headroom": 1, "header_timeout_s": 30}
    server = await start(start_proxy, sim, connections=connections)
    # Two connections in the middle of a request body: busy, not reclaimable.
    busy = [await Conn.open(server.port) for _ in range(2)]
    for conn in busy:
        await conn.send(head(length=len(BODY)) + BODY[:5])
    await asyncio.sleep(0.05)
    over = await Conn.open(server.port)
    await over.send(head(length=len(BODY)) + BODY)
    refused = await over.response()
    assert refused.status == 503
    assert refused.error()["code"] == "too_many_connections"
    assert refused.header("x-should-retry") == "true"
    await over.eof()
    probe = await Conn.open(server.port)
    await probe.send(head("/healthz", method="GET"))
    assert (await probe.response()).status == 200
    await probe.eof()  # one request per connection over the cap
    # The cap frees as the busy requests finish.
    for conn in busy:
        await conn.send(BODY[5:])
        assert (await conn.response()).status == 200
    clean_log(caplog, 3)  # two relayed, one refused (probes are not logged)


async def test_idle_keepalive_connections_give_way_to_new_ones(
    sim: SimulatedProvider, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    connections = {"max_connections": 2, "probe_headroom": 1, "header_timeout_s": 30}
    server = await start(start_proxy, sim, connections=connections)
    idle = [await Conn.open(server.port) for _ in range(2)]
    for conn in idle:
        await conn.send(head(length=len(BODY)) + BODY)
        assert (await conn.response()).status == 200
    fresh = await Conn.open(server.port)
    await fresh.send(head(length=len(BODY)) + BODY)
    assert (await fresh.response()).status == 200  # served: the oldest idle one was closed
    await idle[0].eof()
    clean_log(caplog, 3)
