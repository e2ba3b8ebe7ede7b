"""Prompt token estimate, used only when the upstream reports no prompt count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from proxy.usage.facts import Endpoint

# Prompt estimate (used only when the upstream reports nothing): ~4 characters per token is
# OpenAI's own rule of thumb for English with its BPE tokenizers; each chat message costs a few
# tokens of role and separators (OpenAI's cookbook counts 3, plus 1 for a name), and the reply is
# primed with 3 more. Images count as 85 tokens, the low-detail price: a floor, not a guess.
CHARS_PER_TOKEN: Final = 4
MESSAGE_OVERHEAD_TOKENS: Final = 4
REPLY_PRIMING_TOKENS: Final = 3
IMAGE_TOKENS: Final = 85

_IMAGE_PARTS: Final = frozenset({"image_url", "input_image", "image"})
# `type(x) is dict or isinstance(x, Mapping)`: a parsed body's objects are dicts, and the
# exact type test skips the ABC's `__instancecheck__` (~0.2 us, several times a request).


class Tally:
    __slots__ = ("chars", "tokens")

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0  # exact or fixed token counts (token-id prompts, images, overheads)

    def content(self, content: object) -> None:
        """A message `content`: a string, or a list of parts (text, images, ...)."""
        if isinstance(content, str):
            self.chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    self.chars += len(part)
                elif type(part) is dict or isinstance(part, Mapping):
                    text = part.get("text")
                    if isinstance(text, str):
                        self.chars += len(text)
                    elif part.get("type") in _IMAGE_PARTS:
                        self.tokens += IMAGE_TOKENS

    def strings(self, *values: object) -> None:
        for value in values:
            if isinstance(value, str):
                self.chars += len(value)

    def prompt(self, prompt: object) -> None:
        """Completions `prompt` / embeddings `input`: text, texts, token ids, or lists of ids."""
        if isinstance(prompt, str):
            self.chars += len(prompt)
        elif isinstance(prompt, list):
            for item in prompt:
                if isinstance(item, str):
                    self.chars += len(item)
                elif isinstance(item, int):
                    self.tokens += 1  # a token id: exact
                elif isinstance(item, list):
                    self.tokens += len(item)

    def tools(self, tools: object) -> None:
        # Tool schemas are rendered into the prompt in a provider-specific way; counting the
        # characters of every key and string value is the rough, format-neutral part of that.
        self.chars += _string_chars(tools, 8)

    def total(self) -> int:
        return -(-self.chars // CHARS_PER_TOKEN) + self.tokens


def _string_chars(value: object, depth: int) -> int:
    if isinstance(value, str):
        return len(value)
    if depth <= 0 or value is None:  # None: most requests' `tools` (no ABC check for it)
        return 0
    if type(value) is dict or isinstance(value, Mapping):
        return sum(len(k) + _string_chars(v, depth - 1) for k, v in value.items() if type(k) is str)
    if isinstance(value, list):
        return sum(_string_chars(v, depth - 1) for v in value)
    return 0


def _plain_chat_estimate(body: Mapping[str, Any]) -> int | None:
    """`estimate_prompt_tokens` of the usual chat body, or None for any other: a list of
    messages that are dicts with a text `content` and no `name` or `tool_calls`, no `tools` or
    `functions`. The estimate is made for every request at admission (before anyone knows
    whether the upstream will report the prompt), so its common case is spared `Tally`'s object
    and five method calls (~1 us). tests/test_usage_prompt.py checks it against the general way."""
    messages = body.get("messages")
    if type(messages) is not list or body.get("tools") is not None:
        return None
    if body.get("functions") is not None:
        return None
    chars = 0
    for message in messages:
        if type(message) is not dict:
            return None
        content = message.get("content")
        if type(content) is not str or message.get("name") is not None:
            return None
        if message.get("tool_calls") is not None:
            return None
        chars += len(content)
    tokens = MESSAGE_OVERHEAD_TOKENS * len(messages) + REPLY_PRIMING_TOKENS
    return -(-chars // CHARS_PER_TOKEN) + tokens


def estimate_prompt_tokens(endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    """ceil(characters / 4) of the prompt text, plus fixed overheads (see the constants above)."""
    if endpoint == "chat.completions":
        plain = _plain_chat_estimate(body)
        if plain is not None:
            return plain
    return _estimate(endpoint, body)


def _estimate(endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    """`estimate_prompt_tokens` of any body: the general way."""
    t = Tally()
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if type(message) is not dict and not isinstance(message, Mapping):
                    continue
                t.tokens += MESSAGE_OVERHEAD_TOKENS
                t.content(message.get("content"))
                t.strings(message.get("name"))
                t.tools(message.get("tool_calls"))
            t.tokens += REPLY_PRIMING_TOKENS
        t.tools(body.get("tools"))
        t.tools(body.get("functions"))
    elif endpoint == "completions":
        t.prompt(body.get("prompt"))
        t.strings(body.get("suffix"))
    elif endpoint == "embeddings":
        t.prompt(body.get("input"))
    elif endpoint == "responses":
        t.strings(body.get("instructions"))
        items = body.get("input")
        if isinstance(items, str):
            t.chars += len(items)
            t.tokens += MESSAGE_OVERHEAD_TOKENS
        elif isinstance(items, list):
            for item in items:
                if type(item) is not dict and not isinstance(item, Mapping):
                    continue
                t.tokens += MESSAGE_OVERHEAD_TOKENS
                t.content(item.get("content"))
                t.content(item.get("output"))  # function_call_output: a string or parts
                t.content(item.get("summary"))  # reasoning items: [{"text": ...}]
                t.strings(item.get("arguments"), item.get("name"))
        t.tools(body.get("tools"))
    return t.total()
