"""Job and pod status -> the reason a person reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.operator.factories import job, pod, record
from unlearning_operator import failures
from unlearning_operator import status as st

pytestmark = pytest.mark.unit

FAILED = {"type": "Failed", "status": "True"}


@pytest.mark.parametrize(
    ("conditions", "outcome"),
    [
        ([], failures.JOB_RUNNING),
        ([{"type": "Complete", "status": "True"}], failures.JOB_SUCCEEDED),
        ([{"type": "FailureTarget", "status": "True"}], failures.JOB_RUNNING),
        ([{**FAILED, "reason": "BackoffLimitExceeded"}], failures.JOB_FAILED),
        ([{"type": "Complete", "status": "False"}], failures.JOB_RUNNING),
    ],
)
def test_job_outcome(conditions: list[dict[str, Any]], outcome: str) -> None:
    assert failures.job_outcome(job(conditions)) == outcome


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
    ],
)
def test_explain_failure(the_job: dict[str, Any], pods: list[dict[str, Any]], reason: str, words: list[str]) -> None:
    why = failures.explain_failure(the_job, pods)
    assert why.reason == reason
    for word in words:
        assert word in why.message


def test_parse_record_roundtrip() -> None:
    text = json.dumps(record().dump())
    parsed = failures.parse_record(text)
    assert parsed.verdict == "Passed"
    assert parsed.post is not None
    assert parsed.post.mia_auc == 0.52


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (None, "without a termination message"),
        ("", "without a termination message"),
        ("x" * 5000, "5000 bytes, over 4096"),
        ("Traceback (most recent call last):\nKeyError: 'x'", "not a result record: \"KeyError: 'x'\""),
        ('{"verdict": "Maybe"}', "result record is invalid at"),
    ],
)
def test_malformed_records(message: str | None, words: str) -> None:
    with pytest.raises(failures.MalformedResultError) as caught:
        failures.parse_record(message)
    assert words in str(caught.value)


def test_latest_terminated_pod_picks_the_last_retry() -> None:
    first = pod(terminated={"exitCode": 1, "finishedAt": "2026-01-01T00:01:00Z", "message": "first"})
    last = pod(terminated={"exitCode": 0, "finishedAt": "2026-01-01T00:09:00Z", "message": "last"})
    running = pod(phase="Running")
    chosen = failures.latest_terminated_pod([first, running, last])
    assert chosen is last


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
