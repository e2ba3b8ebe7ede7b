"""proxy.engines without I/O: naming (byte-faithful rid splice, vLLM request id), abort calls,
the config key, and the bounded metric labels."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from proxy.config import ConfigError, MetricsConfig
from proxy.config_file import parse_config
from proxy.engines import engine_for
from proxy.engines.naming import append_member, has_member
from proxy.engines.protocols import server_root
from proxy.metrics import Metrics, series_bound
from proxy.outcome import EngineAbort
from proxy.usage import RequestFacts, inspect_request

CHAT = "/v1/chat/completions"


def facts(body: bytes, path: str = CHAT) -> RequestFacts:
    return inspect_request(path, json.loads(body))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a":1}', b'{"a":1,"rid":"X"}'),
        (b"{}", b'{"rid":"X"}'),
        (b" { } \n", b' { "rid":"X"} \n'),
        (b'{\n  "a": [1, {"b": "}"}]\n}\n', b'{\n  "a": [1, {"b": "}"}]\n,"rid":"X"}\n'),
    ],
)
def test_the_rid_is_the_last_member_and_every_other_byte_stays(
    body: bytes, expected: bytes
) -> None:
    out = append_member(body, "rid", "X")
    assert out == expected
    assert json.loads(out)["rid"] == "X"


@pytest.mark.parametrize(
    "body",
    [b"[1,2]", b'"text"', b"", b"{", "{}".encode("utf-16"), b'{"a":1} x'],
)
def test_what_is_not_a_json_object_is_not_named(body: bytes) -> None:
    assert append_member(body, "rid", "X") is None


def test_a_member_spelled_with_escapes_is_found() -> None:
    assert has_member(b'{"r\\u0069d":"mine"}', "rid")
    assert has_member(b'{"rid":"mine"}', "rid")
    assert not has_member(b'{"messages":[{"content":"\\"rid\\": no"}]}', "rid")
    assert not has_member(b'{"x":{"rid":"nested"}}', "rid")


def test_sglang_names_chat_and_completions_with_a_fresh_rid() -> None:
    sglang = engine_for("sglang")
    headers: CIMultiDict[str] = CIMultiDict({"x-request-id": "client"})
    body = b'{"model":"m","messages":[]}'
    one = sglang.name_attempt(facts(body), body, headers)
    two = sglang.name_attempt(facts(body), body, headers)
    assert one.engine_id is not None and two.engine_id is not None
    assert len(one.engine_id) == 32 and one.engine_id != two.engine_id
    assert one.body == body[:-1] + f',"rid":"{one.engine_id}"}}'.encode()
    assert one.headers is headers  # SGLang names in the body only
    completions = b'{"model":"m","prompt":"p"}'
    named = sglang.name_attempt(facts(completions, "/v1/completions"), completions, headers)
    assert named.engine_id is not None


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, b'{"model":"m","messages":[],"rid":"client-rid"}'),  # the client's own: kept
        (CHAT, b'{"model":"m","messages":[],"r\\u0069d":"client-rid"}'),
        (CHAT, b'{"model":"m","messages":[],"n":2}'),  # samples run as <rid>_<i>
        ("/v1/embeddings", b'{"model":"m","input":"x"}'),
        ("/v1/responses", b'{"model":"m","input":"x"}'),
    ],
)
def test_sglang_leaves_alone_what_it_cannot_abort_safely(path: str, body: bytes) -> None:
    named = engine_for("sglang").name_attempt(facts(body, path), body, CIMultiDict())
    assert named.engine_id is None and named.body is body


def test_vllm_names_by_its_own_request_id_header() -> None:
    vllm = engine_for("vllm")
    headers: CIMultiDict[str] = CIMultiDict({"x-request-id": "client", "authorization": "k"})
    body = b'{"model":"m","messages":[]}'
    named = vllm.name_attempt(facts(body), body, headers)
    sent = named.headers["x-request-id"]
    assert sent != "client" and len(sent) == 32 and named.engine_id == f"chatcmpl-{sent}"
    assert headers["x-request-id"] == "client"  # the plan's headers are not changed
    assert named.body is body and named.headers["authorization"] == "k"
    # Legacy completions run as cmpl-<id>-<i>, one per prompt: not named, left to the close.
    prompt = b'{"model":"m","prompt":"p"}'
    completions = vllm.name_attempt(facts(prompt, "/v1/completions"), prompt, headers)
    assert completions.engine_id is None and completions.headers is headers


@pytest.mark.parametrize("name", ["generic", "openai", "llamacpp"])
def test_socket_close_only_engines_name_nothing(name: str) -> None:
    engine = engine_for(name)  # type: ignore[arg-type]
    body = b'{"model":"m","messages":[]}'
    named = engine.name_attempt(facts(body), body, CIMultiDict())
    assert named.engine_id is None and named.body is body and not engine.aborts


@pytest.mark.parametrize(
    ("base_url", "sglang_url"),
    [
        ("http://h:30000/v1", "http://h:30000/abort_request"),
        ("http://h:30000/v1/", "http://h:30000/abort_request"),
        ("http://lb/sglang-a/v1", "http://lb/sglang-a/abort_request"),
        ("https://h", "https://h/abort_request"),
    ],
)
def test_abort_calls_go_beside_v1(base_url: str, sglang_url: str) -> None:
    call = engine_for("sglang").abort_call(base_url.rstrip("/"), "abc")
    assert str(call.url) == sglang_url and json.loads(call.body) == {"rid": "abc"}
    vllm = engine_for("vllm").abort_call(base_url.rstrip("/"), "chatcmpl-abc")
    assert str(vllm.url) == sglang_url.replace("abort_request", "abort_requests")
    assert json.loads(vllm.body) == {"request_ids": ["chatcmpl-abc"]}
    assert str(server_root("http://h/v1")) == "http://h/"


def test_the_engine_key_defaults_to_generic_and_is_checked() -> None:
    base = "upstreams:\n  u:\n    base_url: http://127.0.0.1:1/v1\n"
    route = "routes:\n  - {name: r, upstream: u}\n"
    assert parse_config(base + route).upstreams["u"].engine == "generic"
    assert parse_config(base + "    engine: sglang\n" + route).upstreams["u"].engine == "sglang"
    with pytest.raises(ConfigError) as err:
        parse_config(base + "    engine: tgi\n" + route, source="c.yaml")
    assert "c.yaml:4: upstreams.u.engine: must be" in str(err.value)
    assert "'tgi'" in str(err.value)


def test_engine_abort_series_are_bounded_by_the_configured_upstreams() -> None:
    def count(upstreams: list[str]) -> int:
        m = Metrics(
            MetricsConfig(),
            routes=["r"],
            configured_models=[],
            registry=CollectorRegistry(),
            abort_upstreams=upstreams,
        )
        for upstream in [*upstreams, "not-an-abort-upstream"]:
            for result in EngineAbort:
                m.engine_abort_sent(upstream)
                m.engine_abort_settled(upstream, result, 0.01)
        body = m.render()[0].decode()
        return sum(1 for line in body.splitlines() if line.startswith("hangup_engine_"))

    assert count([]) == 0
    assert count(["a", "b"]) == 2 * 19
    assert series_bound(1, 0, 50, abort_upstreams=2) - series_bound(1, 0, 50) == 2 * 19
