"""The pure parts of tracing: W3C traceparent parsing (hostile input included), new ids (a
forked child's its own), and the span attributes of a record, checked against the
OpenTelemetry semantic-convention names the installed `opentelemetry-semantic-conventions`
package defines, and against the docs."""

from __future__ import annotations

import re

import pytest
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes

from proxy.attempts import Attempt, AttemptResult
from proxy.config import TracingConfig
from proxy.outcome import Cost, Outcome, RequestRecord, Savings, TimeoutKind, Usage
from proxy.tracing import wanted
from proxy.tracing.attributes import TEXT_MAX, attempt_attributes, server_attributes, span_name
from proxy.tracing.context import (
    TRACESTATE_MAX,
    TraceIds,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)
from tests.cli_support import ROOT
from tests.support import in_forked_child

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_names_its_parent() -> None:
    parent = parse_traceparent(VALID, "vendor=abc")
    assert parent is not None
    assert parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert parent.span_id == 0x00F067AA0BA902B7
    assert parent.sampled and parent.tracestate == "vendor=abc"
    assert format_traceparent(parent.trace_id, parent.span_id, True) == VALID


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        VALID.upper(),  # the spec's hex is lower case
        "ff" + VALID[2:],  # version ff is invalid
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        VALID + "-extra",  # version 00 has exactly four fields
        VALID[:-1],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "x" * 10_000,
        VALID + " " * 600,
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_future_version_keeps_its_first_four_fields() -> None:
    parent = parse_traceparent("01" + VALID[2:] + "-what-comes-later")
    assert parent is not None and parent.span_id == 0x00F067AA0BA902B7


def test_an_oversized_tracestate_is_not_passed_on() -> None:
    parent = parse_traceparent(VALID, "k=" + "v" * TRACESTATE_MAX)
    assert parent is not None and parent.tracestate is None


def test_each_attempt_gets_its_own_span_id() -> None:
    trace = TraceIds(trace_id=7, span_id=8, parent=None, sampled=False)
    first_attempt, second_attempt = attempts()
    first = trace.begin_attempt(first_attempt)
    second = trace.begin_attempt(second_attempt)
    assert first != second
    assert [a.attempt for a in trace.attempts] == [first_attempt, second_attempt]
    assert second == format_traceparent(7, trace.attempts[1].span_id, False)


def full_record(**overrides: object) -> RequestRecord:
    record = RequestRecord(
        request_id="r1",
        method="POST",
        path="/v1/chat/completions",
        started_at=100.0,
        wall_started_at=1_700_000_000.0,
        route="default",
        model="gpt-4o-mini",
        upstream="sim",
        endpoint="chat.completions",
        stream=True,
        status=200,
        upstream_status=200,
        client="team-a",
        client_address="127.0.0.1",
        user_agent="OpenAI/Python 1.99.0",
        upstream_attempts=2,
        finish_reason="length",
        response_model="gpt-4o-mini-2024-07-18",
        first_token_at=100.2,
        client_gone_at=100.5,
        upstream_closed_at=100.501,
        ended_at=100.6,
        usage=Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=2, reasoning_tokens=1),
        savings=Savings(tokens_saved=100, tokens_saved_upper=200, tokens_wasted=1),
        cost=Cost(0.1, 0.2, 0.01),
    )
    record.settle(Outcome.TIMEOUT, timeout_kind=TimeoutKind.IDLE)
    for key, value in overrides.items():
        setattr(record, key, value)
    return record


def attempts() -> tuple[Attempt, Attempt]:
    """A retried 503, then the delivered answer."""
    failed = Attempt("sim", "gpt-4o-mini", 100.0, "primary", status=503, tokens_generated=0)
    failed.end(AttemptResult.SERVER_ERROR, 100.1, "upstream answered 503")
    delivered = Attempt("sim", "gpt-4o-mini", 100.15, "retry", status=200, delivered=True)
    delivered.tokens_generated = 5
    delivered.end(AttemptResult.OK, 100.6)
    return failed, delivered


def every_key() -> set[str]:
    record = full_record()
    record.attempts = list(attempts())
    keys = set(server_attributes(record))
    for i, attempt in enumerate(record.attempts):
        keys |= set(attempt_attributes(record, i, attempt, server_address="h", port=1))
    return keys


def _some_ids() -> list[int]:
    return [new_trace_id() for _ in range(8)] + [new_span_id() for _ in range(8)]


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    """A forked child starts with a copy of the ids' generator: unless it is reseeded there, the
    child draws the very trace and span ids its parent draws next."""
    sent = in_forked_child(lambda: " ".join(f"{i:x}" for i in _some_ids()))
    child, parent = [int(i, 16) for i in sent.split()], _some_ids()
    assert len(child) == len(parent) == 16
    assert not set(child) & set(parent)


