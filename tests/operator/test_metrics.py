"""Metrics: own registry at start-up, the fixed names, bounded labels."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from tests.operator.factories import record
from unlearning_contracts.record import CompactRecord
from unlearning_operator.metrics import Completion, build_registry, completion, gate_labels, metric_names

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
                assert set(sample.labels) <= {"phase", "verdict", "method", "reason", "gate", "handler", "le"}


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
        # Passed on 2 GPUs for 600 s: 1200 GPU-seconds, the post numbers and the test-accuracy drop.
        (
            ("scrub", FINAL, record(), 2, True),
            Completion("scrub", "Passed", None, 0.52, 0.01, pytest.approx(0.7), (), 600.0, 1200.0),
        ),
        # Gates failed: the failure reason and one label per failed gate.
        (
            ("scrub", FAILED_GATES, record(verdict="Failed", exitCode=3, failedGates=["maxMiaAuc"]), 1, True),
            Completion("scrub", "Failed", "GatesFailed", 0.52, 0.01, pytest.approx(0.7), ("maxMiaAuc",), 600.0, 600.0),
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
    metrics.observe(completion("scrub", FINAL, record(), 2, True))
    text = generate_latest(metrics.registry).decode()
    assert 'unlearning_requests_completed_total{method="scrub",verdict="Passed"} 1.0' in text
    assert 'unlearning_gpu_seconds_total{method="scrub"} 1200.0' in text
