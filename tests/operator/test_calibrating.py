"""Calibrations through the reconciler with an in-memory API: the folds Job, the merge, restarts, faults, banks.

The same fake API server as test_controller.py (create/409, status patches),
driven by the events a watch would deliver. The real API server, Job
controller and job CLI are in tests/integration/test_calibration.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from prometheus_client import generate_latest

from tests.operator.factories import bank_record, record
from tests.operator.test_controller import World
from unlearning_operator import calibration_status as cal
from unlearning_operator import status as st
from unlearning_operator.names import calibration_job_name
from unlearning_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

INDEX = "batch.kubernetes.io/job-completion-index"


def jobs(world: World) -> list[str]:
    return sorted(name for kind, name in world.kube.objects if kind == "Job")


def cstatus(world: World, name: str = "cal") -> dict[str, Any]:
    return dict(world.kube.calibrations[name].get("status") or {})


def fold_pod(job: str, index: int, code: int, *, seconds: int = 60, message: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": "2026-01-01T12:00:00Z",
        "finishedAt": f"2026-01-01T12:{seconds // 60:02d}:{seconds % 60:02d}Z",
    }
    if message is not None:
        state["message"] = message
    return {
        "metadata": {"name": f"{job}-{index}-x{len(message or '')}", "annotations": {INDEX: str(index)}},
        "spec": {"containers": [{"name": "unlearn", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
            {"name": "unlearn", "state": {"terminated": state}}
        ]},
    }  # fmt: skip


async def job_event(world: World, name: str, status: dict[str, Any], event: str = "MODIFIED") -> None:
    job = world.kube.objects[("Job", name)]
    job["status"] = status
    world.sync()
    await world.controller.on_calibration_job(event, copy.deepcopy(job))
    await world.drain()


def complete(**extra: Any) -> dict[str, Any]:
    return {"conditions": [{"type": "Complete", "status": "True"}], **extra}


def failed(reason: str, **extra: Any) -> dict[str, Any]:
    return {"conditions": [{"type": "Failed", "status": "True", "reason": reason}], **extra}


async def run_folds(world: World, name: str = "cal") -> str:
    """Every fold of a 4-fold calibration succeeds (two reported at a time); returns the folds Job's name."""
    job = cstatus(world, name)["jobName"]
    world.kube.pods[job] = [fold_pod(job, k, 0, seconds=60 + 10 * k) for k in range(4)]
    await job_event(world, job, {"active": 2, "completedIndexes": "0-1", "succeeded": 2})
    await job_event(world, job, complete(completedIndexes="0-3", succeeded=4))
    return str(job)


async def merge(world: World, message: str | None, outcome: str = "Complete", name: str = "cal") -> None:
    job = cstatus(world, name)["mergeJobName"]
    state: dict[str, Any] = {"exitCode": 0 if outcome == "Complete" else 4, "finishedAt": "2026-01-01T12:10:00Z"}
    if message is not None:
        state["message"] = message
    statuses = [{"name": "unlearn", "state": {"terminated": state}}]
    world.kube.pods[job] = [{"metadata": {"name": f"{job}-x"}, "status": {"containerStatuses": statuses}}]
    status = complete() if outcome == "Complete" else failed("BackoffLimitExceeded")
    await job_event(world, job, status)


