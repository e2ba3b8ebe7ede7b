"""The proxy's small error vocabulary, mapped to HTTP in one place.

Each error knows its HTTP status, its OpenAI error `type`, the outcome it ends the request in,
and whether an OpenAI SDK may retry it. `render_body` makes the OpenAI-shaped JSON; nothing
else in the proxy formats error bodies, and no traceback ever reaches a client.
"""

from __future__ import annotations

import json

from proxy.outcome import Outcome, TimeoutKind


class ProxyError(Exception):
    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    outcome: Outcome = Outcome.REJECTED
    # None: say nothing (the SDK uses its own status rules); False/True: x-should-retry header.
    should_retry: bool | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        if self.should_retry is None:
            return {}
        return {"x-should-retry": "true" if self.should_retry else "false"}


class BadRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "www-authenticate": "Bearer"}  # RFC 9110 11.6.1


class NotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"
    should_retry = False


class Draining(ProxyError):
    """The proxy is shutting down. Retrying is right: another replica will take it."""

    status = 503
    error_type = "service_unavailable_error"
    code = "shutting_down"
    should_retry = True


class UpstreamUnreachable(ProxyError):
    """No connection to the upstream could be made. Nothing was generated, so a retry is cheap."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_unreachable"
    outcome = Outcome.UPSTREAM_ERROR


class UpstreamFailed(ProxyError):
    """The upstream broke the exchange: reset, truncated or malformed response."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_failed"
    outcome = Outcome.UPSTREAM_ERROR


class GatewayTimeout(ProxyError):
    """A route deadline fired. 504, not 408: 408 tells the client *it* was too slow.

    SDKs retry 504 twice by default, which would triple a long, expensive wait; so unless the
    route opts in (`sdk_retry: true`) the response carries `x-should-retry: false`.
    """

    status = 504
    error_type = "timeout_error"
    outcome = Outcome.TIMEOUT

    def __init__(self, message: str, kind: TimeoutKind, *, retry: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = f"{kind.value}_timeout"
        self.should_retry = retry


class RequestTimeout(ProxyError):
    """The client was too slow sending its request (connections.body_timeout_s or
    body_min_rate_bytes_s). Resending the same body at the same pace would fail the same way."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    should_retry = False


class UnsupportedEncoding(ProxyError):
    """A request body in a Content-Encoding the route does not accept (see request_encodings)."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_content_encoding"
    should_retry = False


class HeadTooLarge(ProxyError):
    status = 431
    error_type = "invalid_request_error"
    code = "request_header_fields_too_large"
    should_retry = False


class Overloaded(ProxyError):
    """Every client connection slot is taken (connections.max_connections). Another replica,
    or this one a moment later, can serve it."""

    status = 503
    error_type = "service_unavailable_error"
    code = "too_many_connections"
    should_retry = True


def render_body(err: ProxyError) -> bytes:
    """The OpenAI error shape the SDKs parse into `APIError.message` / `.type` / `.code`."""
    return json.dumps(
        {
            "error": {
                "message": err.message,
                "type": err.error_type,
                "param": err.param,
                "code": err.code,
            }
        }
    ).encode()


def render_sse_event(err: ProxyError) -> bytes:
    """An in-band error for a stream whose headers were already sent.

    The OpenAI Python SDK raises `APIError` when a `data:` event carries an `error` object.
    """
    return b"data: " + render_body(err) + b"\n\n"
