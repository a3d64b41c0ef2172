"""End to end: a reference bank for the digits demo model, made by the chart's operator, used by a request.

``kubectl apply`` the example calibration (examples/calibrations/digits.yaml)
into a namespace holding the demo model; the operator runs its K = 4 folds as
an Indexed Job on the fake GPU node (one GPU: the folds take turns, as they
would on a one-GPU cluster) and the merge; the example request of the model
then names the bank in its record. The test's copy of the calibration
trains 20 epochs instead of the recipe's 150 and K = 4 folds instead of the
example's 10: the tier checks the cluster's side, and the recipe's would make
the calibration about seventeen times longer on two busy cores without
changing anything that is asserted here (the job's tests check the references
against the recipe and the default K).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.e2e.harness import (
    EXAMPLE,
    Api,
    Release,
    Workspace,
    condition,
    kubectl_apply,
    phase,
    wait_request,
)
from unlearning_contracts.api import API_GROUP, API_VERSION, CALIBRATION

pytestmark = pytest.mark.e2e

CALIBRATION_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "calibrations" / "digits.yaml"
# Four folds taking turns on the one GPU, each a fresh process loading torch, then the merge.
CALIBRATION_TIMEOUT = 600.0


def example_calibration(name: str | None = None) -> dict[str, Any]:
    """The example, with 20 epochs and 4 folds (module docstring)."""
    manifest: dict[str, Any] = yaml.safe_load(CALIBRATION_EXAMPLE.read_text())
    manifest["spec"]["recipe"]["epochs"] = 20
    manifest["spec"]["folds"] = 4
    if name is not None:
        manifest["metadata"]["name"] = name
    return manifest


def calibration_of(api: Api, namespace: str, name: str) -> dict[str, Any]:
    response = api.custom.get_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, CALIBRATION.plural, name, _preload_content=False
    )
    return dict(json.loads(response.data))


def wait_calibration(
    api: Api, node: GpuNode, namespace: str, name: str, phases: tuple[str, ...] = ("Ready", "Failed", "Rejected")
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        node.check_alive()
        obj = calibration_of(api, namespace, name)
        return obj if phase(obj) in phases else None

    found: dict[str, Any] = wait_for(f"calibration {namespace}/{name} in {phases}", check, CALIBRATION_TIMEOUT, 0.5)
    return found


def calibration_jobs(api: Api, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    """The calibration's Jobs by component (calibration-folds, calibration-merge)."""
    found = api.batch.list_namespaced_job(
        namespace, label_selector=f"unlearn.dev/calibration={name}", _preload_content=False
    )
    jobs: dict[str, list[dict[str, Any]]] = {}
    for job in json.loads(found.data)["items"]:
        jobs.setdefault(job["metadata"]["labels"]["app.kubernetes.io/component"], []).append(job)
    return jobs


