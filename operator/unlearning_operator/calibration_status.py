"""The calibration's status as a named state machine; transitions are pure functions.

Phases::

    (new) -> Pending -> Queued <-> Pending -> Running -> Merging -> Ready
          \\-> Rejected                       \\-> Failed  \\-> Failed
                                   (Ready, Failed and Rejected never change)

* Running: the folds Job (Indexed, one index per reference model) exists;
  ``foldsDone`` counts the indices the Job controller reports succeeded.
* Merging: every fold succeeded and the merge Job exists.
* Ready: the merge wrote the bank; ``bank`` names it by location and sha256,
  and requests of the model may use it.

Every transition takes the current status (a camelCase dict) and returns the
whole new one, exactly as status.py does for requests (same condition shape,
same ``status_patch``), so an unchanged reconcile writes nothing.

``CalibrationStatus`` is the status's shape: the CRD's status schema is
generated from it, and tests/operator/test_calibration_status.py checks that
every key a transition writes is in that schema.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, WithJsonSchema

from unlearning_contracts.calibration import CalibrationRecord

from . import status as _request_status

# The request status module's helpers: both kinds write status and conditions the same way.
from .status import _DATE_TIME, _INT64, Condition, _base, _Shape, _with, timestamp

get_condition = _request_status.get_condition
"""The same metav1 conditions as a request's, read the same way."""

# Phases.
PENDING = "Pending"
QUEUED = "Queued"
RUNNING = "Running"
MERGING = "Merging"
READY = "Ready"
FAILED = "Failed"
REJECTED = "Rejected"
PHASES = (PENDING, QUEUED, RUNNING, MERGING, READY, FAILED, REJECTED)
TERMINAL_PHASES = frozenset({READY, FAILED, REJECTED})
ACTIVE_PHASES = frozenset({RUNNING, MERGING})
WAITING_PHASES = frozenset({PENDING, QUEUED})

# Condition types.
ACCEPTED = "Accepted"
"""The spec parsed and passed the operator's checks (False: Rejected, with what to change)."""
JOB_CREATED = "JobCreated"
"""The folds Job exists (False while queued, with what the calibration waits for)."""
POD_PENDING = "PodPending"
"""True while a fold's pod has waited longer than the alert threshold, with why."""
FOLDS_COMPLETE = "FoldsComplete"
"""Every reference model is trained (False with FoldFailed when one could not be)."""
READY_CONDITION = "Ready"
"""The bank is written and requests may use it (``kubectl wait --for=condition=Ready``)."""
CONDITION_TYPES = (ACCEPTED, JOB_CREATED, POD_PENDING, FOLDS_COMPLETE, READY_CONDITION)

# Condition reasons (CamelCase).
REASON_VALID = "SpecValid"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_IMAGE_NOT_ALLOWED = "ImageNotAllowed"
REASON_WAITING_FOR_MODEL = "WaitingForModel"
REASON_WAITING_FOR_CAPACITY = "WaitingForCapacity"
REASON_JOB_CREATED = "JobCreated"
REASON_CREATING_JOB = "CreatingJob"
REASON_FOLDS_RUNNING = "FoldsRunning"
REASON_FOLDS_DONE = "FoldsDone"
REASON_MERGING = "Merging"
REASON_BANK_WRITTEN = "BankWritten"
REASON_FOLD_FAILED = "FoldFailed"
REASON_MERGE_FAILED = "MergeFailed"
REASON_JOB_DELETED = "JobDeleted"
REASON_BAD_RECORD = "MalformedRecord"
REASON_NAME_CONFLICT = "NameConflict"
REASON_ERROR = "Error"
# Admission's reasons, the request's own (admission.py admits both kinds by the same rules).
REASON_FACTORY_NOT_ALLOWED = _request_status.REASON_FACTORY_NOT_ALLOWED
REASON_CLAIM_REQUIRED = _request_status.REASON_CLAIM_REQUIRED
REASON_PLACEMENT_NOT_ALLOWED = _request_status.REASON_PLACEMENT_NOT_ALLOWED
REASON_LAUNCH_REFUSED = _request_status.REASON_LAUNCH_REFUSED
REASON_WAITING_FOR_NAMESPACE = _request_status.REASON_WAITING_FOR_NAMESPACE
REASONS = (
    REASON_VALID,
    REASON_INVALID_SPEC,
    REASON_IMAGE_NOT_ALLOWED,
    REASON_WAITING_FOR_MODEL,
    REASON_WAITING_FOR_CAPACITY,
    REASON_JOB_CREATED,
    REASON_CREATING_JOB,
    REASON_FOLDS_RUNNING,
    REASON_FOLDS_DONE,
    REASON_MERGING,
    REASON_BANK_WRITTEN,
    REASON_FOLD_FAILED,
    REASON_MERGE_FAILED,
    REASON_JOB_DELETED,
    REASON_BAD_RECORD,
    REASON_NAME_CONFLICT,
    REASON_ERROR,
    REASON_FACTORY_NOT_ALLOWED,
    REASON_CLAIM_REQUIRED,
    REASON_PLACEMENT_NOT_ALLOWED,
    REASON_LAUNCH_REFUSED,
    REASON_WAITING_FOR_NAMESPACE,
)


