"""The request's status as a named state machine; transitions are pure functions.

Phases::

    (new) -> Pending -> Queued <-> Pending -> Running -> Succeeded | Failed
          \\-> Rejected                                 (terminal phases never change)

Running begins before the Job exists: the operator first records which Job
it will create (``launching``: ``jobName``, the versions, JobCreated=False
``CreatingJob``), then creates it (``running``: JobCreated=True). The record
comes first for two reasons. A Job under that name is adopted only when the
request's status names it, and only the operator writes status, so a Job a
tenant created in advance never is. And ``jobName`` freezes the spec (the
CRD's transition rule), so the Job is built from a spec that can no longer
change; an edit that landed just before the freeze shows as a new generation
in the answer, and the request fails with ``SpecChanged`` instead of running
a spec other than the one it now shows.

Every transition takes the current status (a camelCase dict, as stored) and
returns the whole new status; the handler patches only the difference
(``status_patch``), so an unchanged reconcile writes nothing and a restarted
operator replaying events does not churn ``lastTransitionTime``.

Conditions follow metav1.Condition (type, status, reason, message,
lastTransitionTime, observedGeneration) so ``kubectl wait
--for=condition=Complete`` and generic tooling work. Types and reasons are
constants here, documented in docs/operator.md.

``RequestStatus`` below is the status's shape: the CRD's status schema is
generated from it (crdgen), and tests/operator/test_status.py checks that
every key a transition writes is in that schema. A new status field is a
field there and the transition that writes it.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from unlearning_contracts.record import CompactRecord, SummaryMetrics, columns

# Phases.
PENDING = "Pending"
QUEUED = "Queued"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
REJECTED = "Rejected"
PHASES = (PENDING, QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED)
TERMINAL_PHASES = frozenset({SUCCEEDED, FAILED, REJECTED})

# Condition types.
ACCEPTED = "Accepted"
"""The spec parsed and passed the operator's checks (False: Rejected, with what to change)."""
JOB_CREATED = "JobCreated"
"""The Job exists (False while queued, with what the request waits for)."""
POD_PENDING = "PodPending"
"""True while the pod has waited longer than the alert threshold, with why (unschedulable, image pull)."""
COMPLETE = "Complete"
"""The run ended (True with Succeeded or Failed; the reason says how)."""
GATES_PASSED = "GatesPassed"
"""The audit's acceptance gates held (set only when a result record was read)."""
CALIBRATION_READY = "CalibrationReady"
"""A reference bank was found for the run (False: waiting for one, or why it runs without one)."""
CONDITION_TYPES = (ACCEPTED, JOB_CREATED, POD_PENDING, COMPLETE, GATES_PASSED, CALIBRATION_READY)

# Condition reasons (CamelCase, as metav1.Condition requires).
REASON_VALID = "SpecValid"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_IMAGE_NOT_ALLOWED = "ImageNotAllowed"
REASON_FACTORY_NOT_ALLOWED = "FactoryNotAllowed"
REASON_CLAIM_REQUIRED = "ClaimRequired"
REASON_PLACEMENT_NOT_ALLOWED = "PlacementNotAllowed"
REASON_WAITING_FOR_MODEL = "WaitingForModel"
REASON_WAITING_FOR_CAPACITY = "WaitingForCapacity"
REASON_WAITING_FOR_NAMESPACE = "WaitingForNamespaceCapacity"
REASON_CREATING_JOB = "CreatingJob"
REASON_JOB_CREATED = "JobCreated"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_IMAGE_PULL = "ImagePullFailed"
REASON_POD_STARTED = "PodStarted"
REASON_PENDING = "PodPendingTooLong"
REASON_PASSED = "Passed"
REASON_GATES_FAILED = "GatesFailed"
REASON_INVALID_INPUT = "InvalidInput"
REASON_OOM = "OOMKilled"
REASON_EVICTED = "Evicted"
REASON_DEADLINE = "DeadlineExceeded"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_JOB_DELETED = "JobDeleted"
REASON_BAD_RESULT = "MalformedResult"
REASON_ERROR = "JobFailed"
REASON_NAME_CONFLICT = "NameConflict"
"""An object under one of the operator's names that it did not make (a Job, a pod, a ConfigMap)."""
REASON_SPEC_CHANGED = "SpecChanged"
REASON_LINEAGE_BROKEN = "LineageBroken"
REASON_LAUNCH_REFUSED = "LaunchRefused"
"""The API server refused the Job or its spec ConfigMap for good (invalid, forbidden, over quota)."""
REASON_REQUEST_DELETED = "RequestDeleted"
"""Only in an audit record: the request was deleted while its Job ran."""
REASON_CALIBRATION_FOUND = "CalibrationFound"
REASON_NO_CALIBRATION = "NoCalibration"
REASON_CALIBRATION_DISABLED = "CalibrationDisabled"
REASON_WAITING_FOR_CALIBRATION = "WaitingForCalibration"
REASON_CALIBRATION_MISSING = "CalibrationMissing"

