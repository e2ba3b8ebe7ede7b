"""A non-streamed answer's end goes out with its last chunk (proxy/downstream.py
`_pump_body`), and the relay's close of the answer (`SSERelay._relayed`) writes no second end:
one awaited client write, for the body and its end (the head, held for it, is only serialized
before: `ClientWrites._commit` times no client wait for it)."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from proxy.client_writes import ClientGone, ClientWrites
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
from tests.metrics_support import make_record
from tests.support import make_config


async def test_a_whole_answer_is_written_in_one_write_after_its_head(
    sim: SimulatedProvider, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[object] = []
    client_io = ClientWrites._client_io

    async def counted(self: ClientWrites, write: object) -> None:
        writes.append(write)
        await client_io(self, write)  # type: ignore[arg-type]

    monkeypatch.setattr(ClientWrites, "_client_io", counted)
    server, sink = await start_proxy(make_config(sim.base_url))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat("normal:tokens=3", stream=False),
            headers={"x-request-id": "whole"},
        ) as response,
    ):
        assert response.status == 200
        body = await response.json()
    assert body["usage"]["completion_tokens"] == 3
    record = await sink.wait_for("whole")
    assert record.outcome is not None and record.outcome.value == "completed"
    assert record.bytes_to_client > 0
    # The body's `write_eof(data)` only: the head, held for it, is only serialized by
    # `prepare` (awaited without `_client_io`'s timing: nothing waits for the client there).
    assert [getattr(w, "__qualname__", "") for w in writes] == ["StreamResponse.write_eof"]


class _HeldHead(web.StreamResponse):
    _send_headers_immediately = False

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(status=200)
        self.error = error

    async def prepare(self, request: object) -> None:
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("held", [True, False])
async def test_a_held_heads_commit_is_not_timed_as_a_client_wait(held: bool) -> None:
    """`_commit` of a head held for the first write (`downstream._OneWriteResponse`) awaits
    its `prepare` without `_client_io`: no client wait is timed (the clock is not read)."""
    reads: list[float] = []

    def clock() -> float:
        reads.append(1.0)
        return float(len(reads))

    pending = _HeldHead(None)
    pending._send_headers_immediately = not held
    exchange = SimpleNamespace(
        response=None, _pending=pending, record=make_record(), request=None, plan=None
    )
    exchange.clock = clock
    exchange._client_io = lambda write: ClientWrites._client_io(exchange, write)
    assert await ClientWrites._commit(exchange) is pending
    assert exchange.record.status == 200
    assert len(reads) == (0 if held else 2)
    assert exchange.record.client_wait_s == (0.0 if held else 1.0)


async def test_a_held_heads_commit_that_fails_is_a_client_gone() -> None:
    """Should a hook's write fail in a held head's `prepare`, the client is gone, as a
    write's failure through `_client_io` says."""
    exchange = SimpleNamespace(
        response=None,
        _pending=_HeldHead(ConnectionResetError("gone")),
        record=make_record(),
        request=None,
        plan=None,
        clock=lambda: 7.0,
    )
    with pytest.raises(ClientGone):
        await ClientWrites._commit(exchange)
    assert exchange.record.client_gone_at == 7.0
