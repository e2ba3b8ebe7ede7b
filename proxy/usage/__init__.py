"""Pure token accounting: what a request asked for, what the upstream generated, and how to ask
the upstream to tell us.

The relay calls, in order: `inspect_request` once on the parsed body; `inject_stream_usage` to
ask for a usage chunk; then, per SSE event, `StreamUsageTracker.feed` (whose `EventKind` drives the
first-token and idle timers) and `UsageChunkFilter.client_bytes` (which hides what the client did
not ask for); at the end `tracker.usage()`. Non-streamed answers go through `body_usage`.
docs/accounting.md explains every rule here for users; the code keeps the reasons beside them.

Nothing here raises on odd input: clients and upstreams send what they send, and accounting must
never be the reason a request fails.
"""

from __future__ import annotations

import enum
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from proxy.outcome import Usage
from proxy.sse import SSEEvent

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "EventKind",
    "RequestFacts",
    "StreamUsageTracker",
    "UsageChunkFilter",
    "body_usage",
    "chunk_tokens",
    "endpoint_for",
    "inject_stream_usage",
    "inspect_request",
    "strip_usage_member",
]

Endpoint = Literal["chat.completions", "completions", "responses", "embeddings", "other"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    "chat.completions",
    "completions",
    "responses",
    "embeddings",
    "other",
)

# Prompt estimate (used only when the upstream reports nothing): ~4 characters per token is
# OpenAI's own rule of thumb for English with its BPE tokenizers; each chat message costs a few
# tokens of role and separators (OpenAI's cookbook counts 3, plus 1 for a name), and the reply is
# primed with 3 more. Images count as 85 tokens, the low-detail price: a floor, not a guess.
CHARS_PER_TOKEN: Final = 4
MESSAGE_OVERHEAD_TOKENS: Final = 4
REPLY_PRIMING_TOKENS: Final = 3
IMAGE_TOKENS: Final = 85
# Streamed completion estimate: see `chunk_tokens`.
SINGLE_TOKEN_MAX_CHARS: Final = 12

_MAX_DECODED_BODY: Final = 64 * 1024 * 1024
_IMAGE_PARTS: Final = frozenset({"image_url", "input_image", "image"})


def endpoint_for(path: str) -> Endpoint:
    """The API a request path belongs to, by suffix, so `/v1/...` and `/openai/v1/...` agree."""
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/chat/completions"):
        return "chat.completions"
    if p.endswith("/completions"):
        return "completions"
    if p.endswith("/responses"):
        return "responses"  # `/responses/{id}` and `/responses/{id}/cancel` are "other"
    if p.endswith("/embeddings"):
        return "embeddings"
    return "other"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the client's request says about accounting; values of the wrong type count as absent."""

    endpoint: Endpoint = "other"
    model: str | None = None
    stream: bool = False
    include_usage_requested: bool = False  # the client itself set stream_options.include_usage
    continuous_usage_requested: bool = False  # ... and stream_options.continuous_usage_stats
    has_stream_options: bool = False  # a top-level `stream_options` key exists (any value)
    max_tokens: int | None = None
    n: int = 1
    background: bool = False  # Responses API `background: true`
    prompt_tokens_estimate: int = 0


def _int(value: object) -> int | None:
    # bool is an int subclass; `"max_tokens": true` is not a limit.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def inspect_request(path: str, body: Mapping[str, Any] | None) -> RequestFacts:
    endpoint = endpoint_for(path)
    if not isinstance(body, Mapping):
        return RequestFacts(endpoint=endpoint)
    model = body.get("model")
    options = body.get("stream_options")
    if not isinstance(options, Mapping):
        options = {}
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        limit = _int(body.get(key))
        if limit is not None and limit > 0:
            max_tokens = limit
            break
    n = _int(body.get("n"))
    return RequestFacts(
        endpoint=endpoint,
        model=model if isinstance(model, str) else None,
        stream=body.get("stream") is True,
        include_usage_requested=options.get("include_usage") is True,
        continuous_usage_requested=options.get("continuous_usage_stats") is True,
        has_stream_options="stream_options" in body,
        max_tokens=max_tokens,
        n=n if n is not None and n >= 1 else 1,
        background=body.get("background") is True,
        prompt_tokens_estimate=estimate_prompt_tokens(endpoint, body),
    )


# --- prompt estimate ----------------------------------------------------------------------------


