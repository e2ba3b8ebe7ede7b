"""Span attributes of one finished request, from its record alone (pure: no OpenTelemetry
import, so it is tested without the extra installed).

Names follow the OpenTelemetry GenAI semantic conventions (semconv 1.37+: `gen_ai.provider.name`
replaced `gen_ai.system`, which is still sent for backends that read only the old name), the HTTP
and error conventions, and `hangup.*` for what only a cancelling proxy knows. The mapping to the
Prometheus metrics is in docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from proxy.attempts import Attempt, AttemptResult
from proxy.logs import redact
from proxy.outcome import Outcome, RequestRecord

AttributeValue = str | bool | int | float | tuple[str, ...]
Attributes = dict[str, AttributeValue]

# The API family hangup speaks; the server behind it is in server.address (the conventions'
# advice for OpenAI-compatible servers whose vendor the client cannot know).
PROVIDER: Final = "openai"
# Our endpoint names -> gen_ai.operation.name well-known values.
OPERATIONS: Final[Mapping[str, str]] = {
    "chat.completions": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# Model names and paths are client text: bounded, like every other attribute from a request.
TEXT_MAX: Final = 256
# Outcomes that end a request in error, and the error.type each is reported as.
# (upstream_rejected, a 4xx from the upstream, is the client's error: on the SERVER span no
# error.type, as for our own refusals; the attempt's CLIENT span has the status as error.type.)
_ERROR_TYPES: Final[Mapping[Outcome, str]] = {
    Outcome.CLIENT_CANCELLED: "client_cancelled",
    Outcome.TIMEOUT: "timeout",
    Outcome.UPSTREAM_ERROR: "upstream_error",
    Outcome.RATE_LIMITED: "rate_limited",
    Outcome.SHUTDOWN: "shutdown",
    Outcome.INTERNAL_ERROR: "internal_error",
}


def _text(value: str) -> str:
    """Client or upstream text as an attribute: bounded, and through the same secret redaction
    as the log (a key pasted into a model name or a request id must not reach a trace store)."""
    return redact(value if len(value) <= TEXT_MAX else value[:TEXT_MAX])


def operation(record: RequestRecord) -> str | None:
    return OPERATIONS.get(record.endpoint)


def span_name(record: RequestRecord) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}` (GenAI), else the HTTP method alone
    (the HTTP conventions' name when there is no low-cardinality route)."""
    op = operation(record)
    if op is None:
        return record.method
    return f"{op} {_text(record.model)}" if record.model else op


def error_type(record: RequestRecord) -> str | None:
    """The span's error.type: why the request did not end well, or None when it did (a 4xx
    refusal is the client's error, not the server span's, as the HTTP conventions say)."""
    if record.outcome is None:
        return "internal_error"
    return _ERROR_TYPES.get(record.outcome)