def test_each_attempt_span_describes_its_own_attempt() -> None:
    record = full_record(outcome=Outcome.COMPLETED, timeout_kind=None)
    failed, delivered = record.attempts = list(attempts())
    first = attempt_attributes(record, 0, failed, server_address="h", port=1)
    assert first["hangup.attempt.reason"] == "primary"
    assert first["hangup.attempt.result"] == "server_error"
    assert first["error.type"] == "server_error" and first["http.response.status_code"] == 503
    assert "gen_ai.usage.input_tokens" not in first  # the client's answer is not its
    second = attempt_attributes(record, 1, delivered, server_address="h", port=1)
    assert second["hangup.attempt.reason"] == "retry" and "error.type" not in second
    assert second["gen_ai.usage.output_tokens"] == record.usage.completion_tokens
    assert second["gen_ai.response.finish_reasons"] == ("length",)


def test_every_gen_ai_attribute_is_a_semantic_convention_name() -> None:
    known = {
        value
        for name, value in vars(gen_ai_attributes).items()
        if name.startswith("GEN_AI_") and isinstance(value, str)
    }
    ours = {k for k in every_key() if k.startswith("gen_ai.")}
    assert ours >= {
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.response.finish_reasons",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
    }
    assert ours <= known, ours - known


def test_every_attribute_is_documented() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    missing = sorted(k for k in every_key() if f"`{k}`" not in docs)
    assert not missing


def test_timeout_attributes() -> None:
    a = server_attributes(full_record())
    assert a["error.type"] == "timeout" and a["hangup.timeout_phase"] == "idle"
    assert a["hangup.timeout_key"] == "timeouts.idle_s"
    assert a["hangup.cancel_propagation_ms"] == pytest.approx(1.0)
    assert a["gen_ai.response.finish_reasons"] == ("length",)


def test_completed_and_refused_requests_carry_no_error_type() -> None:
    completed = full_record(outcome=Outcome.COMPLETED, timeout_kind=None)
    assert "error.type" not in server_attributes(completed)
    refused = full_record(outcome=Outcome.REJECTED, timeout_kind=None, status=401)
    assert "error.type" not in server_attributes(refused)


def test_an_upstream_refusal_is_the_attempts_error_not_the_servers() -> None:
    record = full_record(
        outcome=Outcome.UPSTREAM_REJECTED, timeout_kind=None, status=404, upstream_status=404
    )
    assert "error.type" not in server_attributes(record)
    answered = Attempt("sim", "gpt-4o-mini", 100.0, status=404, delivered=True)
    answered.end(AttemptResult.OK, 100.1)
    attempt = attempt_attributes(record, 0, answered, server_address="h", port=1)
    assert attempt["error.type"] == "404"
    limited = full_record(
        outcome=Outcome.RATE_LIMITED, timeout_kind=None, status=429, upstream_status=429
    )
    assert server_attributes(limited)["error.type"] == "rate_limited"


def test_client_text_is_bounded() -> None:
    huge = "m" * 100_000
    record = full_record(model=huge, path="/v1/" + huge, response_model=huge)
    a = server_attributes(record)
    for key in ("gen_ai.request.model", "gen_ai.response.model", "url.path"):
        value = a[key]
        assert isinstance(value, str) and len(value) == TEXT_MAX
    assert len(span_name(record)) <= TEXT_MAX + len("chat ")


def test_a_key_in_client_text_is_redacted_as_in_the_log() -> None:
    key = "sk-proj-abcdefghijklmnop0123456789"
    record = full_record(model=key, request_id=f"id {key}", user_agent=f"agent {key}")
    a = server_attributes(record)
    assert key not in repr(a) and key not in span_name(record)
    assert a["hangup.request_id"] == "id [redacted]"


def test_a_non_genai_path_is_named_by_its_method() -> None:
    record = full_record(endpoint="other", path="/v1/models", method="GET")
    assert span_name(record) == "GET"
    assert not any(k.startswith("gen_ai.") for k in server_attributes(record))


def test_attribute_names_are_dotted_lowercase() -> None:
    for key in every_key():
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key), key


ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}


@pytest.mark.parametrize(
    ("enabled", "env", "on"),
    [
        ("auto", {}, False),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        (
            "auto",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            "auto",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            False,
        ),
        (True, {}, True),
        (True, {"OTEL_SDK_DISABLED": "TRUE"}, False),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_when_tracing_is_on(enabled: bool | str, env: dict[str, str], on: bool) -> None:
    assert wanted(TracingConfig.model_validate({"enabled": enabled}), env) is on
