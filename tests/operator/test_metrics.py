"""Metrics: own registry at start-up, the fixed names, bounded labels, every label set at 0."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from tests.operator.factories import record
from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import METHODS
from unlearning_operator import status as states
from unlearning_operator.metrics import (
    FAILURE_REASONS,
    GATES,
    HANDLERS,
    VERDICTS,
    Completion,
    bank_age_counts,
    build_registry,
    calibration_completion,
    completion,
    gate_labels,
    metric_names,
)

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "unlearning_operator"

pytestmark = pytest.mark.unit

EXPECTED = {
    "unlearning_requests",
    "unlearning_requests_completed_total",
    "unlearning_job_duration_seconds_bucket",
    "unlearning_queue_wait_seconds_bucket",
    "unlearning_post_mia_auc_bucket",
    "unlearning_post_confidence_gap_bucket",
    "unlearning_test_accuracy_drop_points_bucket",
    "unlearning_gate_failures_total",
    "unlearning_job_failures_total",
    "unlearning_handler_errors_total",
    "unlearning_gpu_seconds_total",
    "unlearning_audit_writes_total",
    "unlearning_audit_records_unwritten",
    "unlearning_oldest_waiting_request_seconds",
    "unlearning_operator_leader",
    "process_resident_memory_bytes",
}


def test_names_and_independent_registries() -> None:
    first = build_registry()
    second = build_registry()  # nothing global: building twice does not clash
    assert metric_names(first.registry) >= EXPECTED
    assert metric_names(first.registry) == metric_names(second.registry)


def test_phase_gauge_always_has_every_phase() -> None:
    metrics = build_registry()
    metrics.set_phase_counts({"Running": 2})
    text = generate_latest(metrics.registry).decode()
    assert 'unlearning_requests{phase="Running"} 2.0' in text
    assert 'unlearning_requests{phase="Queued"} 0.0' in text


def test_labels_are_bounded() -> None:
    metrics = build_registry()
    for family in metrics.registry.collect():
        if family.name.startswith("unlearning_"):
            for sample in family.samples:
                assert set(sample.labels) <= {
                    *("phase", "verdict", "method", "reason", "gate", "handler", "result", "le"),
                    *("age", "calibrated"),
                }


def _label_sets(metrics_text: str, name: str) -> set[str]:
    return {line.split(" ")[0] for line in metrics_text.splitlines() if line.startswith(name + "{")}


def test_every_bounded_label_set_exists_at_zero_from_the_start() -> None:
    # A series that appears at its first event starts at 1 and increase() counts nothing for it.
    text = generate_latest(build_registry().registry).decode()
    completed = _label_sets(text, "unlearning_requests_completed_total")
    assert len(completed) == len(VERDICTS) * len(METHODS) == 21
    assert 'unlearning_requests_completed_total{method="salun",verdict="Error"}' in completed
    assert len(_label_sets(text, "unlearning_job_failures_total")) == len(FAILURE_REASONS)
    # The spec's gate names as written in a record's failedGates, and "other".
    gates = {"maxForgetAccuracy", "maxTestAccuracyDrop", "maxConfidenceGap", "maxMiaClassifierAccuracy", "maxMiaAuc"}
    gates |= {"maxEstimatedGap", "minMembershipPValue", "maxClassReadability"}
    assert _label_sets(text, "unlearning_gate_failures_total") == {
        f'unlearning_gate_failures_total{{gate="{gate}"}}' for gate in {*gates, "other"}
    }
    assert len(_label_sets(text, "unlearning_handler_errors_total")) == len(HANDLERS)
    assert len(_label_sets(text, "unlearning_gpu_seconds_total")) == len(METHODS)
    assert len(_label_sets(text, "unlearning_job_duration_seconds_count")) == len(METHODS)
    assert len(_label_sets(text, "unlearning_audit_writes_total")) == 2
    for line in text.splitlines():
        if line.startswith("unlearning_") and "_created" not in line.split("{")[0]:
            assert line.endswith(" 0.0"), line


def test_failure_reasons_are_every_reason_a_failed_request_can_carry() -> None:
    # A new reason in status.py must be placed: a failure (created at 0 here) or not.
    not_failures = {
        states.REASON_VALID,
        states.REASON_INVALID_SPEC,  # Rejected, never ran
        states.REASON_IMAGE_NOT_ALLOWED,  # Rejected, never ran
        states.REASON_FACTORY_NOT_ALLOWED,  # Rejected, never ran
        states.REASON_CLAIM_REQUIRED,  # Rejected, never ran
        states.REASON_PLACEMENT_NOT_ALLOWED,  # Rejected, never ran
        states.REASON_WAITING_FOR_MODEL,
        states.REASON_WAITING_FOR_CAPACITY,
        states.REASON_WAITING_FOR_NAMESPACE,
        states.REASON_CREATING_JOB,
        states.REASON_JOB_CREATED,
        states.REASON_REQUEST_DELETED,  # only in the audit record of a request that is gone
        states.REASON_UNSCHEDULABLE,  # PodPending condition, the request goes on
        states.REASON_POD_STARTED,
        states.REASON_PENDING,
        states.REASON_PASSED,
        states.REASON_CALIBRATION_FOUND,  # CalibrationReady condition, the request goes on
        states.REASON_NO_CALIBRATION,
        states.REASON_CALIBRATION_DISABLED,
        states.REASON_WAITING_FOR_CALIBRATION,
        states.REASON_CALIBRATION_MISSING,  # Rejected, never ran
    }
    reasons = {value for name, value in vars(states).items() if name.startswith("REASON_")}
    assert set(FAILURE_REASONS) == reasons - not_failures


def _handler_names() -> set[str]:
    """Every handler label the operator's code uses: .labels(handler="x"), spawn(..., "x") and retry(key, "x", ...)."""
    found = set()
    for path in OPERATOR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr == "labels":
                found |= {
                    k.value.value
                    for k in node.keywords
                    if k.arg == "handler" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)
                }
            if node.func.attr == "spawn" and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
                found.add(node.args[1].value)
            if node.func.attr == "retry" and len(node.args) == 3 and isinstance(node.args[1], ast.Constant):
                found.add(node.args[1].value)
    return found


