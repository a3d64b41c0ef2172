"""A tenant forging the operator's objects, against the real API server (and real Jobs on the fake GPU node).

Each test plays one attempt from the issue's probe with the means a namespace
user has (create Jobs, pods and ConfigMaps, edit the request's spec) and checks
the same three things: the request fails with a reason that names the
conflict, and an Event says so; the model's lineage does not move; status
references nothing the operator did not make.

The spec edit between scheduling and launch is a race of milliseconds; a
validating admission webhook (a real API server feature) holds the operator's
first write of the launch, the lineage ConfigMap's create, until the test has
edited the spec, so the race happens every time.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane, free_port
from tests.cluster.fixtures import wait_for
from tests.integration.conftest import GROUP, PLURAL, VERSION, OperatorProcess, request_manifest
from tests.integration.test_operator import condition, create, custom, events_for, get, jobs_of, wait_phase
from unlearning_operator.names import audit_configmap_name, job_name

pytestmark = pytest.mark.cluster

LINEAGE = "unlearn-model-digits-mlp"


def model_named(name: str) -> dict[str, Any]:
    """The example's spec.model under another logical name."""
    return {**request_manifest("x")["spec"]["model"], "name": name}


def core(cp: ControlPlane) -> client.CoreV1Api:
    return client.CoreV1Api(cp.api_client())


def lineage_version(cp: ControlPlane, namespace: str, name: str = LINEAGE) -> int | None:
    try:
        found = core(cp).read_namespaced_config_map(name, namespace)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise
    return int(json.loads(found.data["current"])["version"])


def assert_conflict(cp: ControlPlane, namespace: str, name: str, reason: str, words: str) -> dict[str, Any]:
    done = wait_phase(cp, namespace, name, ("Failed", "Succeeded"))
    status = done["status"]
    assert status["phase"] == "Failed", status
    assert condition(done, "Complete")["reason"] == reason, status
    assert words in status["message"], status["message"]
    wait_for(
        f"a {reason} Event on {name}",
        lambda: any(t == "Warning" and r == reason for t, r, _ in events_for(cp, namespace, name)),
        timeout=30,
    )
    return done


def forged_job(cp: ControlPlane, namespace: str, request: dict[str, Any]) -> client.V1Job:
    """A Job under the request's Job name, copying every mark a tenant can read (labels, uid, annotations)."""
    name, uid = request["metadata"]["name"], request["metadata"]["uid"]
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, uid),
            "labels": {
                "app.kubernetes.io/managed-by": "unlearning-operator",
                "app.kubernetes.io/component": "unlearning-job",
                "unlearn.dev/request": name,
                "unlearn.dev/model": "digits-mlp",
            },
            "annotations": {
                "unlearn.dev/request-uid": uid,
                "unlearn.dev/spec-generation": "1",
                "unlearn.dev/model-version": "1",
                "unlearn.dev/input-model": "pvc://models/digits/digits-mlp.pt2",
                "unlearn.dev/output-location": "pvc://models/digits/versions",
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "UnlearningRequest",
                    "name": name,
                    "uid": uid,
                    "controller": True,
                }
            ],
        },
        # Suspended: its pod would run any image; here it only has to exist under the name.
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "unlearn", "image": "evil/miner:1", "command": ["sh", "-c", "id"]}],
                }
            },
        },
    }
    return client.BatchV1Api(cp.api_client()).create_namespaced_job(namespace, body)


