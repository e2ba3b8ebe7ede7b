"""The OpenTelemetry side of tracing: sampler, resource and OTLP/HTTP exporter from the standard
OTEL_* environment variables, and finished spans built from a finished record.

The event loop only queues the finished record (a few microseconds): a `BatchSpanProcessor`
holds it in its bounded deque, and its own thread builds the spans (`ReadableSpan`s with the
ids chosen when the request arrived, see `proxy.tracing.context`, and the record's own
timestamps) just before encoding and sending them. A request never waits for an export, and
with the collector down the queue stays at its bound (`tracing.max_queued_requests`, or
OTEL_BSP_MAX_QUEUE_SIZE, counted in requests) and newer requests push out older ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from multidict import CIMultiDict
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)
from yarl import URL

from proxy import __version__
from proxy.attempts import Attempt
from proxy.config import HangupConfig
from proxy.outcome import RequestRecord
from proxy.secrets import Secrets, configured_secrets
from proxy.tracing import ENDPOINT_VARS, Tracing, TracingUnavailable
from proxy.tracing.attributes import (
    Attributes,
    attempt_attributes,
    error_type,
    server_attributes,
    span_name,
)
from proxy.tracing.context import (
    SAMPLED,
    Parent,
    TraceIds,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)

_DEFAULT_BATCH = 512  # the SDK's OTEL_BSP_MAX_EXPORT_BATCH_SIZE default
_SAMPLED_FLAGS = TraceFlags(SAMPLED)


class _SampledMarker:
    __slots__ = ()
    trace_flags = _SAMPLED_FLAGS


class PendingTrace:
    """A finished, sampled request waiting in the export queue; its spans are built on the
    exporter's thread. (The processor only reads `.context.trace_flags.sampled`.)"""

    __slots__ = ("record", "trace")
    context = _SampledMarker()

    def __init__(self, record: RequestRecord, trace: TraceIds) -> None:
        self.record, self.trace = record, trace


class _Expanding(SpanExporter):
    """Builds each pending request's spans, then hands them all to the OTLP exporter."""

    def __init__(self, inner: SpanExporter, tracing: OtelTracing) -> None:
        self._inner, self._tracing = inner, tracing

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        built = [s for p in spans for s in self._tracing.spans(p.record, p.trace)]
        return self._inner.export(built)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _flags(sampled: bool) -> TraceFlags:
    return TraceFlags(SAMPLED if sampled else 0)


def _parent_context(parent: Parent | None) -> Context:
    if parent is None:
        return Context()
    state = TraceState.from_header([parent.tracestate]) if parent.tracestate else None
    span = NonRecordingSpan(
        SpanContext(
            parent.trace_id,
            parent.span_id,
            is_remote=True,
            trace_flags=_flags(parent.sampled),
            trace_state=state,
        )
    )
    return set_span_in_context(span)


def check_exporter(env: Mapping[str, str]) -> None:
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter != "otlp":
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={exporter}: hangup exports OTLP only")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        raise TracingUnavailable(
            f"OTLP protocol {protocol!r}: hangup exports OTLP over HTTP (http/protobuf, port "
            "4318 on a collector); set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
        )


# The OTLP exporter's logger: it logs every failed export as an ERROR and every retry as a
# WARNING, i.e. about once a second for as long as the collector is down.
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
TROUBLE_EVERY_S = 30.0


