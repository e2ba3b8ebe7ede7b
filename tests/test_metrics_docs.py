"""docs/metrics.md and the alert rules quote figures the code decides: histogram buckets, the
series ceiling, the cancel-propagation target and alert threshold. Each quoted figure is read
from the document and compared with the value the code computes, so neither can drift alone.
(That `series_bound` is the true ceiling is proved by rendering: test_metrics saturates every
label and counts the series.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.config_file import load_config
from proxy.metrics import schema, series_bound
from proxy.metrics.labels import STATUS_CLASSES
from proxy.routing import Router

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "metrics.md").read_text()
ALERTS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _quoted(pattern: str) -> re.Match[str]:
    match = re.search(pattern, DOC, flags=re.S)
    assert match is not None, f"docs/metrics.md no longer says {pattern!r}"
    return match


def test_the_bucket_table_lists_every_histogram_with_its_buckets() -> None:
    section = _quoted(r"### Histogram buckets\n(.*?)\n#")[1]
    rows = dict(re.findall(r"^\| `(hangup_\w+_seconds)` \| ([\d., ]+) \|$", section, flags=re.M))
    histograms = {s.name: s.buckets for s in schema.ALL if s.kind == "histogram"}
    assert set(rows) == set(histograms)
    for name, listed in rows.items():
        assert tuple(float(b) for b in listed.split(", ")) == histograms[name], name


def test_cancel_propagation_range_target_and_alert_threshold_are_bucket_bounds() -> None:
    bounds = schema.CANCEL_PROPAGATION_BUCKETS
    m = _quoted(r"Cancel propagation resolves ([\d.]+) ms to ([\d.]+) s")
    assert (float(m[1]) / 1000, float(m[2])) == (bounds[0], bounds[-1])
    m = _quoted(r"our target \(p99 < ([\d.]+) ms\) and the alert threshold\s+\(([\d.]+) ms\)")
    target, threshold = float(m[1]) / 1000, float(m[2]) / 1000
    assert target in bounds and threshold in bounds
    # The alert rule fires at the threshold the document names.
    (rule,) = [
        r
        for g in ALERTS["groups"]
        for r in g["rules"]
        if r["alert"] == "HangupCancelPropagationSlow"
    ]
    fired_above = re.search(r"\)\s*>\s*([\d.]+)\s*$", rule["expr"])
    assert fired_above is not None and float(fired_above[1]) == threshold


def test_the_label_cardinalities_the_docs_use() -> None:
    m = _quoted(
        r"outcomes `O = (\d+)`, endpoints `E = (\d+)`, status classes `S = (\d+)`, "
        r"phases (\d+), results (\d+)"
    )
    assert tuple(int(x) for x in m.groups()) == (
        len(schema.OUTCOMES),
        schema.MAX_ENDPOINTS + 1,
        len(STATUS_CLASSES),
        len(schema.PHASES),
        len(schema.BACKGROUND_RESULTS),
    )


def test_the_documented_formula_is_series_bound() -> None:
    formula = _quoted(r"Total: `([^`]+)`")[1]
    expr = formula.replace("·", "*").replace("R'", "Rp")
    outcomes = len(schema.OUTCOMES)
    cases = [
        (1, 0, 50, 1, 0, 1),
        (3, 5, 50, 2, 1, 1),
        (7, 2, 1, 3, 3, 4),
        (1, 0, 1000, 0, 0, 2),
    ]
    for routes, configured, max_models, upstreams, aborting, clients in cases:
        names = {
            "Rp": routes + 1,
            "R": routes,
            "M": configured + max_models + 2,
            "O": outcomes,
            "U": upstreams,
            "A": aborting,
            "L": clients + 1,  # the clients, plus "none" (refused before the caller was known)
        }
        documented = eval(expr, {"__builtins__": {}}, names)  # the repo's own docs
        bound = series_bound(routes, configured, max_models, upstreams, aborting, clients)
        assert documented == bound, formula


def test_the_quoted_ceilings_are_series_bound_for_the_shipped_config() -> None:
    config = load_config(ROOT / "config" / "hangup.yaml", env={})
    m = _quoted(
        r"=\s+\*\*([\d,]+)\*\* series\.\s+Three\s+routes, two upstreams and five priced\s+"
        r"models: \*\*([\d,]+)\*\*; each named\s+client adds `[^`]+` \(([\d,]+) with the defaults\)"
    )
    defaults, bigger = _number(m[1]), _number(m[2])
    max_models = config.metrics.max_models
    configured = set(config.prices) | Router(config).exact_models()  # as proxy/state.py does
    assert defaults == series_bound(
        len(config.routes), len(configured), max_models, len(config.upstreams)
    )
    assert bigger == series_bound(3, 5, max_models, 2)
    per_client = _number(m[3])
    assert per_client == series_bound(
        len(config.routes), len(configured), max_models, len(config.upstreams), clients=2
    ) - series_bound(len(config.routes), len(configured), max_models, len(config.upstreams))
