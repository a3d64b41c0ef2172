"""Metrics: own registry at start-up, the fixed names, bounded labels."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tests.operator.factories import record
from unlearning_operator.metrics import build_registry, gate_labels, metric_names

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
