"""The chart's alerting rules under ``promtool test rules``: each fires when it should and stays silent when it should.

Synthetic series (one minute apart) state each case plainly; the series carry
the labels the chart's ServiceMonitor gives the operator's samples. Then the
same rules run over the driven operator of lifecycles.py, whose real metrics
must raise the two alerts that run provokes (an audit write that failed, a
request queued for 88 minutes) and no other.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.chart.promql import metric_names as names_in
from tests.monitoring.lifecycles import JOB, TARGET, Run
from tests.monitoring.promtool import run_tests
from tests.monitoring.rules import alerts, defaults, render
from unlearning_operator.metrics import build_registry, metric_names

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = {**TARGET, "pod": "unlearning-unlearning-operator-6d9c7b5f4-x2k8p", "instance": "10.42.0.17:8080"}
WHERE = {"namespace": TARGET["namespace"], "job": JOB}
RULES = render(JOB)
ALERTS = {rule["alert"]: rule for rule in alerts(RULES)}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted({**OPERATOR, **labels}.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    expected = {"exp_labels": {**labels, "severity": ALERTS[alert]["labels"]["severity"]}}
    runbook = f"docs/monitoring.md#{alert.lower()}"
    expected["exp_annotations"] = {**annotations, "runbook": runbook}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}


def silent(alert: str, *times: str) -> list[dict[str, Any]]:
    return [{"eval_time": at, "alertname": alert, "exp_alerts": []} for at in times]


DOWN = {
    "summary": "The unlearning operator is down.",
    "description": "Prometheus has not scraped the unlearning operator for 5 minutes. No request is validated, "
    "started or finished while it is down, and erasure deadlines run on.",
}


def handler_text(handler: str, count: int) -> dict[str, str]:
    return {
        "summary": f"The unlearning operator's {handler} handler keeps failing.",
        "description": f"{count} unexpected errors in the {handler} handler in the last 15 minutes. "
        "The operator log has the tracebacks.",
    }


def waiting_text(phase: str, waited: str) -> dict[str, str]:
    return {
        "summary": f"An UnlearningRequest has been {phase} for over 1h 0m 0s.",
        "description": f"The oldest {phase} request has waited {waited} for its Job. "
        "`kubectl get unlearningrequests -A` shows which one, and its message says what it waits for.",
    }


def ratio_text(percent: str) -> dict[str, str]:
    return {
        "summary": "Many unlearning Jobs end without a result.",
        "description": f"{percent} of the unlearning Jobs that finished in the last hour ended without a result "
        "record. unlearning_job_failures_total by reason says why (OOMKilled, DeadlineExceeded, ...).",
    }


def audit_text(count: int) -> dict[str, str]:
    return {
        "summary": "Audit records of finished unlearning requests are not written.",
        "description": f"{count} finished request(s) have no audit ConfigMap: the operator could not create it "
        "(the operator log says why). Their status stays Running until it can.",
    }


def completed(verdict: str, values: str, method: str = "neggrad-plus") -> dict[str, str]:
    return series("unlearning_requests_completed_total", values, verdict=verdict, method=method)


# alert -> test groups (input series + alert_rule_test), one minute per sample.
CASES: dict[str, list[dict[str, Any]]] = {
    "UnlearningOperatorDown": [
        {  # scrapes fail from 10 min on: pending, then firing after 5 minutes
            "input_series": [series("up", "1x9 0x20")],
            "alert_rule_test": [
                *silent("UnlearningOperatorDown", "9m", "14m"),
                fires("UnlearningOperatorDown", "16m", WHERE, DOWN),
            ],
        },
        {  # the target is gone (pod deleted, scaled to 0): no series at all
            "input_series": [series("up", "1x9 stale")],
            "alert_rule_test": [
                *silent("UnlearningOperatorDown", "12m"),
                fires("UnlearningOperatorDown", "16m", {}, DOWN),
            ],
        },
        {  # a restart (two failed scrapes), and another job that is down: silent
            "input_series": [series("up", "1x9 0 0 1x20"), series("up", "0x30", job="something-else")],
            "alert_rule_test": silent("UnlearningOperatorDown", "11m", "16m", "25m"),
        },
    ],
    "UnlearningReconcileErrors": [
        {  # an error a minute from 5 min on
            "input_series": [
                series("unlearning_handler_errors_total", "0x4 1+1x30", handler="job"),
                series("unlearning_handler_errors_total", "0x35", handler="tick"),
            ],
            "alert_rule_test": [
                *silent("UnlearningReconcileErrors", "8m"),
                fires("UnlearningReconcileErrors", "30m", {**WHERE, "handler": "job"}, handler_text("job", 15)),
            ],
        },
        {  # a burst of three, then a slow trickle (one per 5 minutes): both heal by retry
            "input_series": [
                series("unlearning_handler_errors_total", "0x4 3x30", handler="launch"),
                series("unlearning_handler_errors_total", "0x4 1x4 2x4 3x4 4x4 5x4 6x4 7x4", handler="event"),
            ],
            "alert_rule_test": silent("UnlearningReconcileErrors", "10m", "20m", "35m"),
        },
    ],
    "UnlearningRequestsWaiting": [
        {  # one request queued since 0 and never started; nothing Pending
            "input_series": [
                series("unlearning_oldest_waiting_request_seconds", "0+60x80", phase="Queued"),
                series("unlearning_oldest_waiting_request_seconds", "0x80", phase="Pending"),
            ],
            "alert_rule_test": [
                *silent("UnlearningRequestsWaiting", "60m", "64m"),
                fires(
                    "UnlearningRequestsWaiting",
                    "70m",
                    {**WHERE, "phase": "Queued"},
                    waiting_text("Queued", "1h 10m 0s"),
                ),
            ],
        },
        {  # a busy queue that moves: each oldest request starts within 30 minutes
            "input_series": [
                series("unlearning_oldest_waiting_request_seconds", "0+60x30 0+60x30 0+60x30", phase="Queued"),
            ],
            "alert_rule_test": silent("UnlearningRequestsWaiting", "30m", "70m", "90m"),
        },
    ],
    "UnlearningJobErrorRatioHigh": [
        {  # in the hour before 70 min: 4 Passed, 2 Error (OOM, deadline ...)
            "input_series": [
                completed("Passed", "0x10 1x10 2x10 3x10 4x30"),
                completed("Error", "0x20 1x20 2x30", method="salun"),
                completed("Failed", "0x70"),
            ],
            "alert_rule_test": [
                *silent("UnlearningJobErrorRatioHigh", "5m"),
                fires("UnlearningJobErrorRatioHigh", "70m", WHERE, ratio_text("33.33%")),
            ],
        },
        {  # half failed, but only two Jobs: too few to call it a trend
            "input_series": [completed("Passed", "0x10 1x60"), completed("Error", "0x20 1x50")],
            "alert_rule_test": silent("UnlearningJobErrorRatioHigh", "30m", "70m"),
        },
        {  # gates failed (verdict Failed): a result, not an error; then nothing ran for an hour (0/0)
            "input_series": [
                completed("Passed", "0x10 1x10 2x10 3x100"),
                completed("Failed", "0x15 1x10 2x10 3x100"),
                completed("Error", "0x130"),
            ],
            "alert_rule_test": silent("UnlearningJobErrorRatioHigh", "40m", "70m", "130m"),
        },
    ],
    "UnlearningAuditRecordsNotWritten": [
        {  # a record that cannot be written for ten minutes
            "input_series": [series("unlearning_audit_records_unwritten", "0x9 1x20")],
            "alert_rule_test": [
                *silent("UnlearningAuditRecordsNotWritten", "12m"),
                fires("UnlearningAuditRecordsNotWritten", "16m", WHERE, audit_text(1)),
            ],
        },
        {  # written on the retry three minutes later
            "input_series": [series("unlearning_audit_records_unwritten", "0x9 1x2 0x20")],
            "alert_rule_test": silent("UnlearningAuditRecordsNotWritten", "12m", "16m", "25m"),
        },
    ],
}


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "alerts.yaml"
    path.write_text(RULES)
    return path


def test_every_alert_has_cases() -> None:
    assert set(CASES) == set(ALERTS)


def test_rules_are_valid(promtool: Path, rules_file: Path) -> None:
    done = subprocess.run(
        [str(promtool), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout
    assert not re.search(r"__[A-Z_]+__", RULES.split("groups:", 1)[1]), "a placeholder was left in the rules"


def test_rules_read_only_what_the_operator_exports() -> None:
    exported = metric_names(build_registry().registry) | {"up"}
    for name, rule in ALERTS.items():
        read = names_in(rule["expr"])
        assert read, name
        assert read <= exported, f"{name} reads {sorted(read - exported)}, which the operator does not export"


def test_every_alert_has_a_runbook_section() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    headings = {line.lstrip("#").strip().lower() for line in doc.splitlines() if line.startswith("### ")}
    for name, rule in ALERTS.items():
        assert rule["annotations"]["runbook"] == f"docs/monitoring.md#{name.lower()}"
        assert name.lower() in headings, f"docs/monitoring.md has no section '### {name}'"


@pytest.mark.parametrize("alert", list(CASES))
def test_alert_fires_when_it_should_and_only_then(alert: str, promtool: Path, rules_file: Path) -> None:
    groups = [{"interval": "1m", **group} for group in CASES[alert]]
    done = run_tests(promtool, groups, rule_files=[rules_file], evaluation_interval="1m")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alerts_over_the_driven_operator(
    promtool: Path, rules_file: Path, series: list[dict[str, str]], run: Run
) -> None:
    """r12's audit write failed from 60 min to 70 (retried every tick); r21 queued from 152 to 240 min behind r22."""
    late = f"{(run.last_completion + 7200) // 60}m"
    tests = [
        fires("UnlearningAuditRecordsNotWritten", "67m", WHERE, audit_text(1)),
        *silent("UnlearningAuditRecordsNotWritten", "62m", "72m", late),
        fires("UnlearningRequestsWaiting", "230m", {**WHERE, "phase": "Queued"}, waiting_text("Queued", "1h 18m 0s")),
        *silent("UnlearningRequestsWaiting", "210m", "245m", late),
        # The operator was down for 2 and for 1 minute: restarts, not an outage.
        *silent("UnlearningOperatorDown", "86m", "88m", "91m", "136m", "140m", late),
        # Two handler errors in the whole run (a Job creation, the audit write of the Job's event), each healed by
        # a retry (the periodic retries of the audit write are counted by its own metrics, not as errors).
        *silent("UnlearningReconcileErrors", "61m", "70m", late),
        *silent("UnlearningJobErrorRatioHigh", late),
    ]
    group = {"interval": "30s", "input_series": series, "alert_rule_test": tests}
    done = run_tests(promtool, [group], rule_files=[rules_file], evaluation_interval="30s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_thresholds_come_from_the_values() -> None:
    text = render(JOB, {"waitingSeconds": 900, "jobErrorRatio": 0.5, "jobErrorMinimum": 10, "handlerErrors": 7})
    rules = {rule["alert"]: rule["expr"] for rule in alerts(text)}
    assert rules["UnlearningRequestsWaiting"].rstrip().endswith("> 900")
    assert "> 0.5" in rules["UnlearningJobErrorRatioHigh"]
    assert rules["UnlearningJobErrorRatioHigh"].rstrip().endswith(">= 10")
    assert rules["UnlearningReconcileErrors"].rstrip().endswith(">= 7")
    assert defaults()["waitingSeconds"] == 3600
