"""`hangup --loop`: which event loop the CLI runs on (asyncio by default, uvloop on request)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.__main__ import loop_factory
from proxy.sim import SimulatedProvider
from tests.cli_support import HangupProcess, sim_config, write_config


def test_loop_factory_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    assert loop_factory("asyncio") is None
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("auto") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(ImportError):
        loop_factory("uvloop")


def _mapped(pid: int, needle: str) -> bool:
    return needle in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_the_cli_serves_on_the_chosen_loop(
    loop: str, sim: SimulatedProvider, tmp_path: Path
) -> None:
    assert sim.base_url is not None
    config = write_config(tmp_path / "hangup.yaml", sim_config(sim.base_url))
    proc = HangupProcess("--config", str(config), "--loop", loop)
    await proc.start()
    try:
        url = await proc.listening_url()
        body = {"model": "normal:tokens=3", "stream": True, "messages": [{"role": "user"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert text.rstrip().endswith("data: [DONE]")
        # uvloop's compiled loop is mapped into the process only when it is the one running.
        assert _mapped(proc.pid, "uvloop/loop.") is (loop == "uvloop")
        line = await proc.wait_line(
            lambda ln: ln.get("logger") == "hangup.access", 10, "the access line"
        )
        assert line["outcome"] == "completed", json.dumps(line)
    finally:
        await proc.close()
