"""The reconciler's decisions with an in-memory API (the injected Kube), no cluster.

The real API server is exercised in tests/integration; here the point is the
order of operations: what is created, what status is written, what a
restarted operator (a fresh Controller with an empty cache) adopts, what a
tenant's forged objects and a failing API do to a request.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.operator.factories import raw_calibration, raw_spec, record
from unlearning_operator import lineage as lin
from unlearning_operator import status as st
from unlearning_operator.adoption import LABEL_CONTROLLER_UID
from unlearning_operator.completion import AuditNotWrittenError
from unlearning_operator.controller import Controller
from unlearning_operator.k8s import ApiError, ObjectRef
from unlearning_operator.metrics import build_registry
from unlearning_operator.names import audit_configmap_name, job_name
from unlearning_operator.settings import OperatorSettings
from unlearning_operator.views import calibration_view, job_view, request_view

pytestmark = pytest.mark.unit

NS = "team-a"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LINEAGE = ("ConfigMap", "unlearn-model-digits-mlp")
OUT = "pvc://models/digits/versions"


class FakeKube:
    """Just enough of k8s.Kube, with the API server's create/409, resourceVersion and uid semantics.

    ``failures`` makes the next calls of an operation raise (``"create ConfigMap"``, ``"patch status"``,
    ...); ``before_status_patch`` runs just before a status patch is applied (a user's edit racing it).
    """

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}
        self.calibrations: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, list[dict[str, Any]]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.creates: list[tuple[str, str]] = []
        self.job_patches: list[tuple[str, dict[str, Any]]] = []
        self.failures: dict[str, list[Exception]] = {}
        self.before_status_patch: Callable[[str, dict[str, Any]], None] | None = None
        self.version = 0

    def _fail(self, operation: str) -> None:
        queued = self.failures.get(operation)
        if queued:
            raise queued.pop(0)

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("uid", f"uid-{obj['kind']}-{self.version}")
        obj["metadata"].setdefault("creationTimestamp", "2026-01-01T12:00:00Z")
        return obj

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        self._fail(f"create {obj['kind']}")
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        self.creates.append(key)
        self.objects[key] = self._stamp(copy.deepcopy(obj))
        return copy.deepcopy(self.objects[key]), True

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"]["name"] = obj["metadata"].pop("generateName") + f"g{self.version:04d}"
        created, _ = self.create_if_absent(obj)
        return created

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(("Job", name)))

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods.get(job_name, []))

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._fail("read ConfigMap")
        return copy.deepcopy(self.objects.get(("ConfigMap", name)))

    def replace_configmap(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = ("ConfigMap", obj["metadata"]["name"])
        if self.objects[key]["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        if self.objects[key].get("immutable"):
            raise ApiError(422, "Invalid", "field is immutable")
        self.objects[key] = self._stamp(copy.deepcopy(obj))
        return copy.deepcopy(self.objects[key])

    def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        self._fail("patch status")
        if self.before_status_patch is not None:
            self.before_status_patch(name, patch)
        objects = self.calibrations if plural == "unlearningcalibrations" else self.requests
        if name not in objects:
            return None
        status = objects[name].setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = copy.deepcopy(value)
        return copy.deepcopy(objects[name])

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        self._fail("patch Job")
        job = self.objects.get(("Job", name))
        if job is None:
            return False
        self.job_patches.append((name, patch))
        job["spec"].update(patch["spec"])
        return True

    def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str, now: datetime) -> None:
        self.events.append((ref.name, type_, reason))


class World:
    """The fake API plus the kopf indexes built from it, and a Controller bound to them."""

    def __init__(self, settings: OperatorSettings | None = None, kube: FakeKube | None = None) -> None:
        self.kube = kube or FakeKube()
        self.request_index: dict[tuple[str, str], list[Any]] = {}
        self.job_index: dict[tuple[str, str], list[Any]] = {}
        self.calibration_index: dict[tuple[str, str], list[Any]] = {}
        self.calibration_job_index: dict[tuple[str, str], list[Any]] = {}
        self.controller = Controller(
            settings=settings or OperatorSettings(),
            kube=self.kube,
            metrics=build_registry(),
            clock=lambda: NOW,  # type: ignore[arg-type]
        )
        self.controller.bind(self.request_index, self.job_index, self.calibration_index, self.calibration_job_index)

    def sync(self) -> None:
        """The kopf indexes, from the fake API (main.py's index handlers do the same)."""
        for index in (self.request_index, self.job_index, self.calibration_index, self.calibration_job_index):
            index.clear()
        for body in self.kube.requests.values():
            view = request_view(body)
            self.request_index[view.key] = [view]
        for body in self.kube.calibrations.values():
            cview = calibration_view(body)
            self.calibration_index[cview.key] = [cview]
        for (kind, _), body in self.kube.objects.items():
            if kind == "Job" and body["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by"):
                job = job_view(body)
                index = self.calibration_job_index if job.owner_kind == "UnlearningCalibration" else self.job_index
                # kopf keeps every value under a key: several Jobs may claim one request.
                index.setdefault((job.namespace, job.request), []).append(job)

    def add(self, name: str, created: str, ns: str = NS, **overrides: Any) -> None:
        self.kube.requests[name] = {
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": f"uid-{name}",
                "creationTimestamp": created,
                "generation": 1,
            },
            "spec": raw_spec(**overrides),
        }

    def edit(self, name: str, **overrides: Any) -> None:
        """A user's spec edit (the CRD's transition rule refuses it once status names a Job)."""
        body = self.kube.requests[name]
        assert "jobName" not in (body.get("status") or {}), "the API server would refuse this edit"
        spec = body["spec"]
        for dotted, value in overrides.items():
            *parents, last = dotted.split(".")
            node = spec
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        body["metadata"]["generation"] += 1

    def add_calibration(self, name: str, created: str, **overrides: Any) -> None:
        self.kube.calibrations[name] = {
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "creationTimestamp": created,
                "generation": 1,
            },
            "spec": raw_calibration(**overrides),
        }

    def snapshot(self) -> str:
        return json.dumps(
            [self.kube.requests, self.kube.calibrations, sorted(self.kube.objects)], sort_keys=True, default=str
        )

    async def drain(self) -> None:
        while self.controller.tasks:
            await asyncio.gather(*list(self.controller.tasks))

    async def settle(self) -> None:
        """Deliver request and calibration events until nothing changes (what kopf's watches would do)."""
        for _ in range(20):
            before = self.snapshot()
            self.sync()
            for body in list(self.kube.requests.values()):
                await self.controller.on_request(None, copy.deepcopy(body))
            for body in list(self.kube.calibrations.values()):
                await self.controller.on_calibration(None, copy.deepcopy(body))
            self.controller.run_schedule()  # the coalesced pass, without waiting for its timer
            await self.drain()
            self.sync()
            if self.snapshot() == before:
                return

    async def tick(self) -> None:
        self.sync()
        await self.controller.tick()
        self.controller.pass_requested = False
        self.controller.run_schedule()
        await self.drain()
        self.sync()

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.kube.requests[name].get("status") or {})

    def phase(self, name: str) -> str | None:
        return st.phase_of(self.kube.requests[name].get("status"))

    def reason(self, name: str) -> str | None:
        return (st.get_condition(self.status(name), st.COMPLETE) or {}).get("reason")

    def job_name(self, name: str) -> str:
        return str(self.kube.requests[name]["status"]["jobName"])

    def jobs(self) -> list[str]:
        return [n for kind, n in self.kube.objects if kind == "Job"]

    def lineage_version(self) -> int:
        return int(json.loads(self.kube.objects[LINEAGE]["data"]["current"])["version"])

    def own_pod(self, job: dict[str, Any], message: str | None, outcome: str) -> dict[str, Any]:
        """The pod the Job controller made for ``job``, terminated with ``message``."""
        state: dict[str, Any] = {"exitCode": 0 if outcome == "Complete" else 1, "finishedAt": "2026-01-01T12:05:00Z"}
        if message is not None:
            state["message"] = message
        uid = job["metadata"]["uid"]
        return {
            "metadata": {
                "name": f"{job['metadata']['name']}-x",
                "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"], LABEL_CONTROLLER_UID: uid},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "uid": uid, "controller": True}],
            },
            "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
            "status": {"containerStatuses": [{"name": "unlearn", "state": {"terminated": state}}]},
        }

    def end_job(self, name: str, message: str | None, outcome: str = "Complete") -> dict[str, Any]:
        """The request's Job ends (its own pod wrote ``message``); no event is delivered."""
        job = self.kube.objects[("Job", self.job_name(name))]
        job["status"] = {"conditions": [{"type": outcome, "status": "True"}]}
        self.kube.pods[job["metadata"]["name"]] = [self.own_pod(job, message, outcome)]
        self.sync()
        return job

    async def complete(self, name: str, message: str | None, outcome: str = "Complete") -> None:
        job = self.end_job(name, message, outcome)
        await self.controller.on_job("MODIFIED", copy.deepcopy(job))
        await self.drain()
        self.sync()