def test_calibration_runs_its_folds_then_the_merge_and_becomes_ready() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await world.settle()
        status = cstatus(world)
        assert status["phase"] == "Running"
        assert (status["folds"], status["parallelism"], status["foldsDone"]) == (4, 2, 0)
        assert status["output"] == "pvc://banks/digits/cal-uid-cal"
        assert jobs(world) == [status["jobName"]]
        job = world.kube.objects[("Job", status["jobName"])]
        assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == (
            "Indexed",
            4,
            2,
        )
        assert ("ConfigMap", f"{status['jobName']}-spec") in world.kube.objects

        folds_job = status["jobName"]
        world.kube.pods[folds_job] = [fold_pod(folds_job, 0, 0, seconds=75), fold_pod(folds_job, 1, 1)]
        await job_event(world, folds_job, {"active": 3, "completedIndexes": "0", "succeeded": 1, "failed": 1})
        assert (cstatus(world)["foldsDone"], cstatus(world)["display"]["folds"]) == (1, "1/4")
        assert ("cal", "Normal", "FoldDone") in world.kube.events

        await run_folds(world)
        status = cstatus(world)
        assert status["phase"] == "Merging"
        assert status["foldsDone"] == 4
        assert jobs(world) == sorted([folds_job, status["mergeJobName"]])
        # GPU-seconds of every fold pod the operator read (one GPU each): 60 + 70 + 80 + 90.
        assert status["cost"] == {"gpuSeconds": 300.0}

        await merge(world, json.dumps(bank_record().dump()))
        return world

    world = asyncio.run(scenario())
    status = cstatus(world)
    assert status["phase"] == "Ready"
    assert status["bank"]["sha256"] == "ba" * 32
    assert status["cost"]["retrainEquivalents"] == 3.0
    assert status["display"] == {"folds": "4/4", "agreement": "97.8", "cost": "3.0"}
    record = world.kube.objects[("ConfigMap", status["auditConfigMap"])]
    assert record["immutable"] is True
    assert "ownerReferences" not in record["metadata"]
    assert record["metadata"]["labels"]["unlearn.dev/audit"] == "true"
    assert json.loads(record["data"]["bank.json"])["bank"]["sha256"] == "ba" * 32
    assert json.loads(record["data"]["calibration.json"])["recipe"]["epochs"] == 150
    assert json.loads(record["data"]["outcome.json"])["phase"] == "Ready"
    assert ("cal", "Normal", "Ready") in world.kube.events
    metrics = generate_latest(world.controller.metrics.registry).decode()
    # Four folds observed once each (the first at 75 s; the others 70, 80, 90 s), never twice.
    assert "unlearning_calibration_fold_duration_seconds_count 4.0" in metrics
    assert "unlearning_calibration_fold_duration_seconds_sum 315.0" in metrics
    assert 'unlearning_calibrations_completed_total{result="Ready"} 1.0' in metrics
    assert "unlearning_calibration_gpu_seconds_total 300.0" in metrics


def test_restart_mid_calibration_adopts_the_one_indexed_job() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await world.settle()
        job = cstatus(world)["jobName"]
        named = cal.running(
            cstatus(world),
            job_name=job,
            folds=4,
            parallelism=2,
            output=cstatus(world)["output"],
            generation=1,
            now=world.controller.clock(),
            created=False,
        )
        # The operator died after naming the Job in status and creating it, before saying it exists:
        # the restarted one finds it with all its marks and adopts it, creating nothing.
        world.kube.calibrations["cal"]["status"] = copy.deepcopy(named)
        creates = len(world.kube.creates)
        restarted = World(kube=world.kube)
        await restarted.settle()
        await restarted.tick()
        assert cstatus(restarted)["phase"] == "Running"
        assert cal.job_created(cstatus(restarted))
        assert cstatus(restarted)["jobName"] == job
        assert jobs(restarted) == [job]
        assert [c for c in restarted.kube.creates[creates:] if c[0] == "Job"] == []

        # Died before creating it: the restarted operator creates it, once.
        job_body = restarted.kube.objects.pop(("Job", job))
        restarted.kube.calibrations["cal"]["status"] = copy.deepcopy(named)
        once = World(kube=restarted.kube)
        await once.settle()
        await once.tick()
        assert cal.job_created(cstatus(once))
        assert jobs(once) == [job]
        assert once.kube.objects[("Job", job)]["spec"] == job_body["spec"]
        restarted = once

        # Killed again after the folds, before Merging was written: the merge Job is found, not made twice.
        await run_folds(restarted)
        merge_job = cstatus(restarted)["mergeJobName"]
        restarted.kube.calibrations["cal"]["status"] = cal.folds_progress(
            cstatus(restarted) | {"phase": "Running"}, "0-3", "", restarted.controller.clock()
        )
        again = World(kube=restarted.kube)
        await again.settle()
        job_body = again.kube.objects[("Job", job)]
        await again.controller.on_calibration_job(None, copy.deepcopy(job_body))
        await again.drain()
        assert cstatus(again)["phase"] == "Merging"
        assert jobs(again) == sorted([job, merge_job])
        await merge(again, json.dumps(bank_record().dump()))
        return again

    world = asyncio.run(scenario())
    assert cstatus(world)["phase"] == "Ready"


