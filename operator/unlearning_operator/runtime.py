"""The operator's edges, shared by every operation: API calls, locks, the status cache, Events, tasks.

API calls are blocking (the kubernetes client's connection pool), so each
runs on a thread pool; the caller names the pool:

* ``launch_pool`` for launching a Job and finishing a request: when a burst
  of requests arrives, the ones that may start (or just ended) must not wait
  behind the Pending/Queued status writes of all the others;
* ``api_pool`` for everything else, Events included (an Event is a courtesy
  and never worth delaying a Job for).

The operator is the only writer of status, so the status it last wrote is
the newest one: ``current_status`` prefers it over the index, which lags by
one watch event. Each request has an asyncio.Lock; launching it, finishing
it and queueing it take that lock, so a Job that ends within milliseconds of
its creation cannot have its Succeeded status overwritten by the launch's
Running patch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from unlearning_contracts.api import REQUEST

from . import failures
from . import status as states
from .k8s import ApiError, Kube, ObjectRef
from .metrics import AUDIT_FAILED, AUDIT_WRITTEN, Metrics
from .settings import OperatorSettings
from .views import JobView, Key

StatusChange = Callable[..., dict[str, Any]]


class Viewed(Protocol):
    """What the runtime needs of an object's view (a RequestView or a CalibrationView)."""

    @property
    def key(self) -> Key: ...
    @property
    def uid(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def status(self) -> dict[str, Any]: ...
    @property
    def object_ref(self) -> ObjectRef: ...


log = logging.getLogger("unlearning_operator")

T = TypeVar("T")

# Threads per pool. The launch pool is smaller: it serves the few requests that
# may start at once (the concurrency cap) and the ones finishing.
API_THREADS = 12
LAUNCH_THREADS = 8


@dataclass
class Runtime:
    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    clock: Callable[[], datetime] = states.now_utc
    api_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(API_THREADS, "unlearning-api"))
    launch_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(LAUNCH_THREADS, "unlearning-launch")
    )
    statuses: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """The status last written per request, with the uid it was written for."""
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    known_lineages: set[Key] = field(default_factory=set)
    """(namespace, model) whose lineage ConfigMap this process has created or read."""
    ended_jobs: dict[Key, tuple[dict[str, Any], list[dict[str, Any]]]] = field(default_factory=dict)
    """A finished Job and its pods as last read, per request, until its completion is recorded: a Job
    deleted meanwhile (by a person: its TTL waits for the record) is finished from this copy."""
    retrying: set[tuple[Key, str]] = field(default_factory=set)
    """(request, what) retries the periodic check has in flight, so a slow one is not started twice."""
    unwritten_audits: set[Key] = field(default_factory=set)
    """Finished requests whose audit ConfigMap the last attempt could not write."""
    plural: str = REQUEST.plural
    """The kind whose status this runtime writes (one runtime per kind: the caches are keyed by name)."""

    async def call(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def spawn(self, coro: Coroutine[Any, Any, None], handler: str) -> None:
        """Run ``coro`` in the background; an error counts under ``handler`` and is logged."""

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                self.metrics.handler_errors.labels(handler=handler).inc()
                log.exception("%s failed", handler)

        task = asyncio.create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def current_status(self, view: Viewed) -> dict[str, Any]:
        cached = self.statuses.get(view.key)
        if cached is not None and cached[0] == view.uid:
            return cached[1]
        return view.status

    async def write_status(self, view: Viewed, new: dict[str, Any], pool: ThreadPoolExecutor) -> bool:
        """Patch only what changed; remember what we wrote (we are the only writer). False: the object is gone."""
        return await self.write_status_reading(view, new, pool) is not None

    async def write_status_reading(self, view: Viewed, new: dict[str, Any], pool: ThreadPoolExecutor) -> int | None:
        """``write_status``, returning the object's metadata.generation as the API server answered it
        (the view's when there was nothing to write), or None when the object is gone."""
        patch = states.status_patch(self.current_status(view), new)
        if patch is None:
            return view.generation
        answer = await self.call(pool, self.kube.patch_status, self.plural, view.namespace, view.name, patch)
        if answer is None:
            return None
        self.statuses[view.key] = (view.uid, new)
        return int((answer.get("metadata") or {}).get("generation") or view.generation)

    async def event(self, view: Viewed, type_: str, reason: str, message: str) -> None:
        try:
            await self.call(self.api_pool, self.kube.post_event, view.object_ref, type_, reason, message, self.clock())
        except ApiError as error:
            # An Event is a courtesy; the status already says the same.
            log.warning("could not post Event %s on %s/%s: %s", reason, view.namespace, view.name, error)

    def audit_written(self, key: Key, written: bool) -> None:
        """Count one audit ConfigMap write; the gauge counts the requests whose last write failed."""
        self.metrics.audit_writes.labels(result=AUDIT_WRITTEN if written else AUDIT_FAILED).inc()
        self._audit_unwritten(key, not written)

    def _audit_unwritten(self, key: Key, unwritten: bool) -> None:
        if unwritten:
            self.unwritten_audits.add(key)
        else:
            self.unwritten_audits.discard(key)
        self.metrics.audit_unwritten.set(len(self.unwritten_audits))

    def discard(self, key: Key) -> None:
        """Drop what is cached for a request that is gone."""
        self.statuses.pop(key, None)
        self.locks.pop(key, None)
        self.ended_jobs.pop(key, None)
        self._audit_unwritten(key, False)

    def retry(self, key: Key, what: str, coro: Coroutine[Any, Any, None]) -> None:
        """Spawn a retry unless the same one is still running (``what`` also labels its errors)."""
        token = (key, what)
        if token in self.retrying:
            coro.close()
            return
        self.retrying.add(token)

        async def once() -> None:
            try:
                await coro
            finally:
                self.retrying.discard(token)

        self.spawn(once(), what)

    async def check_pending(
        self,
        view: Viewed,
        job: JobView,
        queue: str | None,
        *,
        running: Callable[[dict[str, Any]], bool],
        pending: StatusChange,
        started: StatusChange,
    ) -> None:
        """Raise (or clear) the PodPending alert of a running Job's pods, for either kind: ``running`` says
        whether the object still runs, ``pending``/``started`` are its status module's changes."""
        now = self.clock()
        threshold = self.settings.pending_alert_seconds
        pods: list[dict[str, Any]] = []
        if failures.needs_pods(job, now, threshold):
            pods = await self.call(self.api_pool, self.kube.job_pods, view.namespace, job.name)
        check = failures.pending_check(job, pods, queue, now, threshold)
        if check is None:
            return
        async with self.lock(view.key):
            status = self.current_status(view)
            if not running(status):
                return
            before = states.get_condition(status, states.POD_PENDING)
            if check.alert is not None:
                alert = check.alert
                if before is not None and before["status"] == "True" and before["reason"] == alert.reason:
                    return  # already raised; the message's wait time is not worth a write every tick
                await self.write_status(view, pending(status, alert.reason, alert.message, now), self.api_pool)
                await self.event(view, "Warning", alert.reason, alert.message)
            elif check.started:
                await self.write_status(view, started(status, now), self.api_pool)

    def sibling(self, plural: str) -> Runtime:
        """A runtime for another kind: the same pools, client and metrics, its own caches and locks."""
        return Runtime(
            settings=self.settings,
            kube=self.kube,
            metrics=self.metrics,
            clock=self.clock,
            api_pool=self.api_pool,
            launch_pool=self.launch_pool,
            plural=plural,
        )

    async def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def stop(self) -> None:
        await self.cancel_tasks()
        self.api_pool.shutdown(wait=False, cancel_futures=True)
        self.launch_pool.shutdown(wait=False, cancel_futures=True)