class _Tally:
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
                elif isinstance(part, Mapping):
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
    if depth <= 0:
        return 0
    if isinstance(value, Mapping):
        return sum(len(k) + _string_chars(v, depth - 1) for k, v in value.items() if type(k) is str)
    if isinstance(value, list):
        return sum(_string_chars(v, depth - 1) for v in value)
    return 0


def estimate_prompt_tokens(endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    """ceil(characters / 4) of the prompt text, plus fixed overheads (see the constants above)."""
    t = _Tally()
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if not isinstance(message, Mapping):
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
                if not isinstance(item, Mapping):
                    continue
                t.tokens += MESSAGE_OVERHEAD_TOKENS
                t.content(item.get("content"))
                t.content(item.get("output"))  # function_call_output: a string or parts
                t.content(item.get("summary"))  # reasoning items: [{"text": ...}]
                t.strings(item.get("arguments"), item.get("name"))
        t.tools(body.get("tools"))
    return t.total()


# --- include_usage injection --------------------------------------------------------------------

_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{([ \t\r\n]*\}?)")


def inject_stream_usage(body: bytes, facts: RequestFacts, *, continuous: bool) -> bytes | None:
    """A request body that asks the upstream for usage on a stream, or None if none is needed.

    Without a usage chunk a streamed answer has no token counts at all; with it (and with vLLM's
    `continuous_usage_stats`, counts on every chunk) we can account exactly even when we hang up.
    Only chat and legacy completions take `stream_options`.
    """
    if not facts.stream or facts.endpoint not in ("chat.completions", "completions"):
        return None
    add_continuous = continuous and not facts.continuous_usage_requested
    if facts.include_usage_requested and not add_continuous:
        return None
    if not facts.has_stream_options:
        # Prompts can be megabytes: splice the member in after `{` instead of re-encoding.
        m = _OBJECT_START.match(body)
        if m is not None:
            member = (
                b'"stream_options":{"include_usage":true,"continuous_usage_stats":true}'
                if continuous
                else b'"stream_options":{"include_usage":true}'
            )
            brace = m.start(1)
            sep = b"" if m.group(1).endswith(b"}") else b","
            return b"".join((body[:brace], member, sep, body[brace:]))
    # A `stream_options` member exists (a duplicate key would be ambiguous), or the body does not
    # start like an object: decode, merge, re-encode.
    try:
        obj = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(obj, dict):
        return None
    options = obj.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    if continuous:
        merged["continuous_usage_stats"] = True
    obj["stream_options"] = merged
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


# --- streamed usage -----------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    """What one SSE event means to the relay. Only CONTENT resets first-token and idle timers."""

    CONTENT = "content"  # carries generated output: text, reasoning, refusal or tool-call deltas
    USAGE_ONLY = "usage_only"  # the `"choices": []` + usage chunk that include_usage produces
    DONE = "done"  # `[DONE]`, or a Responses terminal event that is not a failure
    ERROR = "error"  # `{"error": ...}`, Responses `error` or `response.failed`
    OTHER = "other"  # role-only / empty / finish chunks, comments, keep-alives, lifecycle events


class _Reported(NamedTuple):
    prompt: int | None
    completion: int | None
    cached: int | None
    reasoning: int | None


def _detail(usage: Mapping[str, Any], keys: tuple[str, str], field: str) -> int | None:
    for key in keys:
        details = usage.get(key)
        if isinstance(details, Mapping):
            value = _int(details.get(field))
            if value is not None:
                return value
    return None


def _parse_usage(usage: object) -> _Reported | None:
    """Chat/completions (`prompt_tokens`...) and Responses (`input_tokens`...) usage objects."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _int(usage.get("input_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if completion is None:
        completion = _int(usage.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    return _Reported(
        prompt,
        completion,
        _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens"),
        _detail(usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens"),
    )


def chunk_tokens(chars: int) -> int:
    """Completion tokens one content chunk stands for, when the upstream does not say.

    OpenAI, vLLM and llama.cpp send one token per chunk, and a single token is rarely longer than
    12 characters (" Information" is one token); so a chunk counts one token, plus one per further
    4 characters or part when it is longer than that (upstreams that batch several tokens per
    chunk). Chunks are counted, not characters overall, because word-salad and code have long
    tokens: on the llama.cpp completions fixture ceil(chars / 4) says 17 where the truth is 12.
    """
    if chars <= SINGLE_TOKEN_MAX_CHARS:
        return 1
    return 1 + -(-(chars - SINGLE_TOKEN_MAX_CHARS) // CHARS_PER_TOKEN)


def _delta_chars(delta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(output chars, reasoning chars) of a chat delta, or None when it carries no output."""
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
            if isinstance(call, Mapping):
                chars += _function_chars(call.get("function"))
    legacy = delta.get("function_call")  # the deprecated single-function form
    if isinstance(legacy, Mapping):
        found = True
        chars += _function_chars(legacy)
    return (chars, reasoning) if found else None


def _function_chars(fn: object) -> int:
    if not isinstance(fn, Mapping):
        return 0
    return sum(len(v) for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))