def test_handlers_are_every_handler_label_the_code_uses() -> None:
    assert _handler_names() == set(HANDLERS)


def test_oldest_waiting_gauge_has_both_waiting_phases() -> None:
    metrics = build_registry()
    metrics.set_oldest_waiting({"Queued": 42.0})
    text = generate_latest(metrics.registry).decode()
    assert 'unlearning_oldest_waiting_request_seconds{phase="Queued"} 42.0' in text
    assert 'unlearning_oldest_waiting_request_seconds{phase="Pending"} 0.0' in text


@pytest.mark.parametrize(
    ("overrides", "labels"),
    [
        ({"verdict": "Failed", "exitCode": 3, "failedGates": ["maxMiaAuc"]}, ["maxMiaAuc"]),
        (
            {"verdict": "Failed", "exitCode": 3, "failedGates": ["maxTestAccuracyDrop", "maxMiaClassifierAccuracy"]},
            ["maxTestAccuracyDrop", "maxMiaClassifierAccuracy"],
        ),
        ({"verdict": "Failed", "exitCode": 3, "failedGates": ["maxSomethingNew"]}, ["other"]),
        ({"verdict": "Failed", "exitCode": 3, "reasons": ["diverged: loss nan"]}, ["other"]),
        ({"verdict": "Failed", "exitCode": 4, "error": "model.source: no such file"}, []),
        ({}, []),
    ],
)
def test_gate_labels_come_from_the_record_and_stay_bounded(overrides: dict[str, object], labels: list[str]) -> None:
    assert gate_labels(record(**overrides)) == labels
    assert set(labels) <= {*GATES, "other"}  # each a label set created at 0


