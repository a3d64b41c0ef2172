"""Job and pod status -> the reason a person reads, and the pending check's decision."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.operator.factories import job, pod
from unlearning_operator import failures
from unlearning_operator import status as st
from unlearning_operator.views import JobView

pytestmark = pytest.mark.unit

FAILED = {"type": "Failed", "status": "True"}


def evicted(message: str) -> dict[str, Any]:
    killed = pod(terminated={"exitCode": 137, "reason": "Error", "finishedAt": "2026-01-01T00:05:00Z"})
    killed["status"].update({"reason": "Evicted", "message": message})
    return killed


@pytest.mark.parametrize(
    ("the_job", "pods", "reason", "words"),
    [
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [pod(terminated={"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-01-01T00:05:00Z"})],
            st.REASON_OOM,
            ["out of memory", "16Gi", "spec.job.memory"],
        ),
        (
            job([{**FAILED, "reason": "DeadlineExceeded"}]),
            [],
            st.REASON_DEADLINE,
            ["deadline (21600 s)", "spec.job.activeDeadlineSeconds"],
        ),
        (
            job([{**FAILED, "reason": "PodFailurePolicy"}]),
            [pod(terminated={"exitCode": 4, "message": "Traceback\nspec.model: no such file", "finishedAt": "x"})],
            st.REASON_ERROR,
            ["exit code 4: invalid input", "spec.model: no such file"],
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [pod(terminated={"exitCode": 1, "message": "RuntimeError: CUDA error", "finishedAt": "x"})],
            st.REASON_BACKOFF,
            ["exit code 1", "after 2 retries", "CUDA error"],
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [pod(phase="Pending", waiting={"reason": "ImagePullBackOff", "message": "not found"})],
            st.REASON_IMAGE_PULL,
            ["cannot pull image job:1", "ImagePullBackOff"],
        ),
        (job([{**FAILED, "reason": "Weird", "message": "m"}]), [], st.REASON_ERROR, ["Weird"]),
        # The kubelet's own words (pkg/kubelet/eviction/helpers.go) when a pod outgrows its local disk.
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [evicted('Usage of EmptyDir volume "tmp" exceeds the limit "4Gi". ')],
            st.REASON_EVICTED,
            ["more to local disk", "job.tmpSizeLimit", 'EmptyDir volume "tmp" exceeds the limit "4Gi"'],
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [evicted('Container unlearn exceeded its local ephemeral storage limit "6Gi". ')],
            st.REASON_EVICTED,
            ["job.ephemeralStorage", 'limit "6Gi"'],
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [evicted("Pod ephemeral local storage usage exceeds the total limit of containers 6Gi. ")],
            st.REASON_EVICTED,
            ["job.ephemeralStorage", "total limit of containers 6Gi"],
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [evicted("The node was low on resource: memory. ")],
            st.REASON_EVICTED,
            ["the node evicted", "low on resource: memory"],
        ),
    ],
)
def test_explain_failure(the_job: dict[str, Any], pods: list[dict[str, Any]], reason: str, words: list[str]) -> None:
    why = failures.explain_failure(the_job, pods)
    assert why.reason == reason
    for word in words:
        assert word in why.message


NOW = datetime(2026, 1, 1, 0, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("the_pod", "reason", "words"),
    [
        (
            pod(
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                    }
                ],
            ),
            st.REASON_UNSCHEDULABLE,
            ["pending for 600 s", "Insufficient nvidia.com/gpu", "spec.job.gpus"],
        ),
        (
            pod(phase="Pending", waiting={"reason": "ErrImagePull", "message": "denied"}),
            st.REASON_IMAGE_PULL,
            ["cannot pull image job:1", "ErrImagePull"],
        ),
        (pod(phase="Pending", waiting={"reason": "ContainerCreating"}), st.REASON_PENDING, ["ContainerCreating"]),
    ],
)
def test_pending_reason(the_pod: dict[str, Any], reason: str, words: list[str]) -> None:
    why = failures.pending_reason(the_pod, NOW, 120)
    assert why is not None
    assert why.reason == reason
    for word in words:
        assert word in why.message


@pytest.mark.parametrize(
    "the_pod",
    [
        pod(phase="Running"),
        pod(phase="Pending", created="2026-01-01T00:09:00Z"),  # 60 s < 120 s threshold
    ],
)
def test_no_pending_alert(the_pod: dict[str, Any]) -> None:
    assert failures.pending_reason(the_pod, NOW, 120) is None


def job_view(created: str = "2026-01-01T00:00:00Z", ready: int = 0, suspended: bool = False) -> JobView:
    return JobView("team-a", "r-1234abcd", "r", "uid-r", created, "Running", 1, ready, suspended)


UNSCHEDULABLE = pod(
    phase="Pending",
    conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}],
)


@pytest.mark.parametrize(
    ("the_job", "pods", "needs_pods", "alert", "started"),
    [
        # A ready pod has started, whenever it was created.
        (job_view(ready=1), [], False, None, True),
        # Too early to say anything (60 s < 120 s): None.
        (job_view(created="2026-01-01T00:09:00Z"), [], False, "none", False),
        # Suspended by Kueue: said from the Job alone, naming the queue.
        (job_view(suspended=True), [], False, "suspended: waiting for Kueue to admit it (queue gpu-queue)", False),
        # Waiting long: the first pod with a reason explains it.
        (job_view(), [UNSCHEDULABLE], True, "unschedulable: no GPU", False),
        # Waiting long but the pod runs (not yet ready): started, no alert.
        (job_view(), [pod(phase="Running")], True, None, True),
        # Waiting long and no pod yet: nothing to say, nothing started.
        (job_view(), [], True, None, False),
    ],
)
def test_pending_check(
    the_job: JobView, pods: list[dict[str, Any]], needs_pods: bool, alert: str | None, started: bool
) -> None:
    assert failures.needs_pods(the_job, NOW, 120) is needs_pods
    check = failures.pending_check(the_job, pods, "gpu-queue", NOW, 120)
    if alert == "none":
        assert check is None
        return
    assert check is not None
    assert check.started is started
    if alert is None:
        assert check.alert is None
    else:
        assert check.alert is not None
        assert alert in check.alert.message


def test_a_suspended_job_without_a_queue_says_so() -> None:
    check = failures.pending_check(job_view(suspended=True), [], None, NOW, 120)
    assert check is not None
    assert check.alert is not None
    assert (check.alert.reason, check.alert.message.endswith("(queue ?)")) == (st.REASON_PENDING, True)


def indexed(conditions: list[dict[str, Any]], failed_indexes: str = "") -> dict[str, Any]:
    the_job = job(conditions, completionMode="Indexed", completions=4)
    the_job["status"]["failedIndexes"] = failed_indexes
    return the_job


def fold(index: int, **terminated: Any) -> dict[str, Any]:
    the_pod = pod(terminated={"finishedAt": f"2026-01-01T00:0{index}:00Z", **terminated})
    the_pod["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return the_pod


FOLD_RECORD = (
    '{"schemaVersion":1,"calibration":"a/c","fold":1,"exitCode":4,'
    '"error":"recipe.augmentations: random-crop needs images of shape C x H x W, the data is 64 features",'
    '"startedAt":"x","finishedAt":"y"}'
)


@pytest.mark.parametrize(
    ("the_job", "pods", "reason", "message"),
    [
        # The fold's own record says best what is wrong (exit 4 fails the index at once).
        (
            indexed([{**FAILED, "reason": "MaxFailedIndexesExceeded"}], "1"),
            [fold(0, exitCode=0), fold(1, exitCode=4, message=FOLD_RECORD)],
            "FoldFailed",
            "fold 1 of 4 failed (exit code 4): recipe.augmentations: random-crop needs images of shape C x H x W, "
            "the data is 64 features",
        ),
        # Only the failed fold's attempts count, not the others' pods.
        (
            indexed([{**FAILED, "reason": "MaxFailedIndexesExceeded"}], "3"),
            [fold(0, exitCode=1, message="other"), *[fold(3, exitCode=139, message="Segmentation fault")] * 3],
            "FoldFailed",
            "fold 3 of 4 failed after 3 attempts with exit code 139: Segmentation fault",
        ),
        (
            indexed([{**FAILED, "reason": "MaxFailedIndexesExceeded"}], "2"),
            [fold(2, exitCode=137, reason="OOMKilled")],
            "FoldFailed",
            "fold 2 of 4 ran out of memory (limit 16Gi) and was killed: raise spec.job.memory or lower "
            "recipe.batchSize",
        ),
        (
            indexed([{**FAILED, "reason": "DeadlineExceeded"}]),
            [],
            "FoldFailed",
            "the folds Job: the Job ran longer than its deadline (21600 s) and was stopped: raise "
            "spec.job.activeDeadlineSeconds, or train more folds at once (UNLEARNING_CALIBRATION_PARALLELISM)",
        ),
        (
            job([{**FAILED, "reason": "BackoffLimitExceeded"}]),
            [pod(terminated={"exitCode": 1, "message": "OSError: disk full", "finishedAt": "x"})],
            "MergeFailed",
            "the merge failed with exit code 1: OSError: disk full",
        ),
    ],
)
def test_explain_calibration_failure(
    the_job: dict[str, Any], pods: list[dict[str, Any]], reason: str, message: str
) -> None:
    why = failures.explain_calibration_failure(the_job, pods, folds=4)
    assert (why.reason, why.message) == (reason, message)
