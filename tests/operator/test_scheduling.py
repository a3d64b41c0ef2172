"""Which requests start: one per model, a global cap, FIFO by creation time."""

from __future__ import annotations

import pytest

from unlearning_operator import status as st
from unlearning_operator.scheduling import Candidate, decide

pytestmark = pytest.mark.unit


def req(
    name: str, model: str, created: str, phase: str | None = st.PENDING, *, ns: str = "a", job: bool = False
) -> Candidate:
    return Candidate(namespace=ns, name=name, model=model, created=created, phase=phase, job_active=job)


def started(decisions: list) -> list[str]:  # type: ignore[type-arg]
    return [d.name for d in decisions if d.start]


@pytest.mark.parametrize(
    ("requests", "cap", "expected"),
    [
        ([req("r1", "m", "01"), req("r2", "m", "02")], 4, ["r1"]),
        ([req("r2", "m", "02"), req("r1", "m", "01")], 4, ["r1"]),
        ([req("r1", "m1", "01"), req("r2", "m2", "02"), req("r3", "m3", "03")], 2, ["r1", "r2"]),
        ([req("r0", "m", "00", st.RUNNING), req("r1", "m", "01")], 4, []),
        ([req("r0", "m", "00", st.SUCCEEDED), req("r1", "m", "01")], 4, ["r1"]),
        ([req("r0", "m", "00", st.REJECTED), req("r1", "m", "01")], 4, ["r1"]),
        # A Job exists but the status patch never landed (operator restarted): the model is busy.
        ([req("r0", "m", "00", st.PENDING, job=True), req("r1", "m", "01")], 4, []),
        # Same model name in two namespaces: two different models.
        ([req("r1", "m", "01", ns="a"), req("r2", "m", "02", ns="b")], 4, ["r1", "r2"]),
        # Cap counts running jobs of other models.
        ([req("r0", "x", "00", st.RUNNING), req("r1", "m1", "01"), req("r2", "m2", "02")], 2, ["r1"]),
        # Not yet validated (no phase) requests are not candidates.
        ([req("r1", "m", "01", None)], 4, []),
        # FIFO: the earliest waiting request of a model blocks later ones even when it waits for capacity.
        ([req("r0", "x", "00", st.RUNNING), req("r1", "m", "01"), req("r2", "m", "02")], 1, []),
    ],
)
def test_who_starts(requests: list[Candidate], cap: int, expected: list[str]) -> None:
    assert started(decide(requests, cap)) == expected


def test_messages_say_what_each_waits_for() -> None:
    decisions = {
        d.name: d
        for d in decide(
            [req("r0", "m", "00", st.RUNNING), req("r1", "m", "01"), req("r2", "x", "02"), req("r3", "y", "03")], 2
        )
    }
    assert decisions["r1"].reason == st.REASON_WAITING_FOR_MODEL
    assert "waiting for request r0" in decisions["r1"].message
    assert decisions["r2"].start
    assert decisions["r3"].reason == st.REASON_WAITING_FOR_CAPACITY
    assert "2 of 2 jobs running" in decisions["r3"].message
    assert "UNLEARNING_MAX_CONCURRENT_JOBS" in decisions["r3"].message


def test_five_hundred_requests_fill_the_cap_in_creation_order() -> None:
    requests = [req(f"r{i:03d}", f"m{i % 50}", f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z") for i in range(500)]
    decisions = decide(requests, 20)
    assert started(decisions) == [f"r{i:03d}" for i in range(20)]
    assert len(decisions) == 500
