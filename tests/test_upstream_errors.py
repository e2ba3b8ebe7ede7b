"""The upstream seam's error mapping: what an attempt raises (`AttemptFailed`: a result for the
failover policy, an error for the client) when real loopback sockets misbehave: a refused
connect, a server that hangs up without answering, one that answers garbage, one that cuts its
body short; and that other exceptions are named by type only."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest

from proxy.attempts import AttemptResult
from proxy.errors import UpstreamFailed, UpstreamUnreachable
from proxy.outcome import Outcome
from proxy.upstream import Upstreams
from proxy.upstream_errors import AttemptFailed, map_open_error
from tests.hostile_support import ScriptedUpstreams, SeenRequest, send_and_close
from tests.upstream_support import open_attempt


async def _open_failure(upstreams: Upstreams, url: str) -> AttemptFailed:
    attempt = open_attempt(upstreams, url)
    try:
        with pytest.raises(AttemptFailed) as caught:
            await attempt.start()
    finally:
        await attempt.close()
    return caught.value


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once this closes


async def test_a_refused_connect_is_unreachable_and_its_address_goes_to_the_log_only(
    upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    port = _dead_port()
    with caplog.at_level(logging.WARNING, logger="hangup.upstream"):
        failed = await _open_failure(upstreams, f"http://127.0.0.1:{port}/v1/x")
    err = failed.error
    assert failed.result is AttemptResult.CONNECT_ERROR  # never reached: safe to try elsewhere
    assert isinstance(err, UpstreamUnreachable)
    assert (err.status, err.code, err.outcome) == (
        502,
        "upstream_unreachable",
        Outcome.UPSTREAM_ERROR,
    )
    # The client learns which upstream and why, by errno; not where it lives.
    assert err.message == 'cannot connect to upstream "primary": Connection refused'
    assert [r.getMessage() for r in caplog.records] == [
        f'cannot connect to upstream "primary" (127.0.0.1:{port}): Connection refused'
    ]


@pytest.fixture
async def silent_close(scripted: ScriptedUpstreams) -> str:
    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        pass  # hang up without a byte

    return (await scripted.start(reply)).base_url + "/x"


@pytest.fixture
async def garbage(scripted: ScriptedUpstreams) -> str:
    return (await scripted.start(send_and_close(b"NOT HTTP AT ALL\r\n\r\n"))).base_url + "/x"


@pytest.fixture
async def cut_body(scripted: ScriptedUpstreams) -> str:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    return (await scripted.start(send_and_close(head + b"only ten b"))).base_url + "/x"


async def test_a_close_without_a_response_is_a_reset(
    upstreams: Upstreams, silent_close: str
) -> None:
    failed = await _open_failure(upstreams, silent_close)
    assert failed.result is AttemptResult.RESET
    assert isinstance(failed.error, UpstreamFailed) and failed.error.code == "upstream_failed"
    assert failed.error.message == 'upstream "primary" closed the connection without a response'


async def test_an_invalid_response_is_an_invalid_response(
    upstreams: Upstreams, garbage: str
) -> None:
    failed = await _open_failure(upstreams, garbage)
    assert failed.result is AttemptResult.INVALID_RESPONSE
    assert isinstance(failed.error, UpstreamFailed)
    assert failed.error.message == 'upstream "primary" sent an invalid HTTP response'


async def test_a_body_cut_short_is_a_stream_error(upstreams: Upstreams, cut_body: str) -> None:
    attempt = open_attempt(upstreams, cut_body)
    try:
        response = await attempt.start()
        assert response.status == 200  # the headers were fine: the body read fails
        with pytest.raises(AttemptFailed) as caught:
            while await response.read():
                pass
    finally:
        attempt.abort()
    assert caught.value.result is AttemptResult.STREAM_ERROR
    err = caught.value.error
    assert isinstance(err, UpstreamFailed) and err.status == 502
    assert err.message.startswith('upstream "primary" response was cut off (')


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (aiohttp.ClientPayloadError("x"), "connection failed: ClientPayloadError"),
        (ConnectionResetError(104, "reset"), "connection failed: ConnectionResetError"),
        (aiohttp.ClientOSError(5, "sk-secret-in-text"), "connection failed: ClientOSError"),
    ],
)
def test_other_failures_name_only_the_exception_type(exc: Exception, message: str) -> None:
    failed = map_open_error(exc, "primary")
    assert failed.result is AttemptResult.RESET
    assert failed.error.message == f'upstream "primary" {message}'
    assert "sk-secret" not in failed.error.message  # an exception's text never reaches a client