def test_a_job_under_the_name_before_status_names_one_is_a_name_conflict() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        name = calibration_job_name("cal", "uid-cal")
        # Made in advance by a tenant, with every mark the operator would give it.
        world.kube.objects[("Job", name)] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "labels": {"app.kubernetes.io/managed-by": "unlearning-operator", "unlearn.dev/calibration": "cal"},
                "annotations": {"unlearn.dev/calibration-uid": "uid-cal"},
                "ownerReferences": [
                    {"apiVersion": "unlearn.dev/v1alpha1", "kind": "UnlearningCalibration", "name": "cal",
                     "uid": "uid-cal", "controller": True}
                ],
            },
            "spec": {"completionMode": "Indexed", "completions": 4, "parallelism": 4},
            "status": {"active": 4},
        }  # fmt: skip
        await world.settle()
        return world

    world = asyncio.run(scenario())
    status = cstatus(world)
    assert status["phase"] == "Failed"
    ready = cal.get_ready_condition(status)
    assert ready is not None
    assert ready["reason"] == cal.REASON_NAME_CONFLICT
    assert "does not name it" in status["message"]
    assert ("cal", "Warning", "Failed") in world.kube.events


def test_a_fold_that_keeps_failing_fails_the_calibration_naming_it() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await world.settle()
        job = cstatus(world)["jobName"]
        crash = "\nRuntimeError: CUDA error: an illegal memory access"
        world.kube.pods[job] = [fold_pod(job, 0, 0), *(fold_pod(job, 2, 1, message="x" * k + crash) for k in range(3))]
        await job_event(world, job, failed("MaxFailedIndexesExceeded", completedIndexes="0", failedIndexes="2"))
        return world

    world = asyncio.run(scenario())
    status = cstatus(world)
    assert status["phase"] == "Failed"
    ready = cal.get_ready_condition(status)
    assert ready is not None
    assert ready["reason"] == "FoldFailed"
    assert status["message"] == (
        "fold 2 of 4 failed after 3 attempts with exit code 1: RuntimeError: CUDA error: an illegal memory access"
    )
    assert (status["foldsDone"], status["failedIndexes"]) == (1, "2")
    assert status["auditConfigMap"]
    assert ("cal", "Warning", "Failed") in world.kube.events
    # No merge of a bank with a missing fold.
    assert not any(name.endswith("-merge") for kind, name in world.kube.objects if kind == "Job")


@pytest.mark.parametrize(
    ("message", "outcome", "reason", "words"),
    [
        ("not json", "Complete", "MalformedRecord", "the merge's record: the termination message is not a result"),
        (
            json.dumps(bank_record(exitCode=4, error="fold-2.json: sha256 differs from fold-2.npz", bank=None).dump()),
            "Failed",
            "MergeFailed",
            "the merge failed: fold-2.json: sha256 differs from fold-2.npz",
        ),
        (None, "Failed", "MergeFailed", "the merge failed with exit code 4"),
    ],
)
def test_merge_endings(message: str | None, outcome: str, reason: str, words: str) -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await world.settle()
        await run_folds(world)
        await merge(world, message, outcome)
        return world

    status = cstatus(asyncio.run(scenario()))
    assert status["phase"] == "Failed"
    ready = cal.get_ready_condition(status)
    assert ready is not None
    assert ready["reason"] == reason
    assert words in status["message"]


def test_deleted_folds_job_fails_the_calibration() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await world.settle()
        job = cstatus(world)["jobName"]
        body = world.kube.objects.pop(("Job", job))
        world.sync()
        await world.controller.on_calibration_job("DELETED", body)
        await world.drain()
        return world

    status = cstatus(asyncio.run(scenario()))
    assert status["phase"] == "Failed"
    assert "was deleted before it finished: the bank was not written" in status["message"]