def _genai(record: RequestRecord, out: Attributes) -> None:
    op = operation(record)
    if op is None:
        return
    out["gen_ai.operation.name"] = op
    out["gen_ai.provider.name"] = PROVIDER
    out["gen_ai.system"] = PROVIDER
    if record.model:
        out["gen_ai.request.model"] = _text(record.model)
    if record.response_model:
        out["gen_ai.response.model"] = _text(record.response_model)
    out["gen_ai.request.stream"] = record.stream
    if record.finish_reason:
        out["gen_ai.response.finish_reasons"] = (_text(record.finish_reason),)
    usage = record.usage
    out["gen_ai.usage.input_tokens"] = usage.prompt_tokens
    out["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if usage.cached_tokens:
        out["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if usage.reasoning_tokens:
        out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
    if record.ttft_s is not None:
        out["gen_ai.response.time_to_first_chunk"] = record.ttft_s


def server_attributes(record: RequestRecord) -> Attributes:
    """The request's SERVER span: GenAI, HTTP and hangup's own attributes."""
    out: Attributes = {
        "http.request.method": record.method,
        "url.path": _text(record.path),
        "hangup.request_id": _text(record.request_id),
    }
    if record.status is not None:
        out["http.response.status_code"] = record.status
    if record.client_address is not None:
        out["client.address"] = record.client_address
    if record.user_agent is not None:
        out["user_agent.original"] = _text(record.user_agent)
    if record.client is not None:
        out["hangup.client"] = record.client
    if record.route is not None:
        out["hangup.route"] = record.route
    if record.upstream is not None:
        out["hangup.upstream"] = record.upstream
    _genai(record, out)
    if record.outcome is not None:
        out["hangup.outcome"] = record.outcome.value
    error = error_type(record)
    if error is not None:
        out["error.type"] = error
    if record.timeout_kind is not None:
        out["hangup.timeout_phase"] = record.timeout_kind.value
        out["hangup.timeout_key"] = record.timeout_kind.config_key
    propagation = record.cancel_propagation_s
    if propagation is not None:
        out["hangup.cancel_propagation_ms"] = round(propagation * 1000, 3)
    usage = record.usage
    if usage.prompt_estimated or usage.completion_estimated:
        out["hangup.usage_estimated"] = True
    if record.savings is not None:
        out["hangup.billing"] = record.savings.billing
        out["hangup.tokens_saved"] = record.savings.tokens_saved
        out["hangup.tokens_wasted"] = record.savings.tokens_wasted
        if record.savings.tokens_saved_upper is not None:
            out["hangup.tokens_saved_upper"] = record.savings.tokens_saved_upper
    cost = record.cost
    if cost is not None and cost.used_usd is not None:
        out["hangup.cost_usd"] = cost.used_usd
        if cost.saved_usd is not None:
            out["hangup.cost_saved_usd"] = cost.saved_usd
        if cost.wasted_usd is not None:
            out["hangup.cost_wasted_usd"] = cost.wasted_usd
    out["hangup.upstream_attempts"] = record.upstream_attempts
    if record.background is not None:
        out["hangup.background_cancel"] = record.background.value
    return out


def attempt_error_type(record: RequestRecord, attempt: Attempt) -> str | None:
    """An attempt's error.type: its result when that was not `ok` (an attempt hangup gave up on
    says why the request ended: client gone, a deadline), else a 4xx/5xx status it relayed, else
    for the answer the client got, whatever ended the request."""
    result = attempt.result
    if result is AttemptResult.ABANDONED:
        return error_type(record) or "abandoned"
    if result is not None and result is not AttemptResult.OK:
        return str(result.value)
    if attempt.status is not None and attempt.status >= 400:
        return str(attempt.status)
    if attempt.delivered or result is None:
        return error_type(record)
    return None


def attempt_attributes(
    record: RequestRecord,
    index: int,
    attempt: Attempt,
    *,
    server_address: str | None,
    port: int | None,
) -> Attributes:
    """The CLIENT span of upstream attempt `index` (0-based, in the order they were sent)."""
    out: Attributes = {
        "http.request.method": record.method,
        "hangup.attempt": index,
        "hangup.attempt.reason": attempt.reason,
        "hangup.upstream": attempt.upstream,
    }
    if attempt.result is not None:
        out["hangup.attempt.result"] = attempt.result.value
    if server_address is not None:
        out["server.address"] = server_address
    if port is not None:
        out["server.port"] = port
    if attempt.status is not None:
        out["http.response.status_code"] = attempt.status
    op = operation(record)
    if op is not None:
        out["gen_ai.operation.name"] = op
        out["gen_ai.provider.name"] = PROVIDER
        model = attempt.model or record.model
        if model:
            out["gen_ai.request.model"] = _text(model)
        if attempt.tokens_generated:
            out["gen_ai.usage.output_tokens"] = attempt.tokens_generated
        if attempt.delivered or len(record.attempts) <= 1:
            # The answer the client got: the record's usage and response details are its own.
            if record.response_model:
                out["gen_ai.response.model"] = _text(record.response_model)
            if record.finish_reason:
                out["gen_ai.response.finish_reasons"] = (_text(record.finish_reason),)
            out["gen_ai.usage.input_tokens"] = record.usage.prompt_tokens
            out["gen_ai.usage.output_tokens"] = record.usage.completion_tokens
    error = attempt_error_type(record, attempt)
    if error is not None:
        out["error.type"] = error
    return out
