"""Status transitions: phases, conditions (metav1 shape), lastTransitionTime, and patch-only-when-changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest

from tests.operator.factories import record
from unlearning_contracts.record import SUMMARY_KEYS, columns
from unlearning_operator import crdgen
from unlearning_operator import status as st

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def running(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return st.running(
        status if status is not None else st.pending(None, 1, T0),
        job_name="r-1234abcd",
        attempt=1,
        model_version=1,
        input_model={"uri": "pvc://models/m.pt2", "sha256": ""},
        generation=1,
        now=T0,
    )


TRANSITIONS: list[tuple[Any, str, dict[str, tuple[str, str]]]] = [
    (lambda: st.pending(None, 1, T0), "Pending", {"Accepted": ("True", "SpecValid")}),
    (
        lambda: st.rejected(None, st.REASON_INVALID_SPEC, "spec.forget: set exactly one", 1, T0),
        "Rejected",
        {"Accepted": ("False", "InvalidSpec"), "Complete": ("True", "InvalidSpec")},
    ),
    (
        lambda: st.queued(st.pending(None, 1, T0), st.REASON_WAITING_FOR_MODEL, "waiting for r0", 1, T0),
        "Queued",
        {"Accepted": ("True", "SpecValid"), "JobCreated": ("False", "WaitingForModel")},
    ),
    (
        lambda: st.launching(
            st.pending(None, 1, T0), job_name="r-1234abcd", model_version=1, input_model={}, generation=1, now=T0
        ),
        "Running",
        {"Accepted": ("True", "SpecValid"), "JobCreated": ("False", "CreatingJob")},
    ),
    (running, "Running", {"Accepted": ("True", "SpecValid"), "JobCreated": ("True", "JobCreated")}),
    (
        lambda: st.finished(running(), record(), T1),
        "Succeeded",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "GatesPassed": ("True", "Passed"),
            "Complete": ("True", "Passed"),
        },
    ),
    (
        lambda: st.finished(
            running(), record(verdict="Failed", exitCode=3, reasons=["maxMiaAuc: 0.71 > 0.6"], outputModel=None), T1
        ),
        "Failed",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "GatesPassed": ("False", "GatesFailed"),
            "Complete": ("True", "GatesFailed"),
        },
    ),
    (
        lambda: st.finished(
            running(), record(verdict="Failed", exitCode=4, error="model: file not found", post=None, pre=None), T1
        ),
        "Failed",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "Complete": ("True", "InvalidInput"),
        },
    ),
    (
        lambda: st.failed(running(), st.REASON_OOM, "ran out of memory", T1),
        "Failed",
        {
            "Accepted": ("True", "SpecValid"),
            "JobCreated": ("True", "JobCreated"),
            "Complete": ("True", "OOMKilled"),
        },
    ),
]


def test_launching_records_the_job_before_it_exists() -> None:
    recorded = st.launching(
        st.queued(None, st.REASON_WAITING_FOR_CAPACITY, "waiting", 1, T0),
        job_name="r-1234abcd",
        model_version=3,
        input_model={"uri": "pvc://models/v2.pt2", "sha256": "ab"},
        generation=1,
        now=T1,
    )
    assert (recorded["jobName"], recorded["modelVersion"], recorded["observedGeneration"]) == ("r-1234abcd", 3, 1)
    assert not st.job_created(recorded)
    created = st.running(
        recorded, job_name="r-1234abcd", attempt=1, model_version=3, input_model={}, generation=1, now=T1
    )
    assert st.job_created(created)
    assert created["startTime"] == recorded["startTime"]


@pytest.mark.parametrize(("build", "phase", "expected"), TRANSITIONS)
def test_transitions(build: Any, phase: str, expected: dict[str, tuple[str, str]]) -> None:
    status = build()
    assert status["phase"] == phase
    assert conditions(status) == expected
    for condition in status["conditions"]:
        assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert condition["message"]
    assert (phase in st.TERMINAL_PHASES) == st.is_terminal(status)


def key_paths(value: Any, path: str = "status") -> set[str]:
    """Every key path in a status, list items as []."""
    if isinstance(value, dict):
        return {p for key, item in value.items() for p in {f"{path}.{key}", *key_paths(item, f"{path}.{key}")}}
    if isinstance(value, list):
        return {p for item in value for p in key_paths(item, f"{path}[]")}
    return set()


def schema_paths(schema: dict[str, Any], path: str = "status") -> set[str]:
    """Every key path the CRD's structural schema declares."""
    found = set()
    for key, sub in schema.get("properties", {}).items():
        found |= {f"{path}.{key}", *schema_paths(sub, f"{path}.{key}")}
    if "items" in schema:
        found |= schema_paths(schema["items"], f"{path}[]")
    return found