def test_example_calibration_becomes_ready_on_the_gpu_node_and_the_example_request_uses_it(
    control_plane: ControlPlane, gpu_node: GpuNode, release: Release, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    applied = kubectl_apply(control_plane, ns, example_calibration())
    assert "unlearningcalibration.unlearn.dev/digits-mlp created" in applied.stdout, applied.stderr

    done = wait_calibration(e2e_api, gpu_node, ns, "digits-mlp")
    status = done["status"]
    assert phase(done) == "Ready", json.dumps(status, indent=1)
    assert condition(done, "Ready")["reason"] == "BankWritten"
    assert (status["folds"], status["foldsDone"]) == (4, 4)

    jobs = calibration_jobs(e2e_api, ns, "digits-mlp")
    (folds,) = jobs["calibration-folds"]
    (merge,) = jobs["calibration-merge"]
    assert (folds["spec"]["completionMode"], folds["spec"]["completions"]) == ("Indexed", 4)
    assert folds["status"]["completedIndexes"] == "0-3"
    pods = e2e_api.job_pods(ns, folds["metadata"]["name"])
    indices = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in pods)
    assert indices == [0, 1, 2, 3]
    for pod in pods:
        # Each fold held the node's GPU, under the restricted pod the operator builds for every Job.
        assert pod["spec"]["nodeName"] == gpu_node.name
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in merge["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    bank = workspace.models / status["bank"]["uri"].removeprefix("pvc://models/")
    assert bank.is_file()
    assert hashlib.sha256(bank.read_bytes()).hexdigest() == status["bank"]["sha256"]
    assert bank.parent.name == f"digits-mlp-{done['metadata']['uid'][:8]}"
    listed = control_plane.kubectl("get", "ulc", "-n", ns).stdout
    assert "Ready" in listed
    assert "4/4" in listed
    record = e2e_api.configmap(ns, status["auditConfigMap"])
    assert record["immutable"] is True
    assert json.loads(record["data"]["bank.json"])["bank"]["sha256"] == status["bank"]["sha256"]
    assert release.sample("unlearning_calibration_fold_duration_seconds_count") >= 4

    # The example request of the model uses the newest Ready bank, and its record says so.
    applied = control_plane.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    assert applied.returncode == 0, applied.stderr
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    request = wait_request(e2e_api, gpu_node, ns, name)
    assert phase(request) == "Succeeded", json.dumps(request["status"], indent=1)
    used = request["status"]["calibration"]
    assert used["calibrated"] is True, used
    assert (used["name"], used["uri"], used["sha256"]) == (
        f"{ns}/digits-mlp",
        status["bank"]["uri"],
        status["bank"]["sha256"],
    )
    audit = e2e_api.configmap(ns, request["status"]["auditConfigMap"])
    assert json.loads(audit["data"]["record.json"])["calibration"]["sha256"] == status["bank"]["sha256"]
    listed = control_plane.kubectl("get", "ulr", "-n", ns, name, "--no-headers").stdout.split()
    assert listed[-2] == "true"  # the Calibrated column


def test_operator_killed_during_a_calibration_leaves_one_indexed_job(
    control_plane: ControlPlane, gpu_node: GpuNode, release: Release, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    leader = release.wait_ready()
    lease = release.lease()
    assert lease is not None
    holder = lease["spec"]["holderIdentity"]
    manifest = example_calibration("digits-restart")
    # Two folds: what is checked is the one Indexed Job across the kill, not the bank (the test above).
    manifest["spec"]["folds"] = 2
    applied = kubectl_apply(control_plane, ns, manifest)
    assert applied.returncode == 0, applied.stderr

    def fold_running() -> dict[str, Any] | None:
        folds = calibration_jobs(e2e_api, ns, "digits-restart").get("calibration-folds")
        if not folds:
            return None
        pods = e2e_api.job_pods(ns, folds[0]["metadata"]["name"])
        return folds[0] if any(phase(p) == "Running" for p in pods) else None

    job = wait_for("a fold to run", fold_running, timeout=120, interval=0.5)
    release.kill(leader)

    # Another process takes the Lease (the standby, or the killed container restarted): no memory of the old.
    def taken_over() -> str | None:
        now = release.lease()
        current = str(((now or {}).get("spec") or {}).get("holderIdentity") or "")
        return current if current not in ("", holder) else None

    wait_for("another replica to take the Lease", taken_over, timeout=90, interval=0.5)

    done = wait_calibration(e2e_api, gpu_node, ns, "digits-restart")
    assert phase(done) == "Ready", json.dumps(done["status"], indent=1)
    jobs = calibration_jobs(e2e_api, ns, "digits-restart")
    # Exactly one Indexed Job (the one made before the kill, adopted) and one merge.
    assert [j["metadata"]["uid"] for j in jobs["calibration-folds"]] == [job["metadata"]["uid"]]
    assert len(jobs["calibration-merge"]) == 1
    assert done["status"]["jobName"] == job["metadata"]["name"]