_RESPONSES_NEEDED: Final = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "response.cancelled",
    }
)
_RESPONSES_DONE: Final = frozenset(
    {"response.completed", "response.incomplete", "response.cancelled"}
)


class StreamUsageTracker:
    """Classifies the events of one streamed answer and counts what was generated.

    Estimated figures (no usage reported) come from `chunk_tokens` per content chunk and per
    choice; reported figures win whenever the upstream sent any.
    """

    __slots__ = (
        "_est_since_report",
        "_estimated",
        "_estimated_reasoning",
        "_reported",
        "chars_by_choice",
        "chunks_by_choice",
        "content_chunks",
        "done",
        "error",
        "facts",
        "finish_reason",
        "malformed_events",
        "response_id",
    )

    def __init__(self, facts: RequestFacts) -> None:
        self.facts = facts
        self.content_chunks = 0  # events that carried output (of any choice)
        self.chunks_by_choice: dict[int, int] = {}
        self.chars_by_choice: dict[int, int] = {}
        self.malformed_events = 0  # data that is not a JSON object (counted as OTHER)
        self.response_id: str | None = None  # Responses API, from response.created
        self.finish_reason: str | None = None  # the last one seen (chat/completions)
        self.error: str | None = None  # message of an in-band error event
        self.done = False
        self._estimated = 0
        self._estimated_reasoning = 0
        self._est_since_report = 0
        self._reported: _Reported | None = None

    def feed(self, event: SSEEvent) -> EventKind:
        data = event.data
        if data is None:
            return EventKind.OTHER
        if data == "[DONE]":
            self.done = True
            return EventKind.DONE
        name = event.event
        if (
            name is not None
            and name.startswith("response.")
            and name not in _RESPONSES_NEEDED
            and not name.endswith(".delta")
        ):
            # `*.done` / `*.added` events repeat the whole text; no need to parse them.
            return EventKind.OTHER
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if name == "error":  # an SSE-level error event, whatever its payload
            self.error = _error_message(obj.get("error", obj) if isinstance(obj, dict) else data)
            return EventKind.ERROR
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return EventKind.OTHER
        kind = obj.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            return self._responses_event(kind, obj)
        return self._chunk(obj)

    def _chunk(self, obj: dict[str, Any]) -> EventKind:
        error = obj.get("error")
        if error is not None and "choices" not in obj:
            self.error = _error_message(error)
            return EventKind.ERROR
        result = EventKind.OTHER
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, Mapping):
                    continue
                finish = choice.get("finish_reason")
                if isinstance(finish, str):
                    self.finish_reason = finish
                delta = choice.get("delta")
                if isinstance(delta, Mapping):
                    sizes = _delta_chars(delta)
                else:  # legacy completions: {"text": ...}
                    text = choice.get("text")
                    sizes = (len(text), 0) if isinstance(text, str) and text else None
                if sizes is not None:
                    index = _int(choice.get("index")) or 0
                    self._count(index, sizes[0], sizes[1])
                    result = EventKind.CONTENT
            if result is EventKind.CONTENT:
                self.content_chunks += 1
        usage = obj.get("usage")
        if usage is None:
            return result
        reported = _parse_usage(usage)
        if reported is not None:
            self._reported = reported
            self._est_since_report = 0
        if not choices and isinstance(usage, Mapping):
            # choices [] (OpenAI, llama.cpp), null or absent (some vLLM versions): by its shape,
            # so that the filter drops it even when its figures are not ones we can read.
            return EventKind.USAGE_ONLY
        return result

    def _responses_event(self, kind: str, obj: dict[str, Any]) -> EventKind:
        if kind.endswith(".delta"):
            delta = obj.get("delta")
            if not isinstance(delta, str) or not delta:
                return EventKind.OTHER
            # Audio deltas are base64, not text: one chunk, whatever its length.
            chars = 0 if kind == "response.audio.delta" else len(delta)
            reasoning = chars if kind.startswith("response.reasoning") else 0
            self._count(_int(obj.get("output_index")) or 0, chars - reasoning, reasoning)
            self.content_chunks += 1
            return EventKind.CONTENT
        if kind == "error":
            self.error = _error_message(obj)
            return EventKind.ERROR
        response = obj.get("response")
        if not isinstance(response, Mapping):
            return EventKind.OTHER
        rid = response.get("id")
        if isinstance(rid, str) and self.response_id is None:
            self.response_id = rid
        reported = _parse_usage(response.get("usage"))
        if reported is not None:
            self._reported = reported
            self._est_since_report = 0
        if kind == "response.failed":
            # A failed generation is not a completed one: the relay settles it as an upstream
            # error, while still accounting the usage it carries.
            self.error = _error_message(response.get("error"))
            return EventKind.ERROR
        if kind in _RESPONSES_DONE:
            self.done = True
            return EventKind.DONE
        return EventKind.OTHER

    def _count(self, index: int, chars: int, reasoning: int) -> None:
        tokens = chunk_tokens(chars + reasoning)
        self._estimated += tokens
        self._est_since_report += tokens
        if reasoning and not chars:
            self._estimated_reasoning += tokens
        self.chunks_by_choice[index] = self.chunks_by_choice.get(index, 0) + 1
        self.chars_by_choice[index] = self.chars_by_choice.get(index, 0) + chars + reasoning

    @property
    def reported(self) -> bool:
        """Whether the upstream reported completion tokens (final or continuous usage)."""
        return self._reported is not None and self._reported.completion is not None

    @property
    def generated_tokens(self) -> int:
        """Best figure for completion tokens generated so far.

        The last reported count (continuous usage stats make it exact at any moment) plus the
        estimate for content that arrived after that report; the estimate alone otherwise.
        """
        r = self._reported
        if r is None or r.completion is None:
            return self._estimated
        return r.completion + self._est_since_report

    def usage(self) -> Usage:
        r = self._reported
        completion = self.generated_tokens
        prompt = None if r is None else r.prompt
        if r is not None and r.reasoning is not None:
            reasoning = r.reasoning
        else:
            reasoning = min(self._estimated_reasoning, completion)
        return Usage(
            prompt_tokens=self.facts.prompt_tokens_estimate if prompt is None else prompt,
            completion_tokens=completion,
            cached_tokens=0 if r is None or r.cached is None else r.cached,
            reasoning_tokens=reasoning,
            prompt_estimated=prompt is None,
            completion_estimated=not self.reported or self._est_since_report > 0,
        )


