"""The metric contract: names, types, labels, buckets. Renaming anything here is a breaking change.

docs/metrics.md describes each metric; tests/test_metrics_dashboard.py checks that the Grafana
dashboard and the alert rules use only names listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.attempts import AttemptResult
from proxy.bills import WASTE_REASONS as WASTE_REASONS
from proxy.outcome import BackgroundCancel, EngineAbort, Outcome, TimeoutKind
from proxy.resilience.circuit import CircuitState

from .labels import STATUS_CLASSES

Kind = Literal["counter", "gauge", "histogram"]
GaugeMode = Literal["livesum", "livemax"]

# Outcome label values: the Outcome enum, plus "unsettled" for a record the relay never settled
# (a bug; the series exists so that the bug is visible instead of silently uncounted).
UNSETTLED = "unsettled"
OUTCOMES: tuple[str, ...] = (*(o.value for o in Outcome), UNSETTLED)
PHASES: tuple[str, ...] = tuple(k.value for k in TimeoutKind)
BACKGROUND_RESULTS: tuple[str, ...] = tuple(b.value for b in BackgroundCancel)
ENGINE_ABORT_RESULTS: tuple[str, ...] = tuple(a.value for a in EngineAbort)
TOKEN_TYPES = ("prompt", "completion")
ATTEMPT_RESULTS: tuple[str, ...] = tuple(r.value for r in AttemptResult)
HEDGE_EVENTS = ("started", "won")
CIRCUIT_STATES: tuple[str, ...] = tuple(c.value for c in CircuitState)
# Endpoint names are a closed set chosen by proxy/usage/facts.py; this caps what the label can
# hold even if that set grows, so the series arithmetic in docs/metrics.md stays true.
MAX_ENDPOINTS = 16

# LLM requests last from milliseconds (a rejection) to an hour (the default total_s).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Reasoning models may think for minutes before the first visible token.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120, 300)
# The proxy's own time per request: sub-millisecond when healthy.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Client gone -> upstream socket closed. The target is p99 < 5 ms and the alert fires at 50 ms,
# so both are bucket bounds; 0.1 ms at the bottom resolves a healthy event loop.
CANCEL_PROPAGATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# How late the event loop runs a timer. The relay's own callbacks are to stay under 10 ms.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Hang-up (socket closed) -> the engine's answer to the abort call: milliseconds on a LAN, the
# 2 s bound (ENGINE_ABORT_S) at worst; the target is 50 ms.
ENGINE_ABORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True, slots=True)
class Spec:
    name: str  # as exported; counters end in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # How a gauge combines across worker processes (prometheus_client multiprocess mode).
    mode: GaugeMode = "livesum"

    @property
    def series_names(self) -> tuple[str, ...]:
        """The sample names this metric puts on the wire."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_RM = ("route", "model")
# Spend and savings per caller: the `auth.keys` names (or "anonymous"), plus "none".
_RMC = (*_RM, "client")