def passed(version: int, out: str = OUT) -> str:
    output = {"uri": f"{out}/digits-mlp-v{version}.pt2", "sha256": f"{version:02d}" * 32, "format": "exported"}
    return json.dumps(record(modelVersion=version, outputModel=output, inputModel=None).dump())


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


# ---- the normal path ------------------------------------------------------------------------------


def test_two_requests_for_one_model_run_in_sequence_from_the_lineage() -> None:
    async def scenario() -> World:
        world = World()
        world.add("first", "2026-01-01T10:00:00Z")
        world.add("second", "2026-01-01T10:00:01Z")
        await world.settle()
        assert (world.phase("first"), world.phase("second")) == ("Running", "Queued")
        waiting = st.get_condition(world.status("second"), st.JOB_CREATED)
        assert waiting is not None
        assert waiting["reason"] == st.REASON_WAITING_FOR_MODEL
        # Lineage, then the spec ConfigMap, then the Job's NetworkPolicy, then the Job: never a Job without
        # its ConfigMap, and never a pod that runs unisolated.
        assert [k for k, _ in world.kube.creates] == ["ConfigMap", "ConfigMap", "NetworkPolicy", "Job"]
        assert st.job_created(world.status("first"))

        await world.complete("first", passed(1))
        assert world.phase("first") == "Succeeded"
        await world.settle()
        assert world.phase("second") == "Running"
        second = world.status("second")
        assert second["inputModel"]["uri"] == f"{OUT}/digits-mlp-v1.pt2"
        assert second["modelVersion"] == 2
        job = world.kube.objects[("Job", world.job_name("second"))]
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--model-version") + 1] == "2"
        return world

    world = run(scenario)
    assert world.lineage_version() == 1
    first = world.status("first")
    audit = world.kube.objects[("ConfigMap", first["auditConfigMap"])]
    assert audit["immutable"] is True
    # The audit record anchors the lineage entry this run added.
    lineage = lin.parse(world.kube.objects[LINEAGE])
    assert json.loads(audit["data"]["outcome.json"])["lineageDigest"] == lineage.current.digest
    assert ("first", "Normal", "Succeeded") in world.kube.events
    # The finished Job may now be deleted by Kubernetes (and not before).
    assert world.kube.job_patches == [(first["jobName"], {"spec": {"ttlSecondsAfterFinished": 86400}})]


