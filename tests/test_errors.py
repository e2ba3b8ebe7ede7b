"""The error vocabulary: each error's status, OpenAI type and code, outcome and retry advice,
and the two renderings (a JSON body, an in-band SSE event) that the OpenAI SDK parses."""

from __future__ import annotations

import json

import pytest

from proxy.errors import (
    BadRequest,
    Draining,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
    UpstreamFailed,
    UpstreamUnreachable,
    render_body,
    render_sse_event,
)
from proxy.outcome import Outcome, TimeoutKind


@pytest.mark.parametrize(
    ("err", "status", "error_type", "code", "outcome", "headers"),
    [
        (BadRequest("m"), 400, "invalid_request_error", "invalid_request", Outcome.REJECTED, {}),
        (
            Unauthorized("m"),
            401,
            "authentication_error",
            "invalid_api_key",
            Outcome.REJECTED,
            {"www-authenticate": "Bearer"},
        ),
        (NotFound("m"), 404, "invalid_request_error", "not_found", Outcome.REJECTED, {}),
        (
            PayloadTooLarge("m"),
            413,
            "invalid_request_error",
            "request_too_large",
            Outcome.REJECTED,
            {"x-should-retry": "false"},
        ),
        (
            Draining("m"),
            503,
            "service_unavailable_error",
            "shutting_down",
            Outcome.REJECTED,
            {"x-should-retry": "true"},
        ),
        (
            UpstreamUnreachable("m"),
            502,
            "upstream_error",
            "upstream_unreachable",
            Outcome.UPSTREAM_ERROR,
            {},
        ),
        (UpstreamFailed("m"), 502, "upstream_error", "upstream_failed", Outcome.UPSTREAM_ERROR, {}),
        (ProxyError("m"), 500, "server_error", None, Outcome.REJECTED, {}),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ProxyError) else None,
)
def test_each_error_maps_to_one_answer(
    err: ProxyError,
    status: int,
    error_type: str,
    code: str | None,
    outcome: Outcome,
    headers: dict[str, str],
) -> None:
    assert (err.status, err.error_type, err.code, err.outcome) == (
        status,
        error_type,
        code,
        outcome,
    )
    assert err.headers() == headers


@pytest.mark.parametrize("kind", list(TimeoutKind))
def test_a_gateway_timeout_names_its_phase_and_says_whether_sdks_may_retry(
    kind: TimeoutKind,
) -> None:
    err = GatewayTimeout("too slow", kind)
    assert (err.status, err.error_type, err.outcome) == (504, "timeout_error", Outcome.TIMEOUT)
    assert err.code == f"{kind.value}_timeout"
    assert err.headers() == {"x-should-retry": "false"}  # SDKs would triple the wait
    assert GatewayTimeout("too slow", kind, retry=True).headers() == {"x-should-retry": "true"}


def test_the_body_is_the_openai_error_shape() -> None:
    err = BadRequest('bad "field"\nhere', param="messages")
    assert json.loads(render_body(err)) == {
        "error": {
            "message": 'bad "field"\nhere',
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_request",
        }
    }


def test_the_in_band_event_is_one_sse_data_event_carrying_the_body() -> None:
    err = GatewayTimeout("idle for 3 s\n\ndata: [DONE]", TimeoutKind.IDLE)
    event = render_sse_event(err)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    # One event: a message with newlines cannot end it early or forge another event.
    assert event.count(b"\n\n") == 1 and b"\n" not in event[:-2]
    assert json.loads(event[len(b"data: ") :]) == json.loads(render_body(err))