REQUESTS = Spec(
    "hangup_requests_total",
    "counter",
    "Requests finished, by the one terminal outcome each request ends in, and client.",
    ("route", "model", "outcome", "client"),
)
RESPONSES = Spec(
    "hangup_responses_total",
    "counter",
    "Requests finished, by API endpoint and the HTTP status class the client got "
    "(none: no response was sent).",
    ("route", "endpoint", "status_class"),
)
TIMEOUTS = Spec(
    "hangup_timeouts_total",
    "counter",
    "Requests ended by a deadline, by the phase whose deadline fired.",
    ("route", "phase"),
)
TOKENS = Spec(
    "hangup_tokens_total",
    "counter",
    "Tokens used (reported by the upstream or estimated), by type prompt|completion, and client.",
    (*_RM, "type", "client"),
)
TOKENS_ESTIMATED = Spec(
    "hangup_tokens_estimated_total",
    "counter",
    "The part of hangup_tokens_total that was estimated because the upstream reported no usage.",
    (*_RM, "type"),
)
TOKENS_TOKENIZED = Spec(
    "hangup_prompt_tokens_tokenized_total",
    "counter",
    'The part of hangup_tokens_total{type="prompt"} that hangup counted with the model\'s '
    "tokenizer (the engine's tokenize endpoint or an offline vocabulary) because the upstream "
    "reported none.",
    _RM,
)
CACHED_TOKENS = Spec(
    "hangup_cached_tokens_total",
    "counter",
    "Prompt tokens served from the provider's prompt cache (a part of type=prompt).",
    _RM,
)
REASONING_TOKENS = Spec(
    "hangup_reasoning_tokens_total",
    "counter",
    "Completion tokens spent on hidden reasoning (a part of type=completion).",
    _RM,
)
TOKENS_SAVED = Spec(
    "hangup_tokens_saved_total",
    "counter",
    "Completion tokens not generated because hangup closed the upstream (estimate; compute "
    "saved: dollars only where the upstream's billing stops, see hangup_cost_saved_usd_total).",
    _RMC,
)
TOKENS_SAVED_UPPER = Spec(
    "hangup_tokens_saved_upper_bound_total",
    "counter",
    "Upper bound of tokens saved: max_tokens minus tokens generated, over cancelled requests "
    "that set max_tokens.",
    _RM,
)
TOKENS_WASTED = Spec(
    "hangup_tokens_wasted_total",
    "counter",
    "Completion tokens that still arrived after the client had gone.",
    _RM,
)
COST = Spec(
    "hangup_cost_usd_total",
    "counter",
    "Money spent, in USD, at configured prices.",
    _RMC,
)
COST_SAVED = Spec(
    "hangup_cost_saved_usd_total",
    "counter",
    "Money not spent because hangup closed the upstream, in USD (estimate).",
    _RMC,
)
COST_WASTED = Spec(
    "hangup_cost_wasted_usd_total",
    "counter",
    "Money spent on tokens that arrived after the client had gone, in USD.",
    _RM,
)
UNPRICED = Spec(
    "hangup_unpriced_requests_total",
    "counter",
    "Requests that used or saved tokens on a model without a configured price.",
    _RM,
)
SDK_RETRIES = Spec(
    "hangup_sdk_retries_total",
    "counter",
    "Requests that arrived as an SDK's automatic retry (x-stainless-retry-count > 0).",
    ("route",),
)
BACKGROUND = Spec(
    "hangup_background_cancels_total",
    "counter",
    "Background (Responses API) jobs whose client went away, by what hangup did about them.",
    ("route", "result"),
)
ENGINE_ABORTS_SENT = Spec(
    "hangup_engine_aborts_sent_total",
    "counter",
    "Abort calls sent to an engine (upstreams.*.engine sglang or vllm) for abandoned requests.",
    ("upstream",),
)
ENGINE_ABORTS = Spec(
    "hangup_engine_aborts_total",
    "counter",
    "Engine aborts by result: acknowledged, failed, unsupported (no endpoint), sent (no answer "
    "before shutdown).",
    ("upstream", "result"),
)
ENGINE_ABORT_SECONDS = Spec(
    "hangup_engine_abort_seconds",
    "histogram",
    "Time from deciding to abort (after the upstream socket closed) to the engine's answer.",
    ("upstream",),
    ENGINE_ABORT_BUCKETS,
)
DURATION = Spec(
    "hangup_request_duration_seconds",
    "histogram",
    "Time from request received to response finished, by outcome.",
    ("route", "outcome"),
    DURATION_BUCKETS,
)
TTFT = Spec(
    "hangup_time_to_first_token_seconds",
    "histogram",
    "Time from request received to the first content token relayed (streams only).",
    _RM,
    TTFT_BUCKETS,
)
OVERHEAD = Spec(
    "hangup_overhead_seconds",
    "histogram",
    "Time the proxy itself spent on a request: duration minus every wait on the upstream, the "
    "client and retry backoff (also waits cut by an error, a deadline or a hang-up).",
    ("route",),
    OVERHEAD_BUCKETS,
)
CANCEL_PROPAGATION = Spec(
    "hangup_cancel_propagation_seconds",
    "histogram",
    "Time from the client going away to the upstream connection being closed.",
    ("route",),
    CANCEL_PROPAGATION_BUCKETS,
)
LOOP_LAG = Spec(
    "hangup_event_loop_lag_seconds",
    "histogram",
    "How late the event loop ran a timer (sampled every 50 ms): the time some callback held it.",
    (),
    LOOP_LAG_BUCKETS,
)
IN_FLIGHT = Spec(
    "hangup_requests_in_flight",
    "gauge",
    "Requests being handled now.",
)
UPSTREAM_CONNECTIONS = Spec(
    "hangup_upstream_connections",
    "gauge",
    "Upstream connections open now.",
)
ATTEMPTS = Spec(
    "hangup_upstream_attempts_total",
    "counter",
    "Upstream attempts (first tries, retries, fallbacks), by upstream and how each ended.",
    ("upstream", "attempt_result"),
)
FALLBACKS = Spec(
    "hangup_fallbacks_total",
    "counter",
    "Times a request moved on to its route's next target after a failure before content.",
    ("route",),
)
HEDGES = Spec(
    "hangup_hedges_total",
    "counter",
    "Hedged attempts: started (a second target raced a slow first token) and won.",
    ("route", "event"),
)
ATTEMPT_WASTE_TOKENS = Spec(
    "hangup_attempt_waste_tokens_total",
    "counter",
    "Tokens billed for attempts whose output never reached the client, by reason (hedge: lost "
    "a hedge race; failover: failed before content, another target was tried) and type.",
    ("route", "reason", "type"),
)
ATTEMPT_WASTE_COST = Spec(
    "hangup_attempt_waste_cost_usd_total",
    "counter",
    "USD billed for attempts whose output never reached the client, by reason, at each "
    "attempt's own model price.",
    ("route", "reason"),
)
CIRCUIT = Spec(
    "hangup_circuit_state",
    "gauge",
    "1 for the state each upstream's circuit breaker is in now (closed, open, half_open).",
    ("upstream", "state"),
    mode="livemax",
)
BUILD_INFO = Spec(
    "hangup_build_info",
    "gauge",
    "Always 1; the labels say which hangup is running.",
    ("version",),
    mode="livemax",
)