def test_restart_after_the_job_was_created_adopts_it_instead_of_creating_a_second() -> None:
    async def scenario() -> World:
        world = World()
        world.add("only", "2026-01-01T10:00:00Z")
        await world.settle()
        # The operator died between creating the Job and writing JobCreated: status still says "creating".
        status = world.status("only")
        world.kube.requests["only"]["status"] = st.launching(
            st.pending(None, 1, NOW),
            job_name=status["jobName"],
            model_version=1,
            input_model=status["inputModel"],
            generation=1,
            now=NOW,
        )
        creates = len(world.kube.creates)
        restarted = World(kube=world.kube)
        await restarted.settle()
        await restarted.tick()
        assert restarted.phase("only") == "Running"
        assert st.job_created(restarted.status("only"))
        assert len(restarted.kube.creates) == creates
        assert restarted.jobs() == [status["jobName"]]
        await restarted.complete("only", passed(1))
        assert restarted.phase("only") == "Succeeded"
        return restarted

    run(scenario)


def test_a_half_created_launch_is_completed_on_the_next_event() -> None:
    # The spec ConfigMap's create fails after the Job was recorded. No Job is created without it (before,
    # the Job ran without its ConfigMap and the request held its slot); the launch resumes on the next
    # event of the request, or on the periodic check, and creates both.
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        original = world.kube.create_if_absent
        failed: list[str] = []

        def flaky(obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
            if obj["metadata"]["name"].endswith("-spec") and not failed:
                failed.append(obj["metadata"]["name"])
                assert world.jobs() == []
                raise ApiError(500, "InternalError", "etcd timeout")
            return original(obj)

        world.kube.create_if_absent = flaky  # type: ignore[method-assign]
        world.sync()
        await world.controller.on_request(None, copy.deepcopy(world.kube.requests["r"]))
        world.controller.run_schedule()
        await world.drain()
        assert failed
        assert world.phase("r") == "Running"
        assert not st.job_created(world.status("r"))
        assert world.jobs() == []
        await world.tick()
        assert st.job_created(world.status("r"))
        name = world.job_name("r")
        assert world.kube.creates[-3:] == [
            ("ConfigMap", name + "-spec"),
            ("NetworkPolicy", name + "-isolation"),
            ("Job", name),
        ]
        return world

    run(scenario)


def test_a_job_whose_spec_configmap_is_missing_gets_it_back() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        name = world.job_name("r")
        del world.kube.objects[("ConfigMap", name + "-spec")]
        world.kube.requests["r"]["status"]["conditions"] = [
            c for c in world.status("r")["conditions"] if c["type"] != st.JOB_CREATED
        ]
        restarted = World(kube=world.kube)
        await restarted.settle()
        await restarted.tick()
        assert ("ConfigMap", name + "-spec") in restarted.kube.objects
        assert st.job_created(restarted.status("r"))
        assert restarted.jobs() == [name]
        return restarted

    run(scenario)


@pytest.mark.parametrize(
    ("message", "outcome", "reason"),
    [
        ("not json at all", "Complete", st.REASON_BAD_RESULT),
        ("x" * 5000, "Complete", st.REASON_BAD_RESULT),
        (None, "Failed", st.REASON_ERROR),
        (
            json.dumps(record(verdict="Failed", exitCode=3, reasons=["maxMiaAuc: 0.7 > 0.6"], inputModel=None).dump()),
            "Failed",
            st.REASON_GATES_FAILED,
        ),
        # A record for what the Job was not built to do is malformed, whoever wrote it.
        (passed(1, out="pvc://models/elsewhere"), "Complete", st.REASON_BAD_RESULT),
        (json.dumps(record(model="other", inputModel=None).dump()), "Complete", st.REASON_BAD_RESULT),
    ],
)
def test_job_endings_become_failed_with_a_reason(message: str | None, outcome: str, reason: str) -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        await world.complete("r", message, outcome)
        return world

    world = run(scenario)
    assert world.phase("r") == "Failed"
    assert world.reason("r") == reason
    assert world.status("r")["auditConfigMap"]
    # A failed run never becomes the current model.
    assert world.lineage_version() == 0


def test_deleted_job_fails_the_request_and_frees_the_model() -> None:
    async def scenario() -> World:
        world = World()
        world.add("a", "2026-01-01T10:00:00Z")
        world.add("b", "2026-01-01T10:00:01Z")
        await world.settle()
        job = world.kube.objects.pop(("Job", world.job_name("a")))
        world.sync()
        await world.controller.on_job("DELETED", job)
        world.controller.run_schedule()
        await world.settle()
        return world

    world = run(scenario)
    assert world.phase("a") == "Failed"
    assert world.reason("a") == st.REASON_JOB_DELETED
    assert world.phase("b") == "Running"


def test_global_cap_and_rejection() -> None:
    async def scenario() -> World:
        world = World(OperatorSettings(max_concurrent_jobs=2))
        for i in range(4):
            world.add(f"r{i}", f"2026-01-01T10:00:0{i}Z", **{"model.name": f"m{i}"})
        world.add("bad", "2026-01-01T09:00:00Z", **{"job.image": "evil/miner:1"})
        await world.settle()
        return world

    world = run(scenario)
    assert [world.phase(f"r{i}") for i in range(4)] == ["Running", "Running", "Queued", "Queued"]
    assert world.phase("bad") == "Rejected"
    assert "2 of 2 slots in use" in world.status("r2")["message"]
    assert ("bad", "Warning", "Rejected") in world.kube.events
    assert not any(name.startswith("bad") for name in world.jobs())


def test_per_namespace_cap_keeps_a_slot_for_the_second_tenant() -> None:
    async def scenario() -> World:
        world = World(OperatorSettings(max_concurrent_jobs=3, max_concurrent_jobs_per_namespace=2))
        for i in range(5):
            world.add(f"a{i}", f"2026-01-01T10:00:0{i}Z", **{"model.name": f"m{i}"})
        world.add("b0", "2026-01-01T11:00:00Z", ns="team-b")
        await world.settle()
        return world

    world = run(scenario)
    assert [world.phase(f"a{i}") for i in range(5)] == ["Running", "Running", "Queued", "Queued", "Queued"]
    assert world.phase("b0") == "Running"
    waiting = st.get_condition(world.status("a2"), st.JOB_CREATED)
    assert waiting is not None
    assert waiting["reason"] == st.REASON_WAITING_FOR_NAMESPACE


def test_status_is_not_rewritten_when_nothing_changed() -> None:
    async def scenario() -> tuple[World, int]:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        calls = 0
        original = world.kube.patch_status

        def counting(plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal calls
            calls += 1
            return original(plural, namespace, name, patch)

        world.kube.patch_status = counting  # type: ignore[method-assign]
        await world.settle()
        await world.tick()
        return world, calls

    _, calls = run(scenario)
    assert calls == 0


def test_job_is_isolated_by_a_policy_of_its_own_unless_turned_off() -> None:
    async def scenario(settings: OperatorSettings) -> World:
        world = World(settings)
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        return world

    world = asyncio.run(scenario(OperatorSettings()))
    assert world.phase("r") == "Running"
    (policy,) = [body for (kind, _), body in world.kube.objects.items() if kind == "NetworkPolicy"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-r"
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    off = asyncio.run(scenario(OperatorSettings(job_network_policy=False)))
    assert off.phase("r") == "Running"
    assert [kind for kind, _ in off.kube.objects if kind == "NetworkPolicy"] == []


def test_a_policy_someone_else_made_under_our_name_is_not_adopted() -> None:
    # A tenant pre-creates a policy with the name the operator would use (it may allow
    # everything): the launch is refused rather than running the pod under that policy.
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        name = f"{job_name('r', 'uid-r')}-isolation"
        world.kube.objects[("NetworkPolicy", name)] = {
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {"podSelector": {}, "egress": [{}]},
        }
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert not [kind for kind, _ in world.kube.objects if kind == "Job"]
    assert_conflict(world, "r", "NetworkPolicy")


# ---- admission ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "settings", "reason", "words"),
    [
        (
            {
                "model": {
                    "name": "m",
                    "format": "state-dict",
                    "source": {"claimName": "models", "path": "m.pt"},
                    "architecture": {"factory": "os:system", "kwargs": {"command": "id"}},
                }
            },
            OperatorSettings(),
            st.REASON_FACTORY_NOT_ALLOWED,
            "spec.model.architecture.factory: os:system is not allowed",
        ),
        ({"job.gpus": 64}, OperatorSettings(), st.REASON_PLACEMENT_NOT_ALLOWED, "spec.job.gpus: 64"),
        (
            {"output.location": {"path": "/tmp/out"}},
            OperatorSettings(),
            st.REASON_CLAIM_REQUIRED,
            "spec.output.location: /tmp/out names no claimName",
        ),
        ({"forget.indices": [3, 3]}, OperatorSettings(), st.REASON_INVALID_SPEC, "forget.indices has duplicates"),
    ],
)
def test_a_rejected_request_gets_an_audit_record_and_no_job(
    overrides: dict[str, Any], settings: OperatorSettings, reason: str, words: str
) -> None:
    async def scenario() -> World:
        world = World(settings)
        world.add("bad", "2026-01-01T10:00:00Z", **overrides)
        await world.settle()
        return world

    world = run(scenario)
    status = world.status("bad")
    assert status["phase"] == "Rejected"
    assert world.reason("bad") == reason
    assert words in status["message"]
    assert world.jobs() == []
    assert LINEAGE not in world.kube.objects
    audit = world.kube.objects[("ConfigMap", status["auditConfigMap"])]
    outcome = json.loads(audit["data"]["outcome.json"])
    assert (outcome["phase"], outcome["reason"]) == ("Rejected", reason)
    assert words in outcome["message"]
    assert audit["immutable"] is True
    assert "ownerReferences" not in audit["metadata"]


def test_a_request_deleted_while_its_job_runs_leaves_an_audit_record() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        body = world.kube.requests.pop("r")
        world.sync()
        await world.controller.on_request("DELETED", body)
        await world.drain()
        return world

    world = run(scenario)
    audit = world.kube.objects[("ConfigMap", audit_configmap_name("r", "uid-r"))]
    outcome = json.loads(audit["data"]["outcome.json"])
    assert (outcome["phase"], outcome["reason"]) == ("Deleted", st.REASON_REQUEST_DELETED)
    assert outcome["jobName"] == job_name("r", "uid-r")
    assert "deleted while Job" in outcome["message"]


# ---- forgeries ------------------------------------------------------------------------------------


def forged_job(world: World, request: str, image: str = "evil/miner:1") -> dict[str, Any]:
    """A Job a tenant makes under the request's deterministic name, copying every mark it can read."""
    body = world.kube.requests[request]
    uid = body["metadata"]["uid"]
    name = job_name(request, uid)
    labels = {
        "app.kubernetes.io/managed-by": "unlearning-operator",
        "unlearn.dev/request": request,
        "unlearn.dev/model": "digits-mlp",
    }
    annotations = {
        "unlearn.dev/request-uid": uid,
        "unlearn.dev/spec-generation": "1",
        "unlearn.dev/model-version": "1",
        "unlearn.dev/input-model": "pvc://models/digits/m.pt2",
        "unlearn.dev/output-location": OUT,
    }
    owner = {"apiVersion": "unlearn.dev/v1alpha1", "kind": "UnlearningRequest", "name": request, "uid": uid}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{**owner, "controller": True}],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "unlearn", "image": image}]}}},
    }
    world.kube.create_if_absent(job)
    world.sync()
    return world.kube.objects[("Job", name)]


