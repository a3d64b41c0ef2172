"""Calibrations: from an UnlearningCalibration to its Ready bank, through the folds Job and the merge Job.

The controller (controller.py) owns the scheduler and hands this module its
calibrations' events; everything that decides is pure and lives elsewhere
(calibration_status.py, calibration_jobs.py, scheduling.py, failures.py,
banks.py). What happens, in order:

1. Validate and admit (the spec is parsed once per watch event, views.py;
   admission.py admits it by the request's rules: image, factory, claims,
   placement bounds) and write Pending; the scheduler starts it (all its
   slots free) or queues it.
2. Launch: status names the folds Job first (Running, JobCreated=False), then
   the manifest ConfigMap, the NetworkPolicy that isolates its pods, and the
   folds Job (Indexed); then JobCreated=True.
3. While it runs, each index the Job controller reports done raises
   ``foldsDone`` and observes that fold's run time.
4. All folds done: the merge Job (create-if-absent), then Merging. A fold
   that used its retries (or exited 4) fails the Job: Failed, naming the fold.
5. The merge Job's record: Ready with the bank, cost and likeness; the
   immutable calibration record is written first.

Restart safety and adoption are the request's: deterministic names,
create-if-absent, status names the folds Job before it is created (a Job
under that name while status names none is someone else's: NameConflict),
and what is found on a resumed launch or a merge is adopted only with all the
operator's marks (labels, the calibration's uid annotation, its controller
owner reference: adoption.calibration_marks_problem). A killed operator
leaves one Indexed Job and one merge Job at most. No finalizer: deleting a calibration deletes
its Jobs and ConfigMap by garbage collection and leaves the bank files on
the claim (and the record ConfigMap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from unlearning_contracts.calibration import CalibrationRecord, UnlearningCalibrationSpec

from . import calibration_status as cal
from . import failures
from .admission import Admitted, admit
from .adoption import calibration_marks_problem
from .audit_configmap import build_calibration_record_configmap
from .banks import BankUse, Offer
from .calibration_jobs import (
    build_calibration_configmap,
    build_calibration_job,
    build_calibration_network_policy,
    build_merge_job,
    output_location,
    parallelism_for,
)
from .jobs import gpus_of
from .k8s import ApiError, Kube
from .metrics import Metrics, calibration_completion
from .names import calibration_job_name, calibration_record_name, merge_job_name
from .results import (
    JOB_FAILED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    MalformedResultError,
    completion_index,
    latest_terminated_pod,
    parse_calibration_record,
    terminated,
)
from .runtime import Runtime
from .scheduling import CALIBRATION, Candidate
from .settings import OperatorSettings
from .views import CalibrationView, JobView, Key, calibration_view, job_view, parse_time, values

log = logging.getLogger("unlearning_operator")


def pod_seconds(pod: dict[str, Any]) -> float:
    """How long a finished pod's container ran (0 when it has not run to an end)."""
    state = terminated(pod) or {}
    start, end = parse_time(state.get("startedAt")), parse_time(state.get("finishedAt"))
    return max(0.0, (end - start).total_seconds()) if start is not None and end is not None else 0.0


def new_fold_durations(pods: list[dict[str, Any]], done: set[int], seen: set[int]) -> list[float]:
    """Run times of the folds newly done (in ``done``, not in ``seen``), from their successful pods. Pure."""
    found: dict[int, float] = {}
    for pod in pods:
        index = completion_index(pod)
        state = terminated(pod) or {}
        if index in done and index not in seen and state.get("exitCode") == 0:
            found[index] = pod_seconds(pod)
    return [found[index] for index in sorted(found)]


