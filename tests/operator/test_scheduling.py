"""Which requests start: one per model, a global cap, a per-namespace cap, FIFO within a namespace,
fewest-running first across namespaces."""

from __future__ import annotations

import pytest

from unlearning_operator import status as st
from unlearning_operator.scheduling import CALIBRATION, Candidate, Caps, Decision, decide
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
    assert "2 of 2 slots in use" in decisions["r3"].message
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
    assert "3 of 3 slots in use" in decisions["a000"].message
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
    assert Caps(10).namespace_fits(1000, 5)
    assert not Caps(10, 3).namespace_fits(2, 2)


def cal(
    name: str,
    model: str,
    created: str,
    phase: str | None = st.PENDING,
    *,
    slots: int = 2,
    held: int | None = None,
    ns: str = "a",
    job: bool = False,
) -> Candidate:
    return Candidate(
        namespace=ns,
        name=name,
        model=model,
        created=created,
        phase=phase,
        job_active=job,
        kind=CALIBRATION,
        slots=slots,
        held=held,
    )


@pytest.mark.parametrize(
    ("candidates", "cap", "expected"),
    [
        # Rule 2: a calibration and a request of one model run side by side ...
        ([cal("c1", "m", "01"), req("r1", "m", "02")], 4, ["c1", "r1"]),
        ([req("r0", "m", "00", st.RUNNING), cal("c1", "m", "01")], 4, ["c1"]),
        ([cal("c0", "m", "00", st.RUNNING), req("r1", "m", "01")], 4, ["r1"]),
        # ... but two calibrations of one model do not.
        ([cal("c0", "m", "00", st.RUNNING), cal("c1", "m", "01")], 8, []),
        ([cal("c1", "m", "01"), cal("c2", "m", "02")], 8, ["c1"]),
        ([cal("c1", "m", "01", ns="a"), cal("c2", "m", "02", ns="b")], 8, ["c1", "c2"]),
        # Rule 3: a running calibration holds a slot per fold it trains at once ...
        ([cal("c0", "x", "00", st.RUNNING, slots=3), req("r1", "m1", "01"), req("r2", "m2", "02")], 4, ["r1"]),
        # ... fewer as its last folds run (held), and one while it merges.
        ([cal("c0", "x", "00", st.RUNNING, slots=3, held=1), req("r1", "m1", "01"), req("r2", "m2", "02")], 4,
         ["r1", "r2"]),
        # A calibration whose Job exists though its status says Pending (restart) holds its slots too.
        ([cal("c0", "x", "00", st.PENDING, slots=3, job=True), req("r1", "m1", "01"), req("r2", "m2", "02")], 4,
         ["r1"]),
        # Rule 4: it starts only with all its slots free.
        ([req("r0", "x", "00", st.RUNNING), req("r1", "y", "00", st.RUNNING), cal("c1", "m", "01", slots=3)], 4, []),
        ([req("r0", "x", "00", st.RUNNING), cal("c1", "m", "01", slots=3)], 4, ["c1"]),
        # Rule 5: nothing overtakes a calibration waiting for its slots ...
        ([req("r0", "x", "00", st.RUNNING), req("q", "y", "00", st.RUNNING), cal("c1", "m", "01", slots=3),
          req("r2", "z", "02")], 4, []),
        # ... nor a request waiting for a slot.
        ([req("r0", "x", "00", st.RUNNING), req("r1", "y", "01"), cal("c2", "m", "02", slots=1)], 2, ["r1"]),
        ([req("r0", "x", "00", st.RUNNING), req("r1", "y", "01"), cal("c2", "m", "02", slots=1)], 1, []),
        # Terminal calibrations hold nothing.
        ([cal("c0", "m", "00", st.SUCCEEDED, slots=4), req("r1", "m", "01")], 4, ["r1"]),
    ],
)  # fmt: skip
def test_calibrations_share_the_cap(candidates: list[Candidate], cap: int, expected: list[str]) -> None:
    assert started(decide(candidates, Caps(cap))) == expected


def test_a_request_waiting_for_a_bank_keeps_its_models_place_and_takes_no_slot() -> None:
    blocked = Candidate(
        namespace="a",
        name="needs-bank",
        model="m",
        created="01",
        phase=st.PENDING,
        blocked=(st.REASON_WAITING_FOR_CALIBRATION, "waiting for c0 to become Ready"),
    )
    decisions = {d.name: d for d in decide([blocked, req("later", "m", "02"), req("other", "x", "03")], Caps(1))}
    assert not decisions["needs-bank"].start
    assert decisions["needs-bank"].reason == st.REASON_WAITING_FOR_CALIBRATION
    assert decisions["needs-bank"].message == "waiting for c0 to become Ready"
    assert decisions["later"].reason == st.REASON_WAITING_FOR_MODEL
    # The one slot is still free for another model's request.
    assert decisions["other"].start


def test_calibration_messages() -> None:
    decisions = {
        d.name: d
        for d in decide(
            [cal("c0", "m", "00", st.RUNNING, slots=2), cal("c1", "m", "01"), cal("c2", "x", "02", slots=3)], Caps(4)
        )
    }
    assert decisions["c1"].kind == CALIBRATION
    assert decisions["c1"].reason == st.REASON_WAITING_FOR_MODEL
    assert "waiting for calibration c0: model m is calibrated by one UnlearningCalibration at a time" in (
        decisions["c1"].message
    )
    assert decisions["c2"].reason == st.REASON_WAITING_FOR_CAPACITY
    assert decisions["c2"].message == (
        "waiting for 3 free slots (one per fold trained at once): 2 of 4 slots in use (UNLEARNING_MAX_CONCURRENT_JOBS)"
    )


def test_a_request_and_a_calibration_of_one_name_are_two_candidates() -> None:
    decisions = decide([req("same", "m", "01"), cal("same", "m", "01", slots=1)], Caps(4))
    assert sorted((d.kind, d.start) for d in decisions) == [(CALIBRATION, True), ("request", True)]
