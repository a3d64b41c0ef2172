"""Which queued requests may start now. Pure: a list of requests in, decisions out.

Three rules, in this order:

1. One active job per logical model (namespace + spec.model.name): each
   request must start from the version its predecessor wrote, so two jobs
   on one model would race and the later one would undo the earlier.
2. A global cap on unfinished Jobs (UNLEARNING_MAX_CONCURRENT_JOBS), so a
   burst of requests cannot claim every GPU in the cluster. (With Kueue,
   set the cap high and let Kueue's quota decide.)
3. First in, first out by creation time (then namespace/name to break
   ties): a request never overtakes an earlier one that waits for capacity.

A request counts as active when its phase is Running or a Job of it exists
and has not finished; the latter is what keeps a restarted operator, whose
status patch may not have landed, from starting a second request on a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import status as states


@dataclass(frozen=True)
class Candidate:
    namespace: str
    name: str
    model: str
    created: str
    """creationTimestamp (RFC 3339 sorts as text)."""
    phase: str | None
    job_active: bool = False
    """A Job of this request exists and has not finished."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def model_key(self) -> tuple[str, str]:
        return (self.namespace, self.model)


@dataclass(frozen=True)
class Decision:
    namespace: str
    name: str
    start: bool
    reason: str
    message: str


WAITING_PHASES = frozenset({states.PENDING, states.QUEUED})


def decide(requests: list[Candidate], max_concurrent: int) -> list[Decision]:
    """Decisions for every waiting request (Pending or Queued), in FIFO order."""
    active = [
        r for r in requests if r.phase == states.RUNNING or (r.job_active and r.phase not in states.TERMINAL_PHASES)
    ]
    busy: dict[tuple[str, str], str] = {r.model_key: r.name for r in sorted(active, key=_order)}
    slots = max_concurrent - len(active)
    active_keys = {r.key for r in active}
    waiting = sorted(
        (r for r in requests if r.phase in WAITING_PHASES and r.key not in active_keys),
        key=_order,
    )
    decisions = []
    for request in waiting:
        holder = busy.get(request.model_key)
        if holder is not None:
            decisions.append(
                Decision(
                    request.namespace,
                    request.name,
                    False,
                    states.REASON_WAITING_FOR_MODEL,
                    f"waiting for request {holder}: model {request.model} runs one request at a time, "
                    "each from the version the previous one wrote",
                )
            )
            continue
        if slots <= 0:
            decisions.append(
                Decision(
                    request.namespace,
                    request.name,
                    False,
                    states.REASON_WAITING_FOR_CAPACITY,
                    f"waiting for a free slot: {max_concurrent - slots} of {max_concurrent} jobs running "
                    "(UNLEARNING_MAX_CONCURRENT_JOBS)",
                )
            )
            # Later requests for this model queue behind this one.
            busy[request.model_key] = request.name
            continue
        decisions.append(Decision(request.namespace, request.name, True, states.REASON_JOB_CREATED, "starting"))
        busy[request.model_key] = request.name
        slots -= 1
    return decisions


def _order(request: Candidate) -> tuple[str, str, str]:
    return (request.created, request.namespace, request.name)