def assert_conflict(world: World, name: str, words: str) -> None:
    status = world.status(name)
    assert status["phase"] == "Failed", status
    assert world.reason(name) == st.REASON_NAME_CONFLICT
    assert words in status["message"]
    assert "the operator adopts only objects it made" in status["message"]
    assert (name, "Warning", st.REASON_NAME_CONFLICT) in world.kube.events


def test_a_job_made_in_advance_while_queued_is_never_adopted() -> None:
    async def scenario() -> World:
        world = World(OperatorSettings(max_concurrent_jobs=1))
        world.add("holder", "2026-01-01T09:00:00Z", **{"model.name": "other"})
        world.add("victim", "2026-01-01T10:00:00Z")
        await world.settle()
        assert world.phase("victim") == "Queued"
        forged = forged_job(world, "victim")
        await world.controller.on_job("ADDED", copy.deepcopy(forged))
        await world.settle()
        return world

    world = run(scenario)
    assert_conflict(world, "victim", "this request's status does not name it: the operator did not create it")
    status = world.status("victim")
    # Nothing in status points at the forged Job, and nothing ran from it.
    assert "jobName" not in status
    assert LINEAGE not in world.kube.objects or world.lineage_version() == 0
    # The forged Job holds no slot: the holder still runs, nobody else was affected.
    assert world.phase("holder") == "Running"


