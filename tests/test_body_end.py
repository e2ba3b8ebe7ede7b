"""A non-streamed answer's end goes out with its last chunk (proxy/downstream.py
`_pump_body`), and the relay's close of the answer (`SSERelay._relayed`) writes no second end:
one awaited client write for the head and one for the body and its end."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.client_writes import ClientWrites
from proxy.sim import SimulatedProvider
from tests.conftest import StartProxy, chat
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
    # The head's `prepare`, then the body's `write_eof(data)`: nothing more awaited.
    assert [getattr(w, "__qualname__", "") for w in writes] == [
        "StreamResponse.prepare",
        "StreamResponse.write_eof",
    ]
