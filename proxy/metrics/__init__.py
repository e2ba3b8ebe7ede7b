"""Prometheus metrics behind a facade: handlers call `Metrics` methods named after events and
never import prometheus_client. The contract (names, labels, buckets) is in `schema`; the
reference for operators is docs/metrics.md."""

from .facade import Metrics, authorized, multiprocess_dir, worker_exited
from .schema import SERIES_NAMES, series_bound
from .summary import summarize, summarize_text

__all__ = [
    "SERIES_NAMES",
    "Metrics",
    "authorized",
    "multiprocess_dir",
    "series_bound",
    "summarize",
    "summarize_text",
    "worker_exited",
]