class CollectorTrouble(logging.Filter):
    """A collector that is down is the operator's warning, not an error (ERROR lines are for
    hangup's own bugs), and one line per `TROUBLE_EVERY_S` says it: the rest are counted."""

    def __init__(self) -> None:
        super().__init__()
        self._next_at = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()  # the exporter logs from its own thread

    def reset(self) -> None:
        """Let the next line through (the filter is per process; tests start afresh)."""
        with self._lock:
            self._next_at, self._suppressed = 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = time.monotonic()
            if now < self._next_at:
                self._suppressed += 1
                return False
            self._next_at = now + TROUBLE_EVERY_S
            suppressed, self._suppressed = self._suppressed, 0
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = f"trace export: {record.getMessage()}"
        if suppressed:
            record.msg += f" ({suppressed} similar lines in the last {TROUBLE_EVERY_S:g} s)"
        record.args = None
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_exporter_logs() -> None:
    logger = logging.getLogger(EXPORTER_LOGGER)
    if not any(isinstance(f, CollectorTrouble) for f in logger.filters):
        logger.addFilter(CollectorTrouble())


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, config: HangupConfig, env: Mapping[str, str]) -> None:
        check_exporter(env)
        _quiet_exporter_logs()
        tracing = config.tracing
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; the config only fills the gap.
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: tracing.service_name}))
        self._resource = resource
        # The provider reads OTEL_TRACES_SAMPLER(_ARG); only its sampler is used.
        self._sampler = TracerProvider(resource=resource, shutdown_on_exit=False).sampler
        endpoint = None if any(env.get(v) for v in ENDPOINT_VARS) else tracing.endpoint
        queue = None if env.get("OTEL_BSP_MAX_QUEUE_SIZE") else tracing.max_queued_requests
        batch = None
        if queue is not None and not env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
            batch = min(_DEFAULT_BATCH, queue)
        self._processor = BatchSpanProcessor(
            _Expanding(OTLPSpanExporter(endpoint=endpoint), self),
            max_queue_size=queue,
            max_export_batch_size=batch,
        )
        self._scope = InstrumentationScope("hangup", __version__)
        self._servers: dict[str, tuple[str | None, int | None]] = {}
        for name, upstream in config.upstreams.items():
            url = URL(upstream.base_url)
            self._servers[name] = (url.host, url.port)
        # Exact-value scrubbing of every configured secret, as for responses and log lines
        # (proxy/secrets.py): an upstream echoing its injected key into "model" stays out.
        self._secrets = Secrets(configured_secrets(config))

    def arrived(self, record: RequestRecord, headers: Mapping[str, str]) -> None:
        parent = parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        decision = self._sampler.should_sample(
            _parent_context(parent), trace_id, "hangup", SpanKind.SERVER
        ).decision
        sampled = decision is Decision.RECORD_AND_SAMPLE
        record.trace = TraceIds(trace_id, new_span_id(), parent, sampled)

    def attempt(self, record: RequestRecord, headers: CIMultiDict[str], attempt: Attempt) -> None:
        trace = record.trace
        if trace is not None:
            headers["traceparent"] = trace.begin_attempt(attempt)

    def finished(self, record: RequestRecord) -> None:
        trace = record.trace
        if trace is None or not trace.sampled:
            return
        # The record is complete and nothing writes to it any more: the export thread may read.
        self._processor.on_end(PendingTrace(record, trace))  # type: ignore[arg-type]

    def _scrubbed(self, attributes: Attributes) -> Attributes:
        secrets = self._secrets
        if not secrets:
            return attributes
        out: Attributes = {}
        for key, value in attributes.items():
            if isinstance(value, str):
                value = secrets.text(value)
            elif isinstance(value, tuple):
                value = tuple(secrets.text(v) for v in value)
            out[key] = value
        return out

    def spans(self, record: RequestRecord, trace: TraceIds) -> list[ReadableSpan]:
        """The request's SERVER span and one CLIENT span per upstream attempt."""
        name = self._secrets.text(span_name(record)) if self._secrets else span_name(record)

        def ns(t: float) -> int:
            return int((record.wall_started_at + (t - record.started_at)) * 1e9)

        ended_at = record.ended_at if record.ended_at is not None else record.started_at
        flags = _flags(trace.sampled)
        parent = trace.parent
        client_span = _parent_context(parent)
        state = None
        remote: SpanContext | None = None
        if parent is not None:
            remote = get_current_span(client_span).get_span_context()
            state = remote.trace_state
        server = SpanContext(trace.trace_id, trace.span_id, False, flags, state)
        error = error_type(record)
        status = Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET)
        events = []
        if record.client_gone_at is not None:
            events.append(Event("hangup.client_gone", timestamp=ns(record.client_gone_at)))
        spans = [
            ReadableSpan(
                name,
                context=server,
                parent=remote,
                resource=self._resource,
                attributes=self._scrubbed(server_attributes(record)),
                events=events,
                kind=SpanKind.SERVER,
                status=status,
                start_time=ns(record.started_at),
                end_time=ns(ended_at),
                instrumentation_scope=self._scope,
            )
        ]
        for index, span in enumerate(trace.attempts):
            attempt = span.attempt
            host, port = self._servers.get(attempt.upstream, (None, None))
            attributes = attempt_attributes(record, index, attempt, server_address=host, port=port)
            attempt_error = attributes.get("error.type")
            end = attempt.closed_at
            if end is None:
                end = record.upstream_closed_at if record.upstream_closed_at else ended_at
            spans.append(
                ReadableSpan(
                    name,
                    context=SpanContext(trace.trace_id, span.span_id, False, flags, state),
                    parent=server,
                    resource=self._resource,
                    attributes=self._scrubbed(attributes),
                    kind=SpanKind.CLIENT,
                    status=(
                        Status(StatusCode.ERROR, str(attempt_error))
                        if attempt_error is not None
                        else Status(StatusCode.UNSET)
                    ),
                    start_time=ns(attempt.started_at),
                    end_time=ns(max(end, attempt.started_at)),
                    instrumentation_scope=self._scope,
                )
            )
        return spans

    def close(self, timeout_s: float) -> None:
        # BatchSpanProcessor.shutdown() waits up to 30 s for a last export (longer than any
        # shutdown budget when the collector is down): bound it; the thread is a daemon.
        closer = threading.Thread(
            target=self._processor.shutdown, name="hangup-trace-flush", daemon=True
        )
        closer.start()
        closer.join(timeout_s)
