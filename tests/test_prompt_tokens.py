"""Offline prompt counts for OpenAI model families, the billing-policy defaults, and finding
`usage` in a body's tail. Pure functions; the engines' endpoints are covered against the real
llama.cpp server (tests/test_real_upstream_prompt_tokens.py) and vLLM's request shape here
against a server that answers as vLLM's `/tokenize` does."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.billing import default_policy, policy_for
from proxy.config import UpstreamConfig
from proxy.tokenize import PromptCounter, slices
from proxy.tokenize import openai as offline
from proxy.tokenize.engines import engine_prompt_tokens, engine_root
from proxy.usage.body import tail_usage

FIXTURES = Path(__file__).parent / "fixtures"
COOKBOOK = json.loads((FIXTURES / "openai" / "prompt-token-counts.json").read_text())

needs_vocab = pytest.mark.skipif(
    not offline.available(), reason="bpe-openai (the `tokenizers` extra) is not installed"
)


def offline_count(model: str, request: dict[str, Any], endpoint: str = "chat.completions") -> int:
    prompt = offline.prompt_text(endpoint, model, request)
    assert prompt is not None
    counter = offline.load(prompt.encoding)
    assert counter is not None
    return prompt.fixed + sum(counter(t) for t in prompt.texts)


@needs_vocab
@pytest.mark.parametrize(
    ("case", "model"),
    [(c, m) for c in COOKBOOK["cases"] for m in c["reported"]],
    ids=lambda v: v if isinstance(v, str) else v["name"][:24],
)
def test_chat_prompts_count_what_the_openai_api_reported(case: dict[str, Any], model: str) -> None:
    assert offline_count(model, case["request"]) == case["reported"][model]


@needs_vocab
def test_the_format_overhead_is_part_of_the_count() -> None:
    """Without the per-message and priming tokens the count is off: they are not optional."""
    request = COOKBOOK["cases"][0]["request"]
    prompt = offline.prompt_text("chat.completions", "gpt-4o", request)
    assert prompt is not None and prompt.fixed == 6 * 3 + 4 * 1 + 3


def test_shapes_without_a_checked_rendering_are_not_counted() -> None:
    image = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
    }
    tool_result = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    nested_tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"o": {"type": "object", "x": 1}}},
        },
    }
    text = [{"role": "user", "content": "hi"}]
    assert offline.prompt_text("chat.completions", "gpt-4o", {"messages": [image]}) is None
    assert offline.prompt_text("chat.completions", "gpt-4o", {"messages": [tool_result]}) is None
    assert (
        offline.prompt_text(
            "chat.completions", "gpt-4o", {"messages": text, "tools": [nested_tool]}
        )
        is None
    )
    assert offline.prompt_text("responses", "gpt-4o", {"input": "hi"}) is None
    # Families whose chat format was not checked against the API: gpt-4.1, o-series, others.
    for model in ("gpt-4.1", "o3-mini", "llama-3.1-8b", "gpt-4ox"):
        assert offline.prompt_text("chat.completions", model, {"messages": text}) is None
    assert offline.encoding_for("chat.completions", "openai/gpt-4o-2024-08-06") == "o200k_base"
    assert offline.encoding_for("chat.completions", "gpt-4-0613") == "cl100k_base"
    assert offline.encoding_for("embeddings", "text-embedding-3-small") == "cl100k_base"


@needs_vocab
def test_slices_add_up_to_the_whole_texts_count() -> None:
    rng = random.Random(7)
    words = ["hello", "world,", "Test", "東京", "naïve", "  two", "x1", "(p)", "\n\nnew", "a.b"]
    text = " ".join(rng.choice(words) for _ in range(60_000))
    pieces = list(slices(text, 8 * 1024))
    assert len(pieces) > 10 and "".join(pieces) == text
    for encoding in ("o200k_base", "cl100k_base"):
        counter = offline.load(encoding)
        assert counter is not None
        assert sum(counter(p) for p in pieces) == counter(text)


def test_a_text_without_safe_cuts_stays_whole() -> None:
    blob = "A" * 100_000
    assert list(slices(blob, 8 * 1024)) == [blob]


@needs_vocab
async def test_the_counter_counts_offline_for_a_hosted_generic_upstream() -> None:
    case = COOKBOOK["cases"][0]
    base = "https://api.openai.com/v1"
    source = PromptCounter.source_for("generic", base, "chat.completions", "gpt-4o")
    assert source == "o200k_base"
    count = await PromptCounter().count(
        source,
        base_url=base,
        endpoint="chat.completions",
        model="gpt-4o",
        body=json.dumps({"model": "gpt-4o", **case["request"]}).encode(),
        headers=CIMultiDict(),
    )
    assert count == 124
    # A local generic upstream is probably a self-hosted engine: no offline vocabulary.
    assert (
        PromptCounter.source_for(
            "generic", "http://127.0.0.1:8000/v1", "chat.completions", "gpt-4o"
        )
        is None
    )


async def test_vllm_is_asked_with_messages_and_the_generation_prompt(
    aiohttp_server: Any,
) -> None:
    seen: list[dict[str, Any]] = []

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(
            {"path": request.path, "body": body, "auth": request.headers.get("authorization")}
        )
        return web.json_response({"count": 57, "max_model_len": 4096, "tokens": [1] * 57})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    server = await aiohttp_server(app)
    messages = [{"role": "user", "content": "hi"}]
    count = await engine_prompt_tokens(
        "vllm",
        f"http://127.0.0.1:{server.port}/v1",
        "chat.completions",
        {"model": "m", "messages": messages},
        CIMultiDict({"Authorization": "Bearer k", "Content-Length": "99", "x-request-id": "r"}),
    )
    assert count == 57
    assert seen == [
        {
            "path": "/tokenize",
            "body": {"model": "m", "messages": messages, "add_generation_prompt": True},
            "auth": "Bearer k",
        }
    ]


def test_engine_root_strips_v1() -> None:
    assert str(engine_root("http://127.0.0.1:8000/v1")) == "http://127.0.0.1:8000/"
    assert str(engine_root("http://h:1/prefix/v1")) == "http://h:1/prefix"


# --- billing policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "engine", "stream", "policy"),
    [
        ("https://api.openai.com/v1", "generic", True, "stops"),
        ("https://api.openai.com/v1", "openai", False, "full"),  # non-streamed: billed in full
        ("https://myres.openai.azure.com/openai", "generic", True, "stops"),
        ("https://api.anthropic.com/v1", "generic", True, "stops"),
        ("https://api.deepseek.com", "generic", True, "stops"),
        ("https://api.groq.com/openai/v1", "generic", True, "full"),
        ("https://bedrock-runtime.us-east-1.amazonaws.com", "generic", True, "full"),
        ("https://generativelanguage.googleapis.com/v1beta/openai", "generic", True, "full"),
        ("https://api.mistral.ai/v1", "generic", True, "full"),
        ("https://api.novita.ai/v3/openai", "generic", True, "full"),
        ("https://openrouter.ai/api/v1", "generic", True, "full"),
        ("https://llm.example.com/v1", "generic", True, "full"),  # unknown: conservative
        ("https://evil-api.openai.com.example.net/v1", "generic", True, "full"),  # not a suffix
        ("http://127.0.0.1:8000/v1", "generic", True, "self_hosted"),
        ("http://10.0.0.5:8000/v1", "generic", False, "self_hosted"),
        ("https://gpu.internal.example/v1", "vllm", True, "self_hosted"),
        ("https://gpu.internal.example/v1", "llamacpp", False, "self_hosted"),
    ],
)
def test_default_billing_policies(base_url: str, engine: str, stream: bool, policy: str) -> None:
    assert default_policy(base_url, engine, stream=stream) == policy


def test_the_config_overrides_the_recognised_default() -> None:
    upstream = UpstreamConfig.model_validate(
        {"base_url": "https://api.groq.com/openai/v1", "billing": {"stream": "stops"}}
    )
    assert policy_for(upstream, stream=True) == "stops"
    assert policy_for(upstream, stream=False) == "full"


# --- usage in the tail -----------------------------------------------------------------------


def test_usage_is_found_in_the_tail_of_every_fixture() -> None:
    chat = (FIXTURES / "llama-cpp" / "chat.json").read_bytes()
    found = tail_usage(chat)
    assert found is not None and (found.prompt, found.completion, found.cached) == (23, 12, 22)
    responses = tail_usage((FIXTURES / "openai" / "responses.json").read_bytes())
    assert responses is not None and (responses.prompt, responses.completion) == (36, 13)
    embeddings = tail_usage((FIXTURES / "openai" / "embeddings.json").read_bytes())
    assert embeddings is not None and embeddings.prompt == 8


def test_usage_text_inside_strings_is_not_mistaken_for_the_member() -> None:
    decoy = json.dumps({"content": 'say {"usage": {"prompt_tokens": 999}} please'})
    body = json.dumps(
        {
            "choices": [{"message": json.loads(decoy)}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }
    ).encode()
    found = tail_usage(body)
    assert found is not None and (found.prompt, found.completion) == (5, 2)
    assert tail_usage(json.dumps({"content": decoy}).encode()) is None


def test_the_tail_scan_is_bounded() -> None:
    usage = b'{"data":[],"usage":{"prompt_tokens":7},"pad":"' + b"x" * 70_000 + b'"}'
    assert tail_usage(usage) is None  # beyond the last 64 KiB: not searched
    assert tail_usage(usage, tail=len(usage)) is not None


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b'{"count": "many"}',
        b'{"tokens": [' + b"1," * 600_000 + b"1]}",  # over the 1 MiB bound: not parsed
    ],
    ids=["not-json", "wrong-type", "too-large"],
)
async def test_an_odd_engine_answer_leaves_the_estimate(aiohttp_server: Any, answer: bytes) -> None:
    async def tokenize(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    server = await aiohttp_server(app)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    count = await PromptCounter().count(
        "vllm",
        base_url=f"http://127.0.0.1:{server.port}/v1",
        endpoint="chat.completions",
        model="m",
        body=body,
        headers=CIMultiDict(),
    )
    assert count is None


async def test_an_engine_that_never_answers_is_given_up_on(aiohttp_server: Any) -> None:
    import asyncio

    from proxy import tokenize

    async def tokenize_slowly(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"count": 1})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize_slowly)
    server = await aiohttp_server(app)
    loop = asyncio.get_running_loop()
    started = loop.time()
    count = await PromptCounter().count(
        "vllm",
        base_url=f"http://127.0.0.1:{server.port}/v1",
        endpoint="completions",
        model="m",
        body=b'{"model": "m", "prompt": "hi"}',
        headers=CIMultiDict(),
    )
    assert count is None
    assert loop.time() - started < tokenize.TIMEOUT_S + 1.0
