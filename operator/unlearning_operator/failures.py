"""Why a Job failed or a pod waits, in words a person can act on. Pure.

Inputs are the Job and pod objects as the API returns them (dicts); outputs
are a condition reason (a constant from status.py) and a one-line message
that says what happened and what to change. The order of the checks matters:
an OOM kill is reported as such even though the Job then also hits its
backoff limit, because "raise spec.job.memory" is the useful advice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from unlearning_contracts.record import EXIT_CODE_MEANINGS, TERMINATION_MESSAGE_LIMIT, CompactRecord

from . import status as st

JOB_RUNNING = "Running"
JOB_SUCCEEDED = "Succeeded"
JOB_FAILED = "Failed"

IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True)
class Explanation:
    reason: str
    message: str


class MalformedResultError(ValueError):
    """The termination message is not a compact record."""


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def job_outcome(job: dict[str, Any]) -> str:
    """Succeeded / Failed once the Job controller says so, Running before."""
    if _condition(job, "Complete"):
        return JOB_SUCCEEDED
    if _condition(job, "Failed"):
        return JOB_FAILED
    return JOB_RUNNING


def _container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return dict(status)
    return {}


def terminated(pod: dict[str, Any], container: str = "unlearn") -> dict[str, Any] | None:
    """The container's terminated state (current, else last), or None."""
    status = _container_status(pod, container)
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
        return CompactRecord.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedResultError(f"the result record is invalid at {where}: {first['msg']}") from None


def explain_failure(job: dict[str, Any], pods: list[dict[str, Any]], container: str = "unlearn") -> Explanation:
    """Why a Job failed without a usable record."""
    spec = job.get("spec") or {}
    for pod in sorted(pods, key=lambda p: str((terminated(p, container) or {}).get("finishedAt") or ""), reverse=True):
        state = terminated(pod, container)
        if state and state.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, container)
            return Explanation(
                st.REASON_OOM,
                f"the job ran out of memory (limit {limit}) and was killed: raise spec.job.memory "
                "or lower audit.maxSamples / method batch sizes",
            )
    for pod in pods:
        waiting = (_container_status(pod, container).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return _image_pull(pod, waiting, container)
    failed = _condition(job, "Failed") or {}
    if failed.get("reason") == "DeadlineExceeded":
        return Explanation(
            st.REASON_DEADLINE,
            f"the Job ran longer than its deadline ({spec.get('activeDeadlineSeconds')} s) and was stopped: "
            "raise spec.job.activeDeadlineSeconds, set method.retainSubset, or pick a faster method",
        )
    last = latest_terminated_pod(pods, container)
    state = terminated(last, container) if last else None
    if state is not None:
        code = int(state.get("exitCode", -1))
        meaning = EXIT_CODE_MEANINGS.get(code)
        detail = _tail(state.get("message"))
        if meaning:
            return Explanation(st.REASON_ERROR, f"exit code {code}: {meaning}" + (f" ({detail})" if detail else ""))
        text = f"the job crashed with exit code {code}"
        backoff = failed.get("reason") == "BackoffLimitExceeded"
        if backoff:
            text += f" after {spec.get('backoffLimit', 0)} retries"
        return Explanation(st.REASON_BACKOFF if backoff else st.REASON_ERROR, text + (f": {detail}" if detail else ""))
    if failed:
        return Explanation(
            st.REASON_ERROR, f"the Job failed: {failed.get('reason')}: {failed.get('message', '')}".strip()
        )
    return Explanation(st.REASON_ERROR, "the Job failed without a pod result")


def _tail(message: str | None) -> str:
    if not message:
        return ""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _memory_limit(pod: dict[str, Any], container: str) -> str:
    for spec in (pod.get("spec") or {}).get("containers") or []:
        if spec.get("name") == container:
            return str(((spec.get("resources") or {}).get("limits") or {}).get("memory", "unset"))
    return "unset"


def _image_pull(pod: dict[str, Any], waiting: dict[str, Any], container: str) -> Explanation:
    image = next(
        (c.get("image") for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == container), "?"
    )
    return Explanation(
        st.REASON_IMAGE_PULL,
        f"cannot pull image {image} ({waiting.get('reason')}: {waiting.get('message', '').strip()[:200]}): "
        "check the image name, the registry, and imagePullSecrets",
    )


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pending_reason(
    pod: dict[str, Any], now: datetime, threshold_seconds: int, container: str = "unlearn"
) -> Explanation | None:
    """Why a pod has been pending longer than the threshold; None when it is fine."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    created = _parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    if created is None or (now - created).total_seconds() < threshold_seconds:
        return None
    waited = int((now - created).total_seconds())
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            message = (condition.get("message") or "").strip()
            return Explanation(
                st.REASON_UNSCHEDULABLE,
                f"pending for {waited} s, unschedulable: {message or condition.get('reason')}. "
                "No node has the requested GPUs/cpu/memory free or matches the node selector and tolerations: "
                "lower spec.job.gpus/cpu/memory, or wait for capacity",
            )
    waiting = (_container_status(pod, container).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in IMAGE_PULL_REASONS:
        return _image_pull(pod, waiting, container)
    what = waiting.get("reason") or "not started"
    return Explanation(st.REASON_PENDING, f"pending for {waited} s ({what})")