_ENGINE_ABORT_SPECS = (ENGINE_ABORTS_SENT, ENGINE_ABORTS, ENGINE_ABORT_SECONDS)

ALL: tuple[Spec, ...] = (
    REQUESTS,
    RESPONSES,
    TIMEOUTS,
    TOKENS,
    TOKENS_ESTIMATED,
    TOKENS_TOKENIZED,
    CACHED_TOKENS,
    REASONING_TOKENS,
    TOKENS_SAVED,
    TOKENS_SAVED_UPPER,
    TOKENS_WASTED,
    COST,
    COST_SAVED,
    COST_WASTED,
    UNPRICED,
    SDK_RETRIES,
    BACKGROUND,
    ENGINE_ABORTS_SENT,
    ENGINE_ABORTS,
    ENGINE_ABORT_SECONDS,
    DURATION,
    TTFT,
    OVERHEAD,
    CANCEL_PROPAGATION,
    LOOP_LAG,
    IN_FLIGHT,
    UPSTREAM_CONNECTIONS,
    ATTEMPTS,
    FALLBACKS,
    HEDGES,
    ATTEMPT_WASTE_TOKENS,
    ATTEMPT_WASTE_COST,
    CIRCUIT,
    BUILD_INFO,
)

SERIES_NAMES: frozenset[str] = frozenset(n for spec in ALL for n in spec.series_names)


def series_bound(
    routes: int,
    configured_models: int,
    max_models: int,
    upstreams: int = 0,
    abort_upstreams: int = 0,
    clients: int = 1,
) -> int:
    """The most series one process can export; docs/metrics.md walks through this sum.

    `abort_upstreams`: upstreams whose engine has an abort call (sglang, vllm); only they
    appear in the `upstream` label.
    Every record-driven metric can also see route="none" (a request refused before routing), and
    the model label holds the configured models, `max_models` admitted ones, "other" and "none".
    `clients` is the number of `auth.keys` entries (1, "anonymous", without keys); the client
    label adds "none" (refused before the caller was known).
    A histogram child is len(buckets) + 1 (+Inf) bucket series, plus _sum and _count.
    """
    sizes = {
        "route": routes + 1,
        "model": configured_models + max_models + 2,
        "outcome": len(OUTCOMES),
        "endpoint": MAX_ENDPOINTS + 1,
        "status_class": len(STATUS_CLASSES),
        "phase": len(PHASES),
        "type": len(TOKEN_TYPES),
        "result": len(BACKGROUND_RESULTS),
        "upstream": upstreams,
        "attempt_result": len(ATTEMPT_RESULTS),
        "state": len(CIRCUIT_STATES),
        "event": len(HEDGE_EVENTS),
        "reason": len(WASTE_REASONS),
        "version": 1,
        "client": clients + 1,
    }
    total = 0
    for spec in ALL:
        children = 1
        for label in spec.labels:
            if spec is ENGINE_ABORTS and label == "result":
                children *= len(ENGINE_ABORT_RESULTS)
            elif spec in _ENGINE_ABORT_SPECS and label == "upstream":
                children *= abort_upstreams  # only upstreams whose engine has an abort call
            else:
                children *= sizes[label]
        if spec is FALLBACKS:
            children = routes  # only configured routes fail over; never route="none"
        if spec is HEDGES:
            children = routes * len(HEDGE_EVENTS)
        if spec in (ATTEMPT_WASTE_TOKENS, ATTEMPT_WASTE_COST):
            # Only configured routes make attempts; prompt and completion for tokens.
            children = routes * len(WASTE_REASONS) * (2 if spec is ATTEMPT_WASTE_TOKENS else 1)
        per_child = len(spec.buckets) + 3 if spec.kind == "histogram" else 1
        total += children * per_child
    return total
