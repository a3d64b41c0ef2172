"""Launching a request: record the Job in status, create its spec ConfigMap and the Job, mark it created.

Called by the controller with the request's lock held, once the scheduler
chose the request and admission passed. Runs on the launch pool (see
runtime.py). The order, and why:

1. The model's lineage, created at version 0 for a new model and verified
   (lineage.py): a request never starts from a history that does not verify.
2. The ``launching`` status (status.py): ``jobName``, the versions, and the
   generation the Job is built from. Only then is anything created, so a
   Job under that name is adopted only if status names it. The API server's
   answer carries the request's generation: if the spec changed since the
   scheduler read it, the request fails with ``SpecChanged`` before any Job
   exists (``jobName`` has frozen the spec, so it cannot change again).
3. The spec ConfigMap (written together with step 2: it is inert until a
   Job mounts it), then the Job, only once the ConfigMap exists: a Job
   created while its ConfigMap's create failed would wait for it forever,
   holding a slot. Each is created if absent; one that exists is checked
   (adoption.py) and one the operator did not make fails the request with
   ``NameConflict``. Right after step 2 no Job of ours can exist yet, so a
   Job found then is someone else's, whatever its labels say.
4. The ``running`` status (JobCreated=True) and the JobCreated Event.

A launch that stops after step 2 (an API error, a restart) is resumed by
``resume`` from step 3: status names the Job and the versions, which are
taken from there (never read again), and every create is idempotent, so the
spec ConfigMap of a half-created launch is created on the next try.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from unlearning_contracts.spec import UnlearningRequestSpec

from . import adoption, lineage
from . import status as states
from .banks import USE, BankChoice, BankUse
from .jobs import build_job, build_network_policy, build_spec_configmap
from .k8s import ApiError
from .labels import ANNOTATION_BANK
from .names import job_name
from .runtime import Runtime
from .views import RequestView, parse_time

log = logging.getLogger("unlearning_operator")

ADOPT_ONLY_OURS = (
    "the operator adopts only objects it made, so the request fails: "
    "remove that object and create a new UnlearningRequest"
)


class LaunchFailedError(Exception):
    """The request cannot run as it stands; it ends Failed with this reason and message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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
    except lineage.LineageError as error:
        raise LaunchFailedError(states.REASON_LINEAGE_BROKEN, str(error)) from None


async def launch(rt: Runtime, view: RequestView, spec: UnlearningRequestSpec, image: str, choice: BankChoice) -> None:
    """Steps 1-4 for a request the scheduler chose (phase Pending or Queued).

    ``choice`` is the bank the Job is given (``USE``), or why it runs without
    one; both are recorded in status with the Job (``calibration``, condition
    CalibrationReady) before anything is created, so a resumed launch gives
    the Job the same bank.
    """
    pool = rt.launch_pool
    current = (await current_lineage(rt, view, spec, pool)).current
    now = rt.clock()
    intent = states.launching(
        rt.current_status(view),
        job_name=job_name(view.name, view.uid),
        model_version=current.version + 1,
        input_model={"uri": current.uri, "sha256": current.sha256},
        generation=view.generation,
        now=now,
    )
    if choice.action == USE and choice.bank is not None:
        message = f"uses the bank of {choice.bank.name} (sha256 {choice.bank.sha256[:12]})"
        intent = states.with_calibration(
            intent,
            bank=choice.bank.dump(),
            found=True,
            reason=states.REASON_CALIBRATION_FOUND,
            message=message,
            now=now,
        )
    else:
        intent = states.with_calibration(
            intent, bank=None, found=False, reason=choice.reason, message=choice.message, now=now
        )
    # The record and the spec ConfigMap together: one round trip less in a burst. The ConfigMap is inert
    # (no Job reads it yet) and owned by the request, so one made for a launch that fails is harmless.
    config_map = build_spec_configmap(view.ref, spec, current)
    written, made = await asyncio.gather(
        rt.write_status_reading(view, intent, pool), _create_checked(rt, config_map), return_exceptions=True
    )
    if isinstance(written, BaseException):
        raise written
    if written is None:
        return  # deleted meanwhile
    if written != view.generation:
        raise LaunchFailedError(
            states.REASON_SPEC_CHANGED,
            f"the spec changed (generation {view.generation} -> {written}) while the operator was launching "
            "this request; nothing ran, and the spec cannot change any more: create a new UnlearningRequest "
            "with the spec you want",
        )
    if isinstance(made, BaseException):
        raise made
    _check_spec_configmap(view, config_map, *made)
    await _create_job(rt, view, spec, image, current, first_try=True, bank=recorded_bank(rt.current_status(view)))


