"""Streamed usage: what each SSE event means to the relay (`EventKind`, proxy/usage/event_kind.py),
and what a stream generated. Chat and completions chunks are read here; the Responses API's
events in proxy/usage/responses_events.py; the plain reads (`feed_plain`, `feed_shaped`, the
path of nearly every read) in proxy/usage/plain_reads.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import UpstreamFailed
from proxy.outcome import Usage
from proxy.sse import SSEEvent
from proxy.usage.event_kind import (
    EVENT_CONTENT,
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_OTHER,
    EVENT_USAGE_ONLY,
    EventKind,
    error_message,
)
from proxy.usage.facts import RequestFacts, as_int
from proxy.usage.fast import ChunkFields, Shape, Sizes, content_sizes, parse_json
from proxy.usage.plain_reads import SINGLE_TOKEN_MAX_CHARS, PlainReads, chunk_tokens
from proxy.usage.reported import Reported, parse_usage, read_usage
from proxy.usage.responses_events import (
    RESPONSE_HEAD_EVENTS,
    ResponsesEvents,
    lifecycle_kind,
    repeats_text,
    response_head,
)

__all__ = ["SINGLE_TOKEN_MAX_CHARS", "StreamUsageTracker", "chunk_tokens", "delta_chars"]


def delta_chars(delta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(output chars, reasoning chars) of a chat delta, or None when it carries no output.

    (Here and in `_chunk`, `type(x) is dict or isinstance(x, Mapping)`: a parsed JSON object
    is a dict, and `isinstance` against the ABC is a Python-level `__instancecheck__` frame;
    None is never a Mapping.)"""
    chars = reasoning = 0
    found = False
    for key in ("content", "refusal"):
        text = delta.get(key)
        if isinstance(text, str) and text:
            chars += len(text)
            found = True
    for key in ("reasoning_content", "reasoning"):
        text = delta.get(key)
        if isinstance(text, str) and text:
            reasoning += len(text)
            found = True
    calls = delta.get("tool_calls")
    if isinstance(calls, list) and calls:
        found = True  # even the first fragment (id and name only) is generated output
        for call in calls:
            if type(call) is dict or isinstance(call, Mapping):
                chars += _function_chars(call.get("function"))
    legacy = delta.get("function_call")  # the deprecated single-function form
    if legacy is not None and (type(legacy) is dict or isinstance(legacy, Mapping)):
        found = True
        chars += _function_chars(legacy)
    return (chars, reasoning) if found else None


def _function_chars(fn: object) -> int:
    if type(fn) is not dict and not isinstance(fn, Mapping):
        return 0
    return sum(len(v) for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))


