"""Which queued requests may start now. Pure: a list of requests in, decisions out.

Four rules, in this order:

1. One active job per logical model (namespace + spec.model.name): each
   request must start from the version its predecessor wrote, so two jobs
   on one model would race and the later one would undo the earlier.
2. A global cap on unfinished Jobs (UNLEARNING_MAX_CONCURRENT_JOBS), so a
   burst of requests cannot claim every GPU in the cluster. (With Kueue,
   set the cap high and let Kueue's quota decide.)
3. A cap per namespace (UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE, 0 for
   none): one tenant cannot hold every slot, so the others always find one
   free while it is at its cap.
4. First in, first out within a namespace (by creation time, then name);
   across namespaces a free slot goes to the namespace with the fewest
   active Jobs, then to the oldest request. A tenant's burst therefore
   delays another tenant's first request by at most one slot's wait (the
   next Job to end), however many it queued; a lone tenant is served in
   plain FIFO order.

A request counts as active when its phase is Running (the operator has
committed to its Job, created or not) or a Job its status names exists and
has not finished; the caller decides the latter, and counts only a Job the
request's status names, so a Job a tenant creates under a request's name
cannot hold a slot or a model.

The caps are a ``Caps`` and the candidates carry only a namespace, a model
key, a creation time and a phase, so any kind whose Jobs share the caps
(calibrations) can be scheduled by the same function.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from . import status as states
from .settings import OperatorSettings


@dataclass(frozen=True)
class Candidate:
    namespace: str
    name: str
    model: str
    created: str
    """creationTimestamp (RFC 3339 sorts as text)."""
    phase: str | None
    job_active: bool = False
    """A Job that this request's status names exists and has not finished."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def model_key(self) -> tuple[str, str]:
        return (self.namespace, self.model)


@dataclass(frozen=True)
class Caps:
    """How many Jobs may be unfinished at once: in all, and per namespace (0: no per-namespace cap)."""

    total: int
    per_namespace: int = 0

    @classmethod
    def of(cls, settings: OperatorSettings) -> Caps:
        return cls(settings.max_concurrent_jobs, settings.max_concurrent_jobs_per_namespace)

    def namespace_full(self, running: int) -> bool:
        return self.per_namespace > 0 and running >= self.per_namespace


@dataclass(frozen=True)
class Decision:
    namespace: str
    name: str
    start: bool
    reason: str
    message: str


WAITING_PHASES = frozenset({states.PENDING, states.QUEUED})


def decide(requests: list[Candidate], caps: Caps) -> list[Decision]:
    """Decisions for every waiting request (Pending or Queued), in FIFO order."""
    active = [
        r for r in requests if r.phase == states.RUNNING or (r.job_active and r.phase not in states.TERMINAL_PHASES)
    ]
    busy: dict[tuple[str, str], str] = {r.model_key: r.name for r in sorted(active, key=_order)}
    per_namespace: dict[str, int] = defaultdict(int)
    for r in active:
        per_namespace[r.namespace] += 1
    active_keys = {r.key for r in active}
    waiting = sorted((r for r in requests if r.phase in WAITING_PHASES and r.key not in active_keys), key=_order)

    decisions: dict[tuple[str, str], Decision] = {}
    # Rule 1 first: the oldest waiting request of each free model contends; later ones wait behind it.
    contenders: dict[str, list[Candidate]] = defaultdict(list)
    for request in waiting:
        holder = busy.get(request.model_key)
        if holder is not None:
            decisions[request.key] = _wait(
                request,
                states.REASON_WAITING_FOR_MODEL,
                f"waiting for request {holder}: model {request.model} runs one request at a time, "
                "each from the version the previous one wrote",
            )
            continue
        busy[request.model_key] = request.name
        contenders[request.namespace].append(request)

    # Rules 2-4: hand out the free slots one at a time, each to the namespace with the fewest active Jobs.
    slots = caps.total - len(active)
    while slots > 0:
        open_ = [ns for ns, queue in contenders.items() if queue and not caps.namespace_full(per_namespace[ns])]
        if not open_:
            break
        namespace = min(open_, key=lambda ns: (per_namespace[ns], _order(contenders[ns][0])))
        request = contenders[namespace].pop(0)
        decisions[request.key] = Decision(request.namespace, request.name, True, states.REASON_JOB_CREATED, "starting")
        per_namespace[namespace] += 1
        slots -= 1

    running = caps.total - slots
    for namespace, queue in contenders.items():
        for request in queue:
            if caps.namespace_full(per_namespace[namespace]):
                decisions[request.key] = _wait(
                    request,
                    states.REASON_WAITING_FOR_NAMESPACE,
                    f"waiting for a free slot of namespace {namespace}: {per_namespace[namespace]} of "
                    f"{caps.per_namespace} jobs running (UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE)",
                )
            else:
                decisions[request.key] = _wait(
                    request,
                    states.REASON_WAITING_FOR_CAPACITY,
                    f"waiting for a free slot: {running} of {caps.total} jobs running (UNLEARNING_MAX_CONCURRENT_JOBS)",
                )
    return [decisions[r.key] for r in waiting]


def _wait(request: Candidate, reason: str, message: str) -> Decision:
    return Decision(request.namespace, request.name, False, reason, message)


def _order(request: Candidate) -> tuple[str, str, str]:
    return (request.created, request.namespace, request.name)