@pytest.mark.parametrize("operator_env", [{"UNLEARNING_MAX_CONCURRENT_JOBS": "1"}])
def test_a_job_made_in_advance_while_queued_is_never_adopted(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    # The only slot is held by a request whose pod can never be scheduled (more GPUs than the node has).
    create(cp, namespace, request_manifest("holder", job={"gpus": 8}, model=model_named("holder-model")))
    wait_phase(cp, namespace, "holder", ("Running",), timeout=60)
    victim = create(cp, namespace, request_manifest("victim"))
    queued = wait_phase(cp, namespace, "victim", ("Queued",), timeout=60)
    assert condition(queued, "JobCreated")["reason"] == "WaitingForCapacity"

    forged = forged_job(cp, namespace, victim)
    done = assert_conflict(
        cp, namespace, "victim", "NameConflict", f"Job {forged.metadata.name} exists, but this request's status"
    )
    # Nothing in status points at it, nothing ran from it, and the operator left it as it was.
    assert "jobName" not in done["status"]
    assert lineage_version(cp, namespace) is None
    again = client.BatchV1Api(cp.api_client()).read_namespaced_job(forged.metadata.name, namespace)
    assert again.spec.suspend is True
    assert again.spec.ttl_seconds_after_finished is None
    assert [j.metadata.name for j in jobs_of(cp, namespace, "victim")] == [forged.metadata.name]
    # It holds no slot either: the holder still runs, the queue behind is unaffected.
    assert get(cp, namespace, "holder")["status"]["phase"] == "Running"


def test_a_pod_with_only_the_jobs_name_label_is_never_read(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    # A request whose Job fails (the model file does not exist: exit 4)...
    source = {"claimName": "models", "path": "digits/missing.pt2"}
    request = create(
        cp, namespace, request_manifest("victim", model={"name": "digits-mlp", "format": "exported", "source": source})
    )
    job = job_name("victim", request["metadata"]["uid"])
    # ...and a pod labelled with its Job's name, "finished" later, with a Passed record pointing anywhere.
    record = {
        "schemaVersion": 1,
        "requestId": "GDPR-victim",
        "model": "digits-mlp",
        "modelVersion": 1,
        "method": "scrub",
        "verdict": "Passed",
        "exitCode": 0,
        "outputModel": {"uri": "pvc://models/evil/anything.pt2", "sha256": "0" * 64, "format": "exported"},
        "startedAt": "2099-01-01T00:00:00Z",
        "finishedAt": "2099-01-01T00:00:01Z",
    }
    pods = core(cp)
    pods.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "imposter", "labels": {"batch.kubernetes.io/job-name": job}},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"unlearn.dev/no-such-node": "true"},  # never runs
                "containers": [{"name": "unlearn", "image": "anything:1"}],
            },
        },
    )
    terminated = {"exitCode": 0, "finishedAt": "2099-01-01T00:00:01Z", "message": json.dumps(record)}
    pods.patch_namespaced_pod_status(
        "imposter",
        namespace,
        {
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "unlearn",
                        "image": "anything:1",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
    )
    done = assert_conflict(cp, namespace, "victim", "NameConflict", f"pod imposter carries Job {job}'s name label")
    assert "outputModel" not in done["status"]
    assert lineage_version(cp, namespace) == 0
    # The Job really failed; that is what its own pod says, and what the audit record keeps.
    audit = core(cp).read_namespaced_config_map(done["status"]["auditConfigMap"], namespace)
    assert "anything.pt2" not in json.dumps(audit.data)


def test_an_audit_configmap_made_in_advance_is_never_referenced(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    cp = control_plane
    request = create(cp, namespace, request_manifest("victim", method={"name": "neggrad-plus"}))
    squatted = audit_configmap_name("victim", request["metadata"]["uid"])
    forged = {"record.json": json.dumps({"verdict": "Passed"})}
    core(cp).create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": squatted,
                "labels": {"unlearn.dev/audit": "true", "unlearn.dev/request": "victim"},
                "annotations": {"unlearn.dev/request-uid": request["metadata"]["uid"]},
            },
            "immutable": True,
            "data": forged,
        },
    )
    # The Job runs for real and passes; the request still fails closed.
    done = assert_conflict(cp, namespace, "victim", "NameConflict", f"ConfigMap {squatted}")
    status = done["status"]
    assert status["verdict"] == "Passed"
    assert lineage_version(cp, namespace) == 0
    assert status["auditConfigMap"] != squatted
    assert status["auditConfigMap"].startswith(squatted + "-")
    own = core(cp).read_namespaced_config_map(status["auditConfigMap"], namespace)
    assert own.immutable is True
    assert json.loads(own.data["outcome.json"])["reason"] == "NameConflict"
    assert json.loads(own.data["record.json"])["verdict"] == "Passed"
    assert core(cp).read_namespaced_config_map(squatted, namespace).data == forged


class HoldingWebhook:
    """A validating admission webhook that holds each review until ``release`` (then allows it)."""

    def __init__(self, cp: ControlPlane) -> None:
        assert cp.pki is not None
        cp.pki.issue("admission-hold", "/CN=admission-hold", server_sans=["IP:127.0.0.1"])
        self.held = threading.Event()
        self.released = threading.Event()
        self.port = free_port()
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                webhook.held.set()
                webhook.released.wait(20)
                answer = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {"uid": review["request"]["uid"], "allowed": True},
                }
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cp.pki.cert("admission-hold")), str(cp.pki.key("admission-hold")))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.ca_bundle = base64.b64encode(cp.pki.ca_cert.read_bytes()).decode()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()


@pytest.fixture
def holding_webhook(control_plane: ControlPlane, namespace: str) -> Iterator[HoldingWebhook]:
    webhook = HoldingWebhook(control_plane)
    api = client.AdmissionregistrationV1Api(control_plane.api_client())
    name = f"hold-lineage-{namespace}"
    api.create_validating_webhook_configuration(
        {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "hold.lineage.unlearn.dev",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "timeoutSeconds": 25,
                    "failurePolicy": "Fail",
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook.port}/hold", "caBundle": webhook.ca_bundle},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["configmaps"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "objectSelector": {"matchLabels": {"app.kubernetes.io/component": "lineage"}},
                }
            ],
        }
    )
    try:
        yield webhook
    finally:
        webhook.stop()
        with contextlib.suppress(client.ApiException):
            api.delete_validating_webhook_configuration(name)


def test_a_spec_edit_between_scheduling_and_launch_fails_the_request_before_any_job(
    control_plane: ControlPlane,
    namespace: str,
    models_pvc: Path,
    holding_webhook: HoldingWebhook,
    operator_process: OperatorProcess,
) -> None:
    cp = control_plane
    create(cp, namespace, request_manifest("edited"))
    # The scheduler chose the request and its launch is creating the model's lineage: held right there.
    wait_for("the operator's launch to reach the API server", holding_webhook.held.is_set, timeout=60)
    # The user edits the spec (allowed: status names no Job yet), here to another model.
    edit = {"spec": {"model": model_named("other-model")}}
    custom(cp).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited", edit)
    assert get(cp, namespace, "edited")["metadata"]["generation"] == 2
    holding_webhook.released.set()

    done = assert_conflict(cp, namespace, "edited", "SpecChanged", "generation 1 -> 2")
    # No Job ran, for either spec; neither model's lineage moved; and the spec is frozen now.
    assert jobs_of(cp, namespace, "edited") == []
    assert lineage_version(cp, namespace) == 0
    assert lineage_version(cp, namespace, "unlearn-model-other-model") is None
    assert done["status"]["jobName"] == job_name("edited", done["metadata"]["uid"])
    with pytest.raises(client.ApiException) as refused:
        custom(cp).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "edited", {"spec": {"requestId": "again"}}
        )
    assert refused.value.status == 422
