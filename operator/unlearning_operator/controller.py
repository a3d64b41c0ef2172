"""The reconciler: routes kopf's events to the operations and runs the scheduler.

main.py feeds it kopf events and kopf indexes; it decides nothing itself.
What each piece does, and where:

* views.py: the index values (a request's parsed spec, or why it is invalid);
* runtime.py: API calls on named thread pools, per-request locks, the status
  cache, Events, background tasks;
* scheduling.py: which request starts (this module coalesces the passes);
* launching.py / completion.py: the two long operations;
* status.py, failures.py, jobs.py, lineage.py, metrics.py: the pure decisions.

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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from unlearning_contracts.spec import UnlearningRequestSpec

from . import completion, failures, launching
from . import status as states
from .jobs import ImageNotAllowedError, model_version_of, resolve_image
from .k8s import Kube
from .metrics import Metrics
from .results import JOB_RUNNING
from .runtime import Runtime
from .scheduling import Candidate, decide
from .settings import OperatorSettings
from .views import JobView, Key, RequestView, job_view, parse_time, request_view, values

log = logging.getLogger("unlearning_operator")

TICK_SECONDS = 5.0
# Coalescing window of scheduler passes: small next to the 1 s launch target.
SCHEDULE_DELAY = 0.05


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

    def __post_init__(self) -> None:
        self.rt = Runtime(settings=self.settings, kube=self.kube, metrics=self.metrics, clock=self.clock)

    # ---- plumbing -------------------------------------------------------------
    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self.rt.tasks

    def bind(self, requests: Mapping[Any, Any], jobs: Mapping[Any, Any]) -> None:
        self.requests = requests
        self.jobs = jobs

    def start(self) -> None:
        self.ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)
        await self.rt.stop()

    def view(self, key: Key) -> RequestView | None:
        views = values(self.requests, key)
        return views[0] if views else None

    def job_of(self, view: RequestView) -> JobView | None:
        for job in values(self.jobs, view.key):
            if job.owner_uid == view.uid:
                return job  # type: ignore[no-any-return]
        return None

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
            accepted = await self._validate(view, status, pool)
            if accepted is None:
                return
            job = self.job_of(view)
            if job is not None:
                await self._adopt(view, accepted[0], job)
            elif phase is None or status.get("observedGeneration") != view.generation:
                await self.rt.write_status(view, states.pending(status, view.generation, self.clock()), pool)
            return
        if phase == states.RUNNING and self.job_of(view) is None:
            name = status.get("jobName", "")
            if name and await self.rt.call(pool, self.kube.read_job, view.namespace, name) is None:
                self._completed(view, await completion.fail_without_job(self.rt, view, status, name))

    async def _validate(
        self, view: RequestView, status: dict[str, Any], pool: ThreadPoolExecutor
    ) -> tuple[UnlearningRequestSpec, str] | None:
        """The typed spec and the image its Job runs, or None after marking the request Rejected."""
        reason = states.REASON_INVALID_SPEC
        message = view.spec_error or ""
        if view.spec is not None:
            try:
                return view.spec, resolve_image(view.spec, self.settings)
            except ImageNotAllowedError as error:
                reason, message = states.REASON_IMAGE_NOT_ALLOWED, str(error)
        self.launched.pop(view.key, None)
        rejected = states.rejected(status, reason, message, view.generation, self.clock())
        if await self.rt.write_status(view, rejected, pool):
            await self.rt.event(view, "Warning", "Rejected", message)
        return None

    async def _adopt(self, view: RequestView, spec: UnlearningRequestSpec, job: JobView) -> None:
        """A Job exists but status does not say so (we stopped between create and patch)."""
        pool = self.rt.api_pool
        body = await self.rt.call(pool, self.kube.read_job, view.namespace, job.name)
        if body is None:
            return
        current = (await launching.current_lineage(self.rt, view, spec, pool)).current
        new = states.running(
            self.rt.current_status(view),
            job_name=job.name,
            attempt=1,
            model_version=model_version_of(body, default=1),
            input_model={"uri": current.uri, "sha256": current.sha256},
            generation=view.generation,
            now=self.clock(),
        )
        self.launched[view.key] = view.uid
        await self.rt.write_status(view, new, pool)

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
            candidates.append(
                Candidate(
                    namespace=view.namespace,
                    name=view.name,
                    model=view.model,
                    created=view.created,
                    phase=phase,
                    job_active=job is not None and job.outcome == JOB_RUNNING,
                )
            )
        for decision in decide(candidates, self.settings.max_concurrent_jobs):
            key = (decision.namespace, decision.name)
            view = views[key]
            if decision.start:
                self.launched[key] = view.uid
                self.queued_messages.pop(key, None)
                self.rt.spawn(self._launch(view), "launch")
            elif self.queued_messages.get(key) != decision.message:
                self.queued_messages[key] = decision.message
                self.rt.spawn(self._queue(view, decision.reason, decision.message), "queue")

    async def _queue(self, view: RequestView, reason: str, message: str) -> None:
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if (
                states.phase_of(status) not in (states.PENDING, states.QUEUED)
                or self.launched.get(view.key) == view.uid
            ):
                return
            queued = states.queued(status, reason, message, view.generation, self.clock())
            await self.rt.write_status(view, queued, self.rt.api_pool)

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
        if states.phase_of(status) not in (states.PENDING, states.QUEUED):
            return
        pool = self.rt.launch_pool
        accepted = await self._validate(view, status, pool)
        if accepted is None:
            return
        spec, image = accepted
        try:
            await launching.launch(self.rt, view, spec, image)
        except launching.BrokenLineageError as error:
            reason = states.REASON_ERROR
            written = await completion.finish_failed(self.rt, view, status, reason, str(error), job=None, pool=pool)
            self._completed(view, written)

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
            if event_type == "DELETED":
                self._completed(view, await completion.fail_without_job(self.rt, view, status, job.name))
            elif job.outcome != JOB_RUNNING:
                self._completed(view, await completion.finish(self.rt, view, dict(body)))
            elif states.phase_of(status) in (states.PENDING, states.QUEUED):
                accepted = await self._validate(view, status, self.rt.api_pool)
                if accepted is not None:
                    await self._adopt(view, accepted[0], job)
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

    async def tick(self) -> None:
        """Phase gauges, the oldest wait, pending-pod alerts, and a scheduler pass (retries failed launches)."""
        if self.requests is None:
            return
        counts: dict[str, int] = {}
        oldest: dict[str, float] = {}
        running: list[RequestView] = []
        now = self.clock()
        for view in self._views():
            phase = states.phase_of(self.rt.current_status(view)) or states.PENDING
            counts[phase] = counts.get(phase, 0) + 1
            if phase == states.RUNNING:
                running.append(view)
            elif phase in (states.PENDING, states.QUEUED) and (created := parse_time(view.created)) is not None:
                oldest[phase] = max(oldest.get(phase, 0.0), (now - created).total_seconds())
        self.metrics.set_phase_counts(counts)
        self.metrics.set_oldest_waiting(oldest)
        for view in running:
            job = self.job_of(view)
            if job is not None and job.outcome == JOB_RUNNING:
                self.rt.spawn(self._check_pending(view, job), "pending")
        self.schedule()

    async def _check_pending(self, view: RequestView, job: JobView) -> None:
        now = self.clock()
        threshold = self.settings.pending_alert_seconds
        pods: list[dict[str, Any]] = []
        if failures.needs_pods(job, now, threshold):
            pods = await self.rt.call(self.rt.api_pool, self.kube.job_pods, view.namespace, job.name)
        queue = view.spec.job.queue_name if view.spec is not None else None
        check = failures.pending_check(job, pods, queue, now, threshold)
        if check is None:
            return
        async with self.rt.lock(view.key):
            status = self.rt.current_status(view)
            if states.phase_of(status) != states.RUNNING:
                return
            before = states.get_condition(status, states.POD_PENDING)
            if check.alert is not None:
                alert = check.alert
                if before is not None and before["status"] == "True" and before["reason"] == alert.reason:
                    return  # already raised; the message's wait time is not worth a write every tick
                await self.rt.write_status(
                    view, states.pod_pending(status, alert.reason, alert.message, now), self.rt.api_pool
                )
                await self.rt.event(view, "Warning", alert.reason, alert.message)
            elif check.started:
                await self.rt.write_status(view, states.pod_started(status, now), self.rt.api_pool)
