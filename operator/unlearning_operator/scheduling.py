"""Which waiting requests and calibrations may start now. Pure: candidates in, decisions out.

Six rules, in this order:

1. One active request per logical model (namespace + spec.model.name):
   each request must start from the version its predecessor wrote, so two
   jobs on one model would race and the later one would undo the earlier.
2. One active calibration per logical model, and calibrations and requests
   do not wait for each other: a bank is trained from the original named in
   the calibration's spec, which no request changes, and requests use only
   banks already Ready, so neither can spoil the other. A second calibration
   of a model (a refresh) waits rather than train the same references twice.
3. A global cap on slots (UNLEARNING_MAX_CONCURRENT_JOBS), so a burst cannot
   claim every GPU in the cluster. A request's Job holds one slot; a
   calibration holds one slot per fold it trains at once (its ``parallelism``)
   while folds remain, and one while it merges. (With Kueue, set the cap
   high and let Kueue's quota decide.)
4. A cap on one namespace's slots (UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE,
   0 for none): one tenant cannot hold every slot, so the others always find
   one free while it is at its cap.
5. A calibration starts only when all the slots it asks for are free (its
   Indexed Job's parallelism is fixed when created): no half-started
   calibration sits on a slot waiting for the others.
6. First in, first out within a namespace (by creation time, then name),
   requests and calibrations alike; across namespaces a free slot goes to
   the namespace holding the fewest slots, then to the oldest candidate. A
   tenant's burst therefore delays another tenant's first request by at
   most one slot's wait, however many it queued. When the candidate chosen
   needs more slots than are free, nothing else starts until they are: a
   calibration that needs several slots is not starved by a stream of
   one-slot requests. A request that waits for a bank
   (spec.calibration.policy Required, ``blocked``) takes no slot but keeps
   its model's place: later requests of the model queue behind it.

A candidate counts as active when its phase is Running (or Merging) or a Job
its status names exists and has not finished; the caller decides the latter,
and counts only a Job the status names, so a Job a tenant creates under a
request's name cannot hold a slot or a model, while a restarted operator
whose status patch may not have landed does not start a second one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from . import status as states
from .settings import OperatorSettings

REQUEST = "request"
CALIBRATION = "calibration"


@dataclass(frozen=True)
class Candidate:
    namespace: str
    name: str
    model: str
    created: str
    """creationTimestamp (RFC 3339 sorts as text)."""
    phase: str | None
    """Pending or Queued: waiting; Running: holding slots; anything else: neither."""
    job_active: bool = False
    """A Job of this candidate exists and has not finished."""
    kind: str = REQUEST
    slots: int = 1
    """Slots it needs to start (a calibration: its parallelism)."""
    held: int | None = None
    """Slots it holds while active (None: ``slots``); a calibration frees them as its folds finish."""
    blocked: tuple[str, str] | None = None
    """(reason, message) when it waits for something besides capacity (a Required bank)."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def model_key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.model)

    @property
    def holding(self) -> int:
        return self.slots if self.held is None else self.held


@dataclass(frozen=True)
class Caps:
    """How many Jobs may be unfinished at once: in all, and per namespace (0: no per-namespace cap)."""

    total: int
    per_namespace: int = 0

    @classmethod
    def of(cls, settings: OperatorSettings) -> Caps:
        return cls(settings.max_concurrent_jobs, settings.max_concurrent_jobs_per_namespace)

    def namespace_fits(self, holding: int, slots: int) -> bool:
        """Whether a namespace holding ``holding`` slots may take ``slots`` more."""
        return self.per_namespace <= 0 or holding + slots <= self.per_namespace


@dataclass(frozen=True)
class Decision:
    namespace: str
    name: str
    start: bool
    reason: str
    message: str
    kind: str = REQUEST


WAITING_PHASES = frozenset({states.PENDING, states.QUEUED})


def _active(candidate: Candidate) -> bool:
    return candidate.phase == states.RUNNING or (candidate.job_active and candidate.phase not in states.TERMINAL_PHASES)