def _error_message(error: object) -> str:
    if isinstance(error, Mapping):
        message = error.get("message")
        if isinstance(message, str):
            return message
    if isinstance(error, str):
        return error
    return "upstream error event"


# --- hiding injected usage from clients ----------------------------------------------------------

_USAGE_KEY: Final = b'"usage"'
# A usage value as OpenAI, vLLM and llama.cpp write it: null, or an object of numbers that may hold
# `*_details` objects one level down. Strings are never part of it, so braces cannot be quoted.
_USAGE_VALUE: Final = re.compile(rb"[ \t]*:[ \t]*(?:null|\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})[ \t]*")
_SPACE: Final = b" \t\r\n"


def strip_usage_member(raw: bytes) -> bytes:
    """`raw` without its last top-level-looking `"usage": ...` member, bytes otherwise unchanged.

    A `"usage"` preceded by `,` or `{` is a member name, never text inside a string: in JSON a
    quote inside a string is always escaped. The last match is taken because the chunk's own
    `usage` is serialised after `choices` by every upstream we know.
    """
    end = len(raw)
    while True:
        i = raw.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return raw
        end = i
        before = i - 1
        while before >= 0 and raw[before] in _SPACE:
            before -= 1
        if before < 0 or raw[before] not in b",{":
            continue
        m = _USAGE_VALUE.match(raw, i + len(_USAGE_KEY))
        if m is None:
            continue
        stop = m.end()
        if raw[before] == 0x2C:  # ",": drop from the comma to the end of the value
            return raw[:before] + raw[stop:]
        # first member: drop it and the comma after it (or nothing, if it was the only one)
        if raw[stop : stop + 1] == b",":
            stop += 1
        return raw[: before + 1] + raw[stop:]


