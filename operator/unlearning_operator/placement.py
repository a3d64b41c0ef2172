"""Where a Job's pod runs and what it may hold: ``spec.job`` with the operator's defaults, and the bounds. Pure.

Both functions take the contracts' ``JobSpec`` (the ``job`` block every kind
that runs a tenant's Jobs shares) and the settings, never a whole request, so
a calibration's Indexed Job is resolved and bounded exactly like a request's
Job. ``build_job`` places the pod from ``resolve_placement``; admission
refuses what ``placement_problems`` finds, before anything is created.

The bounds, each a setting with its chart value (``job.bounds.*``,
``job.kueue.*``), and why:

1. ``gpus``, ``cpu``, ``memory`` and ``activeDeadlineSeconds`` at most the
   admin's maxima: a tenant must not claim a node's worth of GPUs, or one GPU
   for a week, by writing a bigger number.
2. ``priorityClassName`` only the operator's default or one the admin lists:
   ``system-node-critical`` would let a tenant's Job preempt the cluster's
   own pods.
3. No toleration without a key unless the admin allows it: ``operator:
   Exists`` with no key tolerates every taint, the control plane's and a
   draining node's included.
4. With ``require_queue_name`` (Kueue on), every Job goes through a LocalQueue:
   the request's, or the operator's default. Leaving ``queueName`` out must
   not be a way around Kueue's quota.

Each problem is one message naming the field, the bound, and the chart value
that sets it, so the tenant knows what to change and whom to ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unlearning_contracts.spec import JobSpec

from .quantities import quantity
from .settings import OperatorSettings, where_set


@dataclass(frozen=True)
class Placement:
    """The effective resources and placement of a Job's pod (request values over the operator's defaults)."""

    gpus: int
    cpu: str
    memory: str
    deadline_seconds: int
    priority_class: str | None
    queue_name: str | None
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any]


def resolve_placement(job: JobSpec, settings: OperatorSettings) -> Placement:
    """The request's ``spec.job`` with the operator's defaults filled in (unchecked: see placement_problems)."""
    return Placement(
        gpus=job.gpus if job.gpus is not None else settings.job_gpus,
        cpu=job.cpu or settings.job_cpu,
        memory=job.memory or settings.job_memory,
        deadline_seconds=job.active_deadline_seconds or settings.job_deadline_seconds,
        priority_class=job.priority_class_name or settings.job_priority_class or None,
        queue_name=job.queue_name or settings.job_queue_name,
        # The request's node selector keys win; its tolerations are added to the operator's.
        node_selector={**settings.job_node_selector, **(job.node_selector or {})},
        tolerations=[dict(t) for t in settings.job_tolerations]
        + [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in job.tolerations or []],
        affinity=dict(settings.job_affinity),
    )


def placement_problems(job: JobSpec, settings: OperatorSettings, field: str = "spec.job") -> list[str]:
    """What in ``job`` is beyond the admin's bounds, one message per problem (empty: within them)."""
    problems = []
    if job.gpus is not None and job.gpus > settings.max_job_gpus:
        problems.append(
            f"{field}.gpus: {job.gpus} is above this cluster's bound of {settings.max_job_gpus} per Job "
            f"({where_set('max_job_gpus')}): ask for at most {settings.max_job_gpus}"
        )
    for name, value, bound in (
        ("cpu", job.cpu, settings.max_job_cpu),
        ("memory", job.memory, settings.max_job_memory),
    ):
        if value is not None and quantity(value) > quantity(bound):
            problems.append(
                f"{field}.{name}: {value} is above this cluster's bound of {bound} per Job "
                f"({where_set(f'max_job_{name}')}): ask for at most {bound}"
            )
    deadline = job.active_deadline_seconds
    if deadline is not None and deadline > settings.max_job_deadline_seconds:
        problems.append(
            f"{field}.activeDeadlineSeconds: {deadline} is above this cluster's bound of "
            f"{settings.max_job_deadline_seconds} s ({where_set('max_job_deadline_seconds')}): "
            f"ask for at most {settings.max_job_deadline_seconds}"
        )
    problems += _priority_problems(job, settings, field)
    if not settings.allow_keyless_tolerations:
        for index, toleration in enumerate(job.tolerations or []):
            if not toleration.key:
                problems.append(
                    f"{field}.tolerations[{index}]: a toleration without a key tolerates every taint "
                    f"(control-plane and draining nodes included): name the taint's key "
                    f"(keyless tolerations are off: {where_set('allow_keyless_tolerations')})"
                )
    if settings.require_queue_name and not (job.queue_name or settings.job_queue_name):
        problems.append(
            f"{field}.queueName: required: this cluster admits Jobs through Kueue "
            f"({where_set('require_queue_name')}); name your namespace's LocalQueue"
        )
    return problems


def _priority_problems(job: JobSpec, settings: OperatorSettings, field: str) -> list[str]:
    asked = job.priority_class_name
    if asked is None or asked == settings.job_priority_class or asked in settings.allowed_priority_classes:
        return []
    allowed = sorted({c for c in (settings.job_priority_class, *settings.allowed_priority_classes) if c})
    choice = f"pick one of: {', '.join(allowed)}" if allowed else "this cluster allows none"
    return [
        f"{field}.priorityClassName: {asked} is not allowed; remove it to use the default or {choice} "
        f"({where_set('allowed_priority_classes')})"
    ]
