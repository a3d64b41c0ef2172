"""Leader election: the pure decision table, and two electors racing over one Lease with a fake clock."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from unlearning_operator.health import Health
from unlearning_operator.k8s import ApiError
from unlearning_operator.leader import Action, Elector, Observed, Timing, decide, held_spec, released_spec

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def lease(holder: str, renew: str = "2026-01-01T12:00:00.000000Z", duration: int = 15) -> dict[str, Any]:
    return {
        "metadata": {"name": "op", "namespace": "ns", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": duration},
    }


@pytest.mark.parametrize(
    ("current", "observed", "now", "action"),
    [
        (None, None, 0.0, Action.CREATE),
        (lease("me"), None, 0.0, Action.RENEW),
        (lease(""), None, 0.0, Action.TAKE),  # released on a clean stop
        # First sight of someone else's Lease: fresh, whatever its renewTime says (clocks differ).
        (lease("other", renew="2020-01-01T00:00:00.000000Z"), None, 100.0, Action.WAIT),
        # Unchanged for less than its duration on our own clock: still held.
        (lease("other"), Observed("other", "2026-01-01T12:00:00.000000Z", 10.0), 24.9, Action.WAIT),
        # Unchanged for its duration: expired, ours to take.
        (lease("other"), Observed("other", "2026-01-01T12:00:00.000000Z", 10.0), 25.0, Action.TAKE),
        # Renewed meanwhile (another renewTime): the clock starts again.
        (lease("other", renew="2026-01-01T12:00:02.000000Z"), Observed("other", "x", 10.0), 90.0, Action.WAIT),
        # Another holder than the one we timed: fresh again.
        (lease("third"), Observed("other", "2026-01-01T12:00:00.000000Z", 10.0), 90.0, Action.WAIT),
    ],
)
def test_decide(current: dict[str, Any] | None, observed: Observed | None, now: float, action: Action) -> None:
    assert decide(current, "me", observed, now) is action


def test_timing_must_let_a_leader_step_down_before_anyone_takes_over() -> None:
    Timing(15, 10, 2)
    for bad in ((15, 15, 2), (15, 10, 10), (10, 15, 2), (15, 10, 0)):
        with pytest.raises(ValueError, match="renew deadline"):
            Timing(*bad)


def test_specs_count_transitions_and_keep_acquire_time_while_renewing() -> None:
    timing = Timing()
    taken = held_spec(lease("other") | {"spec": {"leaseTransitions": 3}}, "me", timing, T0, taking=True)
    assert taken["holderIdentity"] == "me"
    assert taken["leaseTransitions"] == 4
    assert taken["acquireTime"] == taken["renewTime"] == "2026-01-01T12:00:00.000000Z"
    renewed = held_spec({"spec": taken}, "me", timing, T0 + timedelta(seconds=2), taking=False)
    assert renewed["acquireTime"] == "2026-01-01T12:00:00.000000Z"
    assert renewed["renewTime"] == "2026-01-01T12:00:02.000000Z"
    assert renewed["leaseTransitions"] == 4
    assert held_spec(None, "me", timing, T0, taking=True)["leaseTransitions"] == 0
    released = released_spec({"spec": renewed}, T0)
    assert released["holderIdentity"] == ""
    assert released["leaseTransitions"] == 4


class FakeLeases:
    """One Lease with the API server's create/409 and resourceVersion semantics."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False
        self.writes: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise OSError("connection refused")

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        return copy.deepcopy(self.lease)

    def create_lease(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.lease is not None:
            raise ApiError(409, "AlreadyExists", "exists")
        return self._store({"metadata": {"name": name, "namespace": namespace}, "spec": spec})

    def replace_lease(self, current: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        self._check()
        assert self.lease is not None
        if current["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._store({"metadata": dict(current["metadata"]), "spec": spec})

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.lease = obj
        self.writes.append(str(obj["spec"]["holderIdentity"]))
        return copy.deepcopy(obj)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now)


def elector(leases: FakeLeases, clock: Clock, identity: str, changes: list[tuple[str, bool]]) -> Elector:
    return Elector(
        leases,  # type: ignore[arg-type]
        "ns",
        "op",
        identity,
        Timing(15, 10, 2),
        clock=clock.wall,
        monotonic=lambda: clock.now,
        on_change=lambda leading: changes.append((identity, leading)),
    )


def test_two_replicas_one_leader_a_crash_hands_over_after_the_lease_duration() -> None:
    async def scenario() -> None:
        leases, clock, changes = FakeLeases(), Clock(), []
        a, b = elector(leases, clock, "a", changes), elector(leases, clock, "b", changes)
        assert await a.try_once() is True  # created
        assert await b.try_once() is False
        assert b.contacted
        # a renews every retry period while b polls: b never takes over.
        for _ in range(20):
            clock.now += 2
            assert await a.try_once() is True
            assert await b.try_once() is False
        # a dies (no more renewals): b takes the Lease exactly once it has seen it unchanged for 15 s.
        waited = 0
        while not await b.try_once():
            clock.now += 2
            waited += 2
        assert 15 <= waited <= 17
        assert leases.lease is not None
        assert leases.lease["spec"]["holderIdentity"] == "b"
        assert leases.lease["spec"]["leaseTransitions"] == 1
        # A restarted a (a new identity) waits, as b did.
        a2 = elector(leases, clock, "a-restarted", changes)
        assert await a2.try_once() is False

    asyncio.run(scenario())


def test_of_two_standbys_racing_for_an_expired_lease_one_wins() -> None:
    async def scenario() -> None:
        leases, clock, changes = FakeLeases(), Clock(), []
        leases.lease = lease("dead")
        leases.lease["metadata"]["resourceVersion"] = "1"
        b, c = elector(leases, clock, "b", changes), elector(leases, clock, "c", changes)
        assert await b.try_once() is False
        assert await c.try_once() is False
        clock.now = 15.0
        # Both decide TAKE from the same read; the second write carries a stale resourceVersion.
        b_read = await b._call(leases.read_lease, "ns", "op")
        c_read = await c._call(leases.read_lease, "ns", "op")
        assert decide(b_read, "b", b.observed, clock.now) is Action.TAKE
        assert decide(c_read, "c", c.observed, clock.now) is Action.TAKE
        results = [await b.try_once(), await c.try_once()]
        assert results == [True, False]
        assert leases.writes == ["b"]

    asyncio.run(scenario())


def test_a_leader_that_cannot_renew_gives_up_within_the_renew_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> float:
        leases, clock, changes = FakeLeases(), Clock(), []
        a = elector(leases, clock, "a", changes)
        await a.acquire()
        assert changes == [("a", True)]

        async def sleep(seconds: float) -> None:  # the fake clock moves only when the elector waits
            clock.now += seconds

        monkeypatch.setattr(asyncio, "sleep", sleep)
        leases.down = True
        await a.hold()
        assert changes == [("a", True), ("a", False)]
        return clock.now

    gave_up = asyncio.run(scenario())
    # Renewals fail from t=2; it stops at the first retry at or past 10 s, before anyone could take over at 15 s.
    assert 10 <= gave_up < 15


def test_a_clean_stop_releases_the_lease_for_the_standby() -> None:
    async def scenario() -> None:
        leases, clock, changes = FakeLeases(), Clock(), []
        a, b = elector(leases, clock, "a", changes), elector(leases, clock, "b", changes)
        await a.acquire()
        assert await b.try_once() is False
        await a.release()
        assert leases.lease is not None
        assert leases.lease["spec"]["holderIdentity"] == ""
        clock.now += 2
        assert await b.try_once() is True  # one poll later, not a lease duration
        # Releasing twice, or after losing it, writes nothing.
        writes = len(leases.writes)
        await a.release()
        assert len(leases.writes) == writes

    asyncio.run(scenario())


def test_a_clean_stop_releases_the_lease_after_a_renewal_it_did_not_see() -> None:
    """A renewal cancelled by the stop after its write landed leaves the elector's copy one version behind:
    the release conflicts, reads the Lease again and releases it, since it is still ours. Taken by another
    replica meanwhile, it is left alone."""

    async def scenario() -> None:
        leases, clock, changes = FakeLeases(), Clock(), []
        a = elector(leases, clock, "a", changes)
        await a.acquire()
        assert leases.lease is not None
        leases.lease = {**leases.lease, "metadata": {**leases.lease["metadata"], "resourceVersion": "99"}}
        await a.release()
        assert leases.lease["spec"]["holderIdentity"] == ""
        assert changes == [("a", True), ("a", False)]

        b = elector(leases, clock, "b", changes)
        clock.now += 2
        assert await b.try_once() is True
        c = elector(leases, clock, "c", [])
        c.lease = {**leases.lease, "metadata": {**leases.lease["metadata"], "resourceVersion": "0"}}
        c.lease["spec"] = {**c.lease["spec"], "holderIdentity": "c"}  # c believes it holds a stale copy
        writes = len(leases.writes)
        await c.release()
        assert len(leases.writes) == writes  # b holds it: c writes nothing
        assert leases.lease["spec"]["holderIdentity"] == "b"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("elected", "leading", "contacted", "kopf", "ready"),
    [
        (False, False, False, False, False),  # a lone operator before kopf started
        (False, False, False, True, True),
        (True, False, False, False, False),  # a standby that has not read the Lease yet
        (True, False, True, False, True),  # a standby ready to take over
        (True, True, True, False, False),  # just elected, kopf starting
        (True, True, True, True, True),
    ],
)
def test_readiness(elected: bool, leading: bool, contacted: bool, kopf: bool, ready: bool) -> None:
    health = Health(elected=elected, contacted=lambda: contacted, leading=leading)
    if kopf:
        health.kopf_ready.set()
    assert health.readiness()[0] is ready
