"""The chart's PrometheusRule, rendered by the real helm: the tested rules file, placeholders filled from the values.

Needs the helm that tests/cluster/build.sh builds, hence the cluster tier
like tests/chart/test_rendered.py (no API server is started).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart.conftest import Helm, Render, helm_bin, offline_helm, one, render, template_args
from tests.monitoring.rules import render as render_rules

# The fixtures this module uses, from tests/chart/conftest.py.
__all__ = ["helm_bin", "offline_helm", "render"]

pytestmark = pytest.mark.cluster

API = ("--api-versions", "monitoring.coreos.com/v1")
ON = ("--set", "metrics.prometheusRule.enabled=true")
SERVICE_MONITOR_JOB = "unlearning-unlearning-operator-metrics"
POD_MONITOR_JOB = "unlearning/unlearning-unlearning-operator"


def groups(rule: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = rule["spec"]["groups"]
    return found


def expected(job: str, alert_labels: dict[str, str] | None = None, **values: Any) -> list[dict[str, Any]]:
    document: dict[str, Any] = yaml.safe_load(render_rules(job, values))
    for group in document["groups"]:
        for alert in group["rules"]:
            alert["labels"] = {**(alert_labels or {}), **alert.get("labels", {})}
    found: list[dict[str, Any]] = document["groups"]
    return found


def test_rule_is_the_rules_file_for_the_rendered_monitors(render: Render) -> None:
    both = one(render("monitoring-on.yaml", extra=(*API, *ON)), "PrometheusRule")
    assert groups(both) == expected(f"{SERVICE_MONITOR_JOB}|{POD_MONITOR_JOB}")
    service_only = one(render(extra=(*API, *ON, "--set", "metrics.serviceMonitor.enabled=true")), "PrometheusRule")
    assert groups(service_only) == expected(SERVICE_MONITOR_JOB)
    pod_only = one(render(extra=(*API, *ON, "--set", "metrics.podMonitor.enabled=true")), "PrometheusRule")
    assert groups(pod_only) == expected(POD_MONITOR_JOB)


def test_values_reach_the_rules(render: Render) -> None:
    rule = one(
        render(
            extra=(
                *API,
                *ON,
                "--set",
                "metrics.prometheusRule.job=kubernetes-pods",
                "--set",
                "metrics.prometheusRule.waitingSeconds=900",
                "--set-json",
                "metrics.prometheusRule.jobErrorRatio=0.5",
                "--set",
                "metrics.prometheusRule.handlerErrors=7",
                "--set",
                "metrics.prometheusRule.alertLabels.team=ml-platform",
                "--set",
                "metrics.prometheusRule.labels.release=kube-prometheus-stack",
            )
        ),
        "PrometheusRule",
    )
    want = expected("kubernetes-pods", {"team": "ml-platform"}, waitingSeconds=900, jobErrorRatio=0.5, handlerErrors=7)
    assert groups(rule) == want
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    severities = {a["alert"]: a["labels"]["severity"] for a in groups(rule)[0]["rules"]}
    assert severities["UnlearningOperatorDown"] == "critical"


def test_rule_needs_the_monitoring_api(render: Render) -> None:
    objects = render("monitoring-on.yaml", extra=ON)
    assert [o for o in objects if o["kind"] == "PrometheusRule"] == []


def test_rule_without_a_scrape_job_is_an_error_that_says_what_to_set(offline_helm: Helm) -> None:
    done = offline_helm(*template_args(), *API, *ON)
    assert done.returncode != 0
    assert "metrics.prometheusRule.job" in done.stderr
    assert "metrics.serviceMonitor.enabled" in done.stderr
