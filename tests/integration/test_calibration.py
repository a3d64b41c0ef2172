"""UnlearningCalibrations through the operator, the real Job controller and the real ``unlearn`` CLI.

The folds run ``unlearn calibrate-fold`` as the indices of an Indexed Job on
the fake GPU node, the merge ``unlearn calibrate-merge``; a request of the
model then runs ``unlearn run`` with the bank. The recipe is the demo
model's (Adam, learning rate 1e-3, batch 64) with 20 epochs instead of 150 and
K = 3: what is checked here is the cluster's side (Jobs, indices, retries,
status, records, restarts), and 20 epochs keep a fold to seconds on two busy
cores; the job's own tests check what the references are worth.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import wait_for
from tests.integration.conftest import GROUP, VERSION, OperatorProcess, PhaseRecorder, request_manifest
from tests.integration.test_operator import condition, create, events_for, get, jobs_of, wait_phase
from unlearning_contracts.api import CALIBRATION

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "calibrations" / "digits.yaml"
CAL_PLURAL = CALIBRATION.plural
CAL_TIMEOUT = 480.0


def calibration(name: str, **spec: Any) -> dict[str, Any]:
    """examples/calibrations/digits.yaml, renamed, K = 3, 20 epochs, CPU-only folds (see the module docstring)."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"]["recipe"]["epochs"] = 20
    manifest["spec"]["folds"] = 3
    manifest["spec"]["job"] = {"gpus": 0}
    manifest["spec"].update(spec)
    return manifest


def custom(cp: ControlPlane) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cp.api_client())


def get_cal(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom(cp).get_namespaced_custom_object(GROUP, VERSION, namespace, CAL_PLURAL, name))


