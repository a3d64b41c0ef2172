"""What a Job left behind, read from the objects the API returns. Pure.

Its outcome (from the Job's conditions), the pod that ended last, and the
compact record in that pod's termination message. Why a Job failed when
there is no usable record is failures.py.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from unlearning_contracts.calibration import CalibrationRecord, FoldRecord
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT, CompactRecord

M = TypeVar("M", bound=BaseModel)

JOB_RUNNING = "Running"
JOB_SUCCEEDED = "Succeeded"
JOB_FAILED = "Failed"

# The Job controller's condition types (batch/v1).
_JOB_COMPLETE = "Complete"
_JOB_FAILED = "Failed"


class MalformedResultError(ValueError):
    """The termination message is not a compact record."""


def true_condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The object's condition of this type when its status is True, else None."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def job_outcome(job: dict[str, Any]) -> str:
    """Succeeded / Failed once the Job controller says so, Running before."""
    if true_condition(job, _JOB_COMPLETE):
        return JOB_SUCCEEDED
    if true_condition(job, _JOB_FAILED):
        return JOB_FAILED
    return JOB_RUNNING


def container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return dict(status)
    return {}


def terminated(pod: dict[str, Any], container: str = "unlearn") -> dict[str, Any] | None:
    """The container's terminated state (current, else last), or None."""
    status = container_status(pod, container)
    for key in ("state", "lastState"):
        state = (status.get(key) or {}).get("terminated")
        if state:
            return dict(state)
    return None


def latest_terminated_pod(pods: list[dict[str, Any]], container: str = "unlearn") -> dict[str, Any] | None:
    """The most recently finished pod of a Job (retries leave several)."""
    done = [p for p in pods if terminated(p, container) is not None]
    if not done:
        return None
    return max(done, key=lambda p: str((terminated(p, container) or {}).get("finishedAt") or ""))


def parse_record(message: str | None) -> CompactRecord:
    """Parse a termination message; raise MalformedResultError saying what is wrong with it."""
    return _parse(message, CompactRecord)


def parse_calibration_record(message: str | None) -> CalibrationRecord:
    """The merge Job's termination message: the bank's compact record."""
    return _parse(message, CalibrationRecord)


def parse_fold_record(message: str | None) -> FoldRecord:
    """A fold pod's termination message: its compact FoldRecord."""
    return _parse(message, FoldRecord)


def completion_index(pod: dict[str, Any]) -> int | None:
    """The index an Indexed Job's pod runs (the Job controller's annotation), or None."""
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _parse(message: str | None, model: type[M]) -> M:
    if not message:
        raise MalformedResultError("the pod ended without a termination message (no result record)")
    size = len(message.encode())
    if size > TERMINATION_MESSAGE_LIMIT:
        raise MalformedResultError(f"the termination message is {size} bytes, over {TERMINATION_MESSAGE_LIMIT}")
    try:
        raw = json.loads(message)
    except json.JSONDecodeError:
        head = message.strip().splitlines()[-1][:200] if message.strip() else ""
        raise MalformedResultError(f"the termination message is not a result record: {head!r}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedResultError(f"the result record is invalid at {where}: {first['msg']}") from None
