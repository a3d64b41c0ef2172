"""The reconciler: gathers inputs, calls the pure modules, applies the result.

main.py feeds it kopf events and kopf indexes; it decides nothing itself
(validation: unlearning_contracts.spec; which request starts: scheduling; manifests:
jobs/audit/lineage; status: status; failure words: failures) and does its
API calls through k8s.Kube in a thread pool.

Concurrency model, and why:

* Everything that reads the indexes runs on the kopf event loop, so the
  indexes never change under an iteration.
* Each request has an asyncio.Lock; launching it, finishing it and queueing
  it take that lock, so a Job that ends within milliseconds of its creation
  (the benchmark's canned pods do) cannot have its Succeeded status
  overwritten by the launch's Running patch.
* The operator is the only writer of status, so the status it last wrote is
  the newest one: ``current_status`` prefers it over the index, which lags
  by one watch event. After a restart the cache is empty and kopf fills the
  indexes completely before any handler runs, so the scheduler never sees a
  half-listed cluster (and never starts a second request on a busy model).
* A request chosen to start is marked ``launched`` before any await, so two
  scheduler passes in a row cannot start it (or its model) twice.

No finalizers: only ``on.event`` handlers and indexes are used, which kopf
runs without one, and a periodic task (not kopf timers, which would add a
finalizer) checks pending pods.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from unlearning_contracts.api import API_GROUP_VERSION, REQUEST
from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import SpecError, UnlearningRequestSpec, parse_spec

from . import failures
from . import lineage as lin
from . import status as st
from .audit import build_audit_configmap
from .jobs import GPU_RESOURCE, ImageNotAllowedError, RequestRef, build_job, build_spec_configmap, resolve_image
from .k8s import ApiError, Kube, ObjectRef
from .labels import LABEL_REQUEST
from .metrics import Metrics, gate_labels
from .names import audit_configmap_name
from .scheduling import Candidate, decide
from .settings import OperatorSettings

log = logging.getLogger("unlearning_operator")

T = TypeVar("T")
Key = tuple[str, str]

TICK_SECONDS = 5.0
# Coalescing window of scheduler passes: small next to the 1 s launch target.
SCHEDULE_DELAY = 0.05
_LANE: contextvars.ContextVar[str] = contextvars.ContextVar("unlearning_lane", default="")
LINEAGE_RETRIES = 5


@dataclass(frozen=True)
class RequestView:
    """What the operator keeps of a request (the request index's value)."""

    namespace: str
    name: str
    uid: str
    created: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    deleting: bool = False

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def model(self) -> str:
        model = self.spec.get("model")
        return str(model.get("name", "")) if isinstance(model, dict) else ""

    @property
    def ref(self) -> RequestRef:
        return RequestRef(name=self.name, namespace=self.namespace, uid=self.uid)

    @property
    def object_ref(self) -> ObjectRef:
        return ObjectRef(API_GROUP_VERSION, REQUEST.kind, self.name, self.namespace, self.uid)


@dataclass(frozen=True)
class JobView:
    """What the operator keeps of a Job it made (the job index's value)."""

    namespace: str
    name: str
    request: str
    owner_uid: str
    created: str
    outcome: str
    active: int
    ready: int
    suspended: bool


def request_view(body: Mapping[str, Any]) -> RequestView:
    metadata = body.get("metadata") or {}
    return RequestView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        created=str(metadata.get("creationTimestamp", "")),
        generation=int(metadata.get("generation", 1) or 1),
        spec=copy.deepcopy(dict(body.get("spec") or {})),
        status=copy.deepcopy(dict(body.get("status") or {})),
        deleting=bool(metadata.get("deletionTimestamp")),
    )


def job_view(body: Mapping[str, Any]) -> JobView:
    metadata = body.get("metadata") or {}
    owners = metadata.get("ownerReferences") or []
    owner_uid = next((str(o.get("uid", "")) for o in owners if o.get("kind") == REQUEST.kind), "")
    status = body.get("status") or {}
    return JobView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        request=str((metadata.get("labels") or {}).get(LABEL_REQUEST, "")),
        owner_uid=owner_uid,
        created=str(metadata.get("creationTimestamp", "")),
        outcome=failures.job_outcome(dict(body)),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        suspended=bool((body.get("spec") or {}).get("suspend")),
    )


