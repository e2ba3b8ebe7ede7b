"""Token arithmetic of the simulator: deterministic text, prompt counting, the generation plan.

Everything here is pure, so a test can compute what the simulator will say and count:

- Completion token ``i`` (0-based) is ``word(i)``: a word from a fixed list with a leading space,
  one token per content chunk. ``completion_text(n)`` is the text of an ``n``-token answer.
- Prompt tokens (``prompt_tokens``): whitespace-separated words of every text, plus 3 per message
  and 3 per request for chat-shaped inputs (chat ``messages``, Responses ``input`` and
  ``instructions``); plain words (or the length of token-id lists) for completions ``prompt`` and
  embeddings ``input``. A rough imitation of real tokenizers, exact by construction.
- Length: the natural length is ``tokens=N`` from the behaviour, else unbounded if the request
  sets a maximum (``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``), else the
  simulator's default. The emitted length is the natural one capped by the maximum; hitting the
  cap gives ``finish_reason: "length"``. Reasoning tokens come first and count against the cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from proxy.sim.behaviour import Behaviour, Name
from proxy.sim.errors import ApiError

Endpoint = Literal["chat", "completions", "responses", "embeddings"]

WORDS: tuple[str, ...] = tuple(
    " " + w
    for w in (
        "the quick brown fox jumps over a lazy dog while seven small birds sing about "
        "rivers mountains clouds and distant cities under warm light of an early summer "
        "morning near quiet harbours full of boats"
    ).split()
)
# JSON-encoded once: chunk builders splice these straight into their templates.
JSON_WORDS: tuple[str, ...] = tuple(json.dumps(w) for w in WORDS)


def word(i: int) -> str:
    return WORDS[i % len(WORDS)]


def json_word(i: int) -> str:
    return JSON_WORDS[i % len(JSON_WORDS)]


def completion_text(n: int) -> str:
    """The exact text of an n-token answer (also of n reasoning tokens)."""
    return "".join(word(i) for i in range(n))


def count_words(text: str) -> int:
    return len(text.split())


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return count_words(content)
    if isinstance(content, list):  # content parts: count the text ones
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += count_words(text)
            elif isinstance(part, str):
                total += count_words(part)
        return total
    return 0


def _messages_tokens(messages: list[Any]) -> int:
    total = 3
    for m in messages:
        total += 3 + (_content_words(m.get("content")) if isinstance(m, dict) else 0)
    return total


def _plain_tokens(value: Any) -> int:
    """Completions prompt / embeddings input: text, list of texts, token ids, lists of ids."""
    if isinstance(value, str):
        return count_words(value)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_plain_tokens(v) for v in value)
    return 0


def prompt_tokens(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """The prompt size the simulator reports for a request body (see the module docstring)."""
    if endpoint == "chat":
        messages = body.get("messages")
        return _messages_tokens(messages if isinstance(messages, list) else [])
    if endpoint == "responses":
        items: list[Any] = []
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            items.append({"role": "system", "content": instructions})
        given = body.get("input")
        if isinstance(given, str):
            items.append({"role": "user", "content": given})
        elif isinstance(given, list):
            items.extend(given)
        return _messages_tokens(items)
    field = "prompt" if endpoint == "completions" else "input"
    return _plain_tokens(body.get(field))


def embedding_inputs(body: dict[str, Any]) -> list[Any]:
    given = body.get("input")
    if isinstance(given, str) or (
        isinstance(given, list) and given and all(isinstance(v, int) for v in given)
    ):
        return [given]
    if isinstance(given, list) and given:
        return list(given)
    raise ApiError(400, "'input' must be a non-empty string or array", param="input")


_MAX_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
_REQUIRED: dict[Endpoint, str] = {
    "chat": "messages",
    "completions": "prompt",
    "responses": "input",
    "embeddings": "input",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What one generation will produce, decided before the first byte."""

    prompt_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    content_tokens: int
    finish_reason: Literal["stop", "length", "tool_calls"]
    rate: float  # tokens/s; 0 means as fast as possible
    first_token_delay: float  # seconds from the start of generation to the first token
    # A continuation (an assistant prefix to go on from): the answer resumes at this word.
    content_offset: int = 0

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + self.content_tokens


def continuation_offset(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Words already written when a chat request asks to continue its last assistant message
    (DeepSeek/Mistral `"prefix": true` on it, or vLLM's `continue_final_message`); else 0.
    The simulated answer then resumes where that prefix stopped."""
    messages = body.get("messages")
    if endpoint != "chat" or not isinstance(messages, list) or not messages:
        return 0
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return 0
    if last.get("prefix") is not True and body.get("continue_final_message") is not True:
        return 0
    return _content_words(last.get("content"))


def max_tokens(endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    for name in _MAX_FIELDS[endpoint]:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ApiError(400, f"'{name}' must be a non-negative integer", param=name)
        return value
    return None


def make_plan(
    endpoint: Endpoint,
    body: dict[str, Any],
    behaviour: Behaviour,
    *,
    default_tokens: int,
    default_rate: float,
) -> Plan:
    required = _REQUIRED[endpoint]
    if body.get(required) is None:
        raise ApiError(400, f"Missing required parameter: '{required}'.", param=required)
    cap = max_tokens(endpoint, body)
    natural = behaviour.tokens
    if natural is None and cap is None:
        natural = default_tokens
    offset = continuation_offset(endpoint, body)
    if natural is not None:
        natural = max(0, natural - offset)
    reasoning = behaviour.reasoning_tokens if cap is None else min(behaviour.reasoning_tokens, cap)
    room = None if cap is None else cap - reasoning
    if natural is None:
        content, truncated = room or 0, True
    elif room is not None and room < natural:
        content, truncated = room, True
    else:
        content, truncated = natural, False
    finish: Literal["stop", "length", "tool_calls"] = "length" if truncated else "stop"
    if not truncated and behaviour.name is Name.TOOL_CALL and endpoint == "chat":
        finish = "tool_calls"
    rate = behaviour.rate if behaviour.rate is not None else default_rate
    prompt = prompt_tokens(endpoint, body)
    if behaviour.name is Name.SLOW_FIRST_TOKEN:
        first = behaviour.delay
    else:
        first = 1.0 / rate if rate > 0 else 0.0
    return Plan(
        prompt_tokens=prompt,
        cached_tokens=min(behaviour.cached, prompt),
        reasoning_tokens=reasoning,
        content_tokens=content,
        finish_reason=finish,
        rate=rate,
        first_token_delay=first,
        content_offset=offset,
    )


def chat_usage(plan: Plan, reasoning: int, content: int) -> dict[str, Any]:
    """OpenAI chat/completions usage for the tokens produced so far."""
    completion = reasoning + content
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def responses_usage(plan: Plan, reasoning: int, content: int) -> dict[str, Any]:
    output = reasoning + content
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": plan.prompt_tokens + output,
    }