def test_a_job_made_in_advance_is_found_at_launch_and_refused() -> None:
    async def scenario() -> World:
        world = World()
        world.add("victim", "2026-01-01T10:00:00Z")
        forged = forged_job(world, "victim")
        # Without our labels the index never shows it; the launch meets it as a 409.
        forged["metadata"]["labels"] = {}
        world.sync()
        await world.settle()
        return world

    world = run(scenario)
    assert_conflict(world, "victim", "existed before the operator created it")
    # The forged Job is left alone (never patched, never given a TTL).
    assert world.kube.job_patches == []


def test_a_spec_configmap_made_in_advance_is_refused() -> None:
    async def scenario() -> World:
        world = World()
        world.add("victim", "2026-01-01T10:00:00Z")
        name = job_name("victim", "uid-victim") + "-spec"
        world.kube.create_if_absent(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": NS},
                "data": {"request.yaml": "spec: {model: {architecture: {factory: 'os:system'}}}"},
            }
        )
        await world.settle()
        return world

    world = run(scenario)
    assert_conflict(world, "victim", "does not carry the operator's labels")
    assert world.jobs() == []


def test_a_pod_that_only_carries_the_jobs_name_label_is_never_read() -> None:
    # The probe: a pod labelled job-name=<job> with a later finishedAt turned a Failed Job into Passed.
    async def scenario() -> World:
        world = World()
        world.add("victim", "2026-01-01T10:00:00Z")
        await world.settle()
        job = world.end_job("victim", None, "Failed")
        fake = {
            "metadata": {"name": "imposter", "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}},
            "spec": {"containers": [{"name": "unlearn", "image": "anything"}]},
            "status": {
                "containerStatuses": [
                    {
                        "name": "unlearn",
                        "state": {
                            "terminated": {
                                "exitCode": 0,
                                "finishedAt": "2099-01-01T00:00:00Z",
                                "message": passed(1, out="pvc://models/evil"),
                            }
                        },
                    }
                ]
            },
        }
        world.kube.pods[job["metadata"]["name"]].append(fake)
        await world.controller.on_job("MODIFIED", copy.deepcopy(job))
        await world.drain()
        return world

    world = run(scenario)
    assert_conflict(world, "victim", "pod imposter carries Job")
    assert world.lineage_version() == 0
    assert "outputModel" not in world.status("victim")


def test_an_audit_configmap_made_in_advance_is_never_referenced_and_the_lineage_stays() -> None:
    async def scenario() -> World:
        world = World()
        world.add("victim", "2026-01-01T10:00:00Z")
        await world.settle()
        squatted = audit_configmap_name("victim", "uid-victim")
        world.kube.create_if_absent(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": squatted, "namespace": NS, "labels": {"unlearn.dev/audit": "true"}},
                "data": {"record.json": json.dumps({"verdict": "Passed"})},
            }
        )
        await world.complete("victim", passed(1))
        return world

    world = run(scenario)
    squatted = audit_configmap_name("victim", "uid-victim")
    assert_conflict(world, "victim", f"ConfigMap {squatted} does not carry the operator's labels")
    status = world.status("victim")
    # A passed run, but the request fails closed: the lineage does not move.
    assert world.lineage_version() == 0
    assert status["verdict"] == "Passed"
    # Its own record is written beside the squatted one, and only that one is referenced.
    assert status["auditConfigMap"] != squatted
    assert status["auditConfigMap"].startswith(squatted + "-")
    own = world.kube.objects[("ConfigMap", status["auditConfigMap"])]
    assert json.loads(own["data"]["outcome.json"])["reason"] == st.REASON_NAME_CONFLICT
    assert world.kube.objects[("ConfigMap", squatted)]["data"] == {"record.json": json.dumps({"verdict": "Passed"})}


