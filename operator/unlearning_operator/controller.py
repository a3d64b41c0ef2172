"""The reconciler: routes kopf's events to the operations and runs the scheduler.

main.py feeds it kopf events and kopf indexes; it decides nothing itself.
What each piece does, and where:

* views.py: the index values (a request's parsed spec, or why it is invalid);
* runtime.py: API calls on named thread pools, per-request locks, the status
  cache, Events, background tasks;
* scheduling.py: which request or calibration starts (this module coalesces
  the passes over both kinds: they share the caps);
* banks.py: which reference bank a request uses (or whether it waits);
* launching.py / completion.py: the two long operations of a request;
* calibrating.py: everything of an UnlearningCalibration but its scheduling;
* admission.py, placement.py, adoption.py, status.py, failures.py, jobs.py,
  lineage.py, metrics.py: the pure decisions.

Concurrency model, and why:

* Everything that reads the indexes runs on the kopf event loop, so the
  indexes never change under an iteration.
* A request chosen to start is marked ``launched`` before any await, so two
  scheduler passes in a row cannot start it (or its model) twice.
* After a restart the status cache is empty and kopf fills the indexes
  completely before any handler runs, so the scheduler never sees a
  half-listed cluster (and never starts a second request on a busy model).

No finalizers: only ``on.event`` handlers and indexes are used, which kopf
runs without one, and a periodic task (not kopf timers, which would add a
finalizer) checks pending pods.

kopf does not retry ``on.event`` handlers, so nothing that must happen rests
on one event: the periodic task (``tick``) also resumes a launch that
stopped after its Job was recorded, finishes a Running request whose Job
has ended, fails one whose Job is gone, and sets the TTL of a finished Job
whose request is over. Each retry runs once at a time per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from unlearning_contracts.api import CALIBRATION as CALIBRATION_KIND
from unlearning_contracts.spec import UnlearningRequestSpec

from . import banks, completion, launching
from . import status as states
from .admission import Admitted, admit
from .calibrating import Calibrations
from .k8s import Kube
from .launching import ADOPT_ONLY_OURS, LaunchFailedError
from .metrics import Metrics
from .results import JOB_RUNNING, job_outcome
from .runtime import Runtime
from .scheduling import CALIBRATION, Candidate, Caps, decide
from .settings import OperatorSettings
from .views import CalibrationView, JobView, Key, RequestView, job_view, parse_time, request_view, values

log = logging.getLogger("unlearning_operator")

TICK_SECONDS = 5.0
# Coalescing window of scheduler passes: small next to the 1 s launch target.
SCHEDULE_DELAY = 0.05
# The audit record of a request deleted while its Job ran: tries, the first wait doubling (1 + 2 + 4 + 8 s).
DELETION_AUDIT_TRIES = 5


@dataclass
class Controller:
    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    clock: Callable[[], datetime] = states.now_utc
    requests: Mapping[Any, Any] | None = None
    jobs: Mapping[Any, Any] | None = None
    launched: dict[Key, str] = field(default_factory=dict)
    """Requests the scheduler started (by uid), until their final status is written."""
    queued_messages: dict[Key, str] = field(default_factory=dict)
    ticker: asyncio.Task[None] | None = None
    pass_requested: bool = False
    rt: Runtime = field(init=False)
    calibrations: Calibrations = field(init=False)

    def __post_init__(self) -> None:
        self.rt = Runtime(settings=self.settings, kube=self.kube, metrics=self.metrics, clock=self.clock)
        self.calibrations = Calibrations(
            settings=self.settings,
            kube=self.kube,
            metrics=self.metrics,
            rt=self.rt.sibling(CALIBRATION_KIND.plural),
            schedule=self.schedule,
            clock=self.clock,
        )

    # ---- plumbing -------------------------------------------------------------
    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self.rt.tasks | self.calibrations.rt.tasks

    def bind(
        self,
        requests: Mapping[Any, Any],
        jobs: Mapping[Any, Any],
        calibrations: Mapping[Any, Any] | None = None,
        calibration_jobs: Mapping[Any, Any] | None = None,
    ) -> None:
        self.requests = requests
        self.jobs = jobs
        self.calibrations.bind(calibrations, calibration_jobs)

    def start(self) -> None:
        self.ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)
        await self.calibrations.rt.cancel_tasks()
        await self.rt.stop()

    def view(self, key: Key) -> RequestView | None:
        views = values(self.requests, key)
        return views[0] if views else None

    def job_of(self, view: RequestView) -> JobView | None:
        """The request's Job: the one its status names, else (none named yet) any Job claiming to be its.

        Several Jobs may carry the request's label and owner (a tenant can make
        more); once status names one, the others never stand in for it.
        """
        named = self.rt.current_status(view).get("jobName")
        jobs: list[JobView] = [j for j in values(self.jobs, view.key) if j.owner_uid == view.uid]
        if named:
            return next((j for j in jobs if j.name == named), None)
        return jobs[0] if jobs else None

    def discard(self, key: Key) -> None:
        """Drop everything kept for a deleted request."""
        self.rt.discard(key)
        self.launched.pop(key, None)
        self.queued_messages.pop(key, None)

    def _completed(self, view: RequestView, written: bool) -> None:
        if written:
            self.launched.pop(view.key, None)

    # ---- request events -------------------------------------------------------
    async def on_request(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        view = request_view(body)
        if event_type == "DELETED" or view.deleting:
            if states.phase_of(self.rt.current_status(view)) == states.RUNNING:
                self.rt.spawn(self._record_deletion(view), "audit")
            self.discard(view.key)
            self.schedule()
            return
        async with self.rt.lock(view.key):
            await self._reconcile(view)
        # A pass only when the answer can change: a request to place, a slot or
        # model freed, or the initial listing after a start. Our own Queued and
        # Running writes come back as events too, and need none.
        phase = states.phase_of(self.rt.current_status(view))
        if event_type is None or phase == states.PENDING or phase in states.TERMINAL_PHASES:
            self.schedule()

    async def _reconcile(self, view: RequestView) -> None:
        status = self.rt.current_status(view)
        if states.is_terminal(status):
            return
        phase = states.phase_of(status)
        pool = self.rt.api_pool
        if phase in (None, states.PENDING, states.QUEUED):
            if await self._admit(view, pool) is None:
                return
            job = self.job_of(view)
            if job is not None:
                await self._foreign_job(view, job.name)
            elif phase is None or status.get("observedGeneration") != view.generation:
                await self.rt.write_status(view, states.pending(status, view.generation, self.clock()), pool)
            return
        if phase != states.RUNNING:
            return
        if not states.job_created(status):
            if view.key not in self.launched:
                self.rt.retry(view.key, "resume", self._resume(view))
            return
        if self.job_of(view) is None:
            name = status.get("jobName", "")
            if name and await self.rt.call(pool, self.kube.read_job, view.namespace, name) is None:
                self._completed(view, await completion.fail_without_job(self.rt, view, status, name))

    async def _admit(self, view: RequestView, pool: ThreadPoolExecutor) -> str | None:
        """The image the request's Job runs, or None after marking the request Rejected (admission.py)."""
        reason, message = states.REASON_INVALID_SPEC, view.spec_error or ""
        if view.spec is not None:
            decision = admit(view.spec, self.settings)
            if isinstance(decision, Admitted):
                return decision.image
            reason, message = decision.reason, decision.message
        self.launched.pop(view.key, None)
        await completion.reject(self.rt, view, reason, message, pool)
        return None

    async def _foreign_job(self, view: RequestView, name: str) -> None:
        """A Job under this request's name while status names none: the operator records its Job before
        creating it, so this one is someone else's (whatever its labels and owner say)."""
        message = f"Job {name} exists, but this request's status does not name it: the operator did not create it"
        status = self.rt.current_status(view)
        written = await completion.finish_failed(
            self.rt,
            view,
            status,
            states.REASON_NAME_CONFLICT,
            f"{message}: {ADOPT_ONLY_OURS}",
            job=None,
            pool=self.rt.api_pool,
        )
        self._completed(view, written)

    async def _record_deletion(self, view: RequestView) -> None:
        delay = 1.0
        for attempt in range(DELETION_AUDIT_TRIES):
            try:
                await completion.record_deletion(self.rt, view)
                return
            except Exception:
                if attempt == DELETION_AUDIT_TRIES - 1:
                    raise
                log.warning("audit record of deleted %s/%s: retrying in %.0f s", view.namespace, view.name, delay)
                await asyncio.sleep(delay)
                delay *= 2

    # ---- scheduling -----------------------------------------------------------
    def schedule(self) -> None:
        """Ask for a scheduler pass; requests within SCHEDULE_DELAY share one.

        A pass looks at every request, and a burst of 500 requests brings a few
        thousand events: one pass per event would make the burst quadratic.
        """
        if self.pass_requested:
            return
        self.pass_requested = True
        asyncio.get_running_loop().call_later(SCHEDULE_DELAY, self.run_schedule)

    def run_schedule(self) -> None:
        """Start what may start, queue the rest. Synchronous up to the spawns: no await
        between reading the indexes and marking requests launched."""
        self.pass_requested = False
        if self.requests is None:
            return
        candidates: list[Candidate] = []
        views: dict[Key, RequestView] = {}
        offers: list[banks.Offer] | None = None
        for key in list(self.requests.keys()):
            view = self.view(key)
            if view is None or view.deleting:
                continue
            phase = states.phase_of(self.rt.current_status(view))
            if phase in states.TERMINAL_PHASES:
                continue  # neither waiting nor holding a slot; most of a drained burst
            views[key] = view
            if self.launched.get(key) == view.uid:
                phase = states.RUNNING
            job = self.job_of(view)
            # Only a Job the status names holds a slot: one a tenant made under the name never does.
            named = job is not None and job.name == self.rt.current_status(view).get("jobName")
            blocked = None
            required = view.spec is not None and view.spec.calibration.policy == "Required"
            if phase in (states.PENDING, states.QUEUED) and view.spec is not None and required:
                offers = self.calibrations.offers() if offers is None else offers
                choice = self.bank_choice(view, view.spec, offers)
                if choice.action == banks.REJECT:
                    self.rt.spawn(self._reject(view, choice.reason, choice.message), "reject")
                    continue
                if choice.action == banks.WAIT:
                    blocked = (choice.reason, choice.message)
            candidates.append(
                Candidate(
                    namespace=view.namespace,
                    name=view.name,
                    model=view.model,
                    created=view.created,
                    phase=phase,
                    job_active=named and job is not None and job.outcome == JOB_RUNNING,
                    blocked=blocked,
                )
            )
        calibrations: dict[Key, CalibrationView] = {}
        for candidate, calibration in self.calibrations.candidates():
            candidates.append(candidate)
            calibrations[calibration.key] = calibration
        for decision in decide(candidates, Caps.of(self.settings)):
            key = (decision.namespace, decision.name)
            if decision.kind == CALIBRATION:
                if decision.start:
                    self.calibrations.start(calibrations[key])
                else:
                    self.calibrations.queue(calibrations[key], decision.reason, decision.message)
                continue
            view = views[key]
            if decision.start:
                self.launched[key] = view.uid
                self.queued_messages.pop(key, None)
                self.rt.spawn(self._launch(view), "launch")
            elif self.queued_messages.get(key) != decision.message:
                self.queued_messages[key] = decision.message
                self.rt.spawn(self._queue(view, decision.reason, decision.message), "queue")

    def bank_choice(
        self, view: RequestView, spec: UnlearningRequestSpec, offers: list[banks.Offer] | None = None
    ) -> banks.BankChoice:
        """The bank this request would use now, or why it runs without one, waits or is rejected."""
        created = parse_time(view.created)
        waited = (self.clock() - created).total_seconds() if created is not None else 0.0
        return banks.choose(
            spec.calibration,
            namespace=view.namespace,
            model=spec.model.name,
            data=spec.data,
            offers=self.calibrations.offers() if offers is None else offers,
            waited_seconds=waited,
        )

    async def _reject(self, view: RequestView, reason: str, message: str) -> None:
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if states.phase_of(status) in (states.PENDING, states.QUEUED):
                await self._reject_locked(view, status, reason, message)

    async def _reject_locked(self, view: RequestView, status: dict[str, Any], reason: str, message: str) -> None:
        self.launched.pop(view.key, None)
        rejected = states.rejected(status, reason, message, view.generation, self.clock())
        if await self.rt.write_status(view, rejected, self.rt.api_pool):
            await self.rt.event(view, "Warning", "Rejected", message)

    async def _queue(self, view: RequestView, reason: str, message: str) -> None:
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if (
                states.phase_of(status) not in (states.PENDING, states.QUEUED)
                or self.launched.get(view.key) == view.uid
            ):
                return
            if reason == states.REASON_WAITING_FOR_CALIBRATION:
                new = states.waiting_for_calibration(status, reason, message, view.generation, self.clock())
            else:
                new = states.queued(status, reason, message, view.generation, self.clock())
            await self.rt.write_status(view, new, self.rt.api_pool)

    async def _launch(self, view: RequestView) -> None:
        async with self.rt.lock(view.key):
            try:
                await self._launch_locked(view)
            except Exception:
                # Not launched: the next scheduler pass (at most TICK_SECONDS away) retries.
                self.launched.pop(view.key, None)
                raise

    async def _launch_locked(self, view: RequestView) -> None:
        status = self.rt.current_status(view)
        if states.phase_of(status) not in (states.PENDING, states.QUEUED) or view.spec is None:
            return
        pool = self.rt.launch_pool
        image = await self._admit(view, pool)
        if image is None:
            return
        choice = self.bank_choice(view, view.spec)
        if choice.action == banks.REJECT:
            await self._reject_locked(view, status, choice.reason, choice.message)
            return
        if choice.action == banks.WAIT:
            # The bank went away between the pass and now: wait again (the next pass decides).
            self.launched.pop(view.key, None)
            waiting = states.waiting_for_calibration(
                status, choice.reason, choice.message, view.generation, self.clock()
            )
            await self.rt.write_status(view, waiting, pool)
            return
        try:
            await launching.launch(self.rt, view, view.spec, image, choice)
        except LaunchFailedError as failed:
            await self._launch_failed(view, failed)

    async def _launch_failed(self, view: RequestView, failed: LaunchFailedError) -> None:
        status = self.rt.current_status(view)
        pool = self.rt.launch_pool
        written = await completion.finish_failed(
            self.rt, view, status, failed.reason, failed.message, job=None, pool=pool
        )
        self._completed(view, written)

    async def _resume(self, view: RequestView) -> None:
        """Finish a launch whose Job is recorded in status but was not confirmed created."""
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if states.phase_of(status) != states.RUNNING or states.job_created(status) or view.spec is None:
                return
            decision = admit(view.spec, self.settings)
            try:
                if not isinstance(decision, Admitted):
                    raise LaunchFailedError(decision.reason, decision.message)
                await launching.resume(self.rt, view, view.spec, decision.image)
            except LaunchFailedError as failed:
                await self._launch_failed(view, failed)

    # ---- job events -----------------------------------------------------------
    async def on_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        job = job_view(body)
        view = self.view((job.namespace, job.request))
        if view is None or view.deleting or view.uid != job.owner_uid:
            return  # the request is gone (garbage collection removes the Job) or this is not its Job
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if states.is_terminal(status):
                return
            phase = states.phase_of(status)
            if phase in (None, states.PENDING, states.QUEUED):
                if event_type != "DELETED":
                    await self._foreign_job(view, job.name)
            elif status.get("jobName") != job.name:
                return  # not the Job status names (finish would say so; nothing of ours changed)
            elif event_type == "DELETED":
                self._completed(view, await completion.fail_without_job(self.rt, view, status, job.name))
            elif job.outcome != JOB_RUNNING:
                self._completed(view, await completion.finish(self.rt, view, dict(body)))
        if event_type == "DELETED" or job.outcome != JOB_RUNNING:
            self.schedule()

    # ---- periodic -------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.tick()
            except Exception:
                self.metrics.handler_errors.labels(handler="tick").inc()
                log.exception("periodic check failed")

    def _views(self) -> Iterable[RequestView]:
        if self.requests is None:
            return []
        return [v for key in list(self.requests.keys()) if (v := self.view(key)) is not None]

    async def on_calibration(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        await self.calibrations.on_calibration(event_type, body)

    async def on_calibration_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        await self.calibrations.on_job(event_type, body)

    async def tick(self) -> None:
        """Phase gauges, the oldest wait, bank ages, the retries (see the module docstring), pending-pod alerts,
        and a scheduler pass."""
        if self.requests is None:
            return
        await self.calibrations.tick(self.clock())
        counts: dict[str, int] = {}
        oldest: dict[str, float] = {}
        now = self.clock()
        for view in self._views():
            status = self.rt.current_status(view)
            phase = states.phase_of(status) or states.PENDING
            counts[phase] = counts.get(phase, 0) + 1
            if phase in (states.PENDING, states.QUEUED) and (created := parse_time(view.created)) is not None:
                oldest[phase] = max(oldest.get(phase, 0.0), (now - created).total_seconds())
            job = self.job_of(view)
            named = job if job is not None and job.name == status.get("jobName") else None
            if phase == states.RUNNING:
                self._check_running(view, status, named)
            elif (
                phase in states.TERMINAL_PHASES
                and named is not None
                and named.outcome != JOB_RUNNING
                and named.ttl is None
            ):
                pool = self.rt.api_pool
                self.rt.retry(view.key, "ttl", completion.set_ttl(self.rt, view, named.name, pool))
        self.metrics.set_phase_counts(counts)
        self.metrics.set_oldest_waiting(oldest)
        self.schedule()

    def _check_running(self, view: RequestView, status: dict[str, Any], job: JobView | None) -> None:
        if not states.job_created(status):
            if view.key not in self.launched:
                self.rt.retry(view.key, "resume", self._resume(view))
        elif job is None or job.outcome != JOB_RUNNING:
            # The Job ended (or is gone) and its completion was not recorded: kopf does not retry events.
            self.rt.retry(view.key, "finish", self._finish_again(view))
        else:
            self.rt.spawn(self._check_pending(view, job), "pending")

    async def _finish_again(self, view: RequestView) -> None:
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            name = status.get("jobName", "")
            if states.phase_of(status) != states.RUNNING or not name:
                return
            body = await self.rt.call(self.rt.launch_pool, self.kube.read_job, view.namespace, name)
            try:
                if body is None:
                    self._completed(view, await completion.fail_without_job(self.rt, view, status, name))
                elif job_outcome(body) != JOB_RUNNING:
                    self._completed(view, await completion.finish(self.rt, view, body))
            except completion.AuditNotWrittenError as error:
                # Counted by the audit-write metrics and alerted on there; retried at the next check.
                log.warning("%s/%s: %s (retried)", view.namespace, view.name, error)
        self.schedule()

    async def _check_pending(self, view: RequestView, job: JobView) -> None:
        await self.rt.check_pending(
            view,
            job,
            view.spec.job.queue_name if view.spec is not None else None,
            running=lambda status: states.phase_of(status) == states.RUNNING,
            pending=states.pod_pending,
            started=states.pod_started,
        )