async def resume(rt: Runtime, view: RequestView, spec: UnlearningRequestSpec, image: str) -> None:
    """Steps 3-4 for a request whose status records its Job but not yet that it exists."""
    status = rt.current_status(view)
    if status.get("observedGeneration") != view.generation:
        raise LaunchFailedError(
            states.REASON_SPEC_CHANGED,
            f"the spec is at generation {view.generation}, but the Job was recorded for generation "
            f"{status.get('observedGeneration')}; nothing ran: create a new UnlearningRequest",
        )
    recorded = status.get("inputModel") or {}
    current = lineage.Version(
        version=int(status.get("modelVersion", 1)) - 1,
        uri=str(recorded.get("uri", "")),
        sha256=str(recorded.get("sha256", "")),
        request="",
        parent=None,
    )
    config_map = build_spec_configmap(view.ref, spec, current)
    _check_spec_configmap(view, config_map, *await _create_checked(rt, config_map))
    await _create_job(rt, view, spec, image, current, first_try=False, bank=recorded_bank(status))


def recorded_bank(status: dict[str, Any]) -> BankUse | None:
    """The bank status recorded for the Job at launch (None: it runs without one)."""
    found = status.get("calibration") or {}
    if not (found.get("name") and found.get("uri") and found.get("sha256")):
        return None
    return BankUse(name=str(found["name"]), uri=str(found["uri"]), sha256=str(found["sha256"]))


async def _create_checked(rt: Runtime, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    try:
        return await rt.call(rt.launch_pool, rt.kube.create_if_absent, obj)
    except ApiError as error:
        if error.permanent:
            kind, name = obj["kind"], obj["metadata"]["name"]
            raise LaunchFailedError(
                states.REASON_LAUNCH_REFUSED,
                f"the API server refused to create {kind} {name}: {error.message or error.reason}",
            ) from None
        raise


def _check_spec_configmap(view: RequestView, built: dict[str, Any], found: dict[str, Any], created: bool) -> None:
    if not created and (problem := adoption.spec_configmap_problem(found, built, view.ref)) is not None:
        raise LaunchFailedError(states.REASON_NAME_CONFLICT, f"{problem}: {ADOPT_ONLY_OURS}")


async def _create_job(
    rt: Runtime,
    view: RequestView,
    spec: UnlearningRequestSpec,
    image: str,
    current: lineage.Version,
    *,
    first_try: bool,
    bank: BankUse | None,
) -> None:
    """The Job, once its spec ConfigMap exists, given ``bank``; then status says it is created."""
    pool = rt.launch_pool
    ref = view.ref
    if rt.settings.job_network_policy:
        # Before the Job: on a CNI that enforces policies its pod never runs unisolated.
        policy = build_network_policy(ref, spec, rt.settings)
        found, made = await _create_checked(rt, policy)
        if not made and (problem := adoption.network_policy_problem(found, policy, ref)) is not None:
            raise LaunchFailedError(states.REASON_NAME_CONFLICT, f"{problem}: {ADOPT_ONLY_OURS}")
    manifest = build_job(ref, spec, rt.settings, current, image, generation=view.generation, bank=bank)
    job, created = await _create_checked(rt, manifest)
    status = rt.current_status(view)
    if not created:
        name = manifest["metadata"]["name"]
        problem = (
            f"Job {name} existed before the operator created it"
            if first_try
            else adoption.job_problem(job, ref, status, adoption.build_of(job, status, spec.output.location.uri))
        )
        if problem is not None:
            raise LaunchFailedError(states.REASON_NAME_CONFLICT, f"{problem}: {ADOPT_ONLY_OURS}")
    now = rt.clock()
    new = states.running(
        status,
        job_name=manifest["metadata"]["name"],
        attempt=1,
        model_version=current.version + 1,
        input_model={"uri": current.uri, "sha256": current.sha256},
        generation=view.generation,
        now=now,
    )
    # What the Job was given decides: an adopted Job (a resumed launch) keeps the bank it was created with.
    given = BankUse.from_annotation((job["metadata"].get("annotations") or {}).get(ANNOTATION_BANK))
    if given != bank:
        what = f"the bank of {given.name}" if given is not None else "no bank"
        raise LaunchFailedError(
            states.REASON_NAME_CONFLICT,
            f"Job {new['jobName']} was given {what}, not the one recorded: {ADOPT_ONLY_OURS}",
        )
    if not await rt.write_status(view, new, pool):
        return
    log.info(
        "Job %s for %s/%s (model version %d -> %d)",
        new["jobName"],
        view.namespace,
        view.name,
        current.version,
        current.version + 1,
    )
    if created:
        created_at = parse_time(view.created)
        if created_at is not None:
            rt.metrics.queue_wait.observe(max(0.0, (now - created_at).total_seconds()))
        # Posted in the background: an Event must not delay the next state change.
        message = f"created Job {new['jobName']} from model version {current.version}"
        if given is not None:
            message += f" with the bank of {given.name}"
        rt.spawn(rt.event(view, "Normal", "JobCreated", message), "event")
