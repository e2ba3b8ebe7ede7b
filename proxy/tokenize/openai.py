"""Exact prompt counts for OpenAI model families, offline, with the chat format's overhead.

The vocabularies ship inside the optional `bpe-openai` package (`pip install 'hangup[tokenizers]'`,
about 40 MB): nothing is downloaded at run time. Without it, `available()` is False and prompts
fall back to the heuristic.

What is exact (each checked against the `prompt_tokens` OpenAI's API reported for the same
request, recorded in OpenAI's cookbook "How to count tokens with tiktoken" and kept in
tests/fixtures/openai/prompt-token-counts.json):
- chat messages of text (`role`, `content` as a string or text parts, `name`): 3 tokens per
  message, 1 more per `name`, plus 3 that prime the reply, plus the encoded text;
- function tools whose parameters are flat properties (the cookbook's rendering);
- completions prompts and embeddings inputs: the encoded text, no overhead.
Anything else (images, audio, tool calls in the history, nested tool schemas, the Responses
API, model families whose format was not checked) returns None: the caller keeps the heuristic,
flagged as an estimate.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["PromptText", "available", "encoding_for", "load", "loaded", "prompt_text"]

# Model name prefixes (after any provider prefix such as "openai/") -> encoding, for the families
# whose chat format the cookbook checked against the API.
_CHAT_FAMILIES: Final = (
    ("gpt-4o", "o200k_base"),  # gpt-4o, gpt-4o-mini, gpt-4o-2024-08-06, ...
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"),  # gpt-4, gpt-4-0613, gpt-4-turbo (not gpt-4.1: another format)
    ("gpt-3.5-turbo", "cl100k_base"),
    ("gpt-35-turbo", "cl100k_base"),  # Azure's spelling
)
_EMBEDDING_FAMILIES: Final = (
    ("text-embedding-3-small", "cl100k_base"),
    ("text-embedding-3-large", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
# The cookbook's function-tool rendering constants: (func_init, prop_init, prop_key, enum_init,
# enum_item, func_end), per encoding family.
_TOOL_COSTS: Final = {"o200k_base": (7, 3, 3, -3, 3, 12), "cl100k_base": (10, 3, 3, -3, 3, 12)}
_MESSAGE_KEYS: Final = frozenset({"role", "content", "name"})


def _bare(model: str) -> str:
    return model.rsplit("/", 1)[-1].lower()


def encoding_for(endpoint: str, model: str | None) -> str | None:
    """The encoding whose count is exact for this endpoint and model, or None."""
    if not model:
        return None
    name = _bare(model)
    families = _EMBEDDING_FAMILIES if endpoint == "embeddings" else _CHAT_FAMILIES
    if endpoint not in ("chat.completions", "embeddings"):
        return None  # completions: no current OpenAI model; Responses: format not checked
    for family, encoding in families:
        # The family itself or a dated / sized variant of it ("gpt-4o-mini", "gpt-4-0613").
        if name == family or name.startswith(family + "-"):
            return encoding
    return None


@dataclass(slots=True)
class PromptText:
    """A prompt as texts to encode plus tokens known without encoding (format overhead)."""

    encoding: str
    texts: list[str] = field(default_factory=list)
    fixed: int = 0


def _text_parts(content: object) -> list[str] | None:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                return None  # images, audio, files: not countable by text
            text = part.get("text")
            if not isinstance(text, str):
                return None
            out.append(text)
        return out
    return None


def _tools(tools: object, encoding: str, prompt: PromptText) -> bool:
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = _TOOL_COSTS[encoding]
    if not isinstance(tools, list) or not tools:
        return tools is None
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type") != "function":
            return False
        name, description = fn.get("name"), fn.get("description", "")
        params = fn.get("parameters", {})
        if not isinstance(name, str) or not isinstance(description, str):
            return False
        if not isinstance(params, Mapping):
            return False
        properties = params.get("properties", {})
        if not isinstance(properties, Mapping):
            return False
        prompt.fixed += func_init
        prompt.texts.append(f"{name}:{description.removesuffix('.')}")
        if properties:
            prompt.fixed += prop_init
        for key, prop in properties.items():
            if not isinstance(prop, Mapping) or set(prop) - {"type", "description", "enum"}:
                return False  # nested schemas: rendered in ways the cookbook did not check
            kind, desc = prop.get("type"), prop.get("description", "")
            if not isinstance(kind, str) or not isinstance(desc, str):
                return False
            prompt.fixed += prop_key
            enum = prop.get("enum")
            if enum is not None:
                if not isinstance(enum, list) or not all(isinstance(e, str) for e in enum):
                    return False
                prompt.fixed += enum_init + enum_item * len(enum)
                prompt.texts.extend(enum)
            prompt.texts.append(f"{key}:{kind}:{desc.removesuffix('.')}")
    prompt.fixed += func_end
    return True


def prompt_text(endpoint: str, model: str | None, body: Mapping[str, Any]) -> PromptText | None:
    """What to encode for this request's prompt, or None where no exact count is known."""
    encoding = encoding_for(endpoint, model)
    if encoding is None:
        return None
    prompt = PromptText(encoding)
    if endpoint == "embeddings":
        value = body.get("input")
        if isinstance(value, str):
            prompt.texts.append(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            prompt.texts.extend(value)
        elif isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            prompt.fixed += len(value)
        else:
            return None
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    for message in messages:
        if not isinstance(message, Mapping) or set(message) - _MESSAGE_KEYS:
            return None  # tool calls and tool results carry framing the cookbook did not check
        role, name = message.get("role"), message.get("name")
        parts = _text_parts(message.get("content"))
        if not isinstance(role, str) or parts is None:
            return None
        prompt.fixed += TOKENS_PER_MESSAGE
        prompt.texts.append(role)
        prompt.texts.extend(parts)
        if name is not None:
            if not isinstance(name, str):
                return None
            prompt.texts.append(name)
            prompt.fixed += TOKENS_PER_NAME
    prompt.fixed += REPLY_PRIMING
    if "functions" in body or not _tools(body.get("tools"), encoding, prompt):
        return None
    return prompt


# --- the encoder (optional dependency) --------------------------------------------------------
Counter = Callable[[str], int]
_LOCK = threading.Lock()
_LOADED: dict[str, Counter] = {}


def loaded() -> frozenset[str]:
    """Encodings already in memory (using one costs no load)."""
    return frozenset(_LOADED)


def available() -> bool:
    return importlib.util.find_spec("bpe_openai") is not None


def load(encoding: str) -> Counter | None:
    """The token counter for an encoding (loaded once per process: its vocabulary is immutable
    and takes 50 ms to a few seconds to load), or None without the optional package."""
    with _LOCK:
        cached = _LOADED.get(encoding)
        if cached is not None:
            return cached
        # bpe-openai 0.1.4 reads its vocabularies with importlib.resources.open_binary, which
        # warns DeprecationWarning on Python >= 3.11; the warning is the package's, not ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                # The Rust tokenizer itself, without the package's Python wrappers (they refuse
                # texts over a million characters, which slicing makes moot anyway).
                from bpe_openai import _bindings
            except ImportError:
                return None
            tokenizer = _bindings.tokenizer_for_encoding(encoding)
        counter: Counter = tokenizer.count
        _LOADED[encoding] = counter
        return counter