def test_a_spec_edit_between_scheduling_and_launch_fails_the_request_before_any_job() -> None:
    # The scheduler chose generation 1; the user's edit (another model) lands before the operator records
    # the Job, so the answer to that write carries generation 2.
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")

        def race(name: str, patch: dict[str, Any]) -> None:
            if patch.get("phase") == "Running" and world.kube.requests[name]["metadata"]["generation"] == 1:
                world.edit(name, **{"model.name": "other-model"})

        world.kube.before_status_patch = race
        await world.settle()
        return world

    world = run(scenario)
    status = world.status("r")
    assert status["phase"] == "Failed"
    assert world.reason("r") == st.REASON_SPEC_CHANGED
    assert "generation 1 -> 2" in status["message"]
    assert ("r", "Warning", st.REASON_SPEC_CHANGED) in world.kube.events
    # No Job, and neither model's lineage moved.
    assert world.jobs() == []
    assert world.lineage_version() == 0
    assert ("ConfigMap", "unlearn-model-other-model") not in world.kube.objects


def test_a_job_of_an_older_generation_is_refused_on_resume() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        # A status recorded for generation 1 while the object is at 2 (a rule-less API server, or an edit
        # that slipped in before the freeze and a restart): the Job is not resumed for the wrong spec.
        world.kube.requests["r"]["status"]["conditions"] = [
            c for c in world.status("r")["conditions"] if c["type"] != st.JOB_CREATED
        ]
        world.kube.requests["r"]["metadata"]["generation"] = 2
        restarted = World(kube=world.kube)
        await restarted.settle()
        await restarted.tick()
        return restarted

    world = run(scenario)
    assert world.phase("r") == "Failed"
    assert world.reason("r") == st.REASON_SPEC_CHANGED


