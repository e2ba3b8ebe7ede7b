"""Exact prompt counts for requests whose upstream never reported them (streams cut before
their usage chunk, requests cut before any answer).

Two sources, chosen by the upstream's `engine` (config `upstreams.<name>.engine`):
- self-hosted engines (`llamacpp`, `vllm`, `sglang`): the engine's own tokenize endpoint with
  the chat template applied (`engines.py`);
- OpenAI model families on `engine: openai`, or on a `generic` upstream that is not local: the
  offline tokenizer of the optional `bpe-openai` package, with the chat format's overhead
  (`openai.py`).
Anything else keeps the heuristic estimate.

Runs after the request ended (the record waits, the client does not), bounded: at most
`MAX_CONCURRENT` at once and `TIMEOUT_S` each, then the estimate stands. The offline tokenizer
holds the GIL while it encodes (about 120 ns a character), so long texts are encoded in slices
of `SLICE_CHARS`, cut where the tokenizer itself would cut, yielding to the event loop between
slices; prompts over `MAX_PROMPT_CHARS` are not tokenized.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.billing import is_local_host
from proxy.request_body import RequestBody
from proxy.tokenize import openai
from proxy.tokenize.engines import engine_prompt_tokens

__all__ = ["MAX_PROMPT_CHARS", "SLICE_CHARS", "TIMEOUT_S", "PromptCounter", "slices"]

log = logging.getLogger("hangup.tokenize")

TIMEOUT_S: Final = 2.0
MAX_CONCURRENT: Final = 4
SLICE_CHARS: Final = 32 * 1024
MAX_PROMPT_CHARS: Final = 4 * 1024 * 1024
_MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # parsed again here: keep that parse short
_ENGINES: Final = frozenset({"llamacpp", "vllm", "sglang"})


def slices(text: str, size: int = SLICE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `size` characters whose token counts add up to the whole's.

    A piece ends just before a space that follows a non-space and precedes a letter: there the
    OpenAI pre-tokenizers always start a new token (" word" is one pre-token, and nothing before
    a space absorbs it), so encoding the pieces apart gives the same tokens. Where no such place
    exists within `size` characters (base64, one endless word), the rest is one piece.
    """
    start = 0
    n = len(text)
    while n - start > size:
        cut = -1
        i = text.rfind(" ", start + size // 2, start + size)
        while i > start:
            if not text[i - 1].isspace() and i + 1 < n and text[i + 1].isalpha():
                cut = i
                break
            i = text.rfind(" ", start + size // 2, i)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class PromptCounter:
    """Counts prompts after the fact; one per app."""

    def __init__(self) -> None:
        self._slots: asyncio.Semaphore | None = None

    @staticmethod
    def uses_offline_tokenizer(engine: str, base_url: str) -> bool:
        """`engine: openai`, or a `generic` upstream that is not on this machine or network (a
        local generic upstream is more likely a self-hosted engine than OpenAI's API)."""
        if engine == "openai":
            return True
        return engine == "generic" and not is_local_host((URL(base_url).host or "").lower())

    @staticmethod
    def source_for(engine: str, base_url: str, endpoint: str, model: str | None) -> str | None:
        """Which tokenizer would count this request's prompt (None: the heuristic stays)."""
        if engine in _ENGINES:
            if engine == "sglang" and endpoint not in ("completions", "embeddings"):
                return None
            return engine if endpoint in ("chat.completions", "completions", "embeddings") else None
        if not PromptCounter.uses_offline_tokenizer(engine, base_url) or not openai.available():
            return None
        return openai.encoding_for(endpoint, model)

    @staticmethod
    def preload(encodings: tuple[str, ...] = ("o200k_base", "cl100k_base")) -> None:
        """Load the offline vocabularies in a thread now, so the first cut request does not
        wait for them (loading takes 50 ms to seconds)."""
        if openai.available():
            threading.Thread(
                target=lambda: [openai.load(e) for e in encodings],
                name="hangup-tokenizer-load",
                daemon=True,
            ).start()

    async def count(
        self,
        source: str,
        *,
        base_url: str,
        endpoint: str,
        model: str | None,
        body: RequestBody,
        headers: CIMultiDict[str],
    ) -> int | None:
        """The prompt's token count from `source`, or None (timeout, error, not countable)."""
        if len(body) > _MAX_BODY_BYTES:
            return None
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        if source not in _ENGINES and source not in openai.loaded():
            # Loading a vocabulary happens once per process and may take seconds when its
            # files are not cached: it is not part of any one request's budget.
            await asyncio.to_thread(openai.load, source)
        try:
            async with asyncio.timeout(TIMEOUT_S), self._slots:
                parsed = json.loads(body)
                if not isinstance(parsed, dict):
                    return None
                if source in _ENGINES:
                    return await engine_prompt_tokens(source, base_url, endpoint, parsed, headers)
                return await self._offline(source, endpoint, model, parsed)
        except TimeoutError:
            log.info("prompt tokenization (%s) took over %gs; estimate kept", source, TIMEOUT_S)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # An engine that is down or answers oddly: the estimate stands.
            log.info("prompt tokenization (%s) failed: %s", source, type(exc).__name__)
        return None

    @staticmethod
    async def _offline(
        encoding: str, endpoint: str, model: str | None, body: Mapping[str, Any]
    ) -> int | None:
        prompt = openai.prompt_text(endpoint, model, body)
        if prompt is None or sum(len(t) for t in prompt.texts) > MAX_PROMPT_CHARS:
            return None
        counter = openai.load(encoding)  # loaded by `count` already: a dictionary lookup
        if counter is None:
            return None
        total = prompt.fixed
        for text in prompt.texts:
            for piece in slices(text):
                total += counter(piece)
                await asyncio.sleep(0)  # one slice at a time: other requests move in between
        return total
