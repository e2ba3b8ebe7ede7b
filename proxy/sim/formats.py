"""Wire shapes of the simulated provider: SSE chunk builders and JSON bodies per endpoint.

One builder per stream, holding that stream's ids and counters. Chunks are assembled from
per-stream templates plus pre-encoded words, because benchmarks push tens of thousands of chunks
per second through the simulator; the result is byte-for-byte what
``json.dumps(obj, separators=(",", ":"))`` gives (a test checks this).

Shapes follow api.openai.com (and the llama.cpp transcripts in the shared fixtures):

- chat: role chunk ``{"role":"assistant","content":""}``, one chunk per token, a finish chunk
  with an empty delta, ``data: [DONE]``. With ``stream_options.include_usage`` every chunk ends
  with ``"usage":null`` and a ``"choices":[]`` usage chunk precedes ``[DONE]``; with vLLM's
  ``continuous_usage_stats`` as well, every chunk carries the running usage instead of null.
- completions: ``text_completion`` chunks with ``choices[0].text``; no role chunk.
- responses: see `proxy.sim.responses`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Protocol

from proxy.sim.errors import error_payload
from proxy.sim.tokens import Plan, chat_usage, completion_text, json_word

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
_ENC = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def dumps(obj: Any) -> str:
    return _ENC(obj)


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


class StreamFormat(Protocol):
    """What the generation engine needs from an endpoint's stream shape."""

    def head(self) -> list[bytes]: ...
    def empty(self) -> bytes: ...
    def reasoning(self, i: int) -> bytes | None: ...  # None: reasoning is not streamed
    def content(self, i: int) -> bytes: ...
    def tail(self) -> list[bytes]: ...
    def error(self, status: int, message: str) -> bytes: ...
    def malformed(self) -> bytes: ...


class Counting:
    """The tokens a stream has produced so far: what its usage objects report."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.reasoning_n = 0
        self.content_n = 0

    def account(self, reasoning: int, content: int) -> None:
        """Set the counters directly (non-streaming answers are generated without chunks)."""
        self.reasoning_n, self.content_n = reasoning, content

    def usage(self) -> dict[str, Any]:
        return chat_usage(self.plan, self.reasoning_n, self.content_n)


class ChatStream(Counting):
    """Chat completion chunks, or legacy text completion chunks with ``completions=True``
    (same ``choices`` envelope; ``text`` instead of ``delta``, no role chunk)."""

    def __init__(
        self,
        *,
        model: str,
        plan: Plan,
        include_usage: bool = False,
        continuous_usage: bool = False,
        tool_name: str | None = None,
        completions: bool = False,
    ) -> None:
        super().__init__(plan)
        self.completions = completions
        self.id = new_id("cmpl-" if completions else "chatcmpl-")
        self.created = int(time.time())
        self.model = model
        kind = "text_completion" if completions else "chat.completion.chunk"
        self._pre = (
            f'data: {{"id":"{self.id}","object":"{kind}","created":{self.created},'
            f'"model":{dumps(model)},"choices":['
        )
        self.include_usage = include_usage
        self._continuous = include_usage and continuous_usage  # as vLLM: needs include_usage
        self.tool_name = tool_name
        self.tool_id = new_id("call_") if tool_name else None

    def _chunk(self, choice: str) -> bytes:
        if self._continuous:
            tail = ',"usage":' + dumps(self.usage())
        else:
            tail = ',"usage":null' if self.include_usage else ""
        return f"{self._pre}{choice}]{tail}}}\n\n".encode()

    def _choice(self, piece: str, finish: str = "null") -> str:
        if self.completions:
            return f'{{"text":{piece},"index":0,"logprobs":null,"finish_reason":{finish}}}'
        return f'{{"index":0,"delta":{piece},"logprobs":null,"finish_reason":{finish}}}'

    def head(self) -> list[bytes]:
        if self.completions:
            return []
        if self.tool_name is None:
            return [self._chunk(self._choice('{"role":"assistant","content":""}'))]
        call = {
            "index": 0,
            "id": self.tool_id,
            "type": "function",
            "function": {"name": self.tool_name, "arguments": '{"text":"'},
        }
        delta = {"role": "assistant", "content": None, "tool_calls": [call]}
        return [self._chunk(self._choice(dumps(delta)))]

    def empty(self) -> bytes:
        return self._chunk(self._choice('""' if self.completions else "{}"))

    def reasoning(self, i: int) -> bytes | None:
        if self.completions:
            return None
        self.reasoning_n += 1
        return self._chunk(self._choice(f'{{"reasoning_content":{json_word(i)}}}'))

    def content(self, i: int) -> bytes:
        self.content_n += 1
        w = json_word(i)
        if self.completions:
            return self._chunk(self._choice(w))
        if self.tool_name is not None:
            return self._chunk(
                self._choice(f'{{"tool_calls":[{{"index":0,"function":{{"arguments":{w}}}}}]}}')
            )
        return self._chunk(self._choice(f'{{"content":{w}}}'))

    def tail(self) -> list[bytes]:
        out: list[bytes] = []
        if self.tool_name is not None:
            closing = dumps('"}')
            out.append(
                self._chunk(
                    self._choice(
                        f'{{"tool_calls":[{{"index":0,"function":{{"arguments":{closing}}}}}]}}'
                    )
                )
            )
        finish = dumps(self.plan.finish_reason)
        out.append(self._chunk(self._choice('""' if self.completions else "{}", finish)))
        if self.include_usage:
            out.append(f'{self._pre}],"usage":{dumps(self.usage())}}}\n\n'.encode())
        out.append(DONE)
        return out

    def error(self, status: int, message: str) -> bytes:
        return f"data: {dumps(error_payload(status, message))}\n\n".encode()

    def malformed(self) -> bytes:
        return b"data: {not json\n\n"

    def aborted(self) -> list[bytes]:
        """How a stream ends when an abort call stopped it: finish_reason "abort", [DONE]."""
        return [self._chunk(self._choice('""' if self.completions else "{}", '"abort"')), DONE]

    def body(self) -> dict[str, Any]:
        """The non-streaming answer for the current counters."""
        text = completion_text(self.content_n)
        choice: dict[str, Any]
        if self.completions:
            choice = {"text": text, "index": 0, "logprobs": None}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if self.reasoning_n:
                message["reasoning_content"] = completion_text(self.reasoning_n)
            if self.tool_name is not None:
                arguments = dumps({"text": text})
                function = {"name": self.tool_name, "arguments": arguments}
                message["content"] = None
                message["tool_calls"] = [
                    {"id": self.tool_id, "type": "function", "function": function}
                ]
            choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = self.plan.finish_reason
        return {
            "id": self.id,
            "object": "text_completion" if self.completions else "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }


def embeddings_body(model: str, inputs: list[Any], prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding_vector(v)}
            for i, v in enumerate(inputs)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def embedding_vector(value: Any, dims: int = 8) -> list[float]:
    """A deterministic vector derived from the input (same input, same vector)."""
    digest = hashlib.sha256(dumps(value).encode()).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "o3-mini",
    "text-embedding-3-small",
)


def models_body(extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in (*MODELS, *extra)]}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "hangup-sim"}
