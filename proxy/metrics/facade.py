"""`Metrics`: the only door between request handling and prometheus_client.

The relay tells it about events (`request_started`, `request_finished(record)`, upstream
connections opened and closed); everything exported about a finished request is derived from its
one `RequestRecord`, so metrics, the access log and accounting can never disagree.

Two storage modes, chosen by the environment the process started with:

* single process (default): metrics live in an app-owned `CollectorRegistry`, so two apps in one
  test run do not collide;
* several workers (`PROMETHEUS_MULTIPROC_DIR` set before start-up): prometheus_client keeps every
  value in per-process files in that directory, and `render()` sums all workers' files, so one
  scrape of any worker returns the whole server. Gauges use the "live" modes, so a worker's
  in-flight count disappears with it once `worker_exited(pid)` is called for it.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.attempts import AttemptResult
from proxy.config import MetricsConfig
from proxy.outcome import EngineAbort, RequestRecord
from proxy.resilience.circuit import CircuitState

from . import finished, schema
from .finished import _MAX_FINISHED, _Finished
from .labels import BoundedLabel, endpoint_shaped, model_shaped
from .loopvalue import Buckets, Value, buckets_of, count_of
from .schema import Spec

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def _check_multiprocess_ready(path: str) -> None:
    # prometheus_client picks its value storage when it is first imported. If the variable was set
    # later (from Python, after the import), values would stay in this process's memory and the
    # scrape would silently miss them: refuse instead.
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
            "set it in the environment before the hangup process starts"
        )
    if not os.path.isdir(path):
        raise RuntimeError(f"{MULTIPROC_ENV}={path!r} is not a directory")


class _WithoutCreated:
    """Drops the `*_created` samples prometheus_client adds to counters and histograms.

    They double the series count, multiprocess mode never emits them (so output would differ by
    mode), and nothing in hangup's dashboards or alerts reads them.
    """

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """Per-app metrics. Construct once in `create_app`; call from the relay only."""

    def __init__(
        self,
        config: MetricsConfig,
        *,
        routes: Iterable[str],
        configured_models: Iterable[str],
        clients: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
        upstreams: Iterable[str] = (),
        abort_upstreams: Iterable[str] = (),
    ) -> None:
        self._routes = frozenset(routes)
        self._upstreams = frozenset(upstreams)
        # Upstreams whose engine has an abort call: the engine-abort metrics' `upstream` values.
        self._abort_upstreams = frozenset(abort_upstreams)
        # Closed set: the configured client names (never keys), or "anonymous" without auth.
        self._clients = frozenset(clients)
        # Configured names are trusted; names seen in traffic must earn a slot (see `_model_for`).
        self._models = BoundedLabel(configured_models, config.max_models, model_shaped)
        self._endpoints = BoundedLabel((), schema.MAX_ENDPOINTS, endpoint_shaped)
        path = multiprocess_dir()
        self.multiprocess = path is not None
        target: CollectorRegistry | None
        if path is not None:
            _check_multiprocess_ready(path)
            # In multiprocess mode every metric object writes to the shared files whatever
            # registry it is in; registering ours too would export each value twice.
            target = None
            self._exposed = CollectorRegistry()
            # prometheus_client leaves these two multiprocess helpers unannotated.
            multiprocess.MultiProcessCollector(self._exposed, path=path)  # type: ignore[no-untyped-call]
        else:
            target = registry if registry is not None else CollectorRegistry()
            self._exposed = target
        self._collector = _WithoutCreated(self._exposed)
        # Per exported series, what `request_finished` writes to (see `_count`).
        self._counts: dict[tuple[int, tuple[str, ...]], Value] = {}
        self._buckets: dict[tuple[int, tuple[str, ...]], Buckets] = {}
        self._circuit_states: dict[str, CircuitState] = {}
        self._attempt_counts: dict[tuple[str, AttemptResult], Value] = {}
        # Per label set of a finished request, the series it always writes (`_Finished`).
        self._finished: dict[tuple[str, ...], _Finished] = {}
        self._max_finished = _MAX_FINISHED

        def counter(spec: Spec) -> Counter:
            return Counter(spec.name, spec.help, spec.labels, registry=target)

        def histogram(spec: Spec) -> Histogram:
            return Histogram(
                spec.name, spec.help, spec.labels, registry=target, buckets=spec.buckets
            )

        def gauge(spec: Spec) -> Gauge:
            return Gauge(
                spec.name, spec.help, spec.labels, registry=target, multiprocess_mode=spec.mode
            )

        self._requests = counter(schema.REQUESTS)
        self._responses = counter(schema.RESPONSES)
        self._timeouts = counter(schema.TIMEOUTS)
        self._tokens = counter(schema.TOKENS)
        self._tokens_estimated = counter(schema.TOKENS_ESTIMATED)
        self._tokens_tokenized = counter(schema.TOKENS_TOKENIZED)
        self._cached = counter(schema.CACHED_TOKENS)
        self._reasoning = counter(schema.REASONING_TOKENS)
        self._saved = counter(schema.TOKENS_SAVED)
        self._saved_upper = counter(schema.TOKENS_SAVED_UPPER)
        self._wasted = counter(schema.TOKENS_WASTED)
        self._cost = counter(schema.COST)
        self._cost_saved = counter(schema.COST_SAVED)
        self._cost_wasted = counter(schema.COST_WASTED)
        self._unpriced = counter(schema.UNPRICED)
        self._sdk_retries = counter(schema.SDK_RETRIES)
        self._background = counter(schema.BACKGROUND)
        self._engine_aborts_sent = counter(schema.ENGINE_ABORTS_SENT)
        self._engine_aborts = counter(schema.ENGINE_ABORTS)
        self._engine_abort_seconds = histogram(schema.ENGINE_ABORT_SECONDS)
        self._duration = histogram(schema.DURATION)
        self._ttft = histogram(schema.TTFT)
        self._overhead = histogram(schema.OVERHEAD)
        self._cancel_propagation = histogram(schema.CANCEL_PROPAGATION)
        self._loop_lag = histogram(schema.LOOP_LAG)
        self._in_flight = gauge(schema.IN_FLIGHT)
        self._upstream_connections = gauge(schema.UPSTREAM_CONNECTIONS)
        self._attempts = counter(schema.ATTEMPTS)
        self._fallbacks = counter(schema.FALLBACKS)
        self._hedges = counter(schema.HEDGES)
        self._waste_tokens = counter(schema.ATTEMPT_WASTE_TOKENS)
        self._waste_cost = counter(schema.ATTEMPT_WASTE_COST)
        self._circuit = gauge(schema.CIRCUIT)
        # Written on every request and connection: their values, lock-free (`loopvalue`).
        self._in_flight_count = count_of(self._in_flight)
        self._upstream_connections_count = count_of(self._upstream_connections)
        # A request began, and its handler is done (its response ended: exactly once per
        # `request_started`, at once, as its record may wait for accounting). Called for every
        # request: the value's own `inc` with its amount bound (a float: no int converted),
        # not a method of the facade's calling it (a frame fewer each).
        self.request_started: Callable[[], None] = partial(self._in_flight_count.inc, 1.0)
        self.request_ended: Callable[[], None] = partial(self._in_flight_count.inc, -1.0)
        build_info = gauge(schema.BUILD_INFO)
        build_info.labels(version=__version__).set(1)

        # Series that alerts divide by or take rate() of exist from the start, at zero: a rule
        # over a series that appears only with its first increment misses that increment.
        for route in self._routes:
            for phase in schema.PHASES:
                self._timeouts.labels(route, phase)
            self._sdk_retries.labels(route)
            self._fallbacks.labels(route)
            for event in schema.HEDGE_EVENTS:
                self._hedges.labels(route, event)
            for reason in schema.WASTE_REASONS:
                self._waste_cost.labels(route, reason)
                for kind in schema.TOKEN_TYPES:
                    self._waste_tokens.labels(route, reason, kind)
        for upstream in self._upstreams:
            self.circuit_changed(upstream, CircuitState.CLOSED)
        for upstream in self._abort_upstreams:
            self._engine_aborts_sent.labels(upstream)
            for result in schema.ENGINE_ABORT_RESULTS:
                self._engine_aborts.labels(upstream, result)

    # --- events -------------------------------------------------------------------------------

    # Account one finished request from its sealed record (after accounting); in its own
    # module, bound here as a method (no extra call).
    request_finished = finished.request_finished

    def circuit_changed(self, upstream: str, state: CircuitState) -> None:
        # Called after every attempt; the gauge's three series change only with the state.
        if upstream not in self._upstreams or self._circuit_states.get(upstream) is state:
            return
        self._circuit_states[upstream] = state
        for value in schema.CIRCUIT_STATES:
            self._circuit.labels(upstream, value).set(1 if value == state.value else 0)

    def loop_lag(self, seconds: float) -> None:
        """One sample of the event loop's lag (proxy/looplag.py)."""
        self._loop_lag.observe(seconds)

    def engine_abort_sent(self, upstream: str) -> None:
        if upstream in self._abort_upstreams:
            self._engine_aborts_sent.labels(upstream).inc()

    def engine_abort_settled(
        self, upstream: str, result: EngineAbort | None, seconds: float | None
    ) -> None:
        """One abort settled (called once per abort, off the request's path)."""
        if upstream not in self._abort_upstreams or result is None:
            return
        self._engine_aborts.labels(upstream, result.value).inc()
        self._observe(self._engine_abort_seconds, (upstream,), seconds)

    def upstream_connection_opened(self) -> None:
        self._upstream_connections_count.inc(1.0)

    def upstream_connection_closed(self) -> None:
        self._upstream_connections_count.inc(-1.0)

    # --- labels and exposition ---------------------------------------------------------------

    def model_label(self, model: str | None) -> str:
        """The label `model` is exported under now: itself if known, "none" or "other"."""
        return self._models.label(model)

    def render(self) -> tuple[bytes, str]:
        """The scrape body (Prometheus text format 0.0.4) and its Content-Type."""
        return generate_latest(self._collector), CONTENT_TYPE_PLAIN_0_0_4

    # --- policy -------------------------------------------------------------------------------

    def _model_for(self, record: RequestRecord) -> str:
        """A seen model takes one of the `max_models` slots only once the upstream has accepted a
        request for it (status < 400): upstreams reject unknown model names, so a client sending
        made-up names, or a key pasted into the model field, cannot fill the slots."""
        status = record.upstream_status
        if status is not None and status < 400:
            return self._models.admit(record.model)
        return self._models.label(record.model)

    def _count(self, counter: Counter, labels: tuple[str, ...]) -> Value:
        """The value of `counter.labels(*labels)`, from a cache: prometheus_client validates
        the labels and takes a lock on every `labels()` call (~2-3 us, a dozen times per
        request), and its `inc` checks its arguments and takes the value's lock (`loopvalue`).
        The cache holds one entry per exported series, so it is bounded as the label values
        are. Only positive amounts are added to it (`_add`, or 1)."""
        key = (id(counter), labels)
        found = self._counts.get(key)
        if found is None:
            found = self._counts[key] = count_of(counter.labels(*labels))
        return found

    def _add(self, counter: Counter, labels: tuple[str, ...], amount: float | None) -> None:
        # Zero adds create no series: a model that never had cost saved shows no such line.
        # A negative amount would be an accounting bug; Counter.inc would raise, mid-`finally`.
        if amount is not None and amount > 0:
            self._count(counter, labels).inc(amount)

    def _observe(self, histogram: Histogram, labels: tuple[str, ...], value: float | None) -> None:
        if value is not None:
            self._buckets_of(histogram, labels).observe(value)

    def _buckets_of(self, histogram: Histogram, labels: tuple[str, ...]) -> Buckets:
        """`histogram.labels(*labels)`'s buckets, from a cache (as `_count`)."""
        key = (id(histogram), labels)
        found = self._buckets.get(key)
        if found is None:
            found = self._buckets[key] = buckets_of(histogram.labels(*labels))
        return found


def worker_exited(pid: int) -> None:
    """Tell multiprocess storage a worker is gone, so its live gauges stop counting.

    The supervisor of `--workers N` calls this when a worker exits. Counters and histograms of the
    dead worker stay in the sum (they are totals); a no-op in single-process mode.
    """
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def authorized(config: MetricsConfig, authorization_header: str | None) -> bool:
    """Whether a scrape may read /metrics: always without a configured token, else only with
    `Authorization: Bearer <token>`, compared in constant time."""
    token = config.bearer_token
    if token is None:
        return True
    if authorization_header is None:
        return False
    scheme, _, credentials = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # surrogateescape: aiohttp keeps non-UTF-8 header bytes as lone surrogates; they are a
    # wrong token, not an error.
    return hmac.compare_digest(
        credentials.strip().encode("utf-8", "surrogateescape"),
        token.get_secret_value().encode("utf-8"),
    )
