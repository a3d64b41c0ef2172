"""Leader election on a coordination.k8s.io/v1 Lease: two replicas, exactly one reconciles.

The operator keeps its scheduling state in memory (one Job per model, the
global cap, the statuses it last wrote), so two processes reconciling at once
would each start a Job for the same model. With two replicas exactly one may
run; the other waits, ready to take over when a node is drained or the active
pod dies.

Why a Lease and not kopf's peering:

* kopf's peering is presence, not mutual exclusion: each operator posts its
  priority to a KopfPeering object and pauses while one with a *higher*
  priority is alive. Two replicas of one Deployment have the same priority,
  and kopf then only logs "possibly conflicting operators" and keeps both
  running. It also needs its own CRD installed cluster-wide.
* A Lease is what kube-controller-manager and kube-scheduler use: an update
  carries the ``resourceVersion`` it read, so when two standbys race for an
  expired Lease the API server lets exactly one write win (409 for the
  other). ``kubectl get lease`` shows who leads and since when.

What the standby does: nothing but read the Lease every ``retry_period``.
kopf is not started until this process leads, so the standby has no watches,
no indexes and no caches that could go stale, and it writes nothing. A new
leader starts kopf exactly as a restarted operator does (kopf lists every
request and Job before any handler runs; deterministic names and
adopt-only-what-we-created do the rest), which the operator already had to
get right.

Timing, as client-go's defaults and for the same reasons: the leader renews
every ``retry_period`` (2 s); if it has not renewed for ``renew_deadline``
(10 s) it exits at once (the kubelet restarts it as a standby), which is
before any standby may take over: a Lease counts as expired only after
``lease_duration`` (15 s) without a change *as observed by the standby's own
monotonic clock*, so clocks that disagree between nodes cannot shorten it.
A leader that stops cleanly (SIGTERM on a drain, an upgrade or a scale-down)
releases the Lease, and a standby takes over within one ``retry_period``.

:func:`decide` is pure; :class:`Elector` does the API calls through
:class:`~unlearning_operator.k8s.Kube`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from .k8s import ApiError, Kube

log = logging.getLogger("unlearning_operator.leader")


@dataclass(frozen=True)
class Timing:
    """Seconds; ``renew_deadline < lease_duration`` so a leader steps down before anyone may take over."""

    lease_duration: float = 15.0
    """How long a Lease nobody renews stays held; also how long a killed leader's work waits."""
    renew_deadline: float = 10.0
    """A leader that could not renew for this long exits (it may be partitioned from the API server)."""
    retry_period: float = 2.0
    """Renewal interval of the leader, polling interval of a standby."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"leader election timing: need 0 < retry period ({self.retry_period}) < renew deadline "
                f"({self.renew_deadline}) < lease duration ({self.lease_duration})"
            )


class Action(Enum):
    CREATE = "create"
    """No Lease yet: create it, holding it."""
    TAKE = "take"
    """Released or expired: write ourselves in as holder (a 409 means another standby was faster)."""
    RENEW = "renew"
    """We hold it: write a new renewTime."""
    WAIT = "wait"
    """Someone else holds it and renews it."""


@dataclass(frozen=True)
class Observed:
    """The Lease's (holder, renewTime) as this process last saw it change, on its monotonic clock."""

    holder: str
    renew_time: str
    since: float


def lease_spec(lease: dict[str, Any] | None) -> dict[str, Any]:
    return dict((lease or {}).get("spec") or {})


def decide(lease: dict[str, Any] | None, identity: str, observed: Observed | None, now: float) -> Action:
    """What to do with the Lease as just read.

    ``observed`` is when this process first saw the Lease's current holder and
    renewTime (None if it has not seen this pair before: then it is fresh).
    """
    if lease is None:
        return Action.CREATE
    spec = lease_spec(lease)
    holder = str(spec.get("holderIdentity") or "")
    if holder == identity:
        return Action.RENEW
    if not holder:
        return Action.TAKE
    duration = float(spec.get("leaseDurationSeconds") or 0)
    unchanged = observed is not None and (observed.holder, observed.renew_time) == (
        holder,
        str(spec.get("renewTime") or ""),
    )
    if unchanged and observed is not None and now - observed.since >= duration:
        return Action.TAKE
    return Action.WAIT


