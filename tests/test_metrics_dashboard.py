"""The Grafana dashboard, the alert rules and docs/metrics.md against the metric contract,
without a Prometheus (tests/test_metrics_prometheus.py evaluates the same PromQL for real).

No well-kept Grafana dashboard validator is on PyPI (grafana-foundation-sdk builds dashboards but
its from_json accepts anything), so the structure Grafana needs is checked here.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from proxy.metrics import SERIES_NAMES, schema
from tests.prometheus_support import (
    ROOT,
    alert_exprs,
    dashboard_exprs,
    iter_panels,
    load_dashboard,
    metric_names,
    variable_queries,
)

DATASOURCE = "${datasource}"


def test_dashboard_is_a_grafana_dashboard_with_the_expected_variables() -> None:
    d = load_dashboard()
    assert d["schemaVersion"] >= 39
    assert isinstance(d["uid"], str) and 0 < len(d["uid"]) <= 40
    assert d["title"] and d["panels"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "route", "model"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "model"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"]
        assert v["datasource"]["uid"] == DATASOURCE
    assert [(name, label) for name, _, label in variable_queries()] == [
        ("route", "route"),
        ("model", "model"),
    ]


def _visible_panels() -> list[dict[str, Any]]:
    return [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] != "row"]


@pytest.mark.parametrize("panel", _visible_panels(), ids=lambda p: p["title"])
def test_every_panel_queries_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}
    assert panel["targets"], "a panel without queries"
    ref_ids = [t["refId"] for t in panel["targets"]]
    assert len(ref_ids) == len(set(ref_ids))
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == DATASOURCE
        assert target["expr"].strip()
    assert panel.get("description"), "say what the panel shows and how to read it"


def test_panel_ids_are_unique_and_the_grid_does_not_overlap() -> None:
    panels = list(iter_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for cell in itertools.product(
            range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        ):
            assert cell not in cells, f"{p['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = p["title"]


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs() + alert_exprs()
    exprs += [(f"variable {name}", selector) for name, selector, _ in variable_queries()]
    unknown = {
        f"{where}: {name}"
        for where, expr in exprs
        for name in metric_names(expr)
        if name not in SERIES_NAMES
    }
    assert not unknown, "\n".join(sorted(unknown))
    for where, expr in dashboard_exprs():
        assert metric_names(expr), f"{where} reads no hangup metric: {expr}"


def test_every_exported_metric_is_on_the_dashboard() -> None:
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    missing = {spec.name for spec in schema.ALL if not any(n in used for n in spec.series_names)}
    assert not missing


def test_docs_describe_every_metric_and_bound() -> None:
    docs = (ROOT / "docs" / "metrics.md").read_text()
    missing = [spec.name for spec in schema.ALL if f"`{spec.name}`" not in docs]
    assert not missing
    assert f"{schema.series_bound(1, 0, 50, 1):,}" in docs
