"""Finishing a request: read what its Job left, advance the lineage, keep the audit record, write status.

Called by the controller with the request's lock held. Finishing runs on the
launch pool (see runtime.py): a result should not wait behind a burst of
Pending/Queued status writes. Each function returns whether the final status
was written (False: the request is gone).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec

from . import lineage
from . import status as states
from .audit_configmap import build_audit_configmap
from .failures import explain_failure
from .jobs import gpus_of
from .k8s import ApiError
from .metrics import completion
from .names import audit_configmap_name
from .results import JOB_SUCCEEDED, MalformedResultError, job_outcome, latest_terminated_pod, parse_record, terminated
from .runtime import Runtime
from .views import RequestView

LINEAGE_RETRIES = 5


async def finish(rt: Runtime, view: RequestView, job: dict[str, Any]) -> bool:
    """The Job ended: its record (or why there is none) becomes the request's final status."""
    pool = rt.launch_pool
    status = rt.current_status(view)
    name = job["metadata"]["name"]
    pods = await rt.call(pool, rt.kube.job_pods, view.namespace, name)
    pod = latest_terminated_pod(pods)
    message = (terminated(pod) or {}).get("message") if pod else None
    base = dict(status)
    base["jobName"] = name
    base.setdefault("startTime", job["metadata"].get("creationTimestamp"))
    try:
        record = parse_record(message)
    except MalformedResultError as error:
        if job_outcome(job) == JOB_SUCCEEDED:
            return await finish_failed(rt, view, base, states.REASON_BAD_RESULT, str(error), job=job, pool=pool)
        why = explain_failure(job, pods)
        return await finish_failed(rt, view, base, why.reason, why.message, job=job, pool=pool)
    new = states.finished(base, record, rt.clock())
    if view.spec is not None:
        await advance_lineage(rt, view, view.spec, record)
    return await complete(rt, view, new, record, job=job, pool=pool)


async def fail_without_job(rt: Runtime, view: RequestView, status: dict[str, Any], job_name: str) -> bool:
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
    """The run ended without a usable record."""
    return await complete(rt, view, states.failed(status, reason, message, rt.clock()), None, job=job, pool=pool)


async def advance_lineage(rt: Runtime, view: RequestView, spec: UnlearningRequestSpec, record: CompactRecord) -> None:
    """Record the run in the model's lineage (a Passed run with an output becomes current).

    Read, advance, write with the resourceVersion read: a concurrent writer
    gets 409 and this retries from a fresh read.
    """
    pool = rt.launch_pool
    for _ in range(LINEAGE_RETRIES):
        name = lineage.lineage_name(spec.model.name)
        existing = await rt.call(pool, rt.kube.read_configmap, view.namespace, name)
        current = lineage.initial(spec, view.name) if existing is None else lineage.parse(existing)
        advanced = lineage.advance(current, record, view.name)
        if advanced == current and existing is not None:
            return
        manifest = lineage.build_lineage_configmap(advanced, view.namespace)
        try:
            if existing is None:
                await rt.call(pool, rt.kube.create_if_absent, manifest)
            else:
                manifest["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                await rt.call(pool, rt.kube.replace_configmap, manifest)
            return
        except ApiError as error:
            if error.status != 409:
                raise
    raise RuntimeError(f"lineage of model {spec.model.name}: gave up after {LINEAGE_RETRIES} conflicting writes")


async def complete(
    rt: Runtime,
    view: RequestView,
    new: dict[str, Any],
    record: CompactRecord | None,
    *,
    job: dict[str, Any] | None,
    pool: ThreadPoolExecutor,
) -> bool:
    """Audit record first, then status: a status that names an audit ConfigMap never points at nothing."""
    spec = view.spec
    if spec is not None:
        audit = build_audit_configmap(view.ref, spec, new, record)
        try:
            await rt.call(pool, rt.kube.create_if_absent, audit)
        except Exception:
            # The request stays Running until a later Job event (or a restart)
            # retries; the gauge keeps the alert on until then (docs/monitoring.md).
            rt.audit_written(view.key, False)
            raise
        rt.audit_written(view.key, True)
        new = states.with_audit(new, audit_configmap_name(view.name, view.uid))
    if not await rt.write_status(view, new, pool):
        return False
    method = spec.method.name if spec is not None else None
    rt.metrics.observe(completion(method, new, record, gpus_of(job) if job is not None else 0, ran=job is not None))
    if new["phase"] == states.SUCCEEDED:
        await rt.event(view, "Normal", "Succeeded", new.get("message", ""))
    else:
        await rt.event(view, "Warning", "Failed", new.get("message", ""))
    return True