FINAL = {"phase": "Succeeded", "startTime": "2026-01-01T12:00:00Z", "completionTime": "2026-01-01T12:10:00Z"}
FAILED_GATES = {
    **FINAL,
    "phase": "Failed",
    "conditions": [{"type": "Complete", "status": "True", "reason": "GatesFailed"}],
}
OOM = {**FINAL, "phase": "Failed", "conditions": [{"type": "Complete", "status": "True", "reason": "OOMKilled"}]}


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        # Passed on 2 GPUs for 600 s: 1200 GPU-seconds, the post numbers and the test-accuracy drop;
        # without a bank (the record's default calibration) it counts as uncalibrated.
        (
            ("scrub", FINAL, record(method="scrub"), 2, True),
            Completion("scrub", "Passed", None, 0.52, 0.01, pytest.approx(0.7), (), 600.0, 1200.0, False),
        ),
        # Gates failed: the failure reason and one label per failed gate.
        (
            (
                "scrub",
                FAILED_GATES,
                record(method="scrub", verdict="Failed", exitCode=3, failedGates=["maxMiaAuc"]),
                1,
                True,
            ),
            Completion(
                "scrub", "Failed", "GatesFailed", 0.52, 0.01, pytest.approx(0.7), ("maxMiaAuc",), 600.0, 600.0, False
            ),
        ),
        # The spec said auto; the record names the method that ran, and the label is that one.
        (
            ("auto", FINAL, record(method="calibrated"), 1, True),
            Completion("calibrated", "Passed", None, 0.52, 0.01, pytest.approx(0.7), (), 600.0, 600.0, False),
        ),
        # OOM without a record: verdict Error, no numbers, CPU-only.
        (("salun", OOM, None, 0, True), Completion("salun", "Error", "OOMKilled", None, None, None, (), 600.0, 0.0)),
        # Failed before a Job ran (a broken lineage, an unreadable spec): no duration, no GPU time.
        ((None, OOM, None, 4, False), Completion("unknown", "Error", "OOMKilled", None, None, None, (), None, 0.0)),
    ],
)
def test_completion_is_derived_from_the_final_status_and_record(
    inputs: tuple[str | None, dict[str, Any], CompactRecord | None, int, bool], expected: Completion
) -> None:
    assert completion(*inputs) == expected


def test_observe_counts_a_completion() -> None:
    metrics = build_registry()
    metrics.observe(completion("scrub", FINAL, record(method="scrub"), 2, True))
    text = generate_latest(metrics.registry).decode()
    assert 'unlearning_requests_completed_total{method="scrub",verdict="Passed"} 1.0' in text
    assert 'unlearning_gpu_seconds_total{method="scrub"} 1200.0' in text


@pytest.mark.parametrize(
    ("ages", "expected"),
    [
        ([], {"under_1d": 0, "1d_to_7d": 0, "7d_to_30d": 0, "over_30d": 0}),
        ([0.0, 86399.0], {"under_1d": 2, "1d_to_7d": 0, "7d_to_30d": 0, "over_30d": 0}),
        ([86400.0, 7 * 86400.0, 30 * 86400.0, 400 * 86400.0], {"under_1d": 0, "1d_to_7d": 1, "7d_to_30d": 1,
                                                              "over_30d": 2}),
    ],
)  # fmt: skip
def test_bank_ages_fall_in_four_bands_whatever_the_number_of_models(
    ages: list[float], expected: dict[str, int]
) -> None:
    assert bank_age_counts(ages) == expected
    metrics = build_registry()
    metrics.set_bank_ages(ages)
    sample = metrics.registry.get_sample_value
    assert sample("unlearning_calibration_oldest_bank_age_seconds") == max(ages, default=0.0)
    for label, count in expected.items():
        assert sample("unlearning_calibration_models_by_bank_age", {"age": label}) == count


def test_calibration_completion() -> None:
    ready = calibration_completion({"phase": "Ready", "cost": {"gpuSeconds": 300.0}})
    assert (ready.result, ready.failure_reason, ready.gpu_seconds) == ("Ready", None, 300.0)
    failed = calibration_completion(
        {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False", "reason": "FoldFailed"}]}
    )
    assert (failed.result, failed.failure_reason, failed.gpu_seconds) == ("Failed", "FoldFailed", 0.0)
    metrics = build_registry()
    metrics.observe_calibration(failed)
    text = generate_latest(metrics.registry).decode()
    assert 'unlearning_calibrations_completed_total{result="Failed"} 1.0' in text
    assert 'unlearning_calibration_failures_total{reason="FoldFailed"} 1.0' in text
