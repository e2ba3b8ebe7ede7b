"""Tracing: the optional OpenTelemetry bridge, fed from the finished record.

Three calls, each a no-op when tracing is off (the default without OTEL_* settings):

* `arrived(record, headers)`: read the client's `traceparent`, choose the trace and the request's
  span id, decide sampling;
* `attempt(record, headers, attempt)`: before each upstream request (retry, fallback, hedge),
  a new span id for that `Attempt`, written into the upstream's `traceparent` (the one thing that
  cannot wait for the record to finish);
* `finished(record)`: build the SERVER span and one CLIENT span per attempt from the record's own
  timestamps and hand them to a bounded batch exporter running on its own thread.

OpenTelemetry is an extra (`pip install 'hangup[otel]'`); only `proxy.tracing.otel` imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from multidict import CIMultiDict

from proxy.attempts import Attempt
from proxy.config import HangupConfig, TracingConfig
from proxy.outcome import RequestRecord

# Either of these set means "export traces there" (the OTLP exporter specification's names).
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class TracingUnavailable(Exception):
    """Tracing is asked for but cannot run (the extra is missing, an unsupported exporter)."""


class Tracing:
    """Tracing switched off: every call returns at once."""

    enabled = False

    def arrived(self, record: RequestRecord, headers: Mapping[str, str]) -> None:
        pass

    def attempt(self, record: RequestRecord, headers: CIMultiDict[str], attempt: Attempt) -> None:
        pass

    def finished(self, record: RequestRecord) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        """Export what is queued, for at most `timeout_s` (blocking: call from a thread)."""


def wanted(config: TracingConfig, env: Mapping[str, str]) -> bool:
    """Whether tracing is on: the config says so, or (auto) an OTLP endpoint is configured;
    OTEL_SDK_DISABLED=true and OTEL_TRACES_EXPORTER=none switch it off, as the spec says."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    if config.enabled == "auto":
        return config.endpoint is not None or any(env.get(name) for name in ENDPOINT_VARS)
    return config.enabled


def make_tracing(config: HangupConfig, env: Mapping[str, str] | None = None) -> Tracing:
    """The tracing this config and environment ask for; TracingUnavailable if it cannot run."""
    env = os.environ if env is None else env
    if not wanted(config.tracing, env):
        return Tracing()
    problem = startup_problem(config, env)
    if problem is not None:
        raise TracingUnavailable(problem)
    from proxy.tracing.otel import OtelTracing

    return OtelTracing(config, env)


def startup_problem(config: HangupConfig, env: Mapping[str, str] | None = None) -> str | None:
    """Why tracing as configured cannot start (checked by the CLI before serving), or None."""
    env = os.environ if env is None else env
    if not wanted(config.tracing, env):
        return None
    try:
        from proxy.tracing.otel import check_exporter
    except ImportError as exc:
        return (
            "tracing is on (tracing.enabled, or an OTEL_EXPORTER_OTLP_*ENDPOINT variable) but "
            f"OpenTelemetry is not installed ({exc.name}): pip install 'hangup[otel]'"
        )
    try:
        check_exporter(env)
    except TracingUnavailable as exc:
        return str(exc)
    return None
