"""The operator against a real kube-apiserver, controller-manager and scheduler.

Jobs run the real ``unlearn run`` on the fake GPU node (about 15 s each on
CPU), so every number asserted here comes from a real unlearning run's
termination message.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.integration.conftest import GROUP, PLURAL, VERSION, OperatorProcess, PhaseRecorder, request_manifest
from unlearning_operator.names import audit_configmap_name

pytestmark = pytest.mark.cluster

JOB_TIMEOUT = 240.0


def custom(cp: ControlPlane) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cp.api_client())


def create(cp: ControlPlane, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(custom(cp).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest))


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom(cp).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))


def wait_phase(
    cp: ControlPlane, namespace: str, name: str, phases: tuple[str, ...], timeout: float = JOB_TIMEOUT
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get(cp, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        return dict(wait_for(f"{name} in phase {'/'.join(phases)}", reached, timeout=timeout))
    except TimeoutError as error:
        pods = client.CoreV1Api(cp.api_client()).list_namespaced_pod(namespace).items
        seen = [(p.metadata.name, p.status.phase, p.status.conditions, p.status.container_statuses) for p in pods]
        raise AssertionError(f"{error}; status {get(cp, namespace, name).get('status')}; pods {seen}") from None


def jobs_of(cp: ControlPlane, namespace: str, name: str) -> list[client.V1Job]:
    batch = client.BatchV1Api(cp.api_client())
    return list(batch.list_namespaced_job(namespace, label_selector=f"unlearn.dev/request={name}").items)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def events_for(cp: ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    api = client.CoreV1Api(cp.api_client())
    items = api.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [(e.type, e.reason, e.message) for e in items]


def termination_record(cp: ControlPlane, namespace: str, job_name: str) -> dict[str, Any]:
    api = client.CoreV1Api(cp.api_client())
    pods = api.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items
    messages = [
        s.state.terminated.message
        for p in pods
        for s in p.status.container_statuses or []
        if s.state.terminated is not None and s.state.terminated.message
    ]
    assert len(messages) == 1, messages
    return dict(json.loads(messages[0]))


def test_request_runs_to_succeeded_and_deletion_keeps_the_audit_record(
    *,
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    namespace: str,
    models_pvc: Path,
    operator_process: OperatorProcess,
    phases: PhaseRecorder,
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("digits-a", method={"name": "neggrad-plus"}))
    done = wait_phase(cp, namespace, "digits-a", ("Succeeded", "Failed"))
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert phases.until("digits-a", "Succeeded") == ["Pending", "Running", "Succeeded"]

    # The numbers are the job's own, from its termination message.
    record = termination_record(cp, namespace, status["jobName"])
    assert record["verdict"] == "Passed"
    assert status["verdict"] == "Passed"
    # The compact record keeps each number and its 95% interval at 4 decimals; the status carries them as they are.
    assert status["pre"] == record["pre"]
    assert status["post"] == record["post"]
    assert (
        status["post"]["intervals"]["miaAuc"]["low"]
        <= status["post"]["miaAuc"]
        <= status["post"]["intervals"]["miaAuc"]["high"]
    )
    assert status["outputModel"] == record["outputModel"]
    assert status["modelVersion"] == 1
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Accepted": "True",
        "JobCreated": "True",
        "Complete": "True",
        "GatesPassed": "True",
        # No calibration of the model exists: it ran uncalibrated (policy IfAvailable), and the record says so.
        "CalibrationReady": "False",
    }
    assert status["calibration"]["calibrated"] is False
    assert status["startTime"] <= status["completionTime"]
    assert not done["metadata"].get("finalizers"), "the operator must not add finalizers"
    # The new model file exists where the record says.
    output = models_pvc / record["outputModel"]["uri"].removeprefix("pvc://models/")
    assert output.is_file()

    # Job: owned by the request, labelled, the restricted profile, GPU limit; its TTL set only now that
    # the result is recorded (Kubernetes could have deleted it, and its pod's record, before).
    [job] = jobs_of(cp, namespace, "digits-a")
    assert job.spec.ttl_seconds_after_finished == 86400
    assert job.metadata.annotations["unlearn.dev/spec-generation"] == str(done["metadata"]["generation"])
    assert job.metadata.owner_references[0].uid == done["metadata"]["uid"]
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.security_context.read_only_root_filesystem is True
    assert job.spec.template.spec.automount_service_account_token is False

    # Lineage: version 1 is current, its parent the original.
    core = client.CoreV1Api(cp.api_client())
    lineage = core.read_namespaced_config_map("unlearn-model-digits-mlp", namespace)
    current = json.loads(lineage.data["current"])
    assert (current["version"], current["parent"], current["request"]) == (1, 0, "digits-a")
    assert current["uri"] == record["outputModel"]["uri"]
    assert current["sha256"] == record["outputModel"]["sha256"]

    # Audit record: immutable, the same numbers.
    audit = core.read_namespaced_config_map(status["auditConfigMap"], namespace)
    assert audit.immutable is True
    assert audit.metadata.labels["unlearn.dev/audit"] == "true"
    assert json.loads(audit.data["record.json"])["post"] == record["post"]

    reasons = {(t, r) for t, r, _ in events_for(cp, namespace, "digits-a")}
    assert {("Normal", "JobCreated"), ("Normal", "Succeeded")} <= reasons

    printed = cp.kubectl("get", "ulr", "-n", namespace, "digits-a", "--no-headers").stdout.split()
    assert printed[:3] == ["digits-a", "Succeeded", "digits-mlp"]
    assert "Passed" in printed

    metrics = operator_process.metrics()
    assert 'unlearning_requests_completed_total{method="neggrad-plus",verdict="Passed"} 1.0' in metrics
    assert "unlearning_post_mia_auc_count" in metrics
    assert "process_resident_memory_bytes" in metrics

    # Deleting the request deletes its Job and spec ConfigMap, never the audit record or the lineage.
    custom(cp).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "digits-a")
    wait_for("Job garbage-collected", lambda: not jobs_of(cp, namespace, "digits-a"), timeout=60)
    spec_cms = core.list_namespaced_config_map(namespace, label_selector="app.kubernetes.io/component=unlearning-job")
    wait_for(
        "spec ConfigMap garbage-collected",
        lambda: (
            not core.list_namespaced_config_map(
                namespace, label_selector="app.kubernetes.io/component=unlearning-job"
            ).items
        ),
        timeout=60,
    )
    assert spec_cms is not None
    assert core.read_namespaced_config_map(status["auditConfigMap"], namespace).data == audit.data
    assert core.read_namespaced_config_map("unlearn-model-digits-mlp", namespace).data == lineage.data


@pytest.mark.parametrize(
    ("name", "spec", "words"),
    [
        (
            "both-forget",
            {"forget": {"indices": [1], "indicesFile": {"claimName": "models", "path": "f.json"}}},
            "set exactly one of forget.indices or forget.indicesFile",
        ),
        ("r" * 49, {}, "metadata.name must be at most 48 characters"),
        ("negative-lr", {"method": {"forget": {"lr": -0.1}}}, "spec.method.forget.lr"),
        ("bad-method", {"method": {"name": "forget-everything"}}, "spec.method.name"),
        ("big-share", {"forget": {"indices": [1], "maxShare": 0.9}}, "spec.forget.maxShare"),
        ("bad-claim", {"output": {"location": {"claimName": "Models_PVC", "path": "x"}}}, "claimName"),
        ("escape", {"output": {"location": {"claimName": "models", "path": "../../etc"}}}, "must not contain '..'"),
        (
            "no-arch",
            {"model": {"name": "m", "format": "state-dict", "source": {"path": "m.pt"}}},
            "model.format state-dict needs model.architecture",
        ),
        ("no-train", {"data": {"source": "npz"}}, "need data.train"),
    ],
)
def test_schema_invalid_requests_are_refused_by_the_api_server(
    *, control_plane: ControlPlane, crd: None, namespace: str, name: str, spec: dict[str, Any], words: str
) -> None:
    manifest = request_manifest(name, **spec)
    done = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert done.returncode != 0
    assert words in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("name", "spec", "reason", "words"),
    [
        (
            "evil-image",
            {"job": {"image": "evil/miner:1"}},
            "ImageNotAllowed",
            "spec.job.image: evil/miner:1 is not allowed",
        ),
        ("duplicates", {"forget": {"indices": [3, 3]}}, "InvalidSpec", "spec.forget: forget.indices has duplicates"),
        # The probe: a factory that runs a shell command, a priority class that preempts the
        # cluster's own pods, every taint tolerated, a week on 64 GPUs, an output outside any claim.
        (
            "shell-factory",
            {
                "model": {
                    "name": "m",
                    "format": "state-dict",
                    "source": {"claimName": "models", "path": "m.safetensors"},
                    "architecture": {"factory": "os:system", "kwargs": {"command": "touch /tmp/pwned"}},
                }
            },
            "FactoryNotAllowed",
            "spec.model.architecture.factory: os:system is not allowed",
        ),
        (
            "critical",
            {"job": {"priorityClassName": "system-node-critical"}},
            "PlacementNotAllowed",
            "spec.job.priorityClassName: system-node-critical is not allowed",
        ),
        (
            "tolerate-all",
            {"job": {"tolerations": [{"operator": "Exists"}]}},
            "PlacementNotAllowed",
            "spec.job.tolerations[0]: a toleration without a key tolerates every taint",
        ),
        (
            "greedy",
            {"job": {"gpus": 64, "activeDeadlineSeconds": 604800}},
            "PlacementNotAllowed",
            "spec.job.gpus: 64 is above this cluster's bound of 8 per Job (chart value job.bounds.maxGpus",
        ),
        (
            "tmp-output",
            {"output": {"location": {"path": "/tmp/out"}}},
            "ClaimRequired",
            "spec.output.location: /tmp/out names no claimName",
        ),
    ],
)
def test_invalid_requests_are_rejected_by_the_operator(
    *,
    control_plane: ControlPlane,
    namespace: str,
    operator_process: OperatorProcess,
    name: str,
    spec: dict[str, Any],
    reason: str,
    words: str,
) -> None:
    create(control_plane, namespace, request_manifest(name, **spec))
    done = wait_phase(control_plane, namespace, name, ("Rejected",), timeout=60)
    accepted = condition(done, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", reason)
    assert words in accepted["message"]
    assert words in done["status"]["message"]
    assert not jobs_of(control_plane, namespace, name)
    wait_for("Rejected event", lambda: any(r == "Rejected" for _, r, _ in events_for(control_plane, namespace, name)))
    # A Rejected request has its audit record too: what was asked, and why it was refused.
    audit = client.CoreV1Api(control_plane.api_client()).read_namespaced_config_map(
        done["status"]["auditConfigMap"], namespace
    )
    assert audit.immutable is True
    outcome = json.loads(audit.data["outcome.json"])
    assert (outcome["phase"], outcome["reason"]) == ("Rejected", reason)
    assert words in outcome["message"]
    # Rejected is final: the operator keeps running and writes nothing more.
    operator_process.check_alive()


def test_restart_mid_job_leaves_exactly_one_job(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("digits-restart"))
    running = wait_phase(cp, namespace, "digits-restart", ("Running",), timeout=60)
    operator_process.stop(signal.SIGKILL)
    # The job keeps running without the operator; start it again mid-job.
    assert jobs_of(cp, namespace, "digits-restart")[0].status.succeeded in (None, 0)
    operator_process.start()
    done = wait_phase(cp, namespace, "digits-restart", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["jobName"] == running["status"]["jobName"]
    assert len(jobs_of(cp, namespace, "digits-restart")) == 1
    # A second restart after completion changes nothing.
    version = get(cp, namespace, "digits-restart")["metadata"]["resourceVersion"]
    operator_process.stop()
    operator_process.start()
    wait_for("operator settled", operator_process.healthy, timeout=30)
    subprocess.run(["sleep", "6"], check=True)  # one periodic pass (5 s)
    assert get(cp, namespace, "digits-restart")["metadata"]["resourceVersion"] == version
    assert len(jobs_of(cp, namespace, "digits-restart")) == 1


def test_two_requests_for_one_model_run_in_sequence(
    *,
    control_plane: ControlPlane,
    namespace: str,
    models_pvc: Path,
    operator_process: OperatorProcess,
    phases: PhaseRecorder,
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("first"))
    create(cp, namespace, request_manifest("second", forget={"indices": [5, 6, 7, 8, 9, 10, 11, 12]}))
    queued = wait_phase(cp, namespace, "second", ("Queued",), timeout=60)
    created = condition(queued, "JobCreated")
    assert (created["status"], created["reason"]) == ("False", "WaitingForModel")
    assert "waiting for request first" in queued["status"]["message"]
    first = wait_phase(cp, namespace, "first", ("Succeeded", "Failed"))
    second = wait_phase(cp, namespace, "second", ("Succeeded", "Failed"))
    assert first["status"]["phase"] == second["status"]["phase"] == "Succeeded", (first["status"], second["status"])
    seen = phases.until("second", "Succeeded")
    assert seen[:2] in (["Pending", "Queued"], ["Queued"]), seen
    assert seen[-2:] == ["Running", "Succeeded"], seen
    # The second started from the first's output, never from the original.
    assert second["status"]["inputModel"]["uri"] == first["status"]["outputModel"]["uri"]
    assert second["status"]["inputModel"]["sha256"] == first["status"]["outputModel"]["sha256"]
    assert second["status"]["modelVersion"] == 2
    [second_job] = jobs_of(cp, namespace, "second")
    assert second_job.metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ") >= first["status"]["completionTime"]
    core = client.CoreV1Api(cp.api_client())
    manifest = yaml.safe_load(
        core.read_namespaced_config_map(second_job.metadata.name + "-spec", namespace).data["request.yaml"]
    )
    assert manifest["spec"]["model"]["source"]["path"] in first["status"]["outputModel"]["uri"]
    lineage = core.read_namespaced_config_map("unlearn-model-digits-mlp", namespace).data
    assert json.loads(lineage["current"])["version"] == 2
    assert [(v["version"], v["parent"]) for v in json.loads(lineage["history"])] == [(0, None), (1, 0), (2, 1)]


def test_a_request_deleted_while_its_job_runs_leaves_an_audit_record(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    request = create(cp, namespace, request_manifest("gone"))
    running = wait_phase(cp, namespace, "gone", ("Running",), timeout=60)
    custom(cp).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")
    core = client.CoreV1Api(cp.api_client())
    name = audit_configmap_name("gone", request["metadata"]["uid"])

    def recorded() -> dict[str, Any] | None:
        try:
            return dict(json.loads(core.read_namespaced_config_map(name, namespace).data["outcome.json"]))
        except client.ApiException:
            return None

    outcome = wait_for("the deleted request's audit record", recorded, timeout=60)
    assert (outcome["phase"], outcome["reason"]) == ("Deleted", "RequestDeleted")
    assert outcome["jobName"] == running["status"]["jobName"]
    assert outcome["uid"] == request["metadata"]["uid"]
    wait_for("Job garbage-collected", lambda: not jobs_of(cp, namespace, "gone"), timeout=60)


def test_job_deleted_behind_the_operator_fails_the_request(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("orphaned"))
    running = wait_phase(cp, namespace, "orphaned", ("Running",), timeout=60)
    client.BatchV1Api(cp.api_client()).delete_namespaced_job(
        running["status"]["jobName"], namespace, propagation_policy="Background"
    )
    done = wait_phase(cp, namespace, "orphaned", ("Failed",), timeout=60)
    complete = condition(done, "Complete")
    assert complete["reason"] == "JobDeleted"
    assert "was deleted before it finished" in done["status"]["message"]
    assert done["status"]["auditConfigMap"]


@pytest.mark.parametrize("operator_env", [{"UNLEARNING_PENDING_ALERT_SECONDS": "2"}])
def test_pod_that_cannot_be_scheduled_gets_a_condition_saying_why(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("too-big", job={"gpus": 8}))
    wait_phase(cp, namespace, "too-big", ("Running",), timeout=60)

    def alerted() -> dict[str, Any] | None:
        obj = get(cp, namespace, "too-big")
        pending = [c for c in obj["status"].get("conditions", []) if c["type"] == "PodPending"]
        return pending[0] if pending and pending[0]["status"] == "True" else None

    pending = wait_for("PodPending condition", alerted, timeout=60)
    assert pending["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in pending["message"]
    assert "spec.job.gpus" in pending["message"]


def test_kubectl_explain_teaches_the_api(control_plane: ControlPlane, crd: None) -> None:
    spec = control_plane.kubectl("explain", "unlearningrequest.spec").stdout
    assert "forget\t<Object> -required-" in spec
    assert "The samples to forget." in spec
    gates = control_plane.kubectl("explain", "ulr.spec.gates.maxMiaAuc").stdout
    assert "Loss-attack AUC, forget vs held-out rows of the same classes" in gates
    assert "two-sided" in gates
    listed = control_plane.kubectl("api-resources", "--categories=unlearning", "-o", "name").stdout.split()
    assert sorted(listed) == ["unlearningcalibrations.unlearn.dev", "unlearningrequests.unlearn.dev"]
    use = control_plane.kubectl("explain", "ulr.spec.calibration.policy").stdout
    assert "Required: wait" in use
    recipe = control_plane.kubectl("explain", "unlearningcalibration.spec.recipe").stdout
    assert "The training recipe of the original model." in recipe
    assert "optimizer\t<Object> -required-" in recipe
    folds = control_plane.kubectl("explain", "ulc.spec.folds").stdout
    assert "Reference models (K)" in folds
    bank = control_plane.kubectl("explain", "ulc.status.bank.sha256").stdout
    assert "requests' records name it" in bank


def test_spec_is_immutable_once_the_job_started(control_plane: ControlPlane, crd: None, namespace: str) -> None:
    """No operator here: the API server's CEL transition rule alone enforces it."""
    cp = control_plane
    api = custom(cp)
    create(cp, namespace, request_manifest("frozen"))
    # Before launch the spec may still change.
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"requestId": "GDPR-2"}})
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "frozen", {"status": {"phase": "Running", "jobName": "frozen-1234abcd"}}
    )
    with pytest.raises(client.ApiException) as refused:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"requestId": "GDPR-3"}}
        )
    assert refused.value.status == 422
    assert "spec is immutable once the Job has started" in str(refused.value.body)
    # Status keeps changing through the subresource; labels through the main endpoint.
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "frozen", {"status": {"message": "x"}})
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "frozen", {"metadata": {"labels": {"a": "b"}}}
    )
    assert get(cp, namespace, "frozen")["spec"]["requestId"] == "GDPR-2"