@dataclass
class Calibrations:
    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    rt: Runtime
    schedule: Callable[[], None]
    """Ask the controller for a scheduler pass."""
    clock: Callable[[], datetime]
    calibrations: Mapping[Any, Any] | None = None
    jobs: Mapping[Any, Any] | None = None
    launched: dict[Key, str] = field(default_factory=dict)
    """Calibrations the scheduler started (by uid), until they reach a final phase."""
    queued_messages: dict[Key, str] = field(default_factory=dict)

    def bind(self, calibrations: Mapping[Any, Any] | None, jobs: Mapping[Any, Any] | None) -> None:
        self.calibrations = calibrations
        self.jobs = jobs

    # ---- views ------------------------------------------------------------------
    def view(self, key: Key) -> CalibrationView | None:
        found = values(self.calibrations, key)
        return found[0] if found else None

    def views(self) -> list[CalibrationView]:
        if self.calibrations is None:
            return []
        return [v for key in list(self.calibrations.keys()) if (v := self.view(key)) is not None]

    def jobs_of(self, view: CalibrationView) -> tuple[JobView | None, JobView | None]:
        """(folds Job, merge Job) of this calibration object, by name and owner uid."""
        folds = merge = None
        for job in values(self.jobs, view.key):
            if job.owner_uid != view.uid:
                continue
            if job.name == calibration_job_name(view.name, view.uid):
                folds = job
            elif job.name == merge_job_name(view.name, view.uid):
                merge = job
        return folds, merge

    def offers(self) -> list[Offer]:
        """Every calibration, as requests choose a bank among them (banks.py)."""
        found = []
        for view in self.views():
            if view.deleting:
                continue
            status = self.rt.current_status(view)
            bank = status.get("bank") or {}
            use = None
            if bank.get("uri") and bank.get("sha256"):
                use = BankUse(name=f"{view.namespace}/{view.name}", uri=bank["uri"], sha256=bank["sha256"])
            found.append(
                Offer(
                    namespace=view.namespace,
                    name=view.name,
                    model=view.model,
                    data=view.spec.data if view.spec is not None else None,
                    phase=cal.phase_of(status),
                    created=view.created,
                    completed=str(status.get("completionTime") or ""),
                    bank=use,
                    folds=int(status.get("folds") or 0),
                    folds_done=int(status.get("foldsDone") or 0),
                )
            )
        return found

    def candidates(self) -> Iterable[tuple[Candidate, CalibrationView]]:
        """The scheduler's view of every calibration that waits or holds slots."""
        for view in self.views():
            if view.deleting:
                continue
            status = self.rt.current_status(view)
            phase = cal.phase_of(status)
            if phase in cal.TERMINAL_PHASES:
                continue
            folds_job, merge_job = self.jobs_of(view)
            job_active = any(j is not None and j.outcome == JOB_RUNNING for j in (folds_job, merge_job))
            if self.launched.get(view.key) == view.uid or phase in cal.ACTIVE_PHASES:
                phase = cal.RUNNING
            folds = view.spec.folds if view.spec is not None else 1
            slots = parallelism_for(folds, self.settings)
            yield (
                Candidate(
                    namespace=view.namespace,
                    name=view.name,
                    model=view.model,
                    created=view.created,
                    phase=phase,
                    job_active=job_active,
                    kind=CALIBRATION,
                    slots=slots,
                    held=_held(status, folds_job, merge_job, slots),
                ),
                view,
            )

    def discard(self, key: Key) -> None:
        self.rt.discard(key)
        self.launched.pop(key, None)
        self.queued_messages.pop(key, None)

    # ---- calibration events ---------------------------------------------------------
    async def on_calibration(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        view = calibration_view(body)
        if event_type == "DELETED" or view.deleting:
            self.discard(view.key)
            self.schedule()
            return
        async with self.rt.lock(view.key):
            await self._reconcile(view)
        phase = cal.phase_of(self.rt.current_status(view))
        if event_type is None or phase == cal.PENDING or phase in cal.TERMINAL_PHASES:
            # Terminal too: a Ready bank may unblock requests that require one.
            self.schedule()

    async def _reconcile(self, view: CalibrationView) -> None:
        status = self.rt.current_status(view)
        if cal.is_terminal(status):
            return
        phase = cal.phase_of(status)
        pool = self.rt.api_pool
        folds_job, merge_job = self.jobs_of(view)
        if phase in (None, cal.PENDING, cal.QUEUED):
            accepted = await self._validate(view, status, pool)
            if accepted is None:
                return
            if folds_job is not None or merge_job is not None:
                found = (folds_job or merge_job).name  # type: ignore[union-attr]
                await self._name_conflict(view, accepted[0], status, found)
            elif phase is None or status.get("observedGeneration") != view.generation:
                new = cal.pending(status, accepted[0].folds, view.generation, self.clock())
                await self.rt.write_status(view, new, pool)
            return
        if phase == cal.RUNNING and not cal.job_created(status):
            if self.launched.get(view.key) != view.uid:
                self.rt.retry(view.key, "resume", self._resume(view))
            return
        if phase == cal.RUNNING and folds_job is None and merge_job is None:
            # Gone behind our back (or finished and removed by its TTL while we were down).
            merge = await self.rt.call(pool, self.kube.read_job, view.namespace, merge_job_name(view.name, view.uid))
            name = str(status.get("jobName") or calibration_job_name(view.name, view.uid))
            if merge is None and await self.rt.call(pool, self.kube.read_job, view.namespace, name) is None:
                await self._fail_job_deleted(view, status, name)
        elif phase == cal.MERGING and merge_job is None:
            name = str(status.get("mergeJobName"))
            if await self.rt.call(pool, self.kube.read_job, view.namespace, name) is None:
                await self._fail_job_deleted(view, status, name)

    async def _validate(
        self, view: CalibrationView, status: dict[str, Any], pool: ThreadPoolExecutor
    ) -> tuple[UnlearningCalibrationSpec, str] | None:
        """The typed spec and the image its Jobs run, or None after marking it Rejected."""
        reason = cal.REASON_INVALID_SPEC
        message = view.spec_error or ""
        if view.spec is not None:
            decision = admit(view.spec, self.settings)
            if isinstance(decision, Admitted):
                return view.spec, decision.image
            reason, message = decision.reason, decision.message
        self.launched.pop(view.key, None)
        rejected = cal.rejected(status, reason, message, view.generation, self.clock())
        if await self.rt.write_status(view, rejected, pool):
            await self.rt.event(view, "Warning", "Rejected", message)
        return None

    # ---- scheduling ---------------------------------------------------------------
    def start(self, view: CalibrationView) -> None:
        self.launched[view.key] = view.uid
        self.queued_messages.pop(view.key, None)
        self.rt.spawn(self._launch(view), "launch")

    def queue(self, view: CalibrationView, reason: str, message: str) -> None:
        if self.queued_messages.get(view.key) == message:
            return
        self.queued_messages[view.key] = message
        self.rt.spawn(self._queue(view, reason, message), "queue")

    async def _queue(self, view: CalibrationView, reason: str, message: str) -> None:
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if cal.phase_of(status) not in cal.WAITING_PHASES or self.launched.get(view.key) == view.uid:
                return
            await self.rt.write_status(
                view, cal.queued(status, reason, message, view.generation, self.clock()), self.rt.api_pool
            )

    async def _launch(self, view: CalibrationView) -> None:
        async with self.rt.lock(view.key):
            try:
                await self._launch_locked(view)
            except Exception:
                # Not launched: the next scheduler pass retries.
                self.launched.pop(view.key, None)
                raise

    async def _launch_locked(self, view: CalibrationView) -> None:
        status = self.rt.current_status(view)
        if cal.phase_of(status) not in cal.WAITING_PHASES:
            return
        pool = self.rt.launch_pool
        accepted = await self._validate(view, status, pool)
        if accepted is None:
            return
        spec, image = accepted
        parallelism = parallelism_for(spec.folds, self.settings)
        name = calibration_job_name(view.name, view.uid)
        # Status names the Job before it exists: a Job found under the name afterwards, on this first
        # try, was made by someone else.
        intent = cal.running(
            status,
            job_name=name,
            folds=spec.folds,
            parallelism=parallelism,
            output=output_location(view.ref, spec).uri,
            generation=view.generation,
            now=self.clock(),
            created=False,
        )
        if not await self.rt.write_status(view, intent, pool):
            return
        await self._create(view, spec, image, parallelism, first_try=True)

    async def _resume(self, view: CalibrationView) -> None:
        """Finish a launch whose folds Job is named in status but was not confirmed created."""
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if cal.phase_of(status) != cal.RUNNING or cal.job_created(status):
                return
            accepted = await self._validate(view, status, self.rt.launch_pool)
            if accepted is None:
                return
            spec, image = accepted
            parallelism = int(status.get("parallelism") or parallelism_for(spec.folds, self.settings))
            await self._create(view, spec, image, parallelism, first_try=False)

    async def _create(
        self, view: CalibrationView, spec: UnlearningCalibrationSpec, image: str, parallelism: int, *, first_try: bool
    ) -> None:
        """The manifest ConfigMap, the NetworkPolicy and the folds Job, each adopted only with our marks;
        then status says the Job exists."""
        pool = self.rt.launch_pool
        ref = view.ref
        objects = [build_calibration_configmap(ref, spec)]
        if self.settings.job_network_policy:
            # Before the Job: on a CNI that enforces policies no fold pod runs unisolated.
            objects.append(build_calibration_network_policy(ref, spec, self.settings))
        objects.append(build_calibration_job(ref, spec, self.settings, image, parallelism))
        found: dict[str, Any] = {}
        created = False
        for obj in objects:
            problem: str | None
            try:
                found, created = await self.rt.call(pool, self.kube.create_if_absent, obj)
            except ApiError as error:
                if not error.permanent:
                    raise
                message = f"the API server refused to create {obj['kind']} {obj['metadata']['name']}: " + (
                    error.message or error.reason
                )
                await self._finish(
                    view,
                    spec,
                    cal.failed(self.rt.current_status(view), cal.REASON_LAUNCH_REFUSED, message, self.clock()),
                    None,
                )
                return
            if created:
                continue
            if obj["kind"] == "Job" and first_try:
                problem = f"Job {obj['metadata']['name']} existed before the operator created it"
            else:
                problem = calibration_marks_problem(found, ref)
            if problem is not None:
                await self._conflict(view, spec, problem)
                return
        status = self.rt.current_status(view)
        job = job_view(found)
        new = cal.running(
            status,
            job_name=job.name,
            folds=spec.folds,
            parallelism=job.parallelism,
            output=output_location(ref, spec).uri,
            generation=view.generation,
            now=self.clock(),
        )
        if not await self.rt.write_status(view, new, pool):
            return
        log.info("Job %s for calibration %s/%s (%d folds)", job.name, view.namespace, view.name, spec.folds)
        if created:
            message = f"created Job {job.name}: {spec.folds} reference models, {job.parallelism} at a time"
            self.rt.spawn(self.rt.event(view, "Normal", "JobCreated", message), "event")

    # ---- job events -----------------------------------------------------------------
    async def on_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        job = job_view(body)
        view = self.view((job.namespace, job.request))
        if view is None or view.deleting or view.uid != job.owner_uid:
            return  # the calibration is gone (garbage collection removes the Job) or this is not its Job
        is_folds = job.name == calibration_job_name(view.name, view.uid)
        is_merge = job.name == merge_job_name(view.name, view.uid)
        if not (is_folds or is_merge):
            return
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if cal.is_terminal(status):
                return
            if view.spec is None:
                return  # Rejected on its own event; nothing of ours should run
            if is_folds:
                await self._on_folds(event_type, view, spec=view.spec, job=job, body=dict(body), status=status)
            else:
                await self._on_merge(event_type, view, view.spec, job, status, raw=dict(body))
        if event_type == "DELETED" or job.outcome != JOB_RUNNING:
            self.schedule()

    async def _on_folds(
        self,
        event_type: str | None,
        view: CalibrationView,
        *,
        spec: UnlearningCalibrationSpec,
        job: JobView,
        body: dict[str, Any],
        status: dict[str, Any],
    ) -> None:
        phase = cal.phase_of(status)
        if phase == cal.MERGING:
            return  # the folds are done; their Job's later events (TTL deletion) change nothing
        if phase in (None, *cal.WAITING_PHASES):
            if event_type != "DELETED":
                await self._name_conflict(view, spec, status, job.name)
            return
        if not cal.job_created(status):
            return  # the launch (or its resume) is creating it and records it next
        if event_type == "DELETED" and job.outcome == JOB_RUNNING:
            await self._fail_job_deleted(view, status, job.name)
            return
        pool = self.rt.launch_pool
        if job.completed_indexes != (status.get("completedIndexes") or "") or job.failed_indexes != (
            status.get("failedIndexes") or ""
        ):
            status = await self._progress(view, job, status)
        if job.outcome == JOB_SUCCEEDED:
            await self._start_merge(view, spec, body, status, pool)
        elif job.outcome == JOB_FAILED:
            pods = await self.rt.call(pool, self.kube.job_pods, view.namespace, job.name)
            why = failures.explain_calibration_failure(body, pods, spec.folds)
            await self._finish(view, spec, cal.failed(status, why.reason, why.message, self.clock()), None)

    async def _progress(self, view: CalibrationView, job: JobView, status: dict[str, Any]) -> dict[str, Any]:
        """Count the folds done; observe the run time of each newly done one (once: status remembers)."""
        seen = cal.expand_indexes(status.get("completedIndexes"))
        done = cal.expand_indexes(job.completed_indexes)
        if done - seen:
            pods = await self.rt.call(self.rt.api_pool, self.kube.job_pods, view.namespace, job.name)
            for seconds in new_fold_durations(pods, done, seen):
                self.metrics.fold_duration.observe(seconds)
        new = cal.folds_progress(status, job.completed_indexes, job.failed_indexes, self.clock())
        if await self.rt.write_status(view, new, self.rt.api_pool) and done - seen:
            message = f"{new['foldsDone']} of {new.get('folds')} reference models trained"
            self.rt.spawn(self.rt.event(view, "Normal", "FoldDone", message), "event")
        return new

    async def _start_merge(
        self,
        view: CalibrationView,
        spec: UnlearningCalibrationSpec,
        folds_job: dict[str, Any],
        status: dict[str, Any],
        pool: ThreadPoolExecutor,
    ) -> None:
        decision = admit(spec, self.settings)
        if not isinstance(decision, Admitted):
            await self._finish(view, spec, cal.failed(status, decision.reason, decision.message, self.clock()), None)
            return
        image = decision.image
        pods = await self.rt.call(pool, self.kube.job_pods, view.namespace, folds_job["metadata"]["name"])
        gpu_seconds = gpus_of(folds_job) * sum(pod_seconds(p) for p in pods)
        job, created = await self.rt.call(
            pool, self.kube.create_if_absent, build_merge_job(view.ref, spec, self.settings, image)
        )
        name = job["metadata"]["name"]
        if not created and (problem := calibration_marks_problem(job, view.ref)) is not None:
            await self._conflict(view, spec, problem)
            return
        new = cal.merging(status, merge_job_name=name, gpu_seconds=gpu_seconds, now=self.clock())
        if await self.rt.write_status(view, new, pool) and created:
            self.rt.spawn(self.rt.event(view, "Normal", "Merging", f"created Job {name} to write the bank"), "event")

    async def _on_merge(
        self,
        event_type: str | None,
        view: CalibrationView,
        spec: UnlearningCalibrationSpec,
        job: JobView,
        status: dict[str, Any],
        *,
        raw: dict[str, Any],
    ) -> None:
        phase = cal.phase_of(status)
        if phase != cal.MERGING:
            if phase != cal.RUNNING or calibration_marks_problem(raw, view.ref) is not None:
                if event_type != "DELETED":
                    await self._name_conflict(view, spec, status, job.name)
                return
            # Ours, created just before a restart that kept status from saying so: record it.
            await self.rt.write_status(
                view, cal.merging(status, merge_job_name=job.name, gpu_seconds=0.0, now=self.clock()), self.rt.api_pool
            )
            status = self.rt.current_status(view)
        if job.outcome == JOB_RUNNING:
            if event_type == "DELETED":
                await self._fail_job_deleted(view, status, job.name)
            return
        pool = self.rt.launch_pool
        body = await self.rt.call(pool, self.kube.read_job, view.namespace, job.name)
        pods = await self.rt.call(pool, self.kube.job_pods, view.namespace, job.name)
        pod = latest_terminated_pod(pods)
        message = (terminated(pod) or {}).get("message") if pod else None
        record: CalibrationRecord | None = None
        try:
            record = parse_calibration_record(message)
        except MalformedResultError as error:
            if job.outcome == JOB_SUCCEEDED:
                new = cal.failed(status, cal.REASON_BAD_RECORD, f"the merge's record: {error}", self.clock())
            else:
                why = failures.explain_calibration_failure(body or {}, pods, spec.folds)
                new = cal.failed(status, why.reason, why.message, self.clock())
            await self._finish(view, spec, new, None)
            return
        if record.exit_code != 0 or record.bank is None:
            what = record.error or f"exit code {record.exit_code} and no bank"
            new = cal.failed(status, cal.REASON_MERGE_FAILED, f"the merge failed: {what}", self.clock())
        else:
            new = cal.ready(status, record, self.clock())
        await self._finish(view, spec, new, record)

    async def _name_conflict(
        self, view: CalibrationView, spec: UnlearningCalibrationSpec, status: dict[str, Any], name: str
    ) -> None:
        """A Job under our name that status does not name: the operator names its Jobs before creating them."""
        await self._conflict(view, spec, f"Job {name} exists, but this calibration's status does not name it")

    async def _conflict(self, view: CalibrationView, spec: UnlearningCalibrationSpec, problem: str) -> None:
        """An object under one of our names that we did not make: never adopt it, never run beside it."""
        message = (
            f"{problem}: the operator did not make it for this calibration and does not use it. "
            "Delete it, or create the calibration under another name"
        )
        status = self.rt.current_status(view)
        await self._finish(view, spec, cal.failed(status, cal.REASON_NAME_CONFLICT, message, self.clock()), None)

    async def _fail_job_deleted(self, view: CalibrationView, status: dict[str, Any], name: str) -> None:
        message = (
            f"Job {name} was deleted before it finished: the bank was not written. "
            "Create a new UnlearningCalibration to run again"
        )
        spec = view.spec
        new = cal.failed(status, cal.REASON_JOB_DELETED, message, self.clock())
        if spec is None:
            await self.rt.write_status(view, new, self.rt.api_pool)
            return
        await self._finish(view, spec, new, None)

    async def _finish(
        self,
        view: CalibrationView,
        spec: UnlearningCalibrationSpec,
        new: dict[str, Any],
        record: CalibrationRecord | None,
    ) -> None:
        """The record ConfigMap first, then status: a status that names a record never points at nothing."""
        pool = self.rt.launch_pool
        record_map = build_calibration_record_configmap(view.ref, spec, new, record)
        await self.rt.call(pool, self.kube.create_if_absent, record_map)
        new = cal.with_audit(new, calibration_record_name(view.name, view.uid))
        if not await self.rt.write_status(view, new, pool):
            return
        self.launched.pop(view.key, None)
        self.metrics.observe_calibration(calibration_completion(new))
        if new["phase"] == cal.READY:
            await self.rt.event(view, "Normal", "Ready", str(new.get("message", "")))
        else:
            await self.rt.event(view, "Warning", "Failed", str(new.get("message", "")))

    # ---- periodic -----------------------------------------------------------------
    async def tick(self, now: datetime) -> None:
        """Phase gauge, bank ages, pending-pod alerts of running folds."""
        counts: dict[str, int] = {}
        newest: dict[tuple[str, str], datetime] = {}
        for view in self.views():
            status = self.rt.current_status(view)
            phase = cal.phase_of(status) or cal.PENDING
            counts[phase] = counts.get(phase, 0) + 1
            completed = parse_time(status.get("completionTime"))
            if phase == cal.READY and completed is not None:
                key = (view.namespace, view.model)
                newest[key] = max(newest.get(key, completed), completed)
            folds_job, _ = self.jobs_of(view)
            if phase == cal.RUNNING and not cal.job_created(status) and self.launched.get(view.key) != view.uid:
                # kopf does not retry events: a launch that stopped after naming its Job is finished here.
                self.rt.retry(view.key, "resume", self._resume(view))
            elif phase == cal.RUNNING and folds_job is not None and folds_job.outcome == JOB_RUNNING:
                self.rt.spawn(self._check_pending(view, folds_job), "pending")
        self.metrics.set_calibration_counts(counts)
        self.metrics.set_bank_ages([max(0.0, (now - made).total_seconds()) for made in newest.values()])

    async def _check_pending(self, view: CalibrationView, job: JobView) -> None:
        await self.rt.check_pending(
            view,
            job,
            view.spec.job.queue_name if view.spec is not None else None,
            running=lambda status: cal.phase_of(status) == cal.RUNNING,
            pending=cal.pod_pending,
            started=cal.pod_started,
        )


def _held(status: dict[str, Any], folds_job: JobView | None, merge_job: JobView | None, slots: int) -> int:
    """Slots an active calibration holds: one per fold it still trains at once, one while it merges.

    Never fewer than one while it is active, so the step from the folds to
    the merge never frees a slot that the merge then takes beyond the cap.
    """
    if merge_job is not None or cal.phase_of(status) == cal.MERGING:
        return 1
    parallelism = folds_job.parallelism if folds_job is not None else int(status.get("parallelism") or slots)
    folds = int(status.get("folds") or parallelism)
    done = cal.count_indexes(folds_job.completed_indexes if folds_job is not None else status.get("completedIndexes"))
    return max(1, min(parallelism, folds - done))
