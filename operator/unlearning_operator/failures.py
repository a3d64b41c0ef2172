"""Why a Job failed or a pod waits, in words a person can act on. Pure.

Inputs are the Job and pod objects as the API returns them (dicts) or the
operator's JobView; outputs are a condition reason (a constant from
status.py) and a one-line message that says what happened and what to
change. The order of the checks matters: an OOM kill is reported as such
even though the Job then also hits its backoff limit, because "raise
spec.job.memory" is the useful advice. Reading a successful Job's record is
results.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from unlearning_contracts.record import EXIT_CODE_MEANINGS

from . import calibration_status as cal
from . import status as states
from .results import (
    MalformedResultError,
    completion_index,
    container_status,
    latest_terminated_pod,
    parse_fold_record,
    terminated,
    true_condition,
)
from .views import JobView, parse_time

IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True)
class Explanation:
    reason: str
    message: str


def explain_failure(job: dict[str, Any], pods: list[dict[str, Any]], container: str = "unlearn") -> Explanation:
    """Why a Job failed without a usable record."""
    spec = job.get("spec") or {}
    for pod in sorted(pods, key=lambda p: str((terminated(p, container) or {}).get("finishedAt") or ""), reverse=True):
        state = terminated(pod, container)
        if state and state.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, container)
            return Explanation(
                states.REASON_OOM,
                f"the job ran out of memory (limit {limit}) and was killed: raise spec.job.memory "
                "or lower audit.maxSamples / method batch sizes",
            )
    for pod in pods:
        if (pod.get("status") or {}).get("reason") == "Evicted":
            return _evicted(pod)
    for pod in pods:
        waiting = (container_status(pod, container).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return _image_pull(pod, waiting, container)
    failed = true_condition(job, "Failed") or {}
    if failed.get("reason") == "DeadlineExceeded":
        return Explanation(
            states.REASON_DEADLINE,
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
            return Explanation(states.REASON_ERROR, f"exit code {code}: {meaning}" + (f" ({detail})" if detail else ""))
        text = f"the job crashed with exit code {code}"
        backoff = failed.get("reason") == "BackoffLimitExceeded"
        if backoff:
            text += f" after {spec.get('backoffLimit', 0)} retries"
        return Explanation(
            states.REASON_BACKOFF if backoff else states.REASON_ERROR, text + (f": {detail}" if detail else "")
        )
    if failed:
        return Explanation(
            states.REASON_ERROR, f"the Job failed: {failed.get('reason')}: {failed.get('message', '')}".strip()
        )
    return Explanation(states.REASON_ERROR, "the Job failed without a pod result")


def explain_calibration_failure(job: dict[str, Any], pods: list[dict[str, Any]], folds: int) -> Explanation:
    """Why a calibration's folds Job or merge Job failed, naming the fold and what to change.

    For the folds Job the pods are narrowed to the first failed index (the
    Job's ``failedIndexes``): that fold's attempts are the story, the
    others' successes are not. A fold's own record (exit 4, invalid input)
    says best what is wrong; otherwise an OOM kill, the deadline, an image
    that cannot be pulled, or the exit code with the log's last line.
    """
    spec = job.get("spec") or {}
    indexed = spec.get("completionMode") == "Indexed"
    failed_indexes = sorted(cal.expand_indexes((job.get("status") or {}).get("failedIndexes")))
    what = "the merge"
    if indexed:
        index = failed_indexes[0] if failed_indexes else None
        if index is not None:
            pods = [p for p in pods if completion_index(p) == index]
            what = f"fold {index} of {folds}"
        else:
            what = "the folds Job"
    attempts = sum(1 for p in pods if terminated(p) is not None)
    after = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts > 1 else ""
    reason = cal.REASON_FOLD_FAILED if indexed else cal.REASON_MERGE_FAILED
    failed = true_condition(job, "Failed") or {}
    if failed.get("reason") == "DeadlineExceeded":
        return Explanation(
            reason,
            f"{what}: the Job ran longer than its deadline ({spec.get('activeDeadlineSeconds')} s) and was stopped: "
            "raise spec.job.activeDeadlineSeconds, or train more folds at once (UNLEARNING_CALIBRATION_PARALLELISM)",
        )
    for pod in pods:
        state = terminated(pod)
        if state and state.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, "unlearn")
            return Explanation(
                reason,
                f"{what} ran out of memory (limit {limit}) and was killed: raise spec.job.memory "
                "or lower recipe.batchSize",
            )
        waiting = (container_status(pod, "unlearn").get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            pulled = _image_pull(pod, waiting, "unlearn")
            return Explanation(reason, f"{what}: {pulled.message}")
    last = latest_terminated_pod(pods)
    state = terminated(last) if last else None
    if state is None:
        detail = f"{failed.get('reason')}: {failed.get('message', '')}".strip() if failed else "no pod result"
        return Explanation(reason, f"{what} failed: {detail}")
    code = int(state.get("exitCode", -1))
    if indexed:
        try:
            fold = parse_fold_record(state.get("message"))
        except MalformedResultError:
            fold = None
        if fold is not None and fold.error:
            return Explanation(reason, f"{what} failed{after} (exit code {fold.exit_code}): {fold.error}")
    meaning = EXIT_CODE_MEANINGS.get(code)
    detail = _tail(state.get("message"))
    text = f"{what} failed{after} with exit code {code}" + (f" ({meaning})" if meaning and code != 0 else "")
    return Explanation(reason, text + (f": {detail}" if detail else ""))


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


# What the kubelet's eviction manager writes when a pod outgrows its own local-storage
# limits (pkg/kubelet/eviction/helpers.go). These evictions carry no DisruptionTarget
# condition, so they count against the Job's backoffLimit like a crash.
_STORAGE_EVICTION = ("ephemeral local storage", "local ephemeral storage limit", "Usage of EmptyDir volume")


def _evicted(pod: dict[str, Any]) -> Explanation:
    said = str((pod.get("status") or {}).get("message") or "").strip()
    if any(words in said for words in _STORAGE_EVICTION):
        advice = (
            "the job wrote more to local disk than its pod may use: raise job.tmpSizeLimit and "
            "job.ephemeralStorage in the chart's values"
        )
    else:
        advice = "the node evicted the job's pod"
    return Explanation(states.REASON_EVICTED, f"{advice} (kubelet: {said or 'Evicted'})")


def _image_pull(pod: dict[str, Any], waiting: dict[str, Any], container: str) -> Explanation:
    image = next(
        (c.get("image") for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == container), "?"
    )
    return Explanation(
        states.REASON_IMAGE_PULL,
        f"cannot pull image {image} ({waiting.get('reason')}: {waiting.get('message', '').strip()[:200]}): "
        "check the image name, the registry, and imagePullSecrets",
    )


def pending_reason(
    pod: dict[str, Any], now: datetime, threshold_seconds: int, container: str = "unlearn"
) -> Explanation | None:
    """Why a pod has been pending longer than the threshold; None when it is fine."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    created = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    if created is None or (now - created).total_seconds() < threshold_seconds:
        return None
    waited = int((now - created).total_seconds())
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            message = (condition.get("message") or "").strip()
            return Explanation(
                states.REASON_UNSCHEDULABLE,
                f"pending for {waited} s, unschedulable: {message or condition.get('reason')}. "
                "No node has the requested GPUs/cpu/memory free or matches the node selector and tolerations: "
                "lower spec.job.gpus/cpu/memory, or wait for capacity",
            )
    waiting = (container_status(pod, container).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in IMAGE_PULL_REASONS:
        return _image_pull(pod, waiting, container)
    what = waiting.get("reason") or "not started"
    return Explanation(states.REASON_PENDING, f"pending for {waited} s ({what})")


@dataclass(frozen=True)
class PendingCheck:
    """What the periodic check of a running request's pod concludes."""

    alert: Explanation | None
    """Raise (or keep) PodPending with this reason and message."""
    started: bool
    """The pod runs: clear a PodPending alert if one was raised."""


def needs_pods(job: JobView, now: datetime, threshold_seconds: int) -> bool:
    """Whether ``pending_check`` needs the Job's pods (one API call), or can answer from the Job alone."""
    created = parse_time(job.created)
    return (
        job.ready == 0
        and not job.suspended
        and created is not None
        and (now - created).total_seconds() >= threshold_seconds
    )


def pending_check(
    job: JobView, pods: list[dict[str, Any]], queue: str | None, now: datetime, threshold_seconds: int
) -> PendingCheck | None:
    """Whether a running request's pod waits too long, and why; None while it is too early to say.

    A ready pod has started. Before the threshold nothing is said. A
    suspended Job waits for Kueue (queue named by the request), which no pod
    can explain. Otherwise the first pod with a pending reason explains the
    wait, and a pod in phase Running clears the alert.
    """
    if job.ready > 0:
        return PendingCheck(alert=None, started=True)
    created = parse_time(job.created)
    if created is None or (now - created).total_seconds() < threshold_seconds:
        return None
    if job.suspended:
        message = f"the Job is suspended: waiting for Kueue to admit it (queue {queue or '?'})"
        return PendingCheck(alert=Explanation(states.REASON_PENDING, message), started=False)
    whys = [why for pod in pods if (why := pending_reason(pod, now, threshold_seconds)) is not None]
    alert = whys[0] if whys else None
    started = alert is None and any((pod.get("status") or {}).get("phase") == "Running" for pod in pods)
    return PendingCheck(alert=alert, started=started)
