"""The reconciler's decisions with an in-memory API (the injected Kube), no cluster.

The real API server is exercised in tests/integration; here the point is the
order of operations: what is created, what status is written, what a
restarted operator (a fresh Controller with an empty cache) adopts.
"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.operator.factories import raw_spec, record
from unlearning_operator import status as st
from unlearning_operator.controller import Controller
from unlearning_operator.k8s import ApiError, ObjectRef
from unlearning_operator.metrics import build_registry
from unlearning_operator.names import job_name
from unlearning_operator.settings import OperatorSettings
from unlearning_operator.views import job_view, request_view

pytestmark = pytest.mark.unit

NS = "team-a"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeKube:
    """Just enough of k8s.Kube, with the API server's create/409 and resourceVersion semantics."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, list[dict[str, Any]]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.creates: list[tuple[str, str]] = []
        self.version = 0

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("creationTimestamp", "2026-01-01T12:00:00Z")
        return obj

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        self.creates.append(key)
        self.objects[key] = self._stamp(copy.deepcopy(obj))
        return copy.deepcopy(self.objects[key]), True

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(("Job", name)))

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods.get(job_name, []))

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(("ConfigMap", name)))

    def replace_configmap(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = ("ConfigMap", obj["metadata"]["name"])
        if self.objects[key]["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        if self.objects[key].get("immutable"):
            raise ApiError(422, "Invalid", "field is immutable")
        self.objects[key] = self._stamp(copy.deepcopy(obj))
        return copy.deepcopy(self.objects[key])

    def patch_request_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        if name not in self.requests:
            return False
        status = self.requests[name].setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = copy.deepcopy(value)
        return True

    def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str, now: datetime) -> None:
        self.events.append((ref.name, type_, reason))


class World:
    """The fake API plus the kopf indexes built from it, and a Controller bound to them."""

    def __init__(self, settings: OperatorSettings | None = None, kube: FakeKube | None = None) -> None:
        self.kube = kube or FakeKube()
        self.request_index: dict[tuple[str, str], list[Any]] = {}
        self.job_index: dict[tuple[str, str], list[Any]] = {}
        self.controller = Controller(
            settings=settings or OperatorSettings(),
            kube=self.kube,
            metrics=build_registry(),
            clock=lambda: NOW,  # type: ignore[arg-type]
        )
        self.controller.bind(self.request_index, self.job_index)

    def sync(self) -> None:
        self.request_index.clear()
        self.job_index.clear()
        for body in self.kube.requests.values():
            view = request_view(body)
            self.request_index[view.key] = [view]
        for (kind, _), body in self.kube.objects.items():
            if kind == "Job":
                view = job_view(body)
                self.job_index[(view.namespace, view.request)] = [view]

    def add(self, name: str, created: str, **overrides: Any) -> None:
        self.kube.requests[name] = {
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "creationTimestamp": created,
                "generation": 1,
            },
            "spec": raw_spec(**overrides),
        }

    async def settle(self) -> None:
        """Deliver request events until nothing changes (what kopf's watch would do)."""
        for _ in range(20):
            before = json.dumps([self.kube.requests, sorted(self.kube.objects)], sort_keys=True, default=str)
            self.sync()
            for body in list(self.kube.requests.values()):
                await self.controller.on_request(None, copy.deepcopy(body))
            self.controller.run_schedule()  # the coalesced pass, without waiting for its timer
            while self.controller.tasks:
                await asyncio.gather(*list(self.controller.tasks))
            self.sync()
            if json.dumps([self.kube.requests, sorted(self.kube.objects)], sort_keys=True, default=str) == before:
                return

    def phase(self, name: str) -> str | None:
        return st.phase_of(self.kube.requests[name].get("status"))

    def job_name(self, name: str) -> str:
        return str(self.kube.requests[name]["status"]["jobName"])

    async def complete(self, name: str, message: str | None, outcome: str = "Complete") -> None:
        job_name = self.job_name(name)
        job = self.kube.objects[("Job", job_name)]
        job["status"] = {"conditions": [{"type": outcome, "status": "True"}]}
        state = {"exitCode": 0 if outcome == "Complete" else 1, "finishedAt": "2026-01-01T12:05:00Z"}
        if message is not None:
            state["message"] = message
        self.kube.pods[job_name] = [
            {
                "metadata": {"name": f"{job_name}-x"},
                "status": {"containerStatuses": [{"name": "unlearn", "state": {"terminated": state}}]},
            }
        ]
        self.sync()
        await self.controller.on_job("MODIFIED", copy.deepcopy(job))
        while self.controller.tasks:
            await asyncio.gather(*list(self.controller.tasks))


def passed(version: int) -> str:
    out = {"uri": f"pvc://models/digits/versions/v{version}.pt2", "sha256": f"{version:02d}" * 32, "format": "exported"}
    return json.dumps(record(modelVersion=version, outputModel=out).dump())


