"""Requests that never reach a route: unparseable heads, CONNECT, `OPTIONS *`, HTTP/0.9,
unknown `Expect`, aiohttp's own 404/405. Each gets an OpenAI-shaped body, a `rejected` record
(so metrics and one access line) and the connection closed where the stream is unusable.

aiohttp answers parser errors itself, in `RequestHandler.handle_error`, with a plain-text body
that quotes the offending bytes and an ERROR-level log line; nothing in the app sees them. The
runner's connection handler (`proxy.edge.connections.GuardedRequestHandler`) builds on
`OpenAIErrorHandler`, whose `handle_error` answers like the rest of hangup. A client can send
garbage at will, so their access lines are rate limited (`PARSE_ERROR_LINES_PER_S`, then one
summary line).
"""

from __future__ import annotations

import logging
import time

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import MatchInfoError

from proxy.errors import BadRequest, NotFound, ProxyError, render_body
from proxy.refusal import refuse, rejected_record
from proxy.state import STATE

log = logging.getLogger("hangup")

SERVER_HEADER = "hangup"  # no versions: they only help an attacker pick an exploit
PARSE_ERROR_LINES_PER_S = 20


class MethodNotAllowed(ProxyError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class ExpectationFailed(ProxyError):
    status = 417
    error_type = "invalid_request_error"
    code = "expectation_failed"


class Unparseable(ProxyError):
    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _RateLimit:
    """At most `per_s` events a second pass; the count of the others is reported once."""

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.window = 0
        self.passed = 0
        self.dropped = 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self.window:
            if self.dropped:
                log.warning(
                    "%d more unparseable requests in the last seconds (access lines suppressed)",
                    self.dropped,
                )
            self.window, self.passed, self.dropped = now, 0, 0
        if self.passed < self.per_s:
            self.passed += 1
            return True
        self.dropped += 1
        return False


# --- inside the app: checks run by the app's edge middleware (proxy.app) ---------------------


def target_refusal(request: web.Request) -> web.Response | None:
    """The answer to a request line no route serves (HTTP/0.9, CONNECT, `*` or authority
    form), the OpenAI way; None for a target the routes may serve."""
    if request.version < HttpVersion10:
        return _closing(refuse(request, BadRequest("HTTP/0.9 requests are not served")))
    if request.method == "CONNECT":
        # Closed after the answer: the client may already be sending tunnel bytes.
        refusal = MethodNotAllowed("CONNECT is not served: hangup is not a tunnel")
        return _closing(refuse(request, refusal))
    raw = request.raw_path
    if not raw.startswith("/") and "://" not in raw:  # `*` or host:port, not absolute-form
        return refuse(request, BadRequest("only origin-form targets (/v1/...) are served"))
    return None


def routing_refusal(request: web.Request, exc: web.HTTPException) -> web.Response | None:
    """aiohttp's own 404/405 (no route matched) as ours; None for any other exception."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return refuse(request, MethodNotAllowed(f"{request.method} is not allowed here"))
    if isinstance(exc, web.HTTPNotFound) and isinstance(request.match_info, MatchInfoError):
        return refuse(request, NotFound("unknown path: hangup serves the OpenAI API under /v1/"))
    return None  # a handler's own 404 (none of ours raise it): keep it


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Any expectation but `100-continue` is 417. `100 Continue` itself is not sent here:
    aiohttp's default sends it before any handler ran, inviting the body of a request about
    to be refused; the relay sends it once auth and the declared size passed
    (`proxy.edge.body.send_continue`), and nothing else ever reads a body."""
    expect = request.headers.get("expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        return None
    # The body may be on its way regardless: answer, then close.
    return _closing(refuse(request, ExpectationFailed("only Expect: 100-continue is supported")))


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response


_LIMIT = web.AppKey("hangup_parse_error_lines", _RateLimit)


def add_to_app(app: web.Application) -> None:
    """The app's parse-error line budget (the checks, the expect handler and the Server header
    are applied where the app and its routes are made)."""
    app[_LIMIT] = _RateLimit(PARSE_ERROR_LINES_PER_S)


def set_server_header(response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


# --- outside the app: parser errors -----------------------------------------------------------


class OpenAIErrorHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)  # our bug, or mid-body
        err = Unparseable(
            status, f"the request could not be parsed ({type(exc).__name__ if exc else 'error'})"
        )
        app = _app_of(self)
        if app is not None and app[_LIMIT].allow():
            method, path = _safe(request, "method"), _safe(request, "path")
            rejected_record(app[STATE], err, method=method, path=path, request_id=None)
        response = web.Response(
            status=status,
            body=render_body(err),
            content_type="application/json",
            headers={"Server": SERVER_HEADER},
        )
        response.force_close()
        return response


def _safe(request: BaseRequest, attr: str) -> str:
    try:
        value = getattr(request, attr)
    except (AttributeError, ValueError, TypeError):  # a half-parsed request may lack it
        return ""
    return value[:200] if isinstance(value, str) else ""


def _app_of(handler: RequestHandler) -> web.Application | None:
    manager = handler._manager
    routed = manager.request_handler if manager is not None else None
    # The bound `Application._handle`, or the gate around it (proxy.edge.gate.UnroutedAnswered).
    app = getattr(routed, "app", None) or getattr(routed, "__self__", None)
    return app if isinstance(app, web.Application) else None