class UsageChunkFilter:
    """Makes an injected-usage stream look to the client like the stream it asked for.

    Every data event loses its `usage` member (OpenAI's `"usage":null` on each chunk, vLLM's
    per-chunk objects); with `drop_usage_chunk` the usage-only chunk goes too. Bytes are edited,
    never re-encoded. `UsageChunkFilter.needed` says which filter, if any, a request needs.
    """

    __slots__ = ("_drop_usage_chunk",)

    def __init__(self, *, drop_usage_chunk: bool = True) -> None:
        self._drop_usage_chunk = drop_usage_chunk

    @classmethod
    def needed(cls, facts: RequestFacts, *, continuous: bool) -> UsageChunkFilter | None:
        """The filter for a stream whose body `inject_stream_usage(..., continuous)` changed.

        The client asked for no usage: hide it all. It asked for the final usage chunk but not
        for the per-chunk stats we added: hide only those. It asked for everything: None.
        """
        if not facts.include_usage_requested:
            return cls(drop_usage_chunk=True)
        if continuous and not facts.continuous_usage_requested:
            return cls(drop_usage_chunk=False)
        return None

    def client_bytes(self, event: SSEEvent, kind: EventKind) -> bytes:
        if kind is EventKind.USAGE_ONLY:
            return b"" if self._drop_usage_chunk else event.raw
        if event.data is not None and _USAGE_KEY in event.raw:
            return strip_usage_member(event.raw)
        return event.raw


# --- non-streamed answers -----------------------------------------------------------------------


def _decode(body: bytes, content_encoding: str | None) -> bytes | None:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # RFC 9110 deflate is zlib-wrapped, but some servers send raw deflate.
        wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
    else:
        return None  # br, zstd: not decodable with the standard library
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, _MAX_DECODED_BODY)
    except zlib.error:
        return None
    return None if decoder.unconsumed_tail else out


def _output_chars(endpoint: Endpoint, obj: Mapping[str, Any]) -> int:
    t = _Tally()
    if endpoint == "responses":
        output = obj.get("output")
        for item in output if isinstance(output, list) else ():
            if isinstance(item, Mapping):
                t.content(item.get("content"))
                t.content(item.get("summary"))
                t.strings(item.get("arguments"))
        return t.chars
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, Mapping):
            continue
        t.strings(choice.get("text"))
        message = choice.get("message")
        if isinstance(message, Mapping):
            sizes = _delta_chars(message)
            if sizes is not None:
                t.chars += sizes[0] + sizes[1]
    return t.chars


def body_usage(body: bytes, facts: RequestFacts, content_encoding: str | None) -> Usage:
    """Usage of a non-streamed JSON answer; estimated (and flagged) where the answer has none.

    Without a reported count, completion tokens are ceil(output characters / 4): there are no
    chunks to count in a whole answer. Embeddings generate nothing, so 0 completion is exact.
    """
    no_completion = facts.endpoint == "embeddings"
    decoded = _decode(body, content_encoding)
    obj: object = None
    if decoded is not None:
        try:
            obj = json.loads(decoded)
        except ValueError:
            obj = None
    if not isinstance(obj, Mapping):
        return Usage(
            prompt_tokens=facts.prompt_tokens_estimate,
            prompt_estimated=True,
            completion_estimated=not no_completion,
        )
    r = _parse_usage(obj.get("usage")) or _Reported(None, None, None, None)
    if r.completion is not None:
        completion, completion_estimated = r.completion, False
    elif no_completion:
        completion, completion_estimated = 0, False
    else:
        completion = -(-_output_chars(facts.endpoint, obj) // CHARS_PER_TOKEN)
        completion_estimated = True
    return Usage(
        prompt_tokens=facts.prompt_tokens_estimate if r.prompt is None else r.prompt,
        completion_tokens=completion,
        cached_tokens=r.cached or 0,
        reasoning_tokens=r.reasoning or 0,
        prompt_estimated=r.prompt is None,
        completion_estimated=completion_estimated,
    )
