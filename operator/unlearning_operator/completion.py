"""Ending a request: read what its Job left, advance the lineage, keep the audit record, write status.

Called by the controller with the request's lock held. Finishing runs on the
launch pool (see runtime.py): a result should not wait behind a burst of
Pending/Queued status writes. Each function returns whether the final status
was written (False: the request is gone).

What a finished Job is trusted for, and from where (adoption.py):

* The Job must be the one the request's status names, with the operator's
  marks; what it was built from (model, version, input, output folder) is
  read from its annotations, never from the request, whose spec may be
  another generation's.
* Its pods are the Job controller's (owner, controller-uid label, image); a
  pod that only carries the Job's name label is a conflict, never a result.
* The record must be for that model, version and input, with its output
  inside that folder; otherwise it is malformed, whoever wrote it.

The order of the writes, and why:

1. The lineage is read and advanced in memory (a chain that does not verify
   fails the request with ``LineageBroken``).
2. The audit record's name is checked: an object there that is not this
   request's record (a tenant's "Passed") fails the request with
   ``NameConflict``, and the lineage does not move.
3. The lineage is written, then the audit record, then status naming it: a
   status that names an audit ConfigMap never points at nothing, and never
   at one the operator did not write (a record whose name is taken is
   written under a generated name instead).
4. The Job's ``ttlSecondsAfterFinished`` is set. Until then Kubernetes keeps
   the Job and its pods, so a completion that fails half-way (an API error,
   a restart) is retried by the periodic check from the same Job, and a
   passed run's record is never lost to the TTL.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from unlearning_contracts.record import CompactRecord

from . import adoption, lineage
from . import status as states
from .audit_configmap import PHASE_DELETED, build_audit_configmap
from .failures import explain_failure
from .jobs import gpus_of, ttl_patch
from .k8s import ApiError
from .launching import ADOPT_ONLY_OURS
from .metrics import completion
from .names import audit_configmap_name
from .results import JOB_SUCCEEDED, MalformedResultError, job_outcome, latest_terminated_pod, parse_record, terminated
from .runtime import Runtime
from .views import RequestView

log = logging.getLogger("unlearning_operator")

LINEAGE_RETRIES = 5


class AuditNotWrittenError(Exception):
    """The audit ConfigMap's create failed; the request stays Running and the periodic check retries.

    A kind of its own: the retries of one failing write are counted by the
    audit-write metrics (docs/monitoring.md), not as handler errors each time.
    """


# Failure reasons that say someone tampered with, or raced, the operator's objects: their Warning
# Event carries the reason itself (kubectl describe shows it), not just "Failed".
INTEGRITY_REASONS = frozenset({states.REASON_NAME_CONFLICT, states.REASON_SPEC_CHANGED, states.REASON_LINEAGE_BROKEN})


async def finish(rt: Runtime, view: RequestView, job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> bool:
    """The Job ended: its record (or why there is none) becomes the request's final status.

    ``pods``: the Job's pods as read before (when the Job has been deleted since); read now otherwise.
    """
    pool = rt.launch_pool
    status = rt.current_status(view)
    name = job["metadata"]["name"]
    base = dict(status)
    base.setdefault("startTime", job["metadata"].get("creationTimestamp"))
    output = view.spec.output.location.uri if view.spec is not None else None
    built = adoption.build_of(job, status, output)
    problem = adoption.job_problem(job, view.ref, status, built)
    if problem is not None or built is None:
        return await finish_failed(
            rt, view, base, states.REASON_NAME_CONFLICT, f"{problem}: {ADOPT_ONLY_OURS}", job=None, pool=pool
        )
    if pods is None:
        pods = await rt.call(pool, rt.kube.job_pods, view.namespace, name)
        rt.ended_jobs[view.key] = (job, pods)
    own, foreign = adoption.job_pods(job, pods)
    if foreign:
        names = ", ".join(sorted(str((p.get("metadata") or {}).get("name")) for p in foreign))
        conflict = (
            f"pod {names} carries Job {name}'s name label but was not created by the Job; its result is not read: "
            f"{ADOPT_ONLY_OURS}"
        )
        return await finish_failed(rt, view, base, states.REASON_NAME_CONFLICT, conflict, job=job, pool=pool)
    pod = latest_terminated_pod(own)
    message = (terminated(pod) or {}).get("message") if pod else None
    try:
        record = parse_record(message)
    except MalformedResultError as error:
        if job_outcome(job) == JOB_SUCCEEDED:
            return await finish_failed(rt, view, base, states.REASON_BAD_RESULT, str(error), job=job, pool=pool)
        why = explain_failure(job, own)
        return await finish_failed(rt, view, base, why.reason, why.message, job=job, pool=pool)
    mismatch = adoption.record_problem(record, built)
    if mismatch is not None:
        message = f"the result record does not belong to this Job: {mismatch}"
        return await finish_failed(rt, view, base, states.REASON_BAD_RESULT, message, job=job, pool=pool)
    new = states.finished(base, record, rt.clock())
    try:
        advanced = await _advanced_lineage(rt, view, built.model, record, pool)
    except lineage.LineageError as error:
        failed = states.failed(new, states.REASON_LINEAGE_BROKEN, f"the result is not recorded: {error}", rt.clock())
        failed.pop("outputModel", None)  # written by the job, but not a version of the model
        return await complete(rt, view, failed, record, job=job, pool=pool)
    return await complete(rt, view, new, record, job=job, pool=pool, planned=advanced)


async def fail_without_job(rt: Runtime, view: RequestView, status: dict[str, Any], job_name: str) -> bool:
    """The Job is gone before its result was recorded; finish from the copy read before, if any."""
    seen = rt.ended_jobs.get(view.key)
    if seen is not None and seen[0]["metadata"]["name"] == job_name:
        return await finish(rt, view, seen[0], seen[1])
    message = (
        f"Job {job_name} was deleted before it finished: its result is lost. "
        "Create a new UnlearningRequest to run again"
    )
    return await finish_failed(rt, view, status, states.REASON_JOB_DELETED, message, job=None, pool=rt.api_pool)


async def finish_failed(
    rt: Runtime,
    view: RequestView,
    status: dict[str, Any],
    reason: str,
    message: str,
    *,
    job: dict[str, Any] | None,
    pool: ThreadPoolExecutor,
) -> bool:
    """The run ended without a usable record (``job``: the request's own Job, when it has one)."""
    return await complete(rt, view, states.failed(status, reason, message, rt.clock()), None, job=job, pool=pool)


async def reject(rt: Runtime, view: RequestView, reason: str, message: str, pool: ThreadPoolExecutor) -> bool:
    """The request cannot run at all: its audit record (with the spec as submitted), status Rejected, an Event."""
    new = states.rejected(rt.current_status(view), reason, message, view.generation, rt.clock())
    if not await complete(rt, view, new, None, job=None, pool=pool, observe=False):
        return False
    await rt.event(view, "Warning", "Rejected", message)
    return True


async def record_deletion(rt: Runtime, view: RequestView) -> None:
    """A request deleted while its Job ran: the Job goes with it, so keep an audit record that it ran."""
    status = rt.current_status(view)
    message = (
        f"the request was deleted while Job {status.get('jobName')} ran; the Job is deleted with it "
        "and its result is not recorded"
    )
    outcome = states.failed(status, states.REASON_REQUEST_DELETED, message, rt.clock())
    outcome["phase"] = PHASE_DELETED
    audit = build_audit_configmap(view.ref, _spec_of(view), outcome, None)
    if await _write_audit(rt, view, audit, rt.api_pool) is None:
        await _write_aside(rt, audit, rt.api_pool)


@dataclass(frozen=True)
class PlannedLineage:
    """The lineage after a run, computed before anything is written."""

    after: lineage.Lineage
    read_from: dict[str, Any] | None
    """The ConfigMap it was computed from (None: the model has none yet)."""
    changed: bool

    def digest_of(self, request: str) -> str | None:
        """The digest of the version ``request`` added, if it added one (a replay finds it too)."""
        return next((v.digest for v in self.after.history if v.request == request and v.version > 0), None)


async def _advanced_lineage(
    rt: Runtime, view: RequestView, model: str, record: CompactRecord, pool: ThreadPoolExecutor
) -> PlannedLineage | None:
    if view.spec is None:
        return None
    existing = await rt.call(pool, rt.kube.read_configmap, view.namespace, lineage.lineage_name(model))
    current = lineage.initial(view.spec, view.name) if existing is None else lineage.parse(existing)
    advanced = lineage.advance(current, record, view.name)
    return PlannedLineage(advanced, existing, changed=existing is None or advanced != current)


async def _write_lineage(
    rt: Runtime, view: RequestView, planned: PlannedLineage, record: CompactRecord, pool: ThreadPoolExecutor
) -> lineage.Lineage:
    """Write the advanced lineage with the resourceVersion it was read at; on 409 read and advance again."""
    advanced, existing = planned.after, planned.read_from
    for _ in range(LINEAGE_RETRIES):
        manifest = lineage.build_lineage_configmap(advanced, view.namespace)
        try:
            if existing is None:
                await rt.call(pool, rt.kube.create_if_absent, manifest)
            else:
                manifest["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                await rt.call(pool, rt.kube.replace_configmap, manifest)
            return advanced
        except ApiError as error:
            if error.status != 409:
                raise
        existing = await rt.call(pool, rt.kube.read_configmap, view.namespace, lineage.lineage_name(advanced.model))
        if existing is None:
            continue
        advanced = lineage.advance(lineage.parse(existing), record, view.name)
    raise RuntimeError(f"lineage of model {advanced.model}: gave up after {LINEAGE_RETRIES} conflicting writes")


def _spec_of(view: RequestView) -> Any:
    return view.spec if view.spec is not None else view.submitted


async def _write_audit(rt: Runtime, view: RequestView, audit: dict[str, Any], pool: ThreadPoolExecutor) -> str | None:
    """Create the audit record under its name; None when another object holds the name (``audit_problem``).

    A failed write raises: the request stays Running and the periodic check
    retries it (its Job keeps its record until then); the gauge keeps the
    alert on meanwhile (docs/monitoring.md).
    """
    try:
        found, created = await rt.call(pool, rt.kube.create_if_absent, audit)
    except Exception as error:
        rt.audit_written(view.key, False)
        raise AuditNotWrittenError(f"audit ConfigMap {audit['metadata']['name']}: {error}") from error
    rt.audit_written(view.key, True)
    if created or adoption.audit_problem(found, audit, view.ref, view.created) is None:
        return str(audit["metadata"]["name"])
    return None


async def _write_aside(rt: Runtime, audit: dict[str, Any], pool: ThreadPoolExecutor) -> str:
    """The record under a generated name beside the one that holds its name (never referenced, never replaced)."""
    aside = dict(audit, metadata={**audit["metadata"], "generateName": audit["metadata"]["name"] + "-"})
    del aside["metadata"]["name"]
    written = await rt.call(pool, rt.kube.create, aside)
    return str(written["metadata"]["name"])


def _audit_taken(view: RequestView, name: str) -> str:
    return f"ConfigMap {name} holds this request's audit record name but is not its record"


def _fail_closed(rt: Runtime, new: dict[str, Any], problem: str) -> dict[str, Any]:
    """A run whose record name is taken fails, and its output is not a model version."""
    message = f"{problem}: the run is not recorded in the model's lineage; {ADOPT_ONLY_OURS}"
    failed = states.failed(new, states.REASON_NAME_CONFLICT, message, rt.clock())
    failed.pop("outputModel", None)
    return failed


async def complete(
    rt: Runtime,
    view: RequestView,
    new: dict[str, Any],
    record: CompactRecord | None,
    *,
    job: dict[str, Any] | None,
    pool: ThreadPoolExecutor,
    planned: PlannedLineage | None = None,
    observe: bool = True,
) -> bool:
    """Steps 2-4 of the module docstring, then metrics and Events (``planned``: the lineage after the run)."""
    spec = _spec_of(view)
    ref = view.ref
    digest = planned.digest_of(view.name) if planned is not None else None
    audit = build_audit_configmap(ref, spec, new, record, lineage_digest=digest)
    if planned is not None and planned.changed and record is not None:
        # Before the lineage moves: a record name held by something else fails the run instead.
        name = audit_configmap_name(view.name, view.uid)
        taken = await rt.call(pool, rt.kube.read_configmap, view.namespace, name)
        if taken is not None and (problem := adoption.audit_problem(taken, audit, ref, view.created)) is not None:
            new = _fail_closed(rt, new, problem)
            audit = build_audit_configmap(ref, spec, new, record)
        else:
            await _write_lineage(rt, view, planned, record, pool)
    written = await _write_audit(rt, view, audit, pool)
    if written is None:
        # Taken between the check and the write, or no check was needed (the run moves no lineage).
        problem = _audit_taken(view, audit["metadata"]["name"])
        if new["phase"] != states.REJECTED and not _is_conflict(new):
            new = _fail_closed(rt, new, problem)
            audit = build_audit_configmap(ref, spec, new, record, lineage_digest=digest)
        else:
            await rt.event(view, "Warning", states.REASON_NAME_CONFLICT, f"{problem}: written beside it")
        written = await _write_aside(rt, audit, pool)
    new = states.with_audit(new, written)
    if not await rt.write_status(view, new, pool):
        return False
    rt.ended_jobs.pop(view.key, None)
    if job is not None:
        await set_ttl(rt, view, job["metadata"]["name"], pool)
    if observe:
        method = view.spec.method.name if view.spec is not None else None
        rt.metrics.observe(completion(method, new, record, gpus_of(job) if job is not None else 0, ran=job is not None))
    if new["phase"] == states.SUCCEEDED:
        await rt.event(view, "Normal", "Succeeded", new.get("message", ""))
    elif new["phase"] == states.FAILED:
        reason = (states.get_condition(new, states.COMPLETE) or {}).get("reason")
        await rt.event(view, "Warning", reason if reason in INTEGRITY_REASONS else "Failed", new.get("message", ""))
    return True


def _is_conflict(status: dict[str, Any]) -> bool:
    return (states.get_condition(status, states.COMPLETE) or {}).get("reason") == states.REASON_NAME_CONFLICT


async def set_ttl(rt: Runtime, view: RequestView, job_name: str, pool: ThreadPoolExecutor) -> None:
    """Let Kubernetes delete the finished Job now that its result is recorded (the periodic check retries)."""
    try:
        await rt.call(pool, rt.kube.patch_job, view.namespace, job_name, ttl_patch(rt.settings))
    except ApiError as error:
        log.warning("could not set the TTL of Job %s/%s (retried): %s", view.namespace, job_name, error)
