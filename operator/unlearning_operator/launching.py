"""Launching a request: its model's lineage, the spec ConfigMap and the Job, then status Running.

Called by the controller with the request's lock held, once the scheduler
chose the request and its spec passed validation. Runs on the launch pool
(see runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from unlearning_contracts.spec import UnlearningRequestSpec

from . import lineage
from . import status as states
from .jobs import build_job, build_network_policy, build_spec_configmap, model_version_of
from .runtime import Runtime
from .views import RequestView, parse_time

log = logging.getLogger("unlearning_operator")


class BrokenLineageError(ValueError):
    """The model's lineage ConfigMap cannot be read; the message says which and why."""


async def current_lineage(
    rt: Runtime, view: RequestView, spec: UnlearningRequestSpec, pool: ThreadPoolExecutor
) -> lineage.Lineage:
    """The model's lineage; creates version 0 from this request's source if new.

    For a model this process has not seen, create first (one round trip
    when the model is new; a 409 reads the existing history instead).
    """
    key = (view.namespace, spec.model.name)
    try:
        existing = None
        if key in rt.known_lineages:
            existing = await rt.call(
                pool, rt.kube.read_configmap, view.namespace, lineage.lineage_name(spec.model.name)
            )
        if existing is not None:
            return lineage.parse(existing)
        fresh = lineage.initial(spec, view.name)
        manifest = lineage.build_lineage_configmap(fresh, view.namespace)
        found, created = await rt.call(pool, rt.kube.create_if_absent, manifest)
        rt.known_lineages.add(key)
        return fresh if created else lineage.parse(found)
    except ValueError as error:
        raise BrokenLineageError(f"{error}: repair or delete it") from None


async def isolated_job(
    rt: Runtime,
    *,
    view: RequestView,
    spec: UnlearningRequestSpec,
    current: lineage.Version,
    image: str,
    pool: ThreadPoolExecutor,
) -> tuple[dict[str, Any], bool]:
    """The Job, after its NetworkPolicy: on an enforcing CNI its pod never runs unisolated."""
    if rt.settings.job_network_policy:
        policy, _ = await rt.call(pool, rt.kube.create_if_absent, build_network_policy(view.ref, spec, rt.settings))
        _check_owner(policy, view)
    job, created = await rt.call(pool, rt.kube.create_if_absent, build_job(view.ref, spec, rt.settings, current, image))
    _check_owner(job, view)
    return job, created


def _check_owner(obj: dict[str, Any], view: RequestView) -> None:
    """Refuse an object under our name that this request does not own (a tenant may pre-create names)."""
    owners = {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}
    if view.uid not in owners:
        kind, name = obj.get("kind", "Object"), obj["metadata"]["name"]
        raise RuntimeError(f"{kind} {name} exists but belongs to another object")


async def launch(rt: Runtime, view: RequestView, spec: UnlearningRequestSpec, image: str) -> None:
    """Create the spec ConfigMap and the Job (or find them) and mark the request Running.

    Raises BrokenLineageError when the model's lineage is corrupt, and
    RuntimeError when a Job or NetworkPolicy of that name belongs to another object.
    """
    pool = rt.launch_pool
    status = rt.current_status(view)
    current = (await current_lineage(rt, view, spec, pool)).current
    # The spec ConfigMap and the Job in parallel: the pod's volume waits for
    # the ConfigMap anyway, and one round trip less matters in a burst.
    results = await asyncio.gather(
        rt.call(pool, rt.kube.create_if_absent, build_spec_configmap(view.ref, spec, current)),
        isolated_job(rt, view=view, spec=spec, current=current, image=image, pool=pool),
    )
    job, created = results[1]
    version = model_version_of(job, default=current.version + 1)
    now = rt.clock()
    new = states.running(
        status,
        job_name=job["metadata"]["name"],
        attempt=1,
        model_version=version,
        input_model={"uri": current.uri, "sha256": current.sha256},
        generation=view.generation,
        now=now,
    )
    if not await rt.write_status(view, new, pool):
        return
    log.info(
        "Job %s for %s/%s (model version %d -> %d)", new["jobName"], view.namespace, view.name, current.version, version
    )
    if created:
        created_at = parse_time(view.created)
        if created_at is not None:
            rt.metrics.queue_wait.observe(max(0.0, (now - created_at).total_seconds()))
        # Posted in the background: an Event must not delay the next state change.
        message = f"created Job {new['jobName']} from model version {current.version}"
        rt.spawn(rt.event(view, "Normal", "JobCreated", message), "event")