def micro_time(now: datetime) -> str:
    """metav1.MicroTime as the API server writes it."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def held_spec(
    previous: dict[str, Any] | None, identity: str, timing: Timing, now: datetime, *, taking: bool
) -> dict[str, Any]:
    """The Lease spec with us as holder; ``taking`` counts a transition and stamps acquireTime."""
    spec = lease_spec(previous)
    stamp = micro_time(now)
    new = {
        "holderIdentity": identity,
        "leaseDurationSeconds": int(timing.lease_duration),
        "acquireTime": spec.get("acquireTime") if not taking and spec.get("acquireTime") else stamp,
        "renewTime": stamp,
        "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (1 if taking and previous is not None else 0),
    }
    return new


def released_spec(previous: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Handed back on a clean stop: no holder, so a standby takes it on its next poll."""
    spec = lease_spec(previous)
    spec.update({"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time(now)})
    return spec


@dataclass
class Elector:
    """Acquires, holds and releases one Lease; blocking API calls run in the default executor."""

    kube: Kube
    namespace: str
    name: str
    identity: str
    timing: Timing = field(default_factory=Timing)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    monotonic: Callable[[], float] = lambda: asyncio.get_running_loop().time()
    on_change: Callable[[bool], None] = lambda leading: None
    observed: Observed | None = None
    lease: dict[str, Any] | None = None
    """The Lease as last read or written by us (its resourceVersion guards our next write)."""
    contacted: bool = False
    """At least one round trip to the API server has succeeded (the replica knows who leads)."""
    last_renewal: float | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _observe(self, lease: dict[str, Any] | None) -> None:
        spec = lease_spec(lease)
        pair = (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""))
        if self.observed is None or (self.observed.holder, self.observed.renew_time) != pair:
            self.observed = Observed(pair[0], pair[1], self.monotonic())

    async def try_once(self) -> bool:
        """One round: read, decide, write if we may. True when we hold the Lease afterwards."""
        lease = await self._call(self.kube.read_lease, self.namespace, self.name)
        self.contacted = True
        action = decide(lease, self.identity, self.observed, self.monotonic())
        self._observe(lease)
        self.lease = lease
        if action is Action.WAIT:
            return False
        spec = held_spec(lease, self.identity, self.timing, self.clock(), taking=action is not Action.RENEW)
        try:
            if action is Action.CREATE:
                written = await self._call(self.kube.create_lease, self.namespace, self.name, spec)
            else:
                assert lease is not None
                written = await self._call(self.kube.replace_lease, lease, spec)
        except ApiError as error:
            if error.status == 409:  # another replica wrote first: it leads
                return False
            raise
        self.lease = written
        self._observe(written)
        self.last_renewal = self.monotonic()
        if action is not Action.RENEW:
            spec_now = lease_spec(written)
            log.info(
                "became leader: Lease %s/%s held by %s (transition %s)",
                self.namespace,
                self.name,
                self.identity,
                spec_now.get("leaseTransitions"),
            )
        return True

    async def acquire(self) -> None:
        """Return once this process holds the Lease (standby until then)."""
        waiting_logged = False
        while True:
            try:
                if await self.try_once():
                    self.on_change(True)
                    return
            except (ApiError, OSError) as error:
                log.warning("leader election: cannot read or write Lease %s/%s: %s", self.namespace, self.name, error)
            if not waiting_logged:
                holder = lease_spec(self.lease).get("holderIdentity")
                log.info("standby: Lease %s/%s is held by %s", self.namespace, self.name, holder)
                waiting_logged = True
            # Jitter: two standbys that saw the same expiry do not retry in lockstep.
            await asyncio.sleep(self.timing.retry_period * (1 + 0.2 * random.random()))

    async def hold(self) -> None:
        """Renew every retry_period; return when leadership is lost (not renewed within renew_deadline)."""
        while True:
            await asyncio.sleep(self.timing.retry_period)
            try:
                if not await self.try_once():
                    holder = lease_spec(self.lease).get("holderIdentity")
                    log.error("lost leadership: Lease %s/%s is now held by %s", self.namespace, self.name, holder)
                    break
            except (ApiError, OSError) as error:
                assert self.last_renewal is not None
                late = self.monotonic() - self.last_renewal
                log.warning("could not renew the Lease (%.1f s since the last renewal): %s", late, error)
                if late >= self.timing.renew_deadline:
                    log.error("lost leadership: no renewal for %.1f s", late)
                    break
        self.on_change(False)

    async def release(self) -> None:
        """Hand the Lease back (clean stop), if we still hold it.

        A conflict reads the Lease once more and releases it if it is still ours: a renewal cancelled by
        the stop after its write reached the API server leaves our copy one version behind (seen in the
        integration tier: "the object has been modified", and the standby waited out the Lease).
        """
        lease = self.lease
        for last_try in (False, True):
            if lease is None or lease_spec(lease).get("holderIdentity") != self.identity:
                return
            try:
                await self._call(self.kube.replace_lease, lease, released_spec(lease, self.clock()))
                break
            except (ApiError, OSError) as error:
                if not last_try and isinstance(error, ApiError) and error.status == 409:
                    try:
                        lease = await self._call(self.kube.read_lease, self.namespace, self.name)
                        continue
                    except (ApiError, OSError) as read_error:
                        error = read_error
                # Someone took it already, or the API is gone: the Lease then expires on its own.
                log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, error)
                return
        self.lease = lease
        self.on_change(False)
        log.info("released Lease %s/%s", self.namespace, self.name)