class CalibrationCondition(Condition):
    """A metav1.Condition."""

    type: str = Field(description="Condition type: " + ", ".join(CONDITION_TYPES) + ".")


class BankRef(_Shape):
    """The bank file."""

    uri: str | None = Field(default=None, description="pvc://<claim>/<path>/bank.npz.")
    sha256: str | None = Field(default=None, description="sha256 of the bank file (requests' records name it).")


class InputRef(_Shape):
    """The original model the references were compared with."""

    uri: str | None = Field(default=None, description="Where the original model is.")
    sha256: str | None = Field(default=None, description="sha256 of the original model file.")


class Cost(_Shape):
    """What the calibration cost."""

    device_seconds: float | None = Field(
        default=None, description="Seconds of accelerator (or CPU) time the folds took."
    )
    retrain_equivalents: float | None = Field(
        default=None, description="Optimiser steps of all references over those of one full retrain."
    )
    wall_seconds: float | None = Field(default=None, description="Wall time of the folds and the merge, as run.")
    gpu_seconds: float | None = Field(
        default=None, description="GPUs held x seconds, counted by the operator over every fold pod it read."
    )


class Likeness(_Shape):
    """How alike the reference models are to the original (a bank is only as good as this)."""

    original_test_accuracy: float | None = Field(default=None, description="The original's test accuracy (percent).")
    test_accuracy: float | None = Field(default=None, description="Mean test accuracy of the references (percent).")
    fold_accuracy: float | None = Field(
        default=None,
        description="Mean accuracy of each reference on its own unseen fold (percent): near testAccuracy.",
    )
    agreement: float | None = Field(
        default=None, description="Mean percent of test rows where a reference predicts what the original does."
    )
    min_agreement: float | None = Field(default=None, description="The least agreement of any reference (percent).")


def _display_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "folds": {"type": "string", "description": "Folds: done of K, for example 3/4."},
            "agreement": {"type": "string", "description": "Agreement: likeness.agreement at one decimal."},
            "cost": {"type": "string", "description": "Cost: cost.retrainEquivalents at one decimal."},
        },
    }


class CalibrationStatus(_Shape):
    """What the operator observed; written by the operator only."""

    phase: str | None = Field(
        default=None, description="Where the calibration stands.", json_schema_extra={"enum": list(PHASES)}
    )
    message: str | None = Field(default=None, description="A one-line summary: what happens or what to change.")
    conditions: list[CalibrationCondition] | None = Field(
        default=None,
        description="metav1.Condition list, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the status reflects.", json_schema_extra=_INT64
    )
    job_name: str | None = Field(default=None, description="The Indexed Job that trains the reference models.")
    merge_job_name: str | None = Field(default=None, description="The Job that merges the folds into the bank.")
    parallelism: int | None = Field(default=None, description="Folds trained at once (bounded by the operator's caps).")
    folds: int | None = Field(default=None, description="Reference models in all (spec.folds, K).")
    folds_done: int | None = Field(default=None, description="Reference models trained so far.")
    completed_indexes: str | None = Field(
        default=None, description="The folds done, as the Job reports them (for example 0-2,4)."
    )
    failed_indexes: str | None = Field(default=None, description="The folds that failed, as the Job reports them.")
    output: str | None = Field(
        default=None, description="The calibration's own folder: pvc://<claim>/<output.path>/<name>-<uid[:8]>."
    )
    queued_time: str | None = Field(
        default=None, description="When it first had to wait.", json_schema_extra=_DATE_TIME
    )
    start_time: str | None = Field(
        default=None, description="When the folds Job was created.", json_schema_extra=_DATE_TIME
    )
    completion_time: str | None = Field(
        default=None, description="When it reached Ready, Failed or Rejected.", json_schema_extra=_DATE_TIME
    )
    bank: BankRef | None = Field(default=None, description="The bank file (set when Ready).")
    input_model: InputRef | None = Field(default=None, description="The original model the bank describes.")
    data_digest: str | None = Field(default=None, description="sha256 over the data the folds trained and tested on.")
    cost: Cost | None = Field(default=None, description="GPU-seconds and retrain-equivalents.")
    likeness: Likeness | None = Field(default=None, description="How alike the references are to the original.")
    display: Annotated[dict[str, str] | None, WithJsonSchema(_display_schema())] = Field(
        default=None, description="What the printer columns show, as text at a fixed precision."
    )
    audit_config_map: str | None = Field(default=None, description="Name of the immutable calibration record.")


