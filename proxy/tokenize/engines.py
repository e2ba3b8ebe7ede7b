"""Exact prompt counts from a self-hosted engine's own tokenizer, over its HTTP API.

Each engine tokenizes with the model it serves, so the count is the one it bills against its
context; the chat template must be applied first, as for a real request:

- llama.cpp (`llama-server`): `POST /apply-template {"messages"}` gives the templated prompt,
  `POST /tokenize {"content", "add_special": true, "parse_special": true}` its tokens (the same
  flags the server uses for a chat request). Completions: `/tokenize` of the prompt.
- vLLM: `POST /tokenize {"model", "messages", "add_generation_prompt": true}` applies the chat
  template itself and returns `count`; completions send `prompt`.
- SGLang: `POST /tokenize {"prompt"}` tokenizes plain text only (serving_tokenize.py has no
  `messages`), so only completions and embeddings prompts are counted; chat stays an estimate.

Called after the request ended, never on its critical path, bounded by the caller's timeout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

__all__ = ["engine_prompt_tokens", "engine_root"]

_MAX_ANSWER_BYTES = 1024 * 1024

# Request headers that describe the original request's body or hop, not a tokenize call.
_DROP = (
    "content-type",
    "content-length",
    "content-encoding",
    "accept",
    "accept-encoding",
    "host",
    "x-request-id",  # the original request's id: an engine may key its own requests by it
)


def engine_root(base_url: str) -> URL:
    """The server root: tokenize endpoints sit beside /v1, not under it."""
    url = URL(base_url)
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return url.with_path(path or "/")


def _count(obj: object) -> int | None:
    if not isinstance(obj, Mapping):
        return None
    count = obj.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    tokens = obj.get("tokens")
    if isinstance(tokens, list):
        return len(tokens)
    return None


async def _post(
    session: aiohttp.ClientSession, url: URL, body: Mapping[str, Any], headers: CIMultiDict[str]
) -> object:
    async with session.post(url, json=body, headers=headers, allow_redirects=False) as response:
        if response.status != 200:
            return None
        # A token list is ~7 bytes a token: past this bound (about 150,000 prompt tokens) the
        # answer is not parsed on the event loop and the estimate stands.
        raw = bytearray()
        while chunk := await response.content.readany():
            raw += chunk
            if len(raw) > _MAX_ANSWER_BYTES:
                return None
        return json.loads(raw)


def _plain_prompt(endpoint: str, body: Mapping[str, Any]) -> str | None:
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    if endpoint not in ("completions", "embeddings"):
        return None
    return value if isinstance(value, str) else None


async def engine_prompt_tokens(
    engine: str,
    base_url: str,
    endpoint: str,
    body: Mapping[str, Any],
    headers: CIMultiDict[str],
) -> int | None:
    """The engine's own prompt count for this request, or None where it cannot say."""
    root = engine_root(base_url)
    call_headers = CIMultiDict(headers)
    for name in _DROP:
        call_headers.popall(name, None)
    messages = body.get("messages")
    model = body.get("model")
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",)
    ) as session:
        if engine == "llamacpp":
            if endpoint == "chat.completions" and isinstance(messages, list):
                # The template renders tool definitions into the prompt too.
                template_request: dict[str, Any] = {"messages": messages}
                if isinstance(body.get("tools"), list):
                    template_request["tools"] = body["tools"]
                templated = await _post(
                    session, root / "apply-template", template_request, call_headers
                )
                prompt = templated.get("prompt") if isinstance(templated, Mapping) else None
            else:
                prompt = _plain_prompt(endpoint, body)
            if not isinstance(prompt, str):
                return None
            tokenized = await _post(
                session,
                root / "tokenize",
                {"content": prompt, "add_special": True, "parse_special": True},
                call_headers,
            )
            return _count(tokenized)
        if engine == "vllm":
            request: dict[str, Any] = {"model": model} if isinstance(model, str) else {}
            if endpoint == "chat.completions" and isinstance(messages, list):
                request |= {"messages": messages, "add_generation_prompt": True}
                tools = body.get("tools")
                if isinstance(tools, list):
                    request["tools"] = tools
            else:
                prompt = _plain_prompt(endpoint, body)
                if prompt is None:
                    return None
                request["prompt"] = prompt
            return _count(await _post(session, root / "tokenize", request, call_headers))
        if engine == "sglang":
            prompt = _plain_prompt(endpoint, body)
            if prompt is None:
                return None  # its /tokenize applies no chat template
            request = {"prompt": prompt}
            if isinstance(model, str):
                request["model"] = model
            return _count(await _post(session, root / "tokenize", request, call_headers))
    return None
