"""What a finished Job left: its outcome, its last pod, and the record in the termination message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.factories import job, pod, record
from unlearning_operator import results

pytestmark = pytest.mark.unit

FAILED = {"type": "Failed", "status": "True"}


@pytest.mark.parametrize(
    ("conditions", "outcome"),
    [
        ([], results.JOB_RUNNING),
        ([{"type": "Complete", "status": "True"}], results.JOB_SUCCEEDED),
        ([{"type": "FailureTarget", "status": "True"}], results.JOB_RUNNING),
        ([{**FAILED, "reason": "BackoffLimitExceeded"}], results.JOB_FAILED),
        ([{"type": "Complete", "status": "False"}], results.JOB_RUNNING),
    ],
)
def test_job_outcome(conditions: list[dict[str, Any]], outcome: str) -> None:
    assert results.job_outcome(job(conditions)) == outcome


def test_parse_record_roundtrip() -> None:
    text = json.dumps(record().dump())
    parsed = results.parse_record(text)
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
    with pytest.raises(results.MalformedResultError) as caught:
        results.parse_record(message)
    assert words in str(caught.value)


def test_latest_terminated_pod_picks_the_last_retry() -> None:
    first = pod(terminated={"exitCode": 1, "finishedAt": "2026-01-01T00:01:00Z", "message": "first"})
    last = pod(terminated={"exitCode": 0, "finishedAt": "2026-01-01T00:09:00Z", "message": "last"})
    running = pod(phase="Running")
    chosen = results.latest_terminated_pod([first, running, last])
    assert chosen is last