def decide(candidates: list[Candidate], caps: Caps) -> list[Decision]:
    """Decisions for every waiting candidate (Pending or Queued), in FIFO order."""
    active = [c for c in candidates if _active(c)]
    busy: dict[tuple[str, str, str], str] = {c.model_key: c.name for c in sorted(active, key=_order)}
    per_namespace: dict[str, int] = defaultdict(int)
    for c in active:
        per_namespace[c.namespace] += c.holding
    free = caps.total - sum(c.holding for c in active)
    active_keys = {c.key for c in active}
    waiting = sorted((c for c in candidates if c.phase in WAITING_PHASES and c.key not in active_keys), key=_order)

    decisions: dict[tuple[str, str, str], Decision] = {}
    # Rules 1 and 2 first: the oldest waiting candidate of each free model contends; later ones wait behind it.
    contenders: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in waiting:
        holder = busy.get(candidate.model_key)
        if holder is not None:
            decisions[candidate.key] = _wait(
                candidate, states.REASON_WAITING_FOR_MODEL, _model_message(candidate, holder)
            )
            continue
        busy[candidate.model_key] = candidate.name
        if candidate.blocked is not None:
            decisions[candidate.key] = _wait(candidate, *candidate.blocked)
            continue
        contenders[candidate.namespace].append(candidate)

    # Rules 3-6: hand out the free slots, each time to the namespace holding the fewest.
    while True:
        open_ = [
            ns for ns, queue in contenders.items() if queue and caps.namespace_fits(per_namespace[ns], queue[0].slots)
        ]
        if not open_:
            break
        namespace = min(open_, key=lambda ns: (per_namespace[ns], _order(contenders[ns][0])))
        candidate = contenders[namespace][0]
        if candidate.slots > free:
            break  # rule 6: nothing overtakes it
        contenders[namespace].pop(0)
        decisions[candidate.key] = Decision(
            candidate.namespace, candidate.name, True, states.REASON_JOB_CREATED, "starting", candidate.kind
        )
        per_namespace[namespace] += candidate.slots
        free -= candidate.slots

    for namespace, queue in contenders.items():
        for candidate in queue:
            if not caps.namespace_fits(per_namespace[namespace], candidate.slots):
                decisions[candidate.key] = _wait(
                    candidate,
                    states.REASON_WAITING_FOR_NAMESPACE,
                    f"waiting for {_slots(candidate)} of namespace {namespace}: {per_namespace[namespace]} of "
                    f"{caps.per_namespace} slots in use (UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE)",
                )
            else:
                decisions[candidate.key] = _wait(
                    candidate, states.REASON_WAITING_FOR_CAPACITY, _capacity_message(candidate, free, caps.total)
                )
    return [decisions[c.key] for c in waiting]


def _wait(candidate: Candidate, reason: str, message: str) -> Decision:
    return Decision(candidate.namespace, candidate.name, False, reason, message, candidate.kind)


def _model_message(candidate: Candidate, holder: str) -> str:
    if candidate.kind == CALIBRATION:
        return (
            f"waiting for calibration {holder}: model {candidate.model} is calibrated by one "
            "UnlearningCalibration at a time"
        )
    return (
        f"waiting for request {holder}: model {candidate.model} runs one request at a time, "
        "each from the version the previous one wrote"
    )


def _slots(candidate: Candidate) -> str:
    if candidate.slots > 1:
        return f"{candidate.slots} free slots (one per fold trained at once)"
    return "a free slot"


def _capacity_message(candidate: Candidate, free: int, cap: int) -> str:
    in_use = cap - max(free, 0)
    return f"waiting for {_slots(candidate)}: {in_use} of {cap} slots in use (UNLEARNING_MAX_CONCURRENT_JOBS)"


def _order(candidate: Candidate) -> tuple[str, str, str, str]:
    return (candidate.created, candidate.namespace, candidate.name, candidate.kind)
