"""The mapping of aiohttp's client exceptions to the proxy's errors (`map_open_error`,
`map_body_error`), fed with the exceptions real sockets raise: a refused connect, a server
that hangs up without answering, one that answers garbage, one that cuts its body short."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.errors import ProxyError, UpstreamFailed, UpstreamUnreachable
from proxy.outcome import Outcome
from proxy.upstream import BODY_ERRORS, OPEN_ERRORS, map_body_error, map_open_error

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(reply: Reply) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reply(reader, writer)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
    finally:
        server.close()
        await server.wait_closed()


async def _open_error(url: str) -> Exception:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url) as response:
                await response.read()
        except OPEN_ERRORS as exc:
            return exc
    raise AssertionError("the request did not fail")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once this closes


async def test_a_refused_connect_is_unreachable_and_its_address_goes_to_the_log_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _dead_port()
    exc = await _open_error(f"http://127.0.0.1:{port}/v1/x")
    assert isinstance(exc, aiohttp.ClientConnectorError)
    with caplog.at_level(logging.WARNING, logger="hangup.upstream"):
        err = map_open_error(exc, "primary")
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
async def silent_close() -> AsyncIterator[str]:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass  # hang up without a byte

    async for url in _serve(reply):
        yield url


@pytest.fixture
async def garbage() -> AsyncIterator[str]:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async for url in _serve(reply):
        yield url


@pytest.fixture
async def cut_body() -> AsyncIterator[str]:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()

    async for url in _serve(reply):
        yield url


async def test_a_close_without_a_response_is_upstream_failed(silent_close: str) -> None:
    exc = await _open_error(silent_close)
    assert isinstance(exc, aiohttp.ServerDisconnectedError)
    err = map_open_error(exc, "primary")
    assert isinstance(err, UpstreamFailed) and err.code == "upstream_failed"
    assert err.message == 'upstream "primary" closed the connection without a response'


async def test_an_invalid_response_is_upstream_failed(garbage: str) -> None:
    exc = await _open_error(garbage)
    assert isinstance(exc, aiohttp.ClientResponseError)
    err = map_open_error(exc, "primary")
    assert isinstance(err, UpstreamFailed)
    assert err.message == 'upstream "primary" sent an invalid HTTP response'


async def test_a_body_cut_short_maps_through_map_body_error(cut_body: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(cut_body) as response:
        assert response.status == 200  # the headers were fine: the body read fails
        with pytest.raises(BODY_ERRORS) as caught:
            await response.read()
    err = map_body_error(caught.value, "primary")
    assert isinstance(err, UpstreamFailed) and err.status == 502
    assert err.message.startswith('upstream "primary" response was cut off (')
    assert type(caught.value).__name__ in err.message


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (aiohttp.ClientPayloadError("x"), "connection failed: ClientPayloadError"),
        (ConnectionResetError(104, "reset"), "connection failed: ConnectionResetError"),
        (ValueError("sk-secret-in-text"), "request failed: ValueError"),
    ],
)
def test_other_failures_name_only_the_exception_type(exc: Exception, message: str) -> None:
    err = map_open_error(exc, "primary")
    assert isinstance(err, ProxyError)
    assert err.message == f'upstream "primary" {message}'
    assert "sk-secret" not in err.message  # an exception's text never reaches the client
