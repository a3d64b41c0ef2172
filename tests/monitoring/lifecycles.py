"""Request lifecycles driven through the operator's own code, scraped as Prometheus would.

The operator runs as in production: main.py's kopf handlers over a
Controller with the real metrics registry (``metrics.build_registry()``),
against the in-memory API of tests/operator (FakeKube; what is measured here
is the numbers on /metrics, which need no API server). The clock is
simulated. Every SCRAPE seconds the registry's text exposition
(``generate_latest``) is parsed and stored per series, with the target labels
a ServiceMonitor adds, to be fed to ``promtool test rules`` as input series.

Three UnlearningCalibrations run beside the requests (``CALIBRATIONS``): one
at the start, whose bank the later requests of its model use, and two after
the last request, one Ready and one whose fold fails; their folds Jobs are
driven as the Job controller would report an Indexed Job (completed indices,
then Complete or Failed), so the calibration panels show real fold
durations, phases, failures and bank ages.

The timeline has two operator restarts: the pod is replaced (new pod name,
so new series; the old ones go stale) and later its container restarts (same
series, counters reset). What happened while the operator was down it sees
at its next start, through kopf's initial listing (event type None).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.operator.factories import bank_record, raw_calibration, raw_spec, record
from tests.operator.test_controller import FakeKube
from unlearning_operator import calibration_status as cal
from unlearning_operator import main
from unlearning_operator import status as st
from unlearning_operator.banks import BankUse
from unlearning_operator.completion import AuditNotWrittenError
from unlearning_operator.controller import Controller
from unlearning_operator.k8s import ApiError
from unlearning_operator.labels import ANNOTATION_BANK
from unlearning_operator.metrics import Metrics, build_registry
from unlearning_operator.settings import OperatorSettings
from unlearning_operator.views import calibration_view, job_view, request_view

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# spec.output.location of tests/operator/factories.BASE_SPEC, where every Job writes.
OUTPUT = "pvc://models/digits/versions"
# The chart's ServiceMonitor interval (metrics.serviceMonitor.interval).
SCRAPE = 30
NAMESPACE = "team-a"
# What the chart's ServiceMonitor of release "unlearning" in namespace
# "unlearning" puts on every sample. job is the Service's name (the monitor
# sets no jobLabel); a PodMonitor's would be "unlearning/unlearning-unlearning-operator".
JOB = "unlearning-unlearning-operator-metrics"
TARGET = {
    "job": JOB,
    "namespace": "unlearning",
    "service": JOB,
    "endpoint": "metrics",
    "container": "operator",
}

Labels = tuple[tuple[str, str], ...]
# A stored value: a number, None (no sample at that scrape) or STALE (a staleness marker).
STALE = "stale"
Value = float | str | None

# The job's wording of a failed gate (unlearn.gates): "<metric> <value> > <gate> <limit>";
# the record names the failed gates themselves in failedGates, which the gate label comes from.
GATE_METRICS = {
    "maxForgetAccuracy": "forgetAccuracy",
    "maxTestAccuracyDrop": "testAccuracyDrop",
    "maxConfidenceGap": "|confidenceGap|",
    "maxMiaAuc": "miaAuc",
    "maxMiaClassifierAccuracy": "miaClassifierAccuracy",
}


@dataclass(frozen=True)
class Lifecycle:
    """One UnlearningRequest from creation to its ending; times in seconds after T0.

    ending: ``passed``, ``gates:<gate>,...`` (verdict Failed), ``invalid-input``,
    ``oom``, ``deadline``, ``crash``, ``malformed`` (no record), ``deleted``
    (the Job is deleted while it runs), ``audit-fails-10m`` (passes, but its
    audit ConfigMap cannot be created for ten minutes, as under a full
    ResourceQuota; the operator retries every tick).
    """

    name: str
    model: str
    method: str
    created: int
    runs: int
    ending: str
    gpus: int = 1
    auc: float = 0.52
    drop: float = 0.4


def _m(minutes: float) -> int:
    return int(minutes * 60)


# 23 lifecycles over three hours. Jobs of one model queue behind each other
# and at most 3 Jobs run at once, so requests wait. The endings cover every
# failure path the operator tells apart, and some label sets are first used
# only after a restart (salun's first "Error" comes after the pod was replaced).
LIFECYCLES = (
    Lifecycle("r01", "digits", "neggrad-plus", _m(1), _m(6), "passed", auc=0.51),
    Lifecycle("r02", "digits", "scrub", _m(2), _m(8), "passed", auc=0.55, drop=1.2),
    Lifecycle("r03", "cifar", "salun", _m(3), _m(25), "passed", gpus=2, auc=0.53),
    Lifecycle("r04", "resnet", "gradient-ascent", _m(4), _m(12), "gates:maxMiaAuc", auc=0.71, drop=0.8),
    Lifecycle("r05", "bert", "retrain", _m(5), _m(40), "passed", gpus=4, auc=0.5, drop=0.1),
    Lifecycle("r06", "digits", "neggrad-plus", _m(12), _m(5), "oom"),
    Lifecycle("r07", "digits", "neggrad-plus", _m(13), _m(4), "passed", auc=0.54),
    Lifecycle("r08", "resnet", "scrub", _m(20), _m(15), "passed", auc=0.56, drop=2.5),
    Lifecycle("r09", "cifar", "salun", _m(35), _m(10), "passed", auc=0.51),
    Lifecycle("r10", "digits", "gradient-ascent", _m(40), _m(6), "gates:maxTestAccuracyDrop", drop=6.0),
    Lifecycle("r11", "resnet", "neggrad-plus", _m(50), _m(20), "passed", auc=0.5),
    Lifecycle("r12", "mnist", "scrub", _m(45), _m(15), "audit-fails-10m", auc=0.52),
    # The pod is replaced at 85-87 min; r13 ends while no operator runs and is
    # finished by the new pod at start-up, before Prometheus first scrapes it.
    Lifecycle("r13", "digits", "salun", _m(75), _m(10), "passed", gpus=2, auc=0.5),
    Lifecycle("r14", "cifar", "salun", _m(90), _m(5), "deadline"),
    Lifecycle("r15", "digits", "retrain", _m(92), _m(12), "passed", gpus=4, auc=0.49, drop=0.0),
    Lifecycle("r16", "resnet", "gradient-ascent", _m(95), _m(7), "invalid-input"),
    Lifecycle("r17", "cifar", "scrub", _m(100), _m(9), "gates:maxForgetAccuracy,maxMiaAuc", auc=0.66),
    Lifecycle("r18", "bert", "neggrad-plus", _m(105), _m(6), "crash"),
    Lifecycle("r19", "digits", "neggrad-plus", _m(112), _m(8), "malformed"),
    # The container restarts at 135-136 min.
    Lifecycle("r20", "resnet", "salun", _m(142), _m(10), "deleted"),
    # r21 waits for r22's model for 88 minutes.
    Lifecycle("r22", "bert", "retrain", _m(150), _m(90), "passed", gpus=8, auc=0.5, drop=0.2),
    Lifecycle("r21", "bert", "gradient-ascent", _m(152), _m(14), "passed", auc=0.57, drop=1.8),
    Lifecycle("r23", "digits", "scrub", _m(160), _m(9), "oom"),
)


@dataclass(frozen=True)
class CalibrationCycle:
    """One UnlearningCalibration of K = 4 folds, two at a time (the operator's default parallelism).

    ``fold``: seconds each fold takes; ``ending``: ``ready``, or ``fold-failed`` (fold 2 exits 1
    three times: its retries used, the Indexed Job fails).
    """

    name: str
    model: str
    created: int
    fold: int
    ending: str
    merge: int = 30
    folds: int = 4
    parallelism: int = 2

    def fold_done(self, start: int, index: int) -> int:
        """When fold ``index`` ends: the folds run ``parallelism`` at a time, in index order."""
        return start + self.fold * (index // self.parallelism + 1)


# c01 runs while the first requests arrive (its folds and merge end before r02
# is created, so it never delays one: r01 finds a free slot beside its merge);
# r02 and the later digits requests use its bank. c02 and c03 run after the
# last request has ended.
CALIBRATIONS = (
    CalibrationCycle("c01", "digits", 0, 30, "ready"),
    CalibrationCycle("c02", "cifar", _m(300), _m(5), "ready"),
    CalibrationCycle("c03", "resnet", _m(330), _m(5), "fold-failed"),
)


@dataclass(frozen=True)
class Outage:
    """No operator runs in [start, end). ``new_pod``: the pod was replaced, else its container restarted."""

    start: int
    end: int
    new_pod: bool


OUTAGES = (Outage(_m(85), _m(87), new_pod=True), Outage(_m(135), _m(136), new_pod=False))
PODS = ("unlearning-unlearning-operator-6d9c7b5f4-x2k8p", "unlearning-unlearning-operator-6d9c7b5f4-q7hzm")
POD_IPS = ("10.42.0.17", "10.42.1.9")
# After the last ending the run goes on quietly, so that panels are read long after the last event.
END = _m(390)


@dataclass(frozen=True)
class Completion:
    """An ending the operator recorded (what the completion counters must show)."""

    at: int
    name: str
    verdict: str
    method: str
    reason: str
    calibrated: bool = False
    """The record's word: the run used a verified bank."""


@dataclass
class Run:
    """What the drive produced: every series Prometheus would store, and what happened when.

    ``series`` holds the operator's (its exposition plus ``up``) and one that
    kube-state-metrics would export, the container restart counter of the
    operator's pods, which is made here from the outages (no kube-state-metrics runs).
    """

    steps: int
    series: dict[Labels, list[Value]]
    completions: list[Completion]
    handler_errors: dict[str, int]
    launched: dict[str, int]
    # Times a new operator pod started: what it finished at start-up its first scrape already holds.
    new_pods: list[int]
    # Each calibration's phase as it ended, with when, and every fold duration (seconds) that succeeded.
    calibrations: dict[str, tuple[int, str]]
    fold_durations: dict[str, list[int]]

    @property
    def last_completion(self) -> int:
        return max(c.at for c in self.completions)


class ClockedKube(FakeKube):
    """FakeKube whose objects carry the simulated creation time, with failures injected by kind and name."""

    def __init__(self, now: list[datetime]) -> None:
        super().__init__()
        self.now = now
        self.fail_creates: dict[tuple[str, str], int] = {}
        self.fail_until: dict[tuple[str, str], datetime] = {}

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"].setdefault("creationTimestamp", st.timestamp(self.now[0]))
        return super()._stamp(obj)

    def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        objects = self.calibrations if plural == "unlearningcalibrations" else self.requests
        if name in objects:
            # Each write makes a new version of the object, as the API server's resourceVersion does.
            self.version += 1
            objects[name]["metadata"]["resourceVersion"] = str(self.version)
        return super().patch_status(plural, namespace, name, patch)

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        kind, name = obj["kind"], obj["metadata"]["name"]
        for (fail_kind, prefix), until in self.fail_until.items():
            if kind == fail_kind and name.startswith(prefix) and self.now[0] < until:
                raise ApiError(403, "Forbidden", f"exceeded quota: configmaps ({kind} {name})")
        for (fail_kind, prefix), left in self.fail_creates.items():
            if left and kind == fail_kind and name.startswith(prefix):
                self.fail_creates[(fail_kind, prefix)] = left - 1
                raise ApiError(500, "InternalError", f"etcdserver: request timed out ({kind} {name})")
        return super().create_if_absent(obj)


def job_record(cycle: Lifecycle, version: int, input_uri: str, bank: BankUse | None = None) -> dict[str, Any]:
    """The compact record the job writes to its termination message: for the Job's model, version and input,
    its output in the request's output folder (the operator checks all four against the Job)."""
    pre = {"forgetAccuracy": 100.0, "retainAccuracy": 99.5, "testAccuracy": 97.0, "confidenceGap": 0.08, "miaAuc": 0.7}
    post = {
        "forgetAccuracy": 60.0,
        "retainAccuracy": 99.0,
        "testAccuracy": round(97.0 - cycle.drop, 2),
        "confidenceGap": round((cycle.auc - 0.5) / 2, 3),
        "miaAuc": cycle.auc,
    }
    output = {"uri": f"{OUTPUT}/{cycle.model}-v{version}.pt2", "sha256": f"{version:064x}", "format": "exported"}
    fields: dict[str, Any] = {
        "model": cycle.model,
        "method": cycle.method,
        "modelVersion": version,
        "inputModel": {"uri": input_uri, "sha256": ""},
        "outputModel": output,
        "pre": pre,
        "post": post,
    }
    if bank is not None:
        fields["calibration"] = {**bank.dump(), "calibrated": True, "note": "bank verified: data digest matches"}
    if cycle.ending.startswith("gates:"):
        values = {"forgetAccuracy": 60.0, "testAccuracyDrop": cycle.drop, "miaAuc": cycle.auc}
        gates = cycle.ending.removeprefix("gates:").split(",")
        reasons = [f"{GATE_METRICS[gate]} {values.get(GATE_METRICS[gate], 0.0):.3f} > {gate} 0.600" for gate in gates]
        fields.update(verdict="Failed", exitCode=3, reasons=reasons, failedGates=gates)
        fields.pop("outputModel")
    elif cycle.ending == "invalid-input":
        fields.update(verdict="Failed", exitCode=4, error="forget index 70000 is out of range (60000 samples)")
        fields.pop("post")
        fields.pop("outputModel")
    return record(**fields).dump()


class Drive:
    """The cluster (FakeKube + kopf's indexes) and the operator process, on a simulated clock."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.now = [T0]
        self.kube = ClockedKube(self.now)
        self.settings = settings
        self.request_index: dict[tuple[str, str], list[Any]] = {}
        self.job_index: dict[tuple[str, str], list[Any]] = {}
        self.calibration_index: dict[tuple[str, str], list[Any]] = {}
        self.calibration_job_index: dict[tuple[str, str], list[Any]] = {}
        self.controller: Controller | None = None
        self.metrics: Metrics | None = None
        self.handler_errors: dict[str, int] = {}
        self.views: dict[str, tuple[str, Any]] = {}
        # Each request as its last event showed it (a watch delivers only changes).
        self.delivered: dict[str, str] = {}

    def sync(self) -> None:
        """Rebuild kopf's indexes from the API's objects (a view is reused while its object is unchanged)."""
        for index in (self.request_index, self.job_index, self.calibration_index, self.calibration_job_index):
            index.clear()
        for name, body in self.kube.requests.items():
            text = body["metadata"].get("resourceVersion", "")
            cached = self.views.get(name)
            if cached is None or cached[0] != text:
                cached = self.views[name] = (text, request_view(body))
            self.request_index[cached[1].key] = [cached[1]]
        for name, body in self.kube.calibrations.items():
            text = body["metadata"].get("resourceVersion", "")
            cached = self.views.get(name)
            if cached is None or cached[0] != text:
                cached = self.views[name] = (text, calibration_view(body))
            self.calibration_index[cached[1].key] = [cached[1]]
        for (kind, _), body in self.kube.objects.items():
            if kind == "Job":
                job = job_view(body)
                index = self.calibration_job_index if job.owner_kind == "UnlearningCalibration" else self.job_index
                index.setdefault((job.namespace, job.request), []).append(job)

    async def start(self) -> None:
        """A fresh process: a new registry, empty caches, then kopf's initial listing."""
        self.metrics = build_registry()
        self.controller = Controller(
            settings=self.settings, kube=self.kube, metrics=self.metrics, clock=lambda: self.now[0]
        )
        self.sync()
        for name, body in list(self.kube.requests.items()):
            self.delivered[name] = self.views[name][0]
            await self.deliver("request", None, body)
        for name, body in list(self.kube.calibrations.items()):
            self.delivered[name] = self.views[name][0]
            await self.deliver("calibration", None, body)
        for (kind, _), body in list(self.kube.objects.items()):
            if kind == "Job":
                await self.deliver(self.job_kind(body), None, body)
        await self.settle()

    @staticmethod
    def job_kind(body: dict[str, Any]) -> str:
        return "calibration-job" if job_view(body).owner_kind == "UnlearningCalibration" else "job"

    def objects_of(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.kube.calibrations if kind == "calibration" else self.kube.requests

    async def stop(self) -> None:
        assert self.controller is not None
        await self.controller.stop()
        self.controller = None
        self.metrics = None

    async def deliver(self, kind: str, event_type: str | None, body: dict[str, Any]) -> None:
        """One watch event through main.py's handler; an error is logged and dropped, as kopf does."""
        assert self.controller is not None
        handler = {
            "request": main.request_event,
            "job": main.job_event,
            "calibration": main.calibration_event,
            "calibration-job": main.calibration_job_event,
        }[kind]
        try:
            await handler(
                {"type": event_type},
                copy.deepcopy(body),
                kopf.Memo(controller=self.controller),
                request_index=self.request_index,
                job_index=self.job_index,
                calibration_index=self.calibration_index,
                calibration_job_index=self.calibration_job_index,
            )
        except (ApiError, AuditNotWrittenError):
            self.handler_errors[kind] = self.handler_errors.get(kind, 0) + 1

    async def settle(self) -> None:
        """Deliver an event for each request that changed since its last one, run the scheduler's
        pass and its tasks, and start the pods of new Jobs, until nothing changes."""
        assert self.controller is not None
        for _ in range(20):
            self.sync()
            changed = [
                (kind, name, text)
                for name, (text, _) in self.views.items()
                for kind in ("request", "calibration")
                if name in self.objects_of(kind) and self.delivered.get(name) != text
            ]
            for kind, name, text in changed:
                self.delivered[name] = text
                await self.deliver(kind, "MODIFIED", self.objects_of(kind)[name])
            self.sync()
            self.controller.run_schedule()
            while self.controller.tasks:
                await asyncio.gather(*list(self.controller.tasks))
            started = []
            for (kind, _), body in self.kube.objects.items():
                if kind == "Job" and "status" not in body:
                    # The Job controller creates the pods and they start.
                    pods = int(body["spec"].get("parallelism") or 1)
                    body["status"] = {"active": pods, "ready": pods}
                    started.append(body)
            self.sync()
            for body in started:
                await self.deliver(self.job_kind(body), "MODIFIED", body)
            if not changed and not started:
                self.sync()
                if all(self.delivered.get(name) == text for name, (text, _) in self.views.items()):
                    return

    def add(self, cycle: Lifecycle) -> dict[str, Any]:
        body = {
            "apiVersion": "unlearn.dev/v1alpha1",
            "kind": "UnlearningRequest",
            "metadata": {
                "name": cycle.name,
                "namespace": NAMESPACE,
                "uid": f"uid-{cycle.name}",
                "creationTimestamp": st.timestamp(self.now[0]),
                "generation": 1,
            },
            "spec": raw_spec(**{"model.name": cycle.model, "method": {"name": cycle.method}, "job.gpus": cycle.gpus}),
        }
        self.kube.requests[cycle.name] = body
        return body

    def add_calibration(self, cycle: CalibrationCycle) -> dict[str, Any]:
        body = {
            "apiVersion": "unlearn.dev/v1alpha1",
            "kind": "UnlearningCalibration",
            "metadata": {
                "name": cycle.name,
                "namespace": NAMESPACE,
                "uid": f"uid-{cycle.name}",
                "creationTimestamp": st.timestamp(self.now[0]),
                "generation": 1,
            },
            "spec": raw_calibration(**{"model.name": cycle.model, "folds": cycle.folds}),
        }
        self.kube.calibrations[cycle.name] = body
        return body

    def advance_calibration(self, cycle: CalibrationCycle, t: int) -> dict[str, Any] | None:
        """The folds Job (or merge Job) of a running calibration as the Job controller reports it at ``t``;
        its changed body (the watch event that follows), or None when nothing changed."""
        status = self.kube.calibrations[cycle.name].get("status") or {}
        if status.get("phase") == cal.MERGING:
            merge = self.kube.objects[("Job", status["mergeJobName"])]
            started = int((_time(merge["metadata"]["creationTimestamp"]) - T0).total_seconds())
            if t < started + cycle.merge or "conditions" in merge["status"]:
                return None
            message = json.dumps(bank_record(calibration=f"{NAMESPACE}/{cycle.name}", model=cycle.model).dump())
            self.kube.pods[merge["metadata"]["name"]] = [
                _pod(merge["metadata"]["name"], 0, t - cycle.merge, t, message=message)
            ]
            merge["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
            return merge
        if status.get("phase") != cal.RUNNING:
            return None
        job = self.kube.objects[("Job", status["jobName"])]
        start = int((_time(status["startTime"]) - T0).total_seconds())
        failing = 2 if cycle.ending == "fold-failed" else None
        done = [k for k in range(cycle.folds) if k != failing and cycle.fold_done(start, k) <= t]
        failed = failing is not None and cycle.fold_done(start, failing) <= t
        text = _indexes(done)
        if text == job["status"].get("completedIndexes", "") and not failed:
            return None
        name = job["metadata"]["name"]
        pods = [
            _pod(name, k, cycle.fold_done(start, k) - cycle.fold, cycle.fold_done(start, k), completion=k) for k in done
        ]
        new: dict[str, Any] = {"completedIndexes": text, "succeeded": len(done)}
        if failed:
            assert failing is not None
            end = cycle.fold_done(start, failing)
            crash = "RuntimeError: CUDA error: an illegal memory access was encountered"
            pods += [
                _pod(name, failing, end - cycle.fold, end, message=crash, completion=failing, code=1) for _ in range(3)
            ]
            new.update(failedIndexes=str(failing), conditions=[
                {"type": "Failed", "status": "True", "reason": "MaxFailedIndexesExceeded"}
            ])  # fmt: skip
        elif len(done) == cycle.folds:
            new["conditions"] = [{"type": "Complete", "status": "True"}]
        else:
            new["active"] = min(cycle.parallelism, cycle.folds - len(done))
        self.kube.pods[name] = pods
        job["status"] = new
        return job

    def end_job(self, cycle: Lifecycle) -> tuple[str, dict[str, Any]]:
        """Put the Job and its pod in the state the ending leaves; the watch event that follows."""
        status = self.kube.requests[cycle.name]["status"]
        job_name = status["jobName"]
        if cycle.ending == "deleted":
            return "DELETED", self.kube.objects.pop(("Job", job_name))
        job = self.kube.objects[("Job", job_name)]
        state: dict[str, Any] = {"exitCode": 0, "finishedAt": st.timestamp(self.now[0])}
        condition = {"type": "Complete", "status": "True"}
        failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
        bank = BankUse.from_annotation(job["metadata"].get("annotations", {}).get(ANNOTATION_BANK))
        if cycle.ending in ("passed", "audit-fails-10m"):
            state["message"] = json.dumps(
                job_record(cycle, int(status["modelVersion"]), status["inputModel"]["uri"], bank)
            )
        elif cycle.ending.startswith("gates:") or cycle.ending == "invalid-input":
            result = job_record(cycle, int(status["modelVersion"]), status["inputModel"]["uri"])
            state.update(exitCode=result["exitCode"], message=json.dumps(result))
            condition = failed
        elif cycle.ending == "malformed":
            state["message"] = "Traceback (most recent call last):\n  ...\nKeyError: 'post'"
        elif cycle.ending == "oom":
            state.update(exitCode=137, reason="OOMKilled")
            condition = failed
        elif cycle.ending == "crash":
            state.update(exitCode=1, message="RuntimeError: CUDA error: an illegal memory access was encountered")
            condition = failed
        elif cycle.ending == "deadline":
            state.update(exitCode=143, reason="Error")
            condition = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
        else:
            raise ValueError(f"unknown ending {cycle.ending!r}")
        job["status"] = {"conditions": [condition]}
        # The Job controller's pod: owned by the Job, labelled with its uid, running its image.
        uid = job["metadata"]["uid"]
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        self.kube.pods[job_name] = [
            {
                "metadata": {
                    "name": f"{job_name}-x",
                    "creationTimestamp": status["startTime"],
                    "labels": {"batch.kubernetes.io/job-name": job_name, "batch.kubernetes.io/controller-uid": uid},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "uid": uid, "controller": True}],
                },
                "spec": {
                    "containers": [{"name": "unlearn", "image": image, "resources": {"limits": {"memory": "16Gi"}}}]
                },
                "status": {
                    "phase": "Succeeded" if state["exitCode"] == 0 else "Failed",
                    "containerStatuses": [{"name": "unlearn", "state": {"terminated": state}}],
                },
            }
        ]
        return "MODIFIED", job


def _indexes(done: list[int]) -> str:
    """Indices as the Job controller writes completedIndexes: ranges of consecutive ones ("0-2,4")."""
    parts: list[str] = []
    for index in sorted(done):
        if parts and parts[-1].split("-")[-1] == str(index - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ",".join(parts)


def _pod(
    job: str, index: int, start: int, end: int, *, message: str = "", completion: int | None = None, code: int = 0
) -> Any:
    """A finished pod of a calibration's Job (an Indexed one's carries its completion index)."""
    state: dict[str, Any] = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": st.timestamp(T0 + timedelta(seconds=start)),
        "finishedAt": st.timestamp(T0 + timedelta(seconds=end)),
    }
    if message:
        state["message"] = message
    metadata: dict[str, Any] = {"name": f"{job}-{index}-x"}
    if completion is not None:
        metadata["annotations"] = {"batch.kubernetes.io/job-completion-index": str(completion)}
    return {
        "metadata": metadata,
        "spec": {"containers": [{"name": "unlearn", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
            {"name": "unlearn", "state": {"terminated": state}}
        ]},
    }  # fmt: skip


_LINES: dict[str, tuple[str, dict[str, str], float]] = {}


def parse_exposition(text: str) -> Iterator[tuple[Labels, float]]:
    """(labels with __name__, value) of each sample of a text exposition, ``*_created`` left out
    (they carry the wall-clock time of this process, not the simulated one).

    Each sample line is read by prometheus_client's own parser; most lines repeat
    from one scrape to the next, so each distinct line is parsed once.
    """
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parsed = _LINES.get(line)
        if parsed is None:
            (family,) = text_string_to_metric_families(line + "\n")
            (sample,) = family.samples
            parsed = _LINES[line] = (sample.name, dict(sample.labels), float(sample.value))
        name, labels, value = parsed
        if not name.endswith("_created"):
            yield tuple(sorted({"__name__": name, **labels}.items())), value


def drive(
    lifecycles: tuple[Lifecycle, ...] = LIFECYCLES,
    outages: tuple[Outage, ...] = OUTAGES,
    end: int = END,
    calibrations: tuple[CalibrationCycle, ...] = CALIBRATIONS,
) -> Run:
    """Run the timeline; what Prometheus would have stored, scraping every SCRAPE seconds."""
    return asyncio.run(_drive(lifecycles, outages, end, calibrations))


async def _drive(
    lifecycles: tuple[Lifecycle, ...],
    outages: tuple[Outage, ...],
    end: int,
    calibrations: tuple[CalibrationCycle, ...] = CALIBRATIONS,
) -> Run:
    world = Drive(OperatorSettings(max_concurrent_jobs=3))
    # The first Job creation of r05 fails: a launch error, retried by the next scheduler pass.
    world.kube.fail_creates[("Job", "r05-")] = 1
    steps = end // SCRAPE + 1
    series: dict[Labels, list[Value]] = {}
    completions: list[Completion] = []
    launched: dict[str, int] = {}
    ended: set[str] = set()
    pod = 0
    restarts = 0
    new_pods = [0]
    calibration_ends: dict[str, tuple[int, str]] = {}
    await world.start()

    for step in range(steps):
        t = step * SCRAPE
        world.now[0] = T0 + timedelta(seconds=t)
        down = any(o.start <= t < o.end for o in outages)
        if down and world.controller is not None:
            await world.stop()
        if not down and world.controller is None:
            outage = next(o for o in outages if o.end == t)
            if outage.new_pod:
                pod += 1
                restarts = 0
                new_pods.append(t)
            else:
                restarts += 1
            await world.start()

        # The cluster moves on whether the operator runs or not; its watch
        # events reach the operator only while it runs.
        events: list[tuple[str, str, dict[str, Any]]] = []
        for cycle in lifecycles:
            if cycle.created == t:
                events.append(("request", "ADDED", world.add(cycle)))
        for calibration in calibrations:
            if calibration.created == t:
                events.append(("calibration", "ADDED", world.add_calibration(calibration)))
            elif calibration.name in world.kube.calibrations and (job := world.advance_calibration(calibration, t)):
                events.append(("calibration-job", "MODIFIED", job))
        for cycle in lifecycles:
            status = world.kube.requests.get(cycle.name, {}).get("status") or {}
            if cycle.name in ended or status.get("phase") != st.RUNNING:
                continue
            launched.setdefault(cycle.name, int((_time(status["startTime"]) - T0).total_seconds()))
            if t >= launched[cycle.name] + cycle.runs:
                ended.add(cycle.name)
                events.append(("job", *world.end_job(cycle)))
                if cycle.ending == "audit-fails-10m":
                    # The Job's event fails on the audit write (one handler error); the periodic
                    # check retries every tick until the quota frees, ten minutes later.
                    until = world.now[0] + timedelta(seconds=600)
                    world.kube.fail_until[("ConfigMap", f"unlearn-audit-{cycle.name}-")] = until

        if world.controller is not None:
            world.sync()
            for kind, event, body in events:
                if kind == "request":
                    world.delivered[body["metadata"]["name"]] = body["metadata"].get("resourceVersion", "")
                await world.deliver(kind, event, body)
            await world.controller.tick()
            await world.settle()

        for cycle in lifecycles:
            status = world.kube.requests.get(cycle.name, {}).get("status") or {}
            done = {c.name for c in completions}
            if status.get("phase") in (st.SUCCEEDED, st.FAILED) and cycle.name not in done:
                reason = str((st.get_condition(status, st.COMPLETE) or {}).get("reason"))
                calibrated = bool((status.get("calibration") or {}).get("calibrated"))
                verdict = status.get("verdict") or "Error"
                completions.append(Completion(t, cycle.name, verdict, cycle.method, reason, calibrated))
        for calibration in calibrations:
            status = world.kube.calibrations.get(calibration.name, {}).get("status") or {}
            if cal.is_terminal(status) and calibration.name not in calibration_ends:
                calibration_ends[calibration.name] = (t, str(status["phase"]))

        target = {**TARGET, "pod": PODS[pod], "instance": f"{POD_IPS[pod]}:8080"}
        ksm = {"job": "kube-state-metrics", "namespace": TARGET["namespace"], "pod": PODS[pod], "container": "operator"}
        _store(series, steps, step, {"__name__": "kube_pod_container_status_restarts_total", **ksm}, float(restarts))
        _store(series, steps, step, {"__name__": "up", **target}, float(world.metrics is not None))
        seen: set[Labels] = set()
        if world.metrics is not None:
            for labels, value in parse_exposition(generate_latest(world.metrics.registry).decode()):
                seen.add(_store(series, steps, step, {**dict(labels), **target}, value))
        # A series its target no longer exposes (the pod went away, the scrape
        # failed) gets a staleness marker, as Prometheus writes one.
        for key, values in series.items():
            if key not in seen and values[step] is None and step and values[step - 1] not in (None, STALE):
                values[step] = STALE

    if world.controller is not None:
        await world.stop()
    folds = {c.name: [c.fold] * (c.folds - (c.ending == "fold-failed")) for c in calibrations}
    return Run(steps, series, completions, dict(world.handler_errors), launched, new_pods, calibration_ends, folds)


def _store(series: dict[Labels, list[Value]], steps: int, step: int, labels: dict[str, str], value: float) -> Labels:
    key = tuple(sorted(labels.items()))
    series.setdefault(key, [None] * steps)[step] = value
    return key


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
