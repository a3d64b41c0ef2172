"""Which requests start: one per model, a global cap, a per-namespace cap, FIFO within a namespace,
fewest-running first across namespaces."""

from __future__ import annotations

import pytest

from unlearning_operator import status as st
from unlearning_operator.scheduling import Candidate, Caps, Decision, decide
from unlearning_operator.settings import load_settings

pytestmark = pytest.mark.unit


def req(
    name: str, model: str, created: str, phase: str | None = st.PENDING, *, ns: str = "a", job: bool = False
) -> Candidate:
    return Candidate(namespace=ns, name=name, model=model, created=created, phase=phase, job_active=job)


def started(decisions: list[Decision]) -> list[str]:
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
        # A Job the status names exists and runs: the model is busy.
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
    assert started(decide(requests, Caps(cap))) == expected


def test_messages_say_what_each_waits_for() -> None:
    decisions = {
        d.name: d
        for d in decide(
            [req("r0", "m", "00", st.RUNNING), req("r1", "m", "01"), req("r2", "x", "02"), req("r3", "y", "03")],
            Caps(2),
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
    decisions = decide(requests, Caps(20))
    assert started(decisions) == [f"r{i:03d}" for i in range(20)]
    assert len(decisions) == 500


def burst(ns: str, count: int, start: int = 0) -> list[Candidate]:
    """``count`` requests of one tenant, each for its own model, created one second apart."""
    return [
        req(f"{ns}{i:03d}", f"m{i}", f"2026-01-01T00:{(start + i) // 60:02d}:{(start + i) % 60:02d}Z", ns=ns)
        for i in range(count)
    ]


def test_a_second_tenant_is_not_queued_behind_the_first_ones_burst() -> None:
    # Tenant a holds every slot and queued 100 more; b's one request arrives last.
    running = [req(f"a-run{i}", f"run{i}", "2025-12-31T00:00:00Z", st.RUNNING, ns="a") for i in range(4)]
    waiting = burst("a", 100)
    late = [req("b-first", "mb", "2026-01-01T02:00:00Z", ns="b")]
    # Nothing is free: b waits for capacity, like everyone (not for namespace a's queue).
    full = {d.name: d for d in decide(running + waiting + late, Caps(4))}
    assert full["b-first"].reason == st.REASON_WAITING_FOR_CAPACITY
    # One slot frees: it goes to b (0 running) before a's 100 older requests (3 running).
    decisions = decide(running[1:] + waiting + late, Caps(4))
    assert started(decisions) == ["b-first"]


def test_with_a_per_namespace_cap_a_second_tenant_starts_at_once() -> None:
    running = [req(f"a-run{i}", f"run{i}", "2025-12-31T00:00:00Z", st.RUNNING, ns="a") for i in range(3)]
    decisions = {
        d.name: d
        for d in decide(
            running + burst("a", 100) + [req("b-first", "mb", "2026-01-02", ns="b")], Caps(4, per_namespace=3)
        )
    }
    assert decisions["b-first"].start
    assert decisions["a000"].reason == st.REASON_WAITING_FOR_NAMESPACE
    assert "3 of 3 jobs running" in decisions["a000"].message
    assert "UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE" in decisions["a000"].message


def test_free_slots_are_shared_round_robin_between_namespaces() -> None:
    requests = burst("a", 10) + burst("b", 10, start=30) + burst("c", 2, start=50)
    order = started(decide(requests, Caps(7)))
    # Handed out fewest-running first, oldest request breaking ties (a, b, c, a, b, c, a); listed in FIFO order.
    assert order == ["a000", "a001", "a002", "b000", "b001", "c000", "c001"]
    by_ns = {ns: sum(1 for name in order if name.startswith(ns)) for ns in "abc"}
    assert by_ns == {"a": 3, "b": 2, "c": 2}


def test_a_lone_tenant_is_served_in_fifo_order_up_to_its_cap() -> None:
    decisions = decide(burst("a", 10), Caps(8, per_namespace=5))
    assert started(decisions) == [f"a{i:03d}" for i in range(5)]
    assert {d.reason for d in decisions if not d.start} == {st.REASON_WAITING_FOR_NAMESPACE}


def test_caps_from_settings() -> None:
    settings = load_settings(
        {"UNLEARNING_MAX_CONCURRENT_JOBS": "10", "UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE": "3"}
    )
    assert Caps.of(settings) == Caps(10, 3)
    assert not Caps(10).namespace_full(1000)