def phase_of(status: dict[str, Any] | None) -> str | None:
    return None if not status else status.get("phase")


def job_created(status: dict[str, Any] | None) -> bool:
    """Whether the folds Job exists (JobCreated=True), not just its launch recorded."""
    condition = get_condition(status, JOB_CREATED)
    return condition is not None and condition.get("status") == "True"


def is_terminal(status: dict[str, Any] | None) -> bool:
    return phase_of(status) in TERMINAL_PHASES


def get_ready_condition(status: dict[str, Any] | None) -> dict[str, Any] | None:
    return get_condition(status, READY_CONDITION)


def expand_indexes(indexes: str | None) -> set[int]:
    """The indices a Job's ``completedIndexes``/``failedIndexes`` text names ("0-2,4" is {0, 1, 2, 4})."""
    found: set[int] = set()
    for text in (indexes or "").split(","):
        part = text.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def count_indexes(indexes: str | None) -> int:
    """How many indices a Job's ``completedIndexes``/``failedIndexes`` text names ("0-2,4" is 4)."""
    return len(expand_indexes(indexes))


def _same_generation(status: dict[str, Any]) -> dict[str, Any]:
    return _base(status, int(status.get("observedGeneration", 1)))


def _display(new: dict[str, Any]) -> None:
    shown = dict(new.get("display") or {})
    if new.get("folds") is not None:
        shown["folds"] = f"{new.get('foldsDone', 0)}/{new['folds']}"
    agreement = (new.get("likeness") or {}).get("agreement")
    if agreement is not None:
        shown["agreement"] = f"{agreement:.1f}"
    cost = (new.get("cost") or {}).get("retrainEquivalents")
    if cost is not None:
        shown["cost"] = f"{cost:.1f}"
    new["display"] = shown


def rejected(
    status: dict[str, Any] | None, reason: str, message: str, generation: int, now: datetime
) -> dict[str, Any]:
    """The spec cannot run; nothing is launched. Terminal: fixing it means a new calibration."""
    new = _base(status, generation)
    new["phase"] = REJECTED
    new["message"] = message
    new.setdefault("completionTime", timestamp(now))
    _with(new, ACCEPTED, False, reason, message, now=now)
    _with(new, READY_CONDITION, False, reason, message, now=now)
    return new


def pending(status: dict[str, Any] | None, folds: int, generation: int, now: datetime) -> dict[str, Any]:
    """Accepted; the scheduler decides next."""
    new = _base(status, generation)
    new["phase"] = PENDING
    new["message"] = "accepted: waiting for the scheduler"
    new["folds"] = folds
    new.setdefault("foldsDone", 0)
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    _display(new)
    return new


queued = _request_status.queued
"""Waiting for another calibration of the model or for free slots under the caps (as a request waits)."""


def running(
    status: dict[str, Any] | None,
    *,
    job_name: str,
    folds: int,
    parallelism: int,
    output: str,
    generation: int,
    now: datetime,
    created: bool = True,
) -> dict[str, Any]:
    """The folds Job exists (``created``), or is recorded and about to be created: the operator names it
    in status before creating it, so a Job found under the name while status names none is not its own."""
    new = _base(status, generation)
    new["phase"] = RUNNING
    new["jobName"] = job_name
    new["folds"] = folds
    new["parallelism"] = parallelism
    new["output"] = output
    new.setdefault("foldsDone", 0)
    new.setdefault("startTime", timestamp(now))
    new["message"] = f"Job {job_name} trains {folds} reference models, {parallelism} at a time"
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    if created:
        _with(new, JOB_CREATED, True, REASON_JOB_CREATED, f"created Job {job_name}", now=now)
    else:
        _with(new, JOB_CREATED, False, REASON_CREATING_JOB, f"creating Job {job_name}", now=now)
    _with(
        new,
        FOLDS_COMPLETE,
        False,
        REASON_FOLDS_RUNNING,
        f"{new['foldsDone']} of {folds} reference models trained",
        now=now,
    )
    _display(new)
    return new


def folds_progress(status: dict[str, Any], completed: str, failed: str, now: datetime) -> dict[str, Any]:
    """The Job reported indices done (or failed); counts only, the phase stays."""
    new = _same_generation(status)
    folds = int(new.get("folds") or 0)
    done = count_indexes(completed)
    new["foldsDone"] = done
    if completed:
        new["completedIndexes"] = completed
    if failed:
        new["failedIndexes"] = failed
    if new.get("phase") == RUNNING:
        message = f"{done} of {folds} reference models trained"
        _with(new, FOLDS_COMPLETE, False, REASON_FOLDS_RUNNING, message, now=now)
    _display(new)
    return new