def test_calibration_folds_share_the_cap_with_requests() -> None:
    async def scenario() -> World:
        world = World(OperatorSettings(max_concurrent_jobs=3))
        world.add_calibration("cal", "2026-01-01T10:00:00Z")  # two slots (parallelism 2)
        world.add("r1", "2026-01-01T10:00:01Z", **{"model.name": "m1"})
        world.add("r2", "2026-01-01T10:00:02Z", **{"model.name": "m2"})
        await world.settle()
        assert cstatus(world)["phase"] == "Running"
        assert (world.phase("r1"), world.phase("r2")) == ("Running", "Queued")
        assert "3 of 3 slots in use" in world.kube.requests["r2"]["status"]["message"]
        # Three folds done, one left: the calibration holds one slot now, and r2 starts.
        job = cstatus(world)["jobName"]
        world.kube.pods[job] = [fold_pod(job, k, 0) for k in range(3)]
        await job_event(world, job, {"active": 1, "completedIndexes": "0-2", "succeeded": 3})
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert world.phase("r2") == "Running"


def test_a_second_calibration_of_a_model_waits_for_the_first() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("first", "2026-01-01T10:00:00Z")
        world.add_calibration("refresh", "2026-01-01T10:00:01Z")
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert cstatus(world, "first")["phase"] == "Running"
    waiting = cstatus(world, "refresh")
    assert waiting["phase"] == "Queued"
    assert "waiting for calibration first" in waiting["message"]


def test_invalid_calibration_is_rejected() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("bad", "2026-01-01T10:00:00Z", **{"job.image": "evil/miner:1"})
        world.add_calibration("worse", "2026-01-01T10:00:00Z", folds=64)
        await world.settle()
        return world

    world = asyncio.run(scenario())
    for name, reason, words in (
        ("bad", "ImageNotAllowed", "spec.job.image: evil/miner:1 is not allowed"),
        ("worse", "InvalidSpec", "spec.folds"),
    ):
        status = cstatus(world, name)
        assert status["phase"] == "Rejected"
        accepted = st.get_condition(status, cal.ACCEPTED)
        assert accepted is not None
        assert (accepted["reason"], words in accepted["message"]) == (reason, True)
    assert jobs(world) == []


# ---- requests and banks ---------------------------------------------------------------


async def ready_bank(world: World, name: str = "cal") -> None:
    await world.settle()
    await run_folds(world, name)
    await merge(world, json.dumps(bank_record(calibration=f"team-a/{name}").dump()), name=name)
    await world.settle()


def request_job(world: World, name: str) -> dict[str, Any]:
    return dict(world.kube.objects[("Job", world.job_name(name))])


