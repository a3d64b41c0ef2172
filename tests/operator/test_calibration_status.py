"""The calibration's status machine: phases, conditions, fold counts, the bank, and patch-only-when-changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest

from tests.operator.factories import bank_record, reference
from tests.operator.test_status import conditions, key_paths, schema_paths
from unlearning_operator import calibration_status as cal
from unlearning_operator import crdgen
from unlearning_operator.status import status_patch

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
OUTPUT = "pvc://banks/digits/digits-cal-7c6b5a49"


def running(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return cal.running(
        status if status is not None else cal.pending(None, 4, 1, T0),
        job_name="digits-cal-1234abcd",
        folds=4,
        parallelism=2,
        output=OUTPUT,
        generation=1,
        now=T0,
    )


def merging() -> dict[str, Any]:
    progressed = cal.folds_progress(running(), "0-3", "", T1)
    return cal.merging(progressed, merge_job_name="digits-cal-1234abcd-merge", gpu_seconds=96.0, now=T1)


TRANSITIONS: list[tuple[Any, str, dict[str, tuple[str, str]]]] = [
    (lambda: cal.pending(None, 4, 1, T0), "Pending", {"Accepted": ("True", "SpecValid")}),
    (
        lambda: cal.rejected(None, cal.REASON_INVALID_SPEC, "spec.folds: at most 32", 1, T0),
        "Rejected",
        {"Accepted": ("False", "InvalidSpec"), "Ready": ("False", "InvalidSpec")},
    ),
    (
        lambda: cal.queued(cal.pending(None, 4, 1, T0), cal.REASON_WAITING_FOR_CAPACITY, "2 slots", 1, T0),
        "Queued",
        {"Accepted": ("True", "SpecValid"), "JobCreated": ("False", "WaitingForCapacity")},
    ),
    (
        running,
        "Running",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "FoldsComplete": ("False", "FoldsRunning"),
        },
    ),
    (
        merging,
        "Merging",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "FoldsComplete": ("True", "FoldsDone"),
            "Ready": ("False", "Merging"),
        },
    ),
    (
        lambda: cal.ready(merging(), bank_record(), T1),
        "Ready",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "FoldsComplete": ("True", "FoldsDone"),
            "Ready": ("True", "BankWritten"),
        },
    ),
    (
        lambda: cal.failed(running(), cal.REASON_FOLD_FAILED, "fold 2 of 4 failed after 3 attempts", T1),
        "Failed",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "FoldsComplete": ("False", "FoldFailed"),
            "Ready": ("False", "FoldFailed"),
        },
    ),
    (
        lambda: cal.failed(merging(), cal.REASON_MERGE_FAILED, "the merge failed: fold-2.npz: sha256 differs", T1),
        "Failed",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "FoldsComplete": ("True", "FoldsDone"),
            "Ready": ("False", "MergeFailed"),
        },
    ),
]


@pytest.mark.parametrize(("build", "phase", "expected"), TRANSITIONS)
def test_transitions(build: Any, phase: str, expected: dict[str, tuple[str, str]]) -> None:
    status = build()
    assert status["phase"] == phase
    assert conditions(status) == expected
    for condition in status["conditions"]:
        assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert condition["message"]
        assert condition["type"] in cal.CONDITION_TYPES
        assert condition["reason"] in cal.REASONS
    assert (phase in cal.TERMINAL_PHASES) == cal.is_terminal(status)


WRITERS = [build for build, _, _ in TRANSITIONS] + [
    lambda: cal.folds_progress(running(), "0,2", "", T1),
    lambda: cal.pod_pending(running(), "Unschedulable", "no node has a free GPU", T1),
    lambda: cal.pod_started(cal.pod_pending(running(), "PodPendingTooLong", "pending", T0), T1),
    lambda: cal.with_audit(cal.ready(merging(), bank_record(), T1), "unlearn-calibration-digits-cal-1234abcd"),
]


@pytest.mark.parametrize("build", WRITERS)
def test_every_key_a_transition_writes_is_in_the_crd_schema(build: Any) -> None:
    schema = crdgen.build_crd(crdgen.CALIBRATION_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = build()
    missing = key_paths(status) - schema_paths(schema["properties"]["status"])
    assert not missing, f"calibration_status.py writes keys CalibrationStatus lacks: {missing}"
    jsonschema.validate(status, schema["properties"]["status"])


@pytest.mark.parametrize(
    ("indexes", "expanded"),
    [
        ("", set()),
        (None, set()),
        ("3", {3}),
        ("0-2", {0, 1, 2}),
        ("0-2,4", {0, 1, 2, 4}),
        ("1,3-5,7", {1, 3, 4, 5, 7}),
        ("0-31", set(range(32))),
    ],
)
def test_indexes_as_the_job_controller_writes_them(indexes: str | None, expanded: set[int]) -> None:
    assert cal.expand_indexes(indexes) == expanded
    assert cal.count_indexes(indexes) == len(expanded)


def test_progress_counts_folds_and_the_printer_column_says_done_of_k() -> None:
    status = cal.folds_progress(running(), "0,2", "", T1)
    assert (status["phase"], status["foldsDone"], status["completedIndexes"]) == ("Running", 2, "0,2")
    assert status["display"]["folds"] == "2/4"
    folds = cal.get_condition(status, cal.FOLDS_COMPLETE)
    assert folds is not None
    assert folds["message"] == "2 of 4 reference models trained"
    failed = cal.folds_progress(status, "0,2", "1", T1)
    assert failed["failedIndexes"] == "1"
    assert failed["foldsDone"] == 2


def test_ready_carries_bank_cost_and_likeness() -> None:
    status = cal.ready(merging(), bank_record(), T1)
    assert status["bank"] == {"uri": "pvc://banks/digits/digits-cal-7c6b5a49/bank.npz", "sha256": "ba" * 32}
    assert status["inputModel"]["sha256"] == "11" * 32
    assert status["dataDigest"] == "dd" * 32
    # The job's cost beside the GPU-seconds the operator counted over the fold pods.
    assert status["cost"] == {
        "gpuSeconds": 96.0,
        "deviceSeconds": 48.5,
        "retrainEquivalents": 3.0,
        "wallSeconds": 61.0,
    }
    # Means over the four references (agreement 97.0, 97.5, 98.0, 98.5), and the least agreement.
    assert status["likeness"] == {
        "originalTestAccuracy": 97.1,
        "testAccuracy": 96.3,
        "foldAccuracy": 95.8,
        "agreement": 97.75,
        "minAgreement": 97.0,
    }
    assert status["display"] == {"folds": "4/4", "agreement": "97.8", "cost": "3.0"}
    assert status["foldsDone"] == 4
    assert status["completionTime"] == "2026-01-01T12:05:00Z"
    assert "agree with the original on 97.8% of test rows" in status["message"]


def test_ready_without_a_bank_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the bank"):
        cal.ready(merging(), bank_record(bank=None), T1)


def test_likeness_of_one_reference() -> None:
    record = bank_record(references=[reference(0, agreement=91.25, testAccuracy=95.0, foldAccuracy=94.0)])
    assert cal.likeness_of(record) == {
        "originalTestAccuracy": 97.1,
        "testAccuracy": 95.0,
        "foldAccuracy": 94.0,
        "agreement": 91.25,
        "minAgreement": 91.25,
    }


def test_likeness_from_the_summary_when_the_compact_record_dropped_the_references() -> None:
    summary = {
        "testAccuracyMean": 96.0,
        "testAccuracyMin": 95.5,
        "foldAccuracyMean": 95.25,
        "foldAccuracyMin": 94.0,
        "agreementMean": 97.5,
        "agreementMin": 96.125,
    }
    dropped = bank_record(references=[], likeness=summary)
    assert cal.likeness_of(dropped) == {
        "originalTestAccuracy": 97.1,
        "testAccuracy": 96.0,
        "foldAccuracy": 95.25,
        "agreement": 97.5,
        "minAgreement": 96.12,
    }
    # With both, the summary (over all K) wins over whatever list came along.
    assert cal.likeness_of(bank_record(likeness=summary))["agreement"] == 97.5


def test_replaying_a_transition_writes_nothing() -> None:
    once = running()
    assert status_patch(once, running(once)) is None
    progressed = cal.folds_progress(once, "0", "", T1)
    assert status_patch(progressed, cal.folds_progress(progressed, "0", "", T1)) is None


def test_transitions_do_not_mutate_their_input() -> None:
    before = merging()
    snapshot = repr(before)
    cal.ready(before, bank_record(), T1)
    cal.failed(before, cal.REASON_MERGE_FAILED, "x", T1)
    cal.folds_progress(before, "0-3", "", T1)
    assert repr(before) == snapshot