def _values(index: Mapping[Any, Any] | None, key: Any) -> list[Any]:
    if index is None or key not in index:
        return []
    return list(index[key])


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Controller:
    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    clock: Callable[[], datetime] = st.now_utc
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(12, "unlearning-api"))
    launch_executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, "unlearning-launch"))
    requests: Mapping[Any, Any] | None = None
    jobs: Mapping[Any, Any] | None = None
    statuses: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    launched: dict[Key, str] = field(default_factory=dict)
    queued_messages: dict[Key, str] = field(default_factory=dict)
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    ticker: asyncio.Task[None] | None = None
    pass_requested: bool = False
    known_lineages: set[Key] = field(default_factory=set)

    # ---- plumbing -------------------------------------------------------------
    def bind(self, requests: Mapping[Any, Any], jobs: Mapping[Any, Any]) -> None:
        self.requests = requests
        self.jobs = jobs

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        # Launches and results get their own threads: when a burst of requests
        # arrives, the ones that may start (or just ended) must not wait behind
        # the Pending/Queued status writes of all the others.
        executor = self.launch_executor if _LANE.get() == "launch" else self.executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def spawn(self, coro: Any, handler: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                self.metrics.handler_errors.labels(handler=handler).inc()
                log.exception("%s failed", handler)

        task = asyncio.create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start(self) -> None:
        self.ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, *([self.ticker] if self.ticker else []), return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.launch_executor.shutdown(wait=False, cancel_futures=True)

    def view(self, key: Key) -> RequestView | None:
        views = _values(self.requests, key)
        return views[0] if views else None

    def job_of(self, view: RequestView) -> JobView | None:
        for job in _values(self.jobs, view.key):
            if job.owner_uid == view.uid:
                return job  # type: ignore[no-any-return]
        return None

    def current_status(self, view: RequestView) -> dict[str, Any]:
        cached = self.statuses.get(view.key)
        if cached is not None and cached[0] == view.uid:
            return cached[1]
        return view.status

    async def write_status(self, view: RequestView, new: dict[str, Any]) -> bool:
        """Patch only what changed; remember what we wrote (we are the only writer)."""
        patch = st.status_patch(self.current_status(view), new)
        if patch is None:
            return True
        ok = await self.call(self.kube.patch_request_status, view.namespace, view.name, patch)
        if ok:
            self.statuses[view.key] = (view.uid, new)
        return ok

    async def event(self, view: RequestView, type_: str, reason: str, message: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Never on a launch thread: an Event is not worth delaying a Job for.
            await loop.run_in_executor(
                self.executor, self.kube.post_event, view.object_ref, type_, reason, message, self.clock()
            )
        except ApiError as error:
            # An Event is a courtesy; the status already says the same.
            log.warning("could not post Event %s on %s/%s: %s", reason, view.namespace, view.name, error)

    def forget(self, key: Key) -> None:
        self.statuses.pop(key, None)
        self.launched.pop(key, None)
        self.queued_messages.pop(key, None)
        self.locks.pop(key, None)

    # ---- request events -------------------------------------------------------
    async def on_request(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        view = request_view(body)
        if event_type == "DELETED" or view.deleting:
            self.forget(view.key)
            self.schedule()
            return
        async with self.lock(view.key):
            await self._reconcile(view)
        # A pass only when the answer can change: a request to place, a slot or
        # model freed, or the initial listing after a start. Our own Queued and
        # Running writes come back as events too, and need none.
        phase = st.phase_of(self.current_status(view))
        if event_type is None or phase == st.PENDING or phase in st.TERMINAL_PHASES:
            self.schedule()

    async def _reconcile(self, view: RequestView) -> None:
        status = self.current_status(view)
        if st.is_terminal(status):
            return
        phase = st.phase_of(status)
        now = self.clock()
        if phase in (None, st.PENDING, st.QUEUED):
            spec = await self._validate(view, status)
            if spec is None:
                return
            job = self.job_of(view)
            if job is not None:
                await self._adopt(view, spec, job)
            elif phase is None or status.get("observedGeneration") != view.generation:
                await self.write_status(view, st.pending(status, view.generation, now))
            return
        if phase == st.RUNNING and self.job_of(view) is None:
            name = status.get("jobName", "")
            if name and await self.call(self.kube.read_job, view.namespace, name) is None:
                await self._fail_without_job(view, status, name)

    async def _validate(self, view: RequestView, status: dict[str, Any]) -> UnlearningRequestSpec | None:
        """The typed spec, or None after marking the request Rejected."""
        try:
            spec = parse_spec(view.spec)
            resolve_image(spec, self.settings)
        except (SpecError, ImageNotAllowedError) as error:
            reason = st.REASON_IMAGE_NOT_ALLOWED if isinstance(error, ImageNotAllowedError) else st.REASON_INVALID_SPEC
            message = str(error)
            self.launched.pop(view.key, None)
            if await self.write_status(view, st.rejected(status, reason, message, view.generation, self.clock())):
                await self.event(view, "Warning", "Rejected", message)
            return None
        return spec

    async def _adopt(self, view: RequestView, spec: UnlearningRequestSpec, job: JobView) -> None:
        """A Job exists but status does not say so (we stopped between create and patch)."""
        body = await self.call(self.kube.read_job, view.namespace, job.name)
        if body is None:
            return
        version = int((body["metadata"].get("annotations") or {}).get("unlearn.dev/model-version", "1"))
        current = await self._lineage(view, spec)
        status = self.current_status(view)
        new = st.running(
            status,
            job_name=job.name,
            attempt=1,
            model_version=version,
            input_model={"uri": current.current.uri, "sha256": current.current.sha256},
            generation=view.generation,
            now=self.clock(),
        )
        self.launched[view.key] = view.uid
        await self.write_status(view, new)

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
            phase = st.phase_of(self.current_status(view))
            if phase in st.TERMINAL_PHASES:
                continue  # neither waiting nor holding a slot; most of a drained burst
            views[key] = view
            if self.launched.get(key) == view.uid:
                phase = st.RUNNING
            job = self.job_of(view)
            candidates.append(
                Candidate(
                    namespace=view.namespace,
                    name=view.name,
                    model=view.model,
                    created=view.created,
                    phase=phase,
                    job_active=job is not None and job.outcome == failures.JOB_RUNNING,
                )
            )
        for decision in decide(candidates, self.settings.max_concurrent_jobs):
            key = (decision.namespace, decision.name)
            view = views[key]
            if decision.start:
                self.launched[key] = view.uid
                self.queued_messages.pop(key, None)
                self.spawn(self._launch(view), "launch")
            elif self.queued_messages.get(key) != decision.message:
                self.queued_messages[key] = decision.message
                self.spawn(self._queue(view, decision.reason, decision.message), "queue")

    async def _queue(self, view: RequestView, reason: str, message: str) -> None:
        async with self.lock(view.key):
            status = self.current_status(view)
            if st.phase_of(status) not in (st.PENDING, st.QUEUED) or self.launched.get(view.key) == view.uid:
                return
            await self.write_status(view, st.queued(status, reason, message, view.generation, self.clock()))

    async def _lineage(self, view: RequestView, spec: UnlearningRequestSpec) -> lin.Lineage:
        """The model's lineage; creates version 0 from this request's source if new.

        For a model this process has not seen, create first (one round trip
        when the model is new; a 409 reads the existing history instead).
        """
        key = (view.namespace, spec.model.name)
        existing = None
        if key in self.known_lineages:
            existing = await self.call(self.kube.read_configmap, view.namespace, lin.lineage_name(spec.model.name))
        if existing is not None:
            return lin.parse(existing)
        fresh = lin.initial(spec, view.name)
        found, created = await self.call(self.kube.create_if_absent, lin.build_lineage_configmap(fresh, view.namespace))
        self.known_lineages.add(key)
        return fresh if created else lin.parse(found)

    async def _launch(self, view: RequestView) -> None:
        _LANE.set("launch")  # this task's context only
        async with self.lock(view.key):
            try:
                await self._launch_locked(view)
            except Exception:
                # Not launched: the next scheduler pass (at most TICK_SECONDS away) retries.
                self.launched.pop(view.key, None)
                raise

    async def _launch_locked(self, view: RequestView) -> None:
        status = self.current_status(view)
        if st.phase_of(status) not in (st.PENDING, st.QUEUED):
            return
        spec = await self._validate(view, status)
        if spec is None:
            return
        try:
            lineage = await self._lineage(view, spec)
        except ValueError as error:
            await self._finish_failed(view, status, st.REASON_ERROR, f"{error}: repair or delete it", None)
            return
        current = lineage.current
        # The spec ConfigMap and the Job in parallel: the pod's volume waits for
        # the ConfigMap anyway, and one round trip less matters in a burst.
        results = await asyncio.gather(
            self.call(self.kube.create_if_absent, build_spec_configmap(view.ref, spec, current)),
            self.call(self.kube.create_if_absent, build_job(view.ref, spec, self.settings, current)),
        )
        job, created = results[1]
        owners = {o.get("uid") for o in job["metadata"].get("ownerReferences") or []}
        if view.uid not in owners:
            raise RuntimeError(f"Job {job['metadata']['name']} exists but belongs to another object")
        version = int(job["metadata"].get("annotations", {}).get("unlearn.dev/model-version", current.version + 1))
        now = self.clock()
        new = st.running(
            status,
            job_name=job["metadata"]["name"],
            attempt=1,
            model_version=version,
            input_model={"uri": current.uri, "sha256": current.sha256},
            generation=view.generation,
            now=now,
        )
        if not await self.write_status(view, new):
            return
        log.info(
            "Job %s for %s/%s (model version %d -> %d)",
            new["jobName"],
            view.namespace,
            view.name,
            current.version,
            version,
        )
        if created:
            created_at = _parse_time(view.created)
            if created_at is not None:
                self.metrics.queue_wait.observe(max(0.0, (now - created_at).total_seconds()))
            # Posted after the lock is released: an Event must not delay the next state change.
            message = f"created Job {new['jobName']} from model version {current.version}"
            self.spawn(self.event(view, "Normal", "JobCreated", message), "event")

    # ---- job events -----------------------------------------------------------
    async def on_job(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        job = job_view(body)
        view = self.view((job.namespace, job.request))
        if view is None or view.deleting or view.uid != job.owner_uid:
            return  # the request is gone (garbage collection removes the Job) or this is not its Job
        async with self.lock(view.key):
            status = self.current_status(view)
            if st.is_terminal(status):
                return
            if event_type == "DELETED":
                await self._fail_without_job(view, status, job.name)
            elif job.outcome != failures.JOB_RUNNING:
                # Finishing shares the launch threads: a result should not wait
                # behind a burst of Pending/Queued writes either.
                token = _LANE.set("launch")
                try:
                    await self._finish(view, dict(body))
                finally:
                    _LANE.reset(token)
            elif st.phase_of(status) in (st.PENDING, st.QUEUED):
                spec = await self._validate(view, status)
                if spec is not None:
                    await self._adopt(view, spec, job)
        if event_type == "DELETED" or job.outcome != failures.JOB_RUNNING:
            self.schedule()

    async def _fail_without_job(self, view: RequestView, status: dict[str, Any], job_name: str) -> None:
        message = (
            f"Job {job_name} was deleted before it finished: its result is lost. "
            "Create a new UnlearningRequest to run again"
        )
        await self._finish_failed(view, status, st.REASON_JOB_DELETED, message, None)

    async def _finish(self, view: RequestView, job: dict[str, Any]) -> None:
        status = self.current_status(view)
        name = job["metadata"]["name"]
        outcome = failures.job_outcome(job)
        pods = await self.call(self.kube.job_pods, view.namespace, name)
        pod = failures.latest_terminated_pod(pods)
        message = (failures.terminated(pod) or {}).get("message") if pod else None
        base = dict(status)
        base["jobName"] = name
        base.setdefault("startTime", job["metadata"].get("creationTimestamp"))
        try:
            record = failures.parse_record(message)
        except failures.MalformedResultError as error:
            if outcome == failures.JOB_SUCCEEDED:
                await self._finish_failed(view, base, st.REASON_BAD_RESULT, str(error), job)
            else:
                why = failures.explain_failure(job, pods)
                await self._finish_failed(view, base, why.reason, why.message, job)
            return
        new = st.finished(base, record, self.clock())
        spec = parse_spec(view.spec)
        await self._advance_lineage(view, spec, record)
        await self._complete(view, spec, new, record, job)

    async def _advance_lineage(self, view: RequestView, spec: UnlearningRequestSpec, record: CompactRecord) -> None:
        for _ in range(LINEAGE_RETRIES):
            name = lin.lineage_name(spec.model.name)
            existing = await self.call(self.kube.read_configmap, view.namespace, name)
            current = lin.initial(spec, view.name) if existing is None else lin.parse(existing)
            advanced = lin.advance(current, record, view.name)
            if advanced == current and existing is not None:
                return
            manifest = lin.build_lineage_configmap(advanced, view.namespace)
            try:
                if existing is None:
                    await self.call(self.kube.create_if_absent, manifest)
                else:
                    manifest["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                    await self.call(self.kube.replace_configmap, manifest)
                return
            except ApiError as error:
                if error.status != 409:
                    raise
        raise RuntimeError(f"lineage of model {spec.model.name}: gave up after {LINEAGE_RETRIES} conflicting writes")

    async def _finish_failed(
        self, view: RequestView, status: dict[str, Any], reason: str, message: str, job: dict[str, Any] | None
    ) -> None:
        new = st.failed(status, reason, message, self.clock())
        try:
            spec: UnlearningRequestSpec | None = parse_spec(view.spec)
        except SpecError:
            spec = None
        await self._complete(view, spec, new, None, job)

    async def _complete(
        self,
        view: RequestView,
        spec: UnlearningRequestSpec | None,
        new: dict[str, Any],
        record: CompactRecord | None,
        job: dict[str, Any] | None,
    ) -> None:
        """Audit record first, then status: a status that names an audit ConfigMap never points at nothing."""
        if spec is not None:
            audit = build_audit_configmap(view.ref, spec, new, record)
            await self.call(self.kube.create_if_absent, audit)
            new = st.with_audit(new, audit_configmap_name(view.name, view.uid))
        if not await self.write_status(view, new):
            return
        self.launched.pop(view.key, None)
        self._observe(spec, new, record, job)
        if new["phase"] == st.SUCCEEDED:
            await self.event(view, "Normal", "Succeeded", new.get("message", ""))
        else:
            await self.event(view, "Warning", "Failed", new.get("message", ""))

    def _observe(
        self,
        spec: UnlearningRequestSpec | None,
        new: dict[str, Any],
        record: CompactRecord | None,
        job: dict[str, Any] | None,
    ) -> None:
        method = spec.method.name if spec is not None else "unknown"
        verdict = record.verdict if record is not None else "Error"
        self.metrics.completed.labels(verdict=verdict, method=method).inc()
        if new["phase"] != st.SUCCEEDED:
            reason = (st.get_condition(new, st.COMPLETE) or {}).get("reason", st.REASON_ERROR)
            self.metrics.job_failures.labels(reason=reason).inc()
        if record is not None:
            if record.post is not None:
                self.metrics.post_mia_auc.labels(method=method).observe(record.post.mia_auc)
                self.metrics.post_confidence_gap.labels(method=method).observe(record.post.confidence_gap)
            if record.pre is not None and record.post is not None:
                drop = record.pre.test_accuracy - record.post.test_accuracy
                self.metrics.test_accuracy_drop.labels(method=method).observe(drop)
            for gate in gate_labels(record):
                self.metrics.gate_failures.labels(gate=gate).inc()
        start = _parse_time(new.get("startTime"))
        end = _parse_time(new.get("completionTime"))
        if job is not None and start is not None and end is not None:
            seconds = max(0.0, (end - start).total_seconds())
            self.metrics.job_duration.labels(method=method).observe(seconds)
            containers = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
            gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)) for c in containers)
            if gpus:
                self.metrics.gpu_seconds.labels(method=method).inc(gpus * seconds)

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
        """Phase gauge, pending-pod alerts, and a scheduler pass (retries failed launches)."""
        if self.requests is None:
            return
        counts: dict[str, int] = {}
        running: list[RequestView] = []
        for view in self._views():
            phase = st.phase_of(self.current_status(view)) or st.PENDING
            counts[phase] = counts.get(phase, 0) + 1
            if phase == st.RUNNING:
                running.append(view)
        self.metrics.set_phase_counts(counts)
        for view in running:
            job = self.job_of(view)
            if job is not None and job.outcome == failures.JOB_RUNNING:
                self.spawn(self._check_pending(view, job), "pending")
        self.schedule()

    async def _check_pending(self, view: RequestView, job: JobView) -> None:
        now = self.clock()
        created = _parse_time(job.created)
        threshold = self.settings.pending_alert_seconds
        alert: failures.Explanation | None = None
        started = job.ready > 0
        if started:
            pass
        elif created is None or (now - created).total_seconds() < threshold:
            return
        elif job.suspended:
            queue = (view.spec.get("job") or {}).get("queueName", "?")
            alert = failures.Explanation(
                st.REASON_PENDING, f"the Job is suspended: waiting for Kueue to admit it (queue {queue})"
            )
        else:
            pods = await self.call(self.kube.job_pods, view.namespace, job.name)
            whys = [w for p in pods if (w := failures.pending_reason(p, now, threshold)) is not None]
            alert = whys[0] if whys else None
            started = alert is None and any((p.get("status") or {}).get("phase") == "Running" for p in pods)
        async with self.lock(view.key):
            status = self.current_status(view)
            if st.phase_of(status) != st.RUNNING:
                return
            before = st.get_condition(status, st.POD_PENDING)
            if alert is not None:
                if before is not None and before["status"] == "True" and before["reason"] == alert.reason:
                    return  # already raised; the message's wait time is not worth a write every tick
                await self.write_status(view, st.pod_pending(status, alert.reason, alert.message, now))
                await self.event(view, "Warning", alert.reason, alert.message)
            elif started:
                await self.write_status(view, st.pod_started(status, now))