def test_two_requests_for_one_model_run_in_sequence_from_the_lineage() -> None:
    async def scenario() -> World:
        world = World()
        world.add("first", "2026-01-01T10:00:00Z")
        world.add("second", "2026-01-01T10:00:01Z")
        await world.settle()
        assert (world.phase("first"), world.phase("second")) == ("Running", "Queued")
        waiting = st.get_condition(world.kube.requests["second"]["status"], st.JOB_CREATED)
        assert waiting is not None
        assert waiting["reason"] == st.REASON_WAITING_FOR_MODEL
        kinds = [k for k, _ in world.kube.creates]
        # The lineage, then the spec ConfigMap in parallel with the NetworkPolicy, which precedes the Job.
        assert kinds[0] == "ConfigMap"
        assert sorted(kinds[1:3]) == ["ConfigMap", "NetworkPolicy"]
        assert kinds[3:] == ["Job"]

        await world.complete("first", passed(1))
        assert world.phase("first") == "Succeeded"
        await world.settle()
        assert world.phase("second") == "Running"
        second = world.kube.requests["second"]["status"]
        assert second["inputModel"]["uri"] == "pvc://models/digits/versions/v1.pt2"
        assert second["modelVersion"] == 2
        job = world.kube.objects[("Job", world.job_name("second"))]
        assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "2"
        return world

    world = asyncio.run(scenario())
    lineage = world.kube.objects[("ConfigMap", "unlearn-model-digits-mlp")]["data"]
    assert json.loads(lineage["current"])["version"] == 1
    first = world.kube.requests["first"]["status"]
    audit = world.kube.objects[("ConfigMap", first["auditConfigMap"])]
    assert audit["immutable"] is True
    assert ("first", "Normal", "Succeeded") in world.kube.events


def test_restart_adopts_the_job_instead_of_creating_a_second() -> None:
    async def scenario() -> World:
        world = World()
        world.add("only", "2026-01-01T10:00:00Z")
        await world.settle()
        assert world.phase("only") == "Running"
        # The operator died between creating the Job and patching status.
        world.kube.requests["only"]["status"] = st.pending(None, 1, NOW)
        creates = len(world.kube.creates)
        restarted = World(kube=world.kube)
        await restarted.settle()
        assert restarted.phase("only") == "Running"
        assert len(restarted.kube.creates) == creates
        assert sum(1 for kind, _ in restarted.kube.objects if kind == "Job") == 1
        await restarted.complete("only", passed(1))
        assert restarted.phase("only") == "Succeeded"
        return restarted

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("message", "outcome", "reason"),
    [
        ("not json at all", "Complete", st.REASON_BAD_RESULT),
        ("x" * 5000, "Complete", st.REASON_BAD_RESULT),
        (None, "Failed", st.REASON_ERROR),
        (
            json.dumps(record(verdict="Failed", exitCode=3, reasons=["maxMiaAuc: 0.7 > 0.6"]).dump()),
            "Failed",
            st.REASON_GATES_FAILED,
        ),
    ],
)
def test_job_endings_become_failed_with_a_reason(message: str | None, outcome: str, reason: str) -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        await world.complete("r", message, outcome)
        return world

    world = asyncio.run(scenario())
    status = world.kube.requests["r"]["status"]
    assert status["phase"] == "Failed"
    complete = st.get_condition(status, st.COMPLETE)
    assert complete is not None
    assert complete["reason"] == reason
    assert status["auditConfigMap"]
    # A failed run never becomes the current model.
    lineage = world.kube.objects[("ConfigMap", "unlearn-model-digits-mlp")]["data"]
    assert json.loads(lineage["current"])["version"] == 0


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

    world = asyncio.run(scenario())
    assert world.phase("a") == "Failed"
    complete = st.get_condition(world.kube.requests["a"]["status"], st.COMPLETE)
    assert complete is not None
    assert complete["reason"] == st.REASON_JOB_DELETED
    assert world.phase("b") == "Running"


def test_global_cap_and_rejection() -> None:
    async def scenario() -> World:
        world = World(OperatorSettings(max_concurrent_jobs=2))
        for i in range(4):
            world.add(f"r{i}", f"2026-01-01T10:00:0{i}Z", **{"model.name": f"m{i}"})
        world.add("bad", "2026-01-01T09:00:00Z", **{"job.image": "evil/miner:1"})
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert [world.phase(f"r{i}") for i in range(4)] == ["Running", "Running", "Queued", "Queued"]
    assert world.phase("bad") == "Rejected"
    assert "2 of 2 jobs running" in world.kube.requests["r2"]["status"]["message"]
    assert ("bad", "Warning", "Rejected") in world.kube.events
    assert not any(name.startswith("bad") for kind, name in world.kube.objects if kind == "Job")


def test_status_is_not_rewritten_when_nothing_changed() -> None:
    async def scenario() -> tuple[World, int]:
        world = World()
        world.add("r", "2026-01-01T10:00:00Z")
        await world.settle()
        calls = 0
        original = world.kube.patch_request_status

        def counting(namespace: str, name: str, patch: dict[str, Any]) -> bool:
            nonlocal calls
            calls += 1
            return original(namespace, name, patch)

        world.kube.patch_request_status = counting  # type: ignore[method-assign]
        await world.settle()
        await world.controller.tick()
        return world, calls

    _, calls = asyncio.run(scenario())
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
    assert world.phase("r") in ("Pending", "Queued")
    registry = world.controller.metrics.registry
    errors = registry.get_sample_value("unlearning_handler_errors_total", {"handler": "launch"})
    assert errors is not None
    assert errors >= 1