def test_completion_reads_the_model_from_the_job_never_from_a_later_spec() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        # The index shows another model now (nothing the API server would allow; completion must not care).
        world.kube.requests["r"]["spec"]["model"]["name"] = "other-model"
        await world.complete("r", passed(1))
        return world

    world = run(scenario)
    assert world.phase("r") == "Succeeded"
    assert world.lineage_version() == 1
    assert ("ConfigMap", "unlearn-model-other-model") not in world.kube.objects


def test_a_tampered_lineage_stops_the_next_request_with_a_reason() -> None:
    async def scenario() -> World:
        world = World()
        world.add("first", "2026-01-01T10:00:00Z")
        await world.settle()
        await world.complete("first", passed(1))
        cm = world.kube.objects[LINEAGE]
        current = json.loads(cm["data"]["current"])
        current["uri"] = "pvc://models/evil.pt2"
        cm["data"]["current"] = json.dumps(current)
        history = json.loads(cm["data"]["history"])
        history[-1] = current
        cm["data"]["history"] = json.dumps(history)
        world.add("second", "2026-01-01T11:00:00Z")
        restarted = World(kube=world.kube)  # a fresh process reads the lineage again
        await restarted.settle()
        return restarted

    world = run(scenario)
    assert world.phase("second") == "Failed"
    assert world.reason("second") == st.REASON_LINEAGE_BROKEN
    assert "version 1 was changed after it was written" in world.status("second")["message"]
    assert world.jobs() == [world.job_name("first")]
    assert ("second", "Warning", st.REASON_LINEAGE_BROKEN) in world.kube.events


def test_a_lineage_tampered_while_the_job_runs_is_not_advanced_and_status_names_no_new_model() -> None:
    async def scenario() -> World:
        world = World()
        world.add("first", "2026-01-01T10:00:00Z")
        await world.settle()
        await world.complete("first", passed(1))
        world.add("second", "2026-01-01T11:00:00Z")
        await world.settle()
        assert world.phase("second") == "Running"
        cm = world.kube.objects[LINEAGE]
        current = json.loads(cm["data"]["current"])
        current["uri"] = "pvc://models/evil.pt2"
        cm["data"]["current"] = json.dumps(current)
        await world.complete("second", passed(2))
        return world

    world = run(scenario)
    status = world.status("second")
    assert world.phase("second") == "Failed"
    assert world.reason("second") == st.REASON_LINEAGE_BROKEN
    assert status["message"].startswith("the result is not recorded: ")
    # The job wrote a file, but it is no version of the model: status must not point at it.
    assert "outputModel" not in status
    assert json.loads(world.kube.objects[LINEAGE]["data"]["current"])["uri"] == "pvc://models/evil.pt2"
    assert ("second", "Warning", st.REASON_LINEAGE_BROKEN) in world.kube.events


# ---- completion is retried until recorded ---------------------------------------------------------