_DATE_TIME: JsonDict = {"format": "date-time"}
_INT64: JsonDict = {"format": "int64"}


class _Shape(BaseModel):
    """Status shapes: camelCase on the wire, every field optional (the operator fills them in over time)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Shape):
    """A metav1.Condition."""

    type: str = Field(description="Condition type: " + ", ".join(CONDITION_TYPES) + ".")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="Machine-readable CamelCase reason.")
    message: str = Field(description="What happened and what to change.")
    last_transition_time: str = Field(description="When the status last changed.", json_schema_extra=_DATE_TIME)
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was set for.", json_schema_extra=_INT64
    )


class ModelRef(_Shape):
    """A model version."""

    uri: str | None = Field(default=None, description="pvc://<claim>/<path> of the model file.")
    sha256: str | None = Field(default=None, description="sha256 of the model file.")
    format: str | None = Field(default=None, description="exported, state-dict or torchscript.")


class CalibrationState(_Shape):
    """The reference bank of the run: chosen at launch, confirmed by the job's record."""

    name: str | None = Field(default=None, description="namespace/name of the UnlearningCalibration.")
    uri: str | None = Field(default=None, description="pvc://<claim>/<path>/bank.npz.")
    sha256: str | None = Field(default=None, description="sha256 of the bank file.")
    calibrated: bool | None = Field(
        default=None, description="Whether the run used the bank (from the job's record; unset until it ends)."
    )
    note: str | None = Field(default=None, description="Why it ran uncalibrated, or what to know of the bank.")


def _display_schema() -> dict[str, Any]:
    properties = {
        alias: {"type": "string", "description": f"{shown.column}: {info.description}"}
        for _, alias, shown, info in columns()
    }
    return {"type": "object", "properties": properties}