class StreamUsageTracker(PlainReads, ResponsesEvents):
    """Classifies the events of one streamed answer and counts what was generated.

    Estimated figures (no usage reported) come from `chunk_tokens` per content chunk and per
    choice; reported figures win whenever the upstream sent any.
    """

    __slots__ = (
        "_chars0",
        "_chunks0",
        "_declined",
        "_est_since_report",
        "_estimated",
        "_estimated_reasoning",
        "_fast",
        "_others",
        "_reported",
        "_shape",
        "_shape_misses",
        "content_chunks",
        "done",
        "error",
        "facts",
        "finish_reason",
        "generated",
        "malformed_events",
        "response_id",
        "response_model",
    )

    def __init__(self, facts: RequestFacts, *, fast: bool = True) -> None:
        self.facts = facts
        self._fast = fast  # False: parse every event in full (the reference the tests compare)
        self.content_chunks = 0  # events that carried output (of any choice)
        # Content chunks and chars of choice 0 (nearly every stream has that one only), and of
        # any other choice: two ints where two dicts were (one stream held is ~30 KiB).
        self._chunks0 = self._chars0 = 0
        self._others: dict[int, list[int]] | None = None
        self.malformed_events = 0  # data that is not a JSON object (counted as OTHER)
        self.response_id: str | None = None  # Responses API, from response.created
        self.finish_reason: str | None = None  # the last one seen (chat/completions)
        self.response_model: str | None = None  # the first chunk's "model" (for traces)
        self.error: str | None = None  # message of an in-band error event
        self.done = False
        self._estimated = 0
        self._estimated_reasoning = 0
        self._est_since_report = 0
        self._reported: Reported | None = None
        # `generated_tokens`, kept up to date as a plain attribute: the pump reads it after
        # every write to the client, and a property is a frame each time.
        self.generated = 0
        self._shape: Shape | None = None  # of the last plain content chunk (`feed_plain`)
        self._shape_misses = 0
        # The data of the block `feed_plain` last declined (its typed decode said None): the
        # caller feeds that block next, through the decoder, and `feed` need not try again.
        self._declined: bytes | None = None

    def feed(self, event: SSEEvent) -> EventKind:
        data = event.data
        if data is None:
            if event.event is not None or event.id is not None or event.retry is not None:
                # Fields but no data: the OpenAI SDKs still dispatch it and parse "" as JSON.
                self.malformed_events += 1
            return EVENT_OTHER
        if data == "[DONE]":
            self.done = True
            return EVENT_DONE
        name = event.event
        if name is None and self._fast:
            declined, self._declined = self._declined, None
            # (Compared as bytes: text decoded from invalid UTF-8 is not what was declined.)
            if declined is None or declined != data.encode("utf-8", "surrogatepass"):
                sizes = content_sizes(data)  # plain content chunks without the full parse
                if sizes is not None:
                    return self._content(sizes)
        if repeats_text(name):
            # `*.done` / `*.added` events repeat the whole text; no need to parse them.
            return EVENT_OTHER
        if name in RESPONSE_HEAD_EVENTS and self._fast:
            head = response_head(data)  # (not the whole output `response.completed` repeats)
            if head is not None:
                return self._responses_event(head["type"], head)
        obj = self._parse(data)
        if name == "error":  # an SSE-level error event, whatever its payload
            self.error = error_message(obj.get("error", obj) if isinstance(obj, dict) else data)
            return EVENT_ERROR
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return EVENT_OTHER
        kind = obj.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            return self._responses_event(kind, obj)
        return self._chunk(obj)

    def _parse(self, data: str) -> Any:
        """An event's data parsed (None: not JSON)."""
        try:
            return parse_json(data) if self._fast else json.loads(data)
        except ValueError:
            return None
        except RecursionError as exc:
            # Nothing a client could parse either: end the stream with an error event.
            raise UpstreamFailed("upstream sent an SSE event nested too deeply to read") from exc

    def feed_skeleton(
        self, event: SSEEvent, restore: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> EventKind | None:
        """`feed` of an event whose data is the skeleton of a huge data line
        (proxy/usage/skeleton.py): the same answer and the same counts as `feed` of the whole
        event, or None (nothing changed) when the skeleton cannot tell and the whole event
        must be fed. `restore` gives the parsed skeleton its strings' whole lengths (None: a
        marker sits where a value is read)."""
        data, name = event.data, event.event
        if data is None or data == "[DONE]" or name == "error":
            return None  # not a skeleton's shape, or an error read by its whole text
        if repeats_text(name):
            return EVENT_OTHER
        if name in RESPONSE_HEAD_EVENTS and self._fast:
            head = response_head(data)
            if head is not None:
                restored = restore(head)
                read_kind = None if restored is None else lifecycle_kind(restored.get("type"))
                if restored is None or read_kind is None:
                    return None  # (a marker where a value is read: the whole event)
                return self._responses_event(read_kind, restored)
        # What `content_sizes` would take (its typed decode accepts the same structure and
        # types whatever the strings' lengths): counted as `_chunk` counts it, without the
        # model name that only the full parse reads.
        plain = name is None and self._fast and content_sizes(data) is not None
        obj = self._parse(data)
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return EVENT_OTHER
        restored = restore(obj)
        if restored is None:
            return None
        if plain:
            model = self.response_model
            plain_kind = self._chunk(restored)
            self.response_model = model
            return plain_kind
        kind = restored.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            return self._responses_event(kind, restored)
        return self._chunk(restored)

    def _content(self, sizes: Sizes) -> EventKind:
        if not sizes:
            return EVENT_OTHER
        for index, chars, reasoning in sizes:
            self._count(index, chars, reasoning)
        self.content_chunks += 1
        return EVENT_CONTENT

    def _chunk(self, obj: dict[str, Any]) -> EventKind:
        error = obj.get("error")
        if error is not None and "choices" not in obj:
            self.error = error_message(error)
            return EVENT_ERROR
        result = EVENT_OTHER
        if self.response_model is None:
            model = obj.get("model")
            if isinstance(model, str):
                self.response_model = model[:256]
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if type(choice) is not dict and not isinstance(choice, Mapping):
                    continue
                finish = choice.get("finish_reason")
                if isinstance(finish, str):
                    self.finish_reason = finish
                delta = choice.get("delta")
                if type(delta) is dict or isinstance(delta, Mapping):
                    sizes = delta_chars(delta)
                else:  # legacy completions: {"text": ...}
                    text = choice.get("text")
                    sizes = (len(text), 0) if isinstance(text, str) and text else None
                if sizes is not None:
                    index = as_int(choice.get("index")) or 0
                    self._count(index, sizes[0], sizes[1])
                    result = EVENT_CONTENT
            if result is EVENT_CONTENT:
                self.content_chunks += 1
        usage = obj.get("usage")
        if usage is None:
            return result
        reported = parse_usage(usage)
        if reported is not None:
            self._report(reported)
        if not choices and (type(usage) is dict or isinstance(usage, Mapping)):
            # choices [] (OpenAI, llama.cpp), null or absent (some vLLM versions): by its shape,
            # so that the filter drops it even when its figures are not ones we can read.
            return EVENT_USAGE_ONLY
        return result

    def _fields(self, chunk: ChunkFields) -> EventKind:
        """`_chunk` of a chunk the typed decoder read (`read_chunk`: a stream's finish and
        usage chunks): the same answer and the same counts, from its typed fields. What the
        decoder accepts, `_chunk` reads alike: no error, no `type`, choices that are objects
        whose delta (an object or null) has no tool or function call, strings where `_chunk`
        reads strings, an int index, a usage object `read_usage` reads as `parse_usage` does.
        tests/test_usage_fields.py holds the two equal."""
        if self.response_model is None:
            model = chunk.model
            if model is not None:
                self.response_model = model[:256]
        result = EVENT_OTHER
        choices = chunk.choices
        if choices:
            for choice in choices:
                finish = choice.finish_reason
                if finish is not None:
                    self.finish_reason = finish
                delta = choice.delta
                if delta is not None:  # `delta_chars` of it
                    content, refusal = delta.content, delta.refusal
                    thought, reasoning = delta.reasoning_content, delta.reasoning
                    if not (content or refusal or thought or reasoning):
                        continue
                    self._count(
                        choice.index or 0,
                        (len(content) if content else 0) + (len(refusal) if refusal else 0),
                        (len(thought) if thought else 0) + (len(reasoning) if reasoning else 0),
                    )
                else:  # legacy completions: {"text": ...}
                    text = choice.text
                    if not text:
                        continue
                    self._count(choice.index or 0, len(text), 0)
                result = EVENT_CONTENT
            if result is EVENT_CONTENT:
                self.content_chunks += 1
        usage = chunk.usage
        if usage is None:
            return result
        reported = read_usage(usage)
        if reported is not None:
            self._report(reported)
        # choices [] or absent with a usage object: usage-only, as `_chunk` says by its shape
        return result if choices else EVENT_USAGE_ONLY

    def _count(self, index: int, chars: int, reasoning: int) -> None:
        tokens = chunk_tokens(chars + reasoning)
        self._estimated += tokens
        self._est_since_report += tokens
        self.generated += tokens
        if reasoning and not chars:
            self._estimated_reasoning += tokens
        if index:
            self._tally(index, chars + reasoning)
        else:
            self._chunks0 += 1
            self._chars0 += chars + reasoning

    def _report(self, reported: Reported) -> None:
        """Usage the upstream reported: it wins over the estimate from here on."""
        self._reported = reported
        self._est_since_report = 0
        completion = reported.completion
        self.generated = self._estimated if completion is None else completion

    @property
    def chunks_by_choice(self) -> dict[int, int]:
        """Content chunks per choice index (the ones that had any)."""
        counts = {0: self._chunks0} if self._chunks0 else {}
        counts.update((i, c[0]) for i, c in (self._others or {}).items())
        return counts

    @property
    def chars_by_choice(self) -> dict[int, int]:
        """Output and reasoning chars per choice index (the ones that had a content chunk)."""
        counts = {0: self._chars0} if self._chunks0 else {}
        counts.update((i, c[1]) for i, c in (self._others or {}).items())
        return counts

    @property
    def terminated(self) -> bool:
        """Whether the stream's terminal event came: `[DONE]`, a Responses terminal event, or a
        `finish_reason` (some servers end with that and no `[DONE]`). Without one, the upstream
        cut the stream, however cleanly the connection closed."""
        return self.done or self.finish_reason is not None

    @property
    def reported(self) -> bool:
        """Whether the upstream reported completion tokens (final or continuous usage)."""
        return self._reported is not None and self._reported.completion is not None

    @property
    def generated_tokens(self) -> int:
        """Best figure for completion tokens generated so far (`generated`).

        The last reported count (continuous usage stats make it exact at any moment) plus the
        estimate for content that arrived after that report; the estimate alone otherwise.
        """
        return self.generated

    def usage(self) -> Usage:
        """The stream's usage so far (twice a stream: its attempt's close, the record's seal).
        `generated_tokens` and `reported` read without their properties, `min` without its
        call (~1k instructions: argument parsing) and the `Usage` built positionally (the
        fields in their order, proxy/outcome.py): the same figures."""
        r = self._reported
        completion = self.generated
        if r is None:
            prompt = cached = reasoning = reported = None
        else:
            prompt, reported, cached, reasoning = r  # Reported's fields, in their order
        if reasoning is None:
            reasoning = self._estimated_reasoning
            if completion < reasoning:  # `min(estimated, completion)`
                reasoning = completion
        return Usage(
            self.facts.prompt_tokens_estimate if prompt is None else prompt,
            completion,
            0 if cached is None else cached,
            reasoning,
            prompt is None,
            reported is None or self._est_since_report > 0,
        )