def test_a_failed_audit_write_is_retried_and_the_ttl_waits_for_it() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        world.kube.failures["create ConfigMap"] = [ApiError(500, "InternalError", "etcd timeout")]
        with pytest.raises(AuditNotWrittenError):
            await world.complete("r", passed(1))
        # kopf does not retry the event: the request is still Running, and its Job has no TTL yet.
        assert world.phase("r") == "Running"
        assert world.kube.job_patches == []
        assert "ttlSecondsAfterFinished" not in world.kube.objects[("Job", world.job_name("r"))]["spec"]
        await world.tick()
        return world

    world = run(scenario)
    assert world.phase("r") == "Succeeded"
    assert world.lineage_version() == 1
    assert world.kube.job_patches == [(world.job_name("r"), {"spec": {"ttlSecondsAfterFinished": 86400}})]


def test_a_finished_job_deleted_before_its_result_was_recorded_still_finishes_from_what_was_read() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        world.kube.failures["patch status"] = [ApiError(500, "InternalError", "etcd timeout")]
        with pytest.raises(ApiError):
            await world.complete("r", passed(1))
        job = world.kube.objects.pop(("Job", world.job_name("r")))
        world.kube.pods.clear()
        world.sync()
        await world.controller.on_job("DELETED", job)
        await world.drain()
        return world

    world = run(scenario)
    assert world.phase("r") == "Succeeded"
    assert world.reason("r") == st.REASON_PASSED
    assert world.lineage_version() == 1


def test_a_job_that_ended_without_an_event_is_finished_by_the_periodic_check() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        world.end_job("r", passed(1))  # the MODIFIED event is lost
        await world.tick()
        return world

    world = run(scenario)
    assert world.phase("r") == "Succeeded"


def test_a_missed_ttl_patch_is_retried() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        world.kube.failures["patch Job"] = [ApiError(500, "InternalError", "etcd timeout")]
        await world.complete("r", passed(1))
        assert world.phase("r") == "Succeeded"
        assert world.kube.job_patches == []
        await world.tick()
        return world

    world = run(scenario)
    assert world.kube.job_patches == [(world.job_name("r"), {"spec": {"ttlSecondsAfterFinished": 86400}})]


def squat_audit_name(world: World, request: str) -> str:
    name = audit_configmap_name(request, f"uid-{request}")
    world.kube.create_if_absent(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NS},
            "data": {"outcome.json": json.dumps({"phase": "Succeeded"})},
        }
    )
    return name


def test_a_failed_run_whose_record_name_is_taken_fails_with_the_conflict() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        squat_audit_name(world, "r")
        await world.complete("r", None, "Failed")
        return world

    world = run(scenario)
    squatted = audit_configmap_name("r", "uid-r")
    assert_conflict(world, "r", f"ConfigMap {squatted} holds this request's audit record name but is not its record")
    assert world.status("r")["auditConfigMap"].startswith(squatted + "-")


def test_a_rejected_request_whose_record_name_is_taken_stays_rejected_and_says_so() -> None:
    async def scenario() -> World:
        world = World()
        world.add("bad", "2026-01-01T10:00:00Z", **{"job.gpus": 64})
        squat_audit_name(world, "bad")
        await world.settle()
        return world

    world = run(scenario)
    assert world.phase("bad") == "Rejected"
    assert world.reason("bad") == st.REASON_PLACEMENT_NOT_ALLOWED
    squatted = audit_configmap_name("bad", "uid-bad")
    assert world.status("bad")["auditConfigMap"].startswith(squatted + "-")
    assert ("bad", "Warning", st.REASON_NAME_CONFLICT) in world.kube.events


def test_a_second_job_claiming_the_request_never_stands_in_for_its_own() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        ours = world.kube.objects[("Job", world.job_name("r"))]
        decoy = copy.deepcopy(ours)
        decoy["metadata"] = {k: v for k, v in decoy["metadata"].items() if k not in ("uid", "resourceVersion")}
        decoy["metadata"]["name"] = "r-decoy"
        world.kube.create_if_absent(decoy)
        decoy = world.kube.objects[("Job", "r-decoy")]
        decoy["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
        world.kube.pods["r-decoy"] = [world.own_pod(decoy, passed(1), "Complete")]
        world.sync()
        await world.controller.on_job("MODIFIED", copy.deepcopy(decoy))
        await world.tick()
        assert world.phase("r") == "Running"
        assert world.lineage_version() == 0
        await world.complete("r", passed(1))
        return world

    world = run(scenario)
    assert world.phase("r") == "Succeeded"
    assert world.status("r")["jobName"] == job_name("r", "uid-r")
    assert world.kube.job_patches == [(job_name("r", "uid-r"), {"spec": {"ttlSecondsAfterFinished": 86400}})]