def merging(status: dict[str, Any], *, merge_job_name: str, gpu_seconds: float, now: datetime) -> dict[str, Any]:
    """Every fold succeeded; the merge Job exists. ``gpu_seconds``: what the fold pods held (the operator's count)."""
    new = _same_generation(status)
    folds = int(new.get("folds") or 0)
    new["phase"] = MERGING
    new["cost"] = {**(new.get("cost") or {}), "gpuSeconds": round(gpu_seconds, 1)}
    new["mergeJobName"] = merge_job_name
    new["foldsDone"] = folds
    new["message"] = f"all {folds} reference models trained; Job {merge_job_name} writes the bank"
    _with(new, FOLDS_COMPLETE, True, REASON_FOLDS_DONE, f"all {folds} reference models trained", now=now)
    _with(new, READY_CONDITION, False, REASON_MERGING, f"Job {merge_job_name} writes the bank", now=now)
    _display(new)
    return new


def likeness_of(record: CalibrationRecord) -> dict[str, float]:
    """The likeness summary of a bank's references (means, and the least agreement).

    From the record's own summary when it has one: the merge's termination
    message drops the per-reference list when K references do not fit in it
    (up to 32) and always keeps the summary.
    """
    refs = record.references
    out: dict[str, float] = {}
    if record.original_test_accuracy is not None:
        out["originalTestAccuracy"] = round(record.original_test_accuracy, 2)
    summary = record.likeness
    if summary is not None:
        out["testAccuracy"] = round(summary.test_accuracy_mean, 2)
        out["foldAccuracy"] = round(summary.fold_accuracy_mean, 2)
        out["agreement"] = round(summary.agreement_mean, 2)
        out["minAgreement"] = round(summary.agreement_min, 2)
    elif refs:
        out["testAccuracy"] = round(sum(r.test_accuracy for r in refs) / len(refs), 2)
        out["foldAccuracy"] = round(sum(r.fold_accuracy for r in refs) / len(refs), 2)
        out["agreement"] = round(sum(r.agreement for r in refs) / len(refs), 2)
        out["minAgreement"] = round(min(r.agreement for r in refs), 2)
    return out


def ready(status: dict[str, Any], record: CalibrationRecord, now: datetime) -> dict[str, Any]:
    """The merge wrote the bank: its location and digest, the cost (the job's, beside the GPU-seconds
    the operator counted) and the likeness."""
    if record.bank is None:
        raise ValueError("a Ready calibration needs the bank in its record")
    new = _same_generation(status)
    new["phase"] = READY
    new["bank"] = {"uri": record.bank.uri, "sha256": record.bank.sha256}
    if record.input_model is not None:
        new["inputModel"] = {"uri": record.input_model.uri, "sha256": record.input_model.sha256}
    if record.data_digest:
        new["dataDigest"] = record.data_digest
    keys = ("deviceSeconds", "retrainEquivalents", "wallSeconds")
    new["cost"] = {
        **(new.get("cost") or {}),
        **{key: round(float(record.cost[key]), 3) for key in keys if key in record.cost},
    }
    likeness = likeness_of(record)
    if likeness:
        new["likeness"] = likeness
    new["foldsDone"] = int(new.get("folds") or record.folds)
    new["completionTime"] = timestamp(now)
    message = f"bank {record.bank.uri} (sha256 {record.bank.sha256[:12]}) from {record.folds} reference models"
    if "agreement" in likeness:
        message += f"; they agree with the original on {likeness['agreement']:.1f}% of test rows"
    new["message"] = message
    _with(new, FOLDS_COMPLETE, True, REASON_FOLDS_DONE, f"all {record.folds} reference models trained", now=now)
    _with(new, READY_CONDITION, True, REASON_BANK_WRITTEN, message, now=now)
    _display(new)
    return new


def failed(status: dict[str, Any], reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A fold or the merge failed, or a Job went missing; the bank is not written (or not usable)."""
    new = _same_generation(status)
    new["phase"] = FAILED
    new["message"] = message
    new["completionTime"] = timestamp(now)
    if reason == REASON_FOLD_FAILED:
        _with(new, FOLDS_COMPLETE, False, reason, message, now=now)
    _with(new, READY_CONDITION, False, reason, message, now=now)
    return new


def pod_pending(status: dict[str, Any], reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A fold's pod has waited too long; say why."""
    new = _same_generation(status)
    _with(new, POD_PENDING, True, reason, message, now=now)
    return new


def pod_started(status: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Clear a PodPending alert once a fold's pod runs (only if one was raised)."""
    if get_condition(status, POD_PENDING) is None:
        return status
    new = _same_generation(status)
    _with(new, POD_PENDING, False, "PodStarted", "a fold's pod started", now=now)
    return new


def with_audit(status: dict[str, Any], config_map: str) -> dict[str, Any]:
    new = copy.deepcopy(status)
    new["auditConfigMap"] = config_map
    return new