class RequestStatus(_Shape):
    """What the operator observed; written by the operator only."""

    phase: str | None = Field(
        default=None, description="Where the request stands.", json_schema_extra={"enum": list(PHASES)}
    )
    message: str | None = Field(
        default=None, description="A one-line summary of the phase: what happens or what to change."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        description="metav1.Condition list, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the status reflects.", json_schema_extra=_INT64
    )
    job_name: str | None = Field(default=None, description="The Job running this request.")
    attempt: int | None = Field(default=None, description="Job launches for this request (a Job retries pods itself).")
    queued_time: str | None = Field(
        default=None, description="When the request first had to wait.", json_schema_extra=_DATE_TIME
    )
    start_time: str | None = Field(default=None, description="When the Job was created.", json_schema_extra=_DATE_TIME)
    completion_time: str | None = Field(
        default=None, description="When the request reached a final phase.", json_schema_extra=_DATE_TIME
    )
    model_version: int | None = Field(default=None, description="Lineage version this request writes.")
    input_model: ModelRef | None = Field(
        default=None, description="The input model version (current lineage version at launch)."
    )
    output_model: ModelRef | None = Field(default=None, description="The output model version (written by the job).")
    pre: SummaryMetrics | None = Field(default=None, description="Audit numbers before unlearning.")
    post: SummaryMetrics | None = Field(default=None, description="Audit numbers after unlearning.")
    display: Annotated[dict[str, str] | None, WithJsonSchema(_display_schema())] = Field(
        default=None,
        description="The post-unlearning numbers the printer columns show, as text at a fixed precision "
        "per number (a number column would print 95 beside 96.882).",
    )
    world_size: int | None = Field(
        default=None, description="Processes the job ran (one per GPU; data-parallel when more than one)."
    )
    verdict: Literal["Passed", "Failed"] | None = Field(default=None, description="The acceptance gates' verdict.")
    reasons: list[str] | None = Field(default=None, description="Why gates failed (empty when Passed).")
    audit_config_map: str | None = Field(default=None, description="Name of the immutable audit ConfigMap.")
    calibration: CalibrationState | None = Field(
        default=None, description="The reference bank given to the job, and whether the run used it."
    )


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as metav1.Time serialises."""
    return now.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def phase_of(status: dict[str, Any] | None) -> str | None:
    return None if not status else status.get("phase")


def is_terminal(status: dict[str, Any] | None) -> bool:
    return phase_of(status) in TERMINAL_PHASES


def get_condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for condition in (status or {}).get("conditions", []) or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


def set_condition(
    conditions: list[dict[str, Any]],
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Replace or add one condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    result = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(condition)
            continue
        found = True
        changed = condition.get("status") != value
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp(now)
                if changed
                else condition.get("lastTransitionTime", timestamp(now)),
                "observedGeneration": generation,
            }
        )
    if not found:
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp(now),
                "observedGeneration": generation,
            }
        )
    return result


def _base(status: dict[str, Any] | None, generation: int) -> dict[str, Any]:
    new = copy.deepcopy(status or {})
    new["observedGeneration"] = generation
    new.setdefault("conditions", [])
    return new


def _with(new: dict[str, Any], type_: str, ok: bool, reason: str, message: str, *, now: datetime) -> None:
    new["conditions"] = set_condition(
        new["conditions"],
        type_=type_,
        status=ok,
        reason=reason,
        message=message,
        generation=new["observedGeneration"],
        now=now,
    )


def rejected(
    status: dict[str, Any] | None, reason: str, message: str, generation: int, now: datetime
) -> dict[str, Any]:
    """The spec cannot run; nothing is launched. Terminal: fixing it means a new request."""
    new = _base(status, generation)
    new["phase"] = REJECTED
    new["message"] = message
    new.setdefault("completionTime", timestamp(now))
    _with(new, ACCEPTED, False, reason, message, now=now)
    _with(new, COMPLETE, True, reason, message, now=now)
    return new


def pending(status: dict[str, Any] | None, generation: int, now: datetime) -> dict[str, Any]:
    """Accepted; the scheduler decides next (usually within the same reconcile)."""
    new = _base(status, generation)
    new["phase"] = PENDING
    new["message"] = "accepted: waiting for the scheduler"
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    return new


def queued(status: dict[str, Any] | None, reason: str, message: str, generation: int, now: datetime) -> dict[str, Any]:
    """Waiting for the model's running job or for a free slot under the global cap."""
    new = _base(status, generation)
    new["phase"] = QUEUED
    new["message"] = message
    new.setdefault("queuedTime", timestamp(now))
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    _with(new, JOB_CREATED, False, reason, message, now=now)
    return new