WRITERS = [build for build, _, _ in TRANSITIONS] + [
    lambda: st.pod_pending(running(), st.REASON_UNSCHEDULABLE, "no node has 8 GPUs", T1),
    lambda: st.pod_started(st.pod_pending(running(), st.REASON_PENDING, "pending", T0), T1),
    lambda: st.queued(st.pending(None, 1, T0), st.REASON_WAITING_FOR_CAPACITY, "2 of 2 running", 1, T0),
    lambda: st.with_audit(st.finished(running(), record(), T1), "unlearn-audit-r-1234abcd"),
    lambda: st.waiting_for_calibration(st.pending(None, 1, T0), st.REASON_WAITING_FOR_CALIBRATION, "waiting", 1, T0),
    lambda: st.with_calibration(
        running(), bank=BANK, found=True, reason=st.REASON_CALIBRATION_FOUND, message="x", now=T0
    ),
    lambda: st.finished(running(), record(calibration=USED), T1),
]


@pytest.mark.parametrize("build", WRITERS)
def test_every_key_a_transition_writes_is_in_the_crd_schema(build: Any) -> None:
    """Derived from both sides: what the transitions write against what the CRD declares (nothing listed here)."""
    schema = crdgen.build_crd(crdgen.REQUEST_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = build()
    missing = key_paths(status) - schema_paths(schema["properties"]["status"])
    assert not missing, f"status.py writes keys the CRD's status schema lacks (add them to RequestStatus): {missing}"
    jsonschema.validate(status, schema["properties"]["status"])


BANK = {"name": "team-a/cal", "uri": "pvc://banks/c/bank.npz", "sha256": "ba" * 32}
USED = {**BANK, "calibrated": False, "note": "the bank's data digest differs from the data loaded"}


def test_waiting_for_a_bank_stays_pending_with_a_condition() -> None:
    status = st.waiting_for_calibration(
        st.pending(None, 1, T0), st.REASON_WAITING_FOR_CALIBRATION, "waiting for cal (Running, 1/4 folds)", 1, T0
    )
    assert status["phase"] == "Pending"
    assert status["message"] == "waiting for cal (Running, 1/4 folds)"
    assert conditions(status) == {
        "Accepted": ("True", "SpecValid"),
        "CalibrationReady": ("False", "WaitingForCalibration"),
    }


def test_the_bank_chosen_at_launch_and_the_records_word_on_it() -> None:
    launched = st.with_calibration(
        running(), bank=BANK, found=True, reason=st.REASON_CALIBRATION_FOUND, message="uses the bank", now=T0
    )
    assert launched["calibration"] == BANK
    assert conditions(launched)["CalibrationReady"] == ("True", "CalibrationFound")
    # The job has the last word: it verified the file and says whether it used it.
    done = st.finished(launched, record(calibration=USED), T1)
    assert done["calibration"] == USED
    without = st.with_calibration(
        launched, bank=None, found=False, reason=st.REASON_NO_CALIBRATION, message="none", now=T1
    )
    assert "calibration" not in without
    assert conditions(without)["CalibrationReady"] == ("False", "NoCalibration")


def test_finished_copies_the_numbers_and_versions() -> None:
    status = st.finished(running(), record(), T1)
    assert status["verdict"] == "Passed"
    assert status["reasons"] == []
    expected = {
        "forgetAccuracy": 66.7,
        "retainAccuracy": 99.1,
        "testAccuracy": 96.4,
        "confidenceGap": 0.01,
        "miaAuc": 0.52,
    }
    assert {key: status["post"][key] for key in expected} == expected
    assert set(status["post"]) == set(SUMMARY_KEYS)  # every summary number, whatever the record declares
    assert status["pre"]["miaAuc"] == 0.71
    # Printer columns: each number at its own fixed precision, whatever the value.
    shown = {"forgetAccuracy": "66.7", "testAccuracy": "96.4", "miaAuc": "0.520"}
    assert {key: status["display"][key] for key in shown} == shown
    assert set(status["display"]) == {alias for _, alias, _, _ in columns()}
    assert status["outputModel"]["uri"] == "pvc://models/digits/versions/v1/model.pt2"
    assert status["inputModel"]["sha256"] == "11" * 32
    assert status["startTime"] == "2026-01-01T12:00:00Z"
    assert status["completionTime"] == "2026-01-01T12:05:00Z"
    assert status["jobName"] == "r-1234abcd"


@pytest.mark.parametrize(("reported", "shown"), [({}, 1), ({"worldSize": 1}, 1), ({"worldSize": 4}, 4)])
def test_finished_says_how_many_processes_ran(reported: dict[str, Any], shown: int) -> None:
    # A record from a job that predates the field counts as one process.
    assert st.finished(running(), record(**reported), T1)["worldSize"] == shown


def test_gate_failure_message_lists_the_reasons() -> None:
    status = st.finished(
        running(), record(verdict="Failed", exitCode=3, reasons=["maxMiaAuc: 0.71 > 0.6", "x"], outputModel=None), T1
    )
    assert status["message"] == "gates failed: maxMiaAuc: 0.71 > 0.6; x"
    assert status["reasons"] == ["maxMiaAuc: 0.71 > 0.6", "x"]


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = st.set_condition(
        [], type_="PodPending", status=True, reason="Unschedulable", message="a", generation=1, now=T0
    )
    same = st.set_condition(
        first, type_="PodPending", status=True, reason="Unschedulable", message="b", generation=1, now=T1
    )
    assert same[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert same[0]["message"] == "b"
    flipped = st.set_condition(
        same, type_="PodPending", status=False, reason="PodStarted", message="c", generation=1, now=T1
    )
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T12:05:00Z"


def test_pod_pending_and_started() -> None:
    alerted = st.pod_pending(running(), st.REASON_UNSCHEDULABLE, "no node with a free GPU", T1)
    assert conditions(alerted)["PodPending"] == ("True", "Unschedulable")
    assert alerted["phase"] == "Running"
    cleared = st.pod_started(alerted, T1)
    assert conditions(cleared)["PodPending"] == ("False", "PodStarted")
    untouched = running()
    assert st.pod_started(untouched, T1) is untouched


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"phase": "Pending"}, {"phase": "Pending"}, None),
        (None, {"phase": "Pending"}, {"phase": "Pending"}),
        ({"phase": "Pending", "message": "a"}, {"phase": "Queued", "message": "a"}, {"phase": "Queued"}),
        ({"phase": "Queued", "queuedTime": "x"}, {"phase": "Queued"}, {"queuedTime": None}),
        ({"phase": "Queued", "kopf": {}}, {"phase": "Queued"}, None),
    ],
)
def test_status_patch_only_when_changed(
    old: dict[str, Any] | None, new: dict[str, Any], patch: dict[str, Any] | None
) -> None:
    assert st.status_patch(old, new) == patch


def test_replaying_a_transition_writes_nothing() -> None:
    once = running()
    again = st.running(
        once,
        job_name="r-1234abcd",
        attempt=1,
        model_version=1,
        input_model={"uri": "pvc://models/m.pt2", "sha256": ""},
        generation=1,
        now=T1,
    )
    assert st.status_patch(once, again) is None


def test_transitions_do_not_mutate_their_input() -> None:
    before = running()
    snapshot = repr(before)
    st.finished(before, record(), T1)
    st.failed(before, st.REASON_OOM, "x", T1)
    assert repr(before) == snapshot
