"""Pure token accounting: what a request asked for, what the upstream generated, and how to ask
the upstream to tell us.

The relay calls, in order: `inspect_request` once on the parsed body; `inject_stream_usage` to
ask for a usage chunk; then, per SSE event, `StreamUsageTracker.feed` (whose `EventKind` drives the
first-token and idle timers) and `UsageChunkFilter.client_bytes` (which hides what the client did
not ask for); at the end `tracker.usage()`. Non-streamed answers go through `body_usage`.
docs/accounting.md explains every rule here for users; the code keeps the reasons beside them.

One module per noun: `facts` (the request), `prompt` (prompt estimate), `inject` (asking for
usage), `reported` (usage objects upstreams send), `event_kind` (what an event means to the relay),
`stream` (the stream tracker; chat and completions chunks), `responses_events` (the Responses
API's events, for the tracker), `filter` (hiding injected usage), `body` (non-streamed answers).

Nothing here raises on odd input: clients and upstreams send what they send, and accounting must
never be the reason a request fails.
"""

from proxy.usage.body import body_usage
from proxy.usage.event_kind import EventKind
from proxy.usage.facts import ENDPOINTS, Endpoint, RequestFacts, endpoint_for, inspect_request
from proxy.usage.filter import UsageChunkFilter, strip_usage_member
from proxy.usage.inject import inject_stream_usage
from proxy.usage.prompt import (
    CHARS_PER_TOKEN,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    estimate_prompt_tokens,
)
from proxy.usage.stream import SINGLE_TOKEN_MAX_CHARS, StreamUsageTracker, chunk_tokens

__all__ = [
    "CHARS_PER_TOKEN",
    "ENDPOINTS",
    "IMAGE_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "SINGLE_TOKEN_MAX_CHARS",
    "Endpoint",
    "EventKind",
    "RequestFacts",
    "StreamUsageTracker",
    "UsageChunkFilter",
    "body_usage",
    "chunk_tokens",
    "endpoint_for",
    "estimate_prompt_tokens",
    "inject_stream_usage",
    "inspect_request",
    "strip_usage_member",
]