def test_a_required_bank_is_waited_for_then_handed_to_the_job() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        world.add("r", "2026-01-01T10:00:01Z", **{"calibration.policy": "Required"})
        await world.settle()
        assert world.phase("r") == "Pending"
        waiting = st.get_condition(world.kube.requests["r"]["status"], st.CALIBRATION_READY)
        assert waiting is not None
        assert (waiting["status"], waiting["reason"]) == ("False", "WaitingForCalibration")
        assert "waiting for cal (Running, 0/4 folds) to become Ready" in waiting["message"]
        assert [name for name in jobs(world) if name.startswith("r-")] == []
        await ready_bank(world)
        return world

    world = asyncio.run(scenario())
    assert world.phase("r") == "Running"
    status = world.kube.requests["r"]["status"]
    bank = {"name": "team-a/cal", "uri": "pvc://banks/digits/digits-cal-7c6b5a49/bank.npz", "sha256": "ba" * 32}
    assert status["calibration"] == bank
    found = st.get_condition(status, st.CALIBRATION_READY)
    assert found is not None
    assert (found["status"], found["reason"]) == ("True", "CalibrationFound")
    job = request_job(world, "r")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-6:] == ["--calibration-bank", bank["uri"], "--calibration-sha256", bank["sha256"],
                            "--calibration-name", "team-a/cal"]  # fmt: skip
    mounts = {m["mountPath"]: m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/volumes/banks"]["readOnly"] is True
    assert json.loads(job["metadata"]["annotations"]["unlearn.dev/calibration-bank"]) == bank


def test_if_available_runs_without_a_bank_and_says_why() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:01Z")
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert world.phase("r") == "Running"
    status = world.kube.requests["r"]["status"]
    assert "calibration" not in status
    none = st.get_condition(status, st.CALIBRATION_READY)
    assert none is not None
    assert (none["status"], none["reason"]) == ("False", "NoCalibration")
    assert "--calibration-bank" not in request_job(world, "r")["spec"]["template"]["spec"]["containers"][0]["command"]


def test_required_without_any_calibration_is_rejected() -> None:
    async def scenario() -> World:
        world = World()
        world.add("r", "2026-01-01T10:00:01Z", **{"calibration.policy": "Required"})  # two hours before NOW
        await world.settle()
        return world

    world = asyncio.run(scenario())
    assert world.phase("r") == "Rejected"
    accepted = st.get_condition(world.kube.requests["r"]["status"], st.ACCEPTED)
    assert accepted is not None
    assert accepted["reason"] == "CalibrationMissing"
    assert ("r", "Warning", "Rejected") in world.kube.events
    assert jobs(world) == []


def test_the_record_says_whether_the_run_was_calibrated() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await ready_bank(world)
        world.add("r", "2026-01-01T10:00:01Z")
        await world.settle()
        used = {"name": "team-a/cal", "uri": "pvc://banks/x/bank.npz", "sha256": "ba" * 32, "calibrated": True}
        await world.complete("r", json.dumps(record(calibration=used | {"note": ""}).dump()))
        return world

    world = asyncio.run(scenario())
    status = world.kube.requests["r"]["status"]
    assert status["phase"] == "Succeeded"
    assert status["calibration"]["calibrated"] is True
    metrics = generate_latest(world.controller.metrics.registry).decode()
    assert 'unlearning_requests_calibrated_total{calibrated="true"} 1.0' in metrics


def test_tick_reports_phases_and_bank_ages() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        await ready_bank(world)
        world.add_calibration("next", "2026-01-01T11:00:00Z", **{"model.name": "other"})
        await world.settle()
        await world.controller.tick()
        await world.drain()
        return world

    world = asyncio.run(scenario())
    metrics = generate_latest(world.controller.metrics.registry).decode()
    assert 'unlearning_calibrations{phase="Ready"} 1.0' in metrics
    assert 'unlearning_calibrations{phase="Running"} 1.0' in metrics
    assert 'unlearning_calibrations{phase="Failed"} 0.0' in metrics
    # The fake clock does not move: the bank was written "now".
    assert "unlearning_calibration_oldest_bank_age_seconds 0.0" in metrics
    assert 'unlearning_calibration_models_by_bank_age{age="under_1d"} 1.0' in metrics
    assert 'unlearning_calibration_models_by_bank_age{age="over_30d"} 0.0' in metrics


def test_a_job_of_its_name_that_the_operator_did_not_make_is_never_adopted() -> None:
    async def scenario() -> World:
        world = World()
        world.add_calibration("cal", "2026-01-01T10:00:00Z")
        # A tenant made a Job under the folds Job's name before the operator did (the name is computable).
        name = calibration_job_name("cal", "uid-cal")
        forged = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "labels": {"app.kubernetes.io/managed-by": "unlearning-operator", "unlearn.dev/calibration": "cal"},
                "ownerReferences": [{"kind": "UnlearningCalibration", "name": "cal", "uid": "uid-cal"}],
            },
            "spec": {"completionMode": "Indexed", "completions": 4},
        }
        world.kube.create_if_absent(forged)
        await world.settle()
        return world

    world = asyncio.run(scenario())
    status = cstatus(world)
    assert status["phase"] == "Failed"
    ready = cal.get_ready_condition(status)
    assert ready is not None
    assert ready["reason"] == "NameConflict"
    assert "the operator did not make it for this calibration" in status["message"]
    assert not any(name.endswith("-merge") for kind, name in world.kube.objects if kind == "Job")