def launching(
    status: dict[str, Any] | None,
    *,
    job_name: str,
    model_version: int,
    input_model: dict[str, Any],
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    """The operator commits to a Job before creating it (see the module docstring)."""
    new = _base(status, generation)
    new["phase"] = RUNNING
    new["jobName"] = job_name
    new["attempt"] = 1
    new["modelVersion"] = model_version
    new["inputModel"] = input_model
    new.setdefault("startTime", timestamp(now))
    new["message"] = f"creating Job {job_name} for model version {model_version - 1} -> {model_version}"
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    _with(new, JOB_CREATED, False, REASON_CREATING_JOB, f"creating Job {job_name}", now=now)
    return new


def job_created(status: dict[str, Any] | None) -> bool:
    """Whether the request's Job exists (JobCreated=True), not just its launch recorded."""
    condition = get_condition(status, JOB_CREATED)
    return condition is not None and condition.get("status") == "True"


def running(
    status: dict[str, Any] | None,
    *,
    job_name: str,
    attempt: int,
    model_version: int,
    input_model: dict[str, Any],
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    """The Job exists (created now or adopted after a restart)."""
    new = _base(status, generation)
    new["phase"] = RUNNING
    new["jobName"] = job_name
    new["attempt"] = attempt
    new["modelVersion"] = model_version
    new["inputModel"] = input_model
    new.setdefault("startTime", timestamp(now))
    new["message"] = f"Job {job_name} runs model version {model_version - 1} -> {model_version}"
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    _with(new, JOB_CREATED, True, REASON_JOB_CREATED, f"created Job {job_name}", now=now)
    return new


def waiting_for_calibration(
    status: dict[str, Any] | None, reason: str, message: str, generation: int, now: datetime
) -> dict[str, Any]:
    """Accepted, but spec.calibration.policy Required and no Ready bank yet: stays Pending."""
    new = _base(status, generation)
    new["phase"] = PENDING
    new["message"] = message
    _with(new, ACCEPTED, True, REASON_VALID, "the spec is valid", now=now)
    _with(new, CALIBRATION_READY, False, reason, message, now=now)
    return new


def with_calibration(
    status: dict[str, Any], *, bank: dict[str, str] | None, found: bool, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """The bank chosen at launch (or why there is none) in status and the CalibrationReady condition."""
    new = _base(status, int(status.get("observedGeneration", 1)))
    if bank is not None:
        new["calibration"] = dict(bank)
    else:
        new.pop("calibration", None)
    _with(new, CALIBRATION_READY, found, reason, message, now=now)
    return new


def pod_pending(status: dict[str, Any], reason: str, message: str, now: datetime) -> dict[str, Any]:
    """The pod has waited too long; say why (the question batch users ask most)."""
    new = _base(status, int(status.get("observedGeneration", 1)))
    _with(new, POD_PENDING, True, reason, message, now=now)
    return new


def pod_started(status: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Clear a PodPending alert once the pod runs (only if one was raised)."""
    if get_condition(status, POD_PENDING) is None:
        return status
    new = _base(status, int(status.get("observedGeneration", 1)))
    _with(new, POD_PENDING, False, REASON_POD_STARTED, "the pod started", now=now)
    return new


def _numbers(values: SummaryMetrics | None) -> dict[str, Any] | None:
    return None if values is None else values.rounded()


def finished(status: dict[str, Any], record: CompactRecord, now: datetime) -> dict[str, Any]:
    """The job wrote its compact record: copy the numbers and the verdict."""
    new = _base(status, int(status.get("observedGeneration", 1)))
    passed = record.verdict == "Passed" and record.exit_code == 0
    new["phase"] = SUCCEEDED if passed else FAILED
    new["verdict"] = record.verdict
    new["reasons"] = list(record.reasons)
    for key, values in (("pre", record.pre), ("post", record.post)):
        numbers = _numbers(values)
        if numbers:
            new[key] = numbers
    if record.post is not None:
        new["display"] = record.post.display()
    if record.model_version is not None:
        new["modelVersion"] = record.model_version
    if record.input_model is not None:
        new["inputModel"] = record.input_model.dump()
    if record.output_model is not None:
        new["outputModel"] = record.output_model.dump()
    new["worldSize"] = record.world_size
    new["calibration"] = record.calibration.dump()
    new["completionTime"] = timestamp(now)
    if passed:
        reason, message = REASON_PASSED, "the model forgot and passed every acceptance gate"
    elif record.error:
        reason, message = REASON_INVALID_INPUT, record.error
    else:
        reason = REASON_GATES_FAILED
        message = "gates failed: " + ("; ".join(record.reasons) or "no reason given")
    new["message"] = message
    if record.post is not None or record.verdict == "Passed":
        _with(new, GATES_PASSED, passed, reason, message, now=now)
    _with(new, COMPLETE, True, reason, message, now=now)
    return new


def failed(status: dict[str, Any], reason: str, message: str, now: datetime) -> dict[str, Any]:
    """The run ended without a usable record (OOM, deadline, Job deleted, malformed result)."""
    new = _base(status, int(status.get("observedGeneration", 1)))
    new["phase"] = FAILED
    new["message"] = message
    new["completionTime"] = timestamp(now)
    _with(new, COMPLETE, True, reason, message, now=now)
    return new


def with_audit(status: dict[str, Any], config_map: str) -> dict[str, Any]:
    new = copy.deepcopy(status)
    new["auditConfigMap"] = config_map
    return new


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns old into new, or None when nothing changed.

    Top-level keys only: conditions and the number blocks are replaced whole,
    which a JSON merge patch does for lists anyway. Keys dropped from new are
    set to None (deleted by the merge patch).
    """
    old = old or {}
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch or None


def now_utc() -> datetime:
    return datetime.now(UTC)
