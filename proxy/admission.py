"""Admission: read and check a request, then decide everything the exchange needs before the
first upstream byte: route, deadlines, upstream URL, headers and body. Every refusal is a
`ProxyError` the relay turns into an OpenAI-shaped answer and a `rejected` record."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiohttp import web
from aiohttp.helpers import parse_content_type
from multidict import CIMultiDict
from yarl import URL

from proxy.edge.body import (
    SCAN_FROM_BYTES,
    at_once,
    in_steps,
    read_arrived,
    read_body,
    request_encoding,
    send_continue,
    too_large,
)
from proxy.errors import BadRequest, Draining, NotFound
from proxy.headers import upstream_request_headers
from proxy.member_edit import renamed, renamed_in_steps
from proxy.outcome import RequestRecord
from proxy.refusal import close_after_response
from proxy.request_body import RequestBody
from proxy.request_fields import read_fields, read_fields_in_steps, with_size_estimate
from proxy.resilience.continuation import continuable
from proxy.resilience.continuation_steps import IN_STEPS_FROM as CONTINUE_IN_STEPS
from proxy.routing import Route, Target
from proxy.state import ProxyState
from proxy.stream_options import STEP_BYTES, with_stream_usage
from proxy.target import check_decoded_path, check_raw_target, upstream_url
from proxy.timeouts import Budget, Deadlines, client_deadlines
from proxy.upstream_checks import ask_identity
from proxy.usage import RequestFacts, UsageChunkFilter, inspect_request

JSON_TYPES = ("application/json",)


def _is_json(request: web.Request) -> bool:
    """`request.content_type in JSON_TYPES`, the same parse (aiohttp's, cached) without
    `request.content_type`: that property stores three attributes on the request and a copy
    of its parameters, kept under every held stream."""
    raw = request.headers.get("content-type")
    return raw is not None and parse_content_type(raw)[0] in JSON_TYPES


MODEL_LOG_CHARS = 200
# A fallback's rename of a larger body is done in steps (`json.loads` and `json.dumps` of a
# 128 KiB body are ~5 ms); a smaller one in one, as before.
RENAME_ONE_STEP_BYTES = 64 * 1024


class TargetPlan(msgspec.Struct):
    """What goes to one target: its URL, headers (its own key) and body (its model).

    A msgspec Struct, as `Plan` and the other values made for every request: its `__init__`
    is C, where a slotted dataclass's stores one field a bytecode at a time (~2x the time)."""

    target: Target
    url: URL
    headers: CIMultiDict[str]
    body: RequestBody
    model: str | None  # the model this target is asked for

    @property
    def upstream_name(self) -> str:
        return self.target.upstream_name


class Plan(msgspec.Struct):
    """Everything decided before the first upstream byte is sent."""

    route: Route
    url: URL
    headers: CIMultiDict[str]
    body: RequestBody
    facts: RequestFacts
    # Set when we injected usage the client did not ask for: hides it from the client.
    usage_filter: UsageChunkFilter | None
    deadlines: Deadlines
    # The primary (the url/headers/body above) and then each fallback, in order.
    targets: tuple[TargetPlan, ...] = ()
    # A large body on a route that continues cut streams: whether it can be continued
    # (`continuation.continuable`), so that a stall need not parse it; None: not known.
    continuable: bool | None = None


async def admit(
    state: ProxyState,
    request: web.Request,
    record: RequestRecord,
    clock: Callable[[], float],
) -> Plan:
    """Read and check the request; decide route, deadlines, headers and body. `clock`: the
    running loop's (`Exchange.clock`; `asyncio.get_running_loop()` is a getpid() syscall on
    Python 3.11)."""
    state.arrived(record, request)
    if state.draining:
        raise Draining("hangup is shutting down; retry on another instance")
    caller = state.auth.identify(request)
    record.client = caller.name
    limit = state.config.limits.max_request_body_bytes
    length = request.content_length  # (a property that parses the header each time)
    if length is not None and length > limit:
        # Refuse at once, rather than after reading up to the limit.
        raise too_large(state.config.limits.max_request_body_mb)
    # Refused before the body is read; the URL itself is built (and checked) below.
    check_raw_target(request.rel_url.raw_path)
    check_decoded_path(request.rel_url.path)
    # 415 before a byte of the body is read; the route is known only after, so any route this
    # path could reach may accept the encoding, and the matched one must (checked below).
    encoding = None
    if "content-encoding" in request.headers:  # (most requests: no route set to gather)
        encoding = request_encoding(request, state.router.encodings_for(request.path))
    if "expect" in request.headers:  # (no coroutine for the others: nothing to send them)
        await send_continue(request)
    content = request.content
    body: RequestBody
    read_at = None
    try:
        if (
            encoding is None
            and length is not None
            and length < SCAN_FROM_BYTES
            and content.is_eof()
        ):
            # The usual small body, all here before the handler started: `read_body`'s answer
            # without its two coroutines, and no wait of the client's to time.
            body = read_arrived(content, state.config.limits.max_request_body_mb)
            record.bytes_from_client, scan = len(body), None
        else:
            read_at = clock()
            body, record.bytes_from_client, scan = await read_body(
                request, state.config.limits, encoding, length
            )
    except web.RequestPayloadError as exc:  # a bad chunk size
        close_after_response(request)
        raise BadRequest("the request body could not be read (invalid framing)") from exc
    finally:  # a slow upload is the client's time, not hangup's
        if read_at is not None:
            record.client_wait_s += clock() - read_at
    fields = None
    if body and _is_json(request):
        # A small body (no scan) is parsed at once: no generator and coroutine per request.
        if scan is None:
            fields = read_fields(body)
        else:
            fields = await in_steps(read_fields_in_steps(body, scan))
    facts = inspect_request(request.path, fields.members if fields is not None else None)
    if fields is not None:
        facts = with_size_estimate(facts, fields)
    record.model, record.stream, record.endpoint = facts.model, facts.stream, facts.endpoint
    if record.model is not None and len(record.model) > MODEL_LOG_CHARS:
        # A 1 MiB `model` must not become a 1 MiB log line (metric labels bound it already).
        record.model = record.model[:MODEL_LOG_CHARS] + "..."
    route = state.router.match(request.path, facts.model)
    if route is None:
        with_model = f" with model {facts.model!r}" if facts.model else ""
        raise NotFound(f"no route for {request.method} {request.path}{with_model}")
    record.route, record.upstream = route.name, route.upstream_name
    if encoding is not None:
        request_encoding(request, route.options.request_encodings)
    options = route.options
    try:
        record.sdk_retry_count = int(request.headers.get("x-stainless-retry-count", "0"))
    except ValueError:
        record.sdk_retry_count = 0
    announced, client_headers, read_gap = client_deadlines(request.headers)
    if announced is not None:
        record.client_deadline_s = announced[0]
    elif client_headers is not None:
        record.client_deadline_s = client_headers[0]
    budget = Budget.for_request(
        options.timeouts,
        announced,
        honor_client_deadline=options.honor_client_deadline,
        client_headers=client_headers,
        read_gap=read_gap,
    )
    deadlines = Deadlines(budget, record.started_at, watch_first_token=facts.stream)
    usage_filter: UsageChunkFilter | None = None
    if options.include_usage and facts.stream:
        continuous = options.continuous_usage_stats
        steps = with_stream_usage(body, fields, facts, continuous=continuous)
        # Under one step's size every stream's request is changed at once, as before the
        # steps existed: no coroutine and no await on the hot path.
        injected = at_once(steps) if len(body) <= STEP_BYTES else await in_steps(steps)
        if injected is not None:
            body = injected
            usage_filter = UsageChunkFilter.needed(facts, continuous=continuous)
    drop = (options.deadline_header,) if options.deadline_header else ()
    # The path and query only (an absolute-form target's scheme and authority are not ours).
    rel = request.rel_url
    targets: list[TargetPlan] = []
    for target in route.targets:
        headers = upstream_request_headers(
            request.headers,
            upstream=target.upstream,
            request_id=record.request_id,
            drop_client_credentials=caller.used_proxy_key,
            drop=drop,
        )
        ask_identity(headers, facts.stream)
        url = upstream_url(target.upstream.base_url, rel.raw_path, rel.path, rel.raw_query_string)
        target_body, model = body, record.model  # (bounded for logs)
        if target.model is not None and fields is not None:
            if len(body) < RENAME_ONE_STEP_BYTES:
                target_body = renamed(body, target.model)
            else:
                target_body = await in_steps(renamed_in_steps(body, fields, target.model))
            model = target.model
        targets.append(TargetPlan(target, url, headers, target_body, model))
    primary = targets[0]
    continues = None
    if fields is not None and options.continue_cut_streams and len(body) >= CONTINUE_IN_STEPS:
        continues = continuable(fields)
    return Plan(
        route,
        primary.url,
        primary.headers,
        primary.body,
        facts,
        usage_filter,
        deadlines,
        tuple(targets),
        continues,
    )