def wait_cal(
    cp: ControlPlane, namespace: str, name: str, phases: tuple[str, ...], timeout: float = CAL_TIMEOUT
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get_cal(cp, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        return dict(wait_for(f"calibration {name} in {'/'.join(phases)}", reached, timeout=timeout))
    except TimeoutError as error:
        pods = client.CoreV1Api(cp.api_client()).list_namespaced_pod(namespace).items
        seen = [(p.metadata.name, p.status.phase, p.status.container_statuses) for p in pods]
        raise AssertionError(f"{error}; status {get_cal(cp, namespace, name).get('status')}; pods {seen}") from None


def calibration_jobs(cp: ControlPlane, namespace: str, name: str) -> list[client.V1Job]:
    batch = client.BatchV1Api(cp.api_client())
    return list(batch.list_namespaced_job(namespace, label_selector=f"unlearn.dev/calibration={name}").items)


def messages(cp: ControlPlane, namespace: str, job_name: str) -> dict[str, dict[str, Any]]:
    """Each finished pod's termination message, by the pod's completion index (or its name)."""
    api = client.CoreV1Api(cp.api_client())
    found = {}
    for pod in api.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items:
        for status in pod.status.container_statuses or []:
            if status.state.terminated is not None and status.state.terminated.message:
                key = (pod.metadata.annotations or {}).get(
                    "batch.kubernetes.io/job-completion-index", pod.metadata.name
                )
                found[key] = json.loads(status.state.terminated.message)
    return found


def on_claim(models: Path, uri: str) -> Path:
    return models / uri.removeprefix("pvc://models/")


def test_calibration_becomes_ready_and_a_request_that_requires_it_uses_its_bank(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    recorder = PhaseRecorder(cp.api_client(), namespace, CAL_PLURAL)
    try:
        applied = cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(calibration("digits-cal")))
        assert "unlearningcalibration.unlearn.dev/digits-cal created" in applied.stdout
        # A request that requires the bank waits for it (Pending, with a condition saying so).
        create(cp, namespace, request_manifest("needs-bank", calibration={"policy": "Required"}))
        waiting = wait_phase(cp, namespace, "needs-bank", ("Pending",), timeout=60)
        wait_for(
            "needs-bank waits for the calibration",
            lambda: (get(cp, namespace, "needs-bank")["status"].get("conditions") and any(
                c["type"] == "CalibrationReady" and c["reason"] == "WaitingForCalibration"
                for c in get(cp, namespace, "needs-bank")["status"]["conditions"]
            )),
            timeout=60,
        )  # fmt: skip
        assert not jobs_of(cp, namespace, "needs-bank"), waiting["status"]
        done = wait_cal(cp, namespace, "digits-cal", ("Ready", "Failed"))
    finally:
        recorder.stop()
    status = done["status"]
    assert status["phase"] == "Ready", json.dumps(status, indent=1)
    assert recorder.phases["digits-cal"] == ["Pending", "Running", "Merging", "Ready"]
    assert (status["folds"], status["foldsDone"], status["parallelism"]) == (3, 3, 2)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Accepted": "True",
        "JobCreated": "True",
        "FoldsComplete": "True",
        "Ready": "True",
    }
    assert not done["metadata"].get("finalizers")

    # One Indexed Job whose three indices each trained a reference, then one merge Job.
    jobs = {j.metadata.labels["app.kubernetes.io/component"]: j for j in calibration_jobs(cp, namespace, "digits-cal")}
    assert sorted(jobs) == ["calibration-folds", "calibration-merge"]
    folds = jobs["calibration-folds"]
    assert (folds.spec.completion_mode, folds.spec.completions, folds.spec.parallelism) == ("Indexed", 3, 2)
    assert (folds.spec.backoff_limit_per_index, folds.spec.max_failed_indexes) == (2, 0)
    assert folds.status.completed_indexes == "0-2"
    assert folds.metadata.owner_references[0].uid == done["metadata"]["uid"]
    fold_records = messages(cp, namespace, folds.metadata.name)
    assert sorted(fold_records) == ["0", "1", "2"]
    assert all(fold_records[k]["fold"] == int(k) and fold_records[k]["exitCode"] == 0 for k in fold_records)

    # The bank is on the claim, in the calibration's own folder, with the digest status names.
    assert status["output"] == f"pvc://models/calibrations/digits-mlp/digits-cal-{done['metadata']['uid'][:8]}"
    bank = on_claim(models_pvc, status["bank"]["uri"])
    assert bank.parent == on_claim(models_pvc, status["output"])
    assert hashlib.sha256(bank.read_bytes()).hexdigest() == status["bank"]["sha256"]
    assert (bank.parent / "bank.json").is_file()
    assert sorted(p.name for p in bank.parent.glob("fold-*.npz")) == ["fold-0.npz", "fold-1.npz", "fold-2.npz"]
    (merge_record,) = messages(cp, namespace, jobs["calibration-merge"].metadata.name).values()
    assert merge_record["bank"] == status["bank"]
    assert (
        status["inputModel"]["sha256"]
        == hashlib.sha256((models_pvc / "digits" / "digits-mlp.pt2").read_bytes()).hexdigest()
    )
    assert status["cost"]["retrainEquivalents"] > 0
    assert 0 < status["likeness"]["agreement"] <= 100
    printed = cp.kubectl("get", "ulc", "-n", namespace, "digits-cal", "--no-headers").stdout.split()
    assert printed[:4] == ["digits-cal", "Ready", "digits-mlp", "3/3"]

    core = client.CoreV1Api(cp.api_client())
    record = core.read_namespaced_config_map(status["auditConfigMap"], namespace)
    assert record.immutable is True
    assert json.loads(record.data["bank.json"])["bank"] == status["bank"]
    reasons = [r for _, r, _ in events_for(cp, namespace, "digits-cal")]
    assert reasons.count("FoldDone") >= 1
    assert {"JobCreated", "Merging", "Ready"} <= set(reasons)
    metrics = operator_process.metrics()
    assert "unlearning_calibration_fold_duration_seconds_count 3.0" in metrics
    assert 'unlearning_calibrations_completed_total{result="Ready"} 1.0' in metrics

    # The waiting request now runs with the bank, and its record names it.
    request = wait_phase(cp, namespace, "needs-bank", ("Succeeded", "Failed"))
    assert request["status"]["phase"] == "Succeeded", request["status"]
    used = request["status"]["calibration"]
    assert used["calibrated"] is True, used
    assert (used["name"], used["uri"], used["sha256"]) == (
        f"{namespace}/digits-cal",
        status["bank"]["uri"],
        status["bank"]["sha256"],
    )
    assert condition(request, "CalibrationReady")["reason"] == "CalibrationFound"
    [job] = jobs_of(cp, namespace, "needs-bank")
    command = job.spec.template.spec.containers[0].command
    assert command[command.index("--calibration-sha256") + 1] == status["bank"]["sha256"]
    audit = core.read_namespaced_config_map(request["status"]["auditConfigMap"], namespace)
    assert json.loads(audit.data["record.json"])["calibration"]["sha256"] == status["bank"]["sha256"]

    # Deleting the calibration deletes its Jobs; the bank files and the record stay.
    custom(cp).delete_namespaced_custom_object(GROUP, VERSION, namespace, CAL_PLURAL, "digits-cal")
    wait_for("calibration Jobs garbage-collected", lambda: not calibration_jobs(cp, namespace, "digits-cal"), 60)
    assert hashlib.sha256(bank.read_bytes()).hexdigest() == status["bank"]["sha256"]
    assert core.read_namespaced_config_map(status["auditConfigMap"], namespace).data == record.data


def test_operator_killed_mid_calibration_leaves_one_indexed_job(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    create_calibration = calibration("restart-cal")
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(create_calibration))
    running = wait_cal(cp, namespace, "restart-cal", ("Running",), timeout=60)
    operator_process.stop(signal.SIGKILL)
    # The folds go on without the operator; it comes back mid-calibration.
    assert running["status"]["foldsDone"] < 3
    operator_process.start()
    done = wait_cal(cp, namespace, "restart-cal", ("Ready", "Failed"))
    assert done["status"]["phase"] == "Ready", done["status"]
    assert done["status"]["jobName"] == running["status"]["jobName"]
    components = sorted(
        j.metadata.labels["app.kubernetes.io/component"] for j in calibration_jobs(cp, namespace, "restart-cal")
    )
    assert components == ["calibration-folds", "calibration-merge"]
    # A second restart after Ready writes nothing.
    version = get_cal(cp, namespace, "restart-cal")["metadata"]["resourceVersion"]
    operator_process.stop()
    operator_process.start()
    wait_for("operator settled", operator_process.healthy, timeout=30)
    wait_for("a periodic pass", lambda: 'unlearning_calibrations{phase="Ready"} 1.0' in operator_process.metrics(), 30)
    assert get_cal(cp, namespace, "restart-cal")["metadata"]["resourceVersion"] == version
    assert len(calibration_jobs(cp, namespace, "restart-cal")) == 2


def test_a_fold_that_cannot_run_fails_the_calibration_naming_it(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    missing = {"name": "digits-mlp", "format": "exported", "source": {"claimName": "models", "path": "no/such.pt2"}}
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(calibration("broken-cal", model=missing)))
    done = wait_cal(cp, namespace, "broken-cal", ("Ready", "Failed"))
    status = done["status"]
    assert status["phase"] == "Failed", status
    ready = condition(done, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "FoldFailed")
    assert status["message"].startswith("fold ")
    assert "of 3 failed (exit code 4)" in status["message"]
    assert "no/such.pt2" in status["message"]
    # Exit 4 fails the index at once (no retry of invalid input) and no merge runs on a partial bank.
    [folds] = calibration_jobs(cp, namespace, "broken-cal")
    failed = folds.status.failed_indexes
    assert failed
    index = failed.split(",")[0].split("-")[0]
    assert f"fold {index} of 3" in status["message"]
    pods = (
        client.CoreV1Api(cp.api_client())
        .list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={folds.metadata.name}")
        .items
    )
    tried = [p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == index]
    assert len(tried) == 1
    assert get_cal(cp, namespace, "broken-cal")["status"]["auditConfigMap"]
    assert any(r == "Failed" for _, r, _ in events_for(cp, namespace, "broken-cal"))
