"""Continuing a cut stream (opt-in, `continue_cut_streams`): a chat stream cut or stalled after
content reached the client is continued by a target that accepts an assistant prefix, and the
continuation is spliced into the client's stream. A target that refuses it never shows its
400: the client gets the in-band error it would have got without the feature."""

from __future__ import annotations

from typing import Any

from proxy.attempts import AttemptResult
from proxy.config import HangupConfig
from proxy.outcome import Outcome
from proxy.resilience.continuation import PrefixStyle, continuation_body, continuation_target
from proxy.sim import SimulatedProvider, completion_text
from tests.conftest import StartProxy, chat
from tests.resilience_support import BACKUP_MODEL, post, seen
from tests.support import config_from

WHOLE = completion_text(16)  # the simulator's whole answer at its default length


def continue_config(
    primary: SimulatedProvider,
    backup: SimulatedProvider,
    *,
    backup_prefix: str = "prefix",
    backup_model: str = BACKUP_MODEL,
    **route: Any,
) -> HangupConfig:
    assert primary.base_url is not None and backup.base_url is not None
    return config_from(
        {
            "upstreams": {
                "primary": {"base_url": primary.base_url},
                "backup": {"base_url": backup.base_url, "assistant_prefix": backup_prefix},
            },
            "routes": [
                {
                    "name": "chat",
                    "upstream": "primary",
                    "fallbacks": [{"upstream": "backup", "model": backup_model}],
                    "continue_cut_streams": True,
                    "circuit_failures": 0,
                    **route,
                }
            ],
        }
    )


async def test_a_stream_cut_mid_answer_is_continued_and_spliced(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, sink = await start_proxy(continue_config(sim, backup))
    answer = await post(server.base_url, chat("reset:after=5", stream=True), "c-cut")
    assert answer.status == 200
    assert answer.text() == WHOLE  # the client's answer reads as one, whole
    assert answer.body.rstrip().endswith(b"data: [DONE]")
    roles = [e for e in answer.events() if (e["choices"] or [{}])[0].get("delta", {}).get("role")]
    assert len(roles) == 1  # the continuation's role chunk was not spliced in
    # The backup was asked to go on from exactly what the client had.
    asked = seen(backup, "c-cut")[0].body
    assert asked["messages"][-1] == {
        "role": "assistant",
        "content": completion_text(5),
        "prefix": True,
    }
    record = await sink.wait_for("c-cut")
    assert record.outcome is Outcome.COMPLETED
    assert [(a.upstream, a.reason, a.result, a.delivered) for a in record.attempts] == [
        ("primary", "primary", AttemptResult.CUT, True),
        ("backup", "continue", AttemptResult.OK, True),
    ]


async def test_a_stall_mid_answer_is_continued(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    config = continue_config(
        sim, backup, backup_prefix="continue_final_message", timeouts={"idle_s": 0.4}
    )
    server, sink = await start_proxy(config)
    answer = await post(server.base_url, chat("stall:after=3", stream=True), "c-stall")
    assert answer.status == 200 and answer.text() == WHOLE
    asked = seen(backup, "c-stall")[0].body
    assert asked["continue_final_message"] is True and asked["add_generation_prompt"] is False
    await sim.wait_closed("c-stall", timeout=1.0)  # the stalled attempt was hung up on
    record = await sink.wait_for("c-stall")
    assert [(a.result, a.delivered) for a in record.attempts] == [
        (AttemptResult.TIMEOUT, True),
        (AttemptResult.OK, True),
    ]


async def test_a_target_that_refuses_the_prefix_never_shows_its_400(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    config = continue_config(sim, backup, backup_model="error:status=400")
    server, sink = await start_proxy(config)
    answer = await post(server.base_url, chat("reset:after=5", stream=True), "c-refused")
    assert answer.status == 200
    assert answer.text() == completion_text(5)
    error = answer.events()[-1]["error"]
    assert error["code"] == "upstream_failed" and "cut off" in error["message"]  # as today
    assert len(seen(backup, "c-refused")) == 1
    record = await sink.wait_for("c-refused")
    assert record.outcome is Outcome.UPSTREAM_ERROR


async def test_targets_without_prefix_support_are_never_asked(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    server, _ = await start_proxy(continue_config(sim, backup, backup_prefix="none"))
    answer = await post(server.base_url, chat("reset:after=5", stream=True), "c-none")
    assert answer.events()[-1]["error"]["code"] == "upstream_failed"
    assert len(seen(backup, "c-none")) == 0


def test_continuation_body_shapes_and_refusals() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10}'
    out = continuation_body(body, " the quick", "prefix", 2)
    assert out is not None
    assert b'"max_tokens":8' in out and b'"prefix":true' in out
    assert continuation_body(body, " x", "none", 1) is None
    assert continuation_body(body, "", "prefix", 0) is None
    assert continuation_body(b'{"messages":[],"n":2}', " x", "prefix", 1) is None
    assert continuation_body(b'{"messages":[],"tools":[{}]}', " x", "prefix", 1) is None
    assert continuation_body(b"not json", " x", "prefix", 1) is None
    styles: list[PrefixStyle] = ["none", "prefix", "continue_final_message"]
    names = ["a", "b", "c"]
    assert continuation_target(styles, names, 0, lambda _: True) == 1
    assert continuation_target(styles, names, 1, lambda _: True) == 1  # the same one first
    assert continuation_target(styles, names, 0, lambda n: n != "b") == 2
    assert continuation_target(["none"], ["a"], 0, lambda _: True) is None


async def test_a_stream_that_keeps_breaking_is_continued_twice_then_ends_in_band(
    sim: SimulatedProvider, backup: SimulatedProvider, start_proxy: StartProxy
) -> None:
    """At most two continuations a request (attempt_failures' `_MAX_CONTINUATIONS`): a backup that
    cuts its continuations too is asked twice, then the client gets the in-band error."""
    config = continue_config(sim, backup, backup_model="reset:after=2")
    server, sink = await start_proxy(config)
    answer = await post(server.base_url, chat("reset:after=5", stream=True), "c-again")
    assert answer.status == 200
    error = answer.events()[-1]["error"]
    assert error["code"] == "upstream_failed" and "cut off" in error["message"]
    assert len(seen(backup, "c-again")) == 2
    record = await sink.wait_for("c-again")
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert [(a.upstream, a.reason, a.result) for a in record.attempts] == [
        ("primary", "primary", AttemptResult.CUT),
        ("backup", "continue", AttemptResult.CUT),
        ("backup", "continue", AttemptResult.CUT),
    ]
