"""The Grafana dashboard queries only metrics that really exist.

Every PromQL expression in every panel (and every variable query) is reduced
to its metric names, and each name must be a series the operator's own
registry exports (``unlearning_operator.metrics.build_registry()``), or one of
the few external series named below. A renamed or dropped metric therefore
fails here instead of leaving a panel silently showing "No data".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.chart.promql import metric_names, variable_query_metrics
from unlearning_operator.metrics import build_registry
from unlearning_operator.metrics import metric_names as exported_metric_names

ROOT = Path(__file__).resolve().parents[2]
CHART_DASHBOARD = ROOT / "charts" / "unlearning-operator" / "dashboards" / "unlearning-operator.json"
DOCS_DASHBOARD = ROOT / "docs" / "dashboard.json"

# Series the operator does not export but the dashboard may read: Prometheus'
# own scrape health and kube-state-metrics' restart counter.
EXTERNAL_METRICS = frozenset({"up", "kube_pod_container_status_restarts_total"})

REQUIRED_ROWS = {
    "Operator health": {
        "up",
        "kube_pod_container_status_restarts_total",
        "unlearning_handler_errors_total",
        "process_resident_memory_bytes",
    },
    "Request flow": {
        "unlearning_requests",
        "unlearning_requests_completed_total",
        "unlearning_queue_wait_seconds_bucket",
        "unlearning_job_duration_seconds_bucket",
    },
    "Forgetting quality": {
        "unlearning_post_mia_auc_bucket",
        "unlearning_post_confidence_gap_bucket",
        "unlearning_test_accuracy_drop_points_bucket",
        "unlearning_gate_failures_total",
    },
    "GPU-hours": {"unlearning_gpu_seconds_total"},
    "Calibrations": {
        "unlearning_calibrations",
        "unlearning_calibrations_completed_total",
        "unlearning_calibration_failures_total",
        "unlearning_calibration_fold_duration_seconds_bucket",
        "unlearning_calibration_oldest_bank_age_seconds",
        "unlearning_calibration_models_by_bank_age",
        "unlearning_requests_calibrated_total",
        "unlearning_calibration_gpu_seconds_total",
    },
}

pytestmark = pytest.mark.unit


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(CHART_DASHBOARD.read_text())
    return data


def panels_by_row(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Panels grouped under the row above them (or nested in a collapsed row)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            current = panel["title"]
            rows.setdefault(current, []).extend(panel.get("panels", []))
        else:
            rows.setdefault(current, []).append(panel)
    return rows


def exported_series() -> set[str]:
    """Every series name the operator's registry exposes (``_total``, ``_bucket`` etc. included)."""
    names: set[str] = exported_metric_names(build_registry().registry)
    return names


def test_docs_copy_is_identical() -> None:
    assert DOCS_DASHBOARD.read_bytes() == CHART_DASHBOARD.read_bytes(), (
        "docs/dashboard.json differs from the chart's dashboard: "
        "cp charts/unlearning-operator/dashboards/unlearning-operator.json docs/dashboard.json"
    )


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    dashboard = load_dashboard()
    ids = []
    for panels in panels_by_row(dashboard).values():
        for panel in panels:
            ids.append(panel["id"])
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert panel.get("description"), f"panel {panel['title']!r} has no description"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids))


def test_rows_cover_health_flow_quality_and_gpu_hours() -> None:
    rows = panels_by_row(load_dashboard())
    for row, wanted in REQUIRED_ROWS.items():
        assert row in rows, f"dashboard has no row {row!r}"
        queried = set().union(*(metric_names(t["expr"]) for p in rows[row] for t in p["targets"]))
        assert wanted <= queried, f"row {row!r} does not query {sorted(wanted - queried)}"


def test_gpu_hours_are_seconds_over_3600() -> None:
    rows = panels_by_row(load_dashboard())
    exprs = [t["expr"] for p in rows["GPU-hours"] for t in p["targets"]]
    assert exprs
    assert all("unlearning_gpu_seconds_total" in e and e.rstrip().endswith("/ 3600") for e in exprs)


def test_every_queried_metric_is_exported_by_the_operator() -> None:
    dashboard = load_dashboard()
    exported = exported_series()
    queried: dict[str, str] = {}
    for panels in panels_by_row(dashboard).values():
        for panel in panels:
            for target in panel["targets"]:
                for name in metric_names(target["expr"]):
                    queried.setdefault(name, panel["title"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            for name in variable_query_metrics(text):
                queried.setdefault(name, f"variable ${variable['name']}")
    assert len(queried) >= 12, f"the tokenizer found too few metrics: {sorted(queried)}"
    unknown = {name: where for name, where in queried.items() if name not in exported | EXTERNAL_METRICS}
    assert not unknown, f"the dashboard queries series the operator does not export: {unknown}"
