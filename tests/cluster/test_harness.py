"""The test harness itself: real control plane + fake GPU node behave like a cluster."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePath
from typing import Any

import pytest
from kubernetes import client

from tests.cluster import controlplane
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.cluster.nodeagent import KEEP_VISIBLE

pytestmark = pytest.mark.cluster

TOOLS = Path(__file__).resolve().parent / "tools"


def pinned_kubernetes_version() -> str:
    text = (TOOLS / "kubernetes" / "go.mod").read_text()
    match = re.search(r"^require k8s\.io/kubernetes (v\S+)$", text, re.MULTILINE)
    assert match, "k8s.io/kubernetes pin not found in go.mod"
    return match.group(1)


def core(cp: ControlPlane) -> Any:
    # Any: the tests pass manifests as dicts, which the client serialises as
    # they are, while its annotations ask for the generated model classes.
    return client.CoreV1Api(cp.api_client())


def python_pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    """A one-container pod whose process is ``python -c code``."""
    container: dict[str, Any] = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def wait_pod(api: Any, ns: str, name: str, phases: tuple[str, ...], timeout: float = 60) -> Any:
    """The pod (a V1Pod, typed Any like ``core()``) once its phase is in ``phases``."""

    def check() -> Any:
        pod = api.read_namespaced_pod(name, ns)
        return pod if pod.status and pod.status.phase in phases else None

    return wait_for(f"pod {ns}/{name} in {phases}", check, timeout=timeout)


def terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    assert pod.status is not None
    assert pod.status.container_statuses
    state = pod.status.container_statuses[0].state
    assert state is not None
    assert state.terminated is not None, state
    return state.terminated


def test_version_is_pinned(control_plane: ControlPlane) -> None:
    version = client.VersionApi(control_plane.api_client()).get_code()
    assert version.git_version == pinned_kubernetes_version()
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == pinned_kubernetes_version()
    assert out["serverVersion"]["gitVersion"] == pinned_kubernetes_version()


def test_helm_version(control_plane: ControlPlane) -> None:
    out = control_plane.helm("version", "--short").stdout
    assert re.match(r"v3\.\d+\.\d+", out), out


def test_namespace_created_and_deleted(control_plane: ControlPlane, namespace: str) -> None:
    api = core(control_plane)
    ns = api.read_namespace(namespace)
    assert ns.status is not None
    assert ns.status.phase == "Active"

    other = f"{namespace}-gone"
    api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    api.create_namespaced_config_map(other, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x")))
    api.delete_namespace(other)

    def gone() -> bool:
        try:
            api.read_namespace(other)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    # The namespace controller empties it and removes the finalizer.
    wait_for(f"namespace {other} to be deleted", gone, timeout=60)


def test_job_completes_with_termination_message(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    code = "import json; open('/dev/termination-log', 'w').write(json.dumps({'verdict': 'Passed'})); print('hello')"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 300,
            "template": {"spec": python_pod("unused", code)["spec"]},
        },
    }
    batch: Any = client.BatchV1Api(control_plane.api_client())
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job("hello", namespace).status
        conds = {c.type: c.status for c in (status.conditions or [])} if status else {}
        assert conds.get("Failed") != "True", status
        return conds.get("Complete") == "True"

    wait_for("job hello to complete", complete, timeout=90)
    pods = core(control_plane).list_namespaced_pod(namespace, label_selector="job-name=hello").items
    assert len(pods) == 1
    pod = pods[0]
    assert pod.spec is not None
    assert pod.spec.node_name == gpu_node.name
    term = terminated(pod)
    assert term.exit_code == 0
    assert term.reason == "Completed"
    assert json.loads(term.message or "") == {"verdict": "Passed"}
    assert pod.metadata is not None
    assert pod.metadata.name
    assert "hello" in gpu_node.pod_log(namespace, pod.metadata.name, "main")


def test_pod_requesting_more_gpus_than_node_has_stays_pending(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    api = core(control_plane)
    resources = {"limits": {"nvidia.com/gpu": str(gpu_node.gpus + 1)}}
    api.create_namespaced_pod(namespace, python_pod("greedy", "pass", container={"resources": resources}))

    def unschedulable() -> bool:
        pod = api.read_namespaced_pod("greedy", namespace)
        assert pod.status is not None
        assert pod.status.phase == "Pending"
        conds = {c.type: c for c in pod.status.conditions or []}
        sched = conds.get("PodScheduled")
        return sched is not None and sched.status == "False" and sched.reason == "Unschedulable"

    wait_for("pod greedy to be Unschedulable", unschedulable, timeout=60)
    pod = api.read_namespaced_pod("greedy", namespace)
    assert pod.spec is not None
    assert not pod.spec.node_name
    assert pod.status is not None
    assert pod.status.conditions
    message = next(c.message for c in pod.status.conditions if c.type == "PodScheduled")
    assert "nvidia.com/gpu" in (message or "")


def test_gpu_pod_fits_and_sees_its_device(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    api = core(control_plane)
    code = "import os; open('/dev/termination-log', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    resources = {"limits": {"nvidia.com/gpu": str(gpu_node.gpus)}}
    api.create_namespaced_pod(namespace, python_pod("gpu", code, container={"resources": resources}))
    pod = wait_pod(api, namespace, "gpu", ("Succeeded", "Failed"))
    assert pod.status is not None
    assert pod.status.phase == "Succeeded", terminated(pod)
    assert terminated(pod).message == ",".join(str(i) for i in range(gpu_node.gpus))


def test_configmap_env_and_pvc_at_absolute_paths(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    api = core(control_plane)
    api.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "request"}, "data": {"request.yaml": "model: digits\n", "mode": "fast"}},
    )
    for claim in ("inputs", "outputs"):
        api.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )
    (gpu_node.pvc_path(namespace, "inputs") / "data.txt").write_text("input bytes")
    code = """
import json, os, pathlib
out = {
    "request": pathlib.Path("/etc/unlearning/request.yaml").read_text(),
    "data": pathlib.Path("/data/data.txt").read_text(),
    "env": [os.environ["MODE"], os.environ["POD_NAME"], os.environ["POD_NAMESPACE"]],
    "sa": sorted(os.listdir("/var/run/secrets/kubernetes.io/serviceaccount")),
}
try:
    pathlib.Path("/data/x").write_text("must fail")
    out["readonly"] = False
except OSError:
    out["readonly"] = True
pathlib.Path("/output/result.json").write_text(json.dumps(out))
pathlib.Path("/dev/termination-log").write_text(json.dumps(out))
"""
    pod = python_pod(
        "mounts",
        code,
        container={
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "request", "key": "mode"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ],
            "volumeMounts": [
                {"name": "request", "mountPath": "/etc/unlearning", "readOnly": True},
                {"name": "inputs", "mountPath": "/data", "readOnly": True},
                {"name": "outputs", "mountPath": "/output"},
            ],
        },
        volumes=[
            {"name": "request", "configMap": {"name": "request"}},
            {"name": "inputs", "persistentVolumeClaim": {"claimName": "inputs", "readOnly": True}},
            {"name": "outputs", "persistentVolumeClaim": {"claimName": "outputs"}},
        ],
    )
    api.create_namespaced_pod(namespace, pod)
    done = wait_pod(api, namespace, "mounts", ("Succeeded", "Failed"), timeout=90)
    term = terminated(done)
    assert term.exit_code == 0, (term.message, gpu_node.pod_log(namespace, "mounts", "main"))
    result = json.loads(term.message or "")
    assert result["request"] == "model: digits\n"
    assert result["data"] == "input bytes"
    assert result["env"] == ["fast", "mounts", namespace]
    assert result["sa"] == ["ca.crt", "namespace", "token"]
    assert result["readonly"] is True
    assert json.loads((gpu_node.pvc_path(namespace, "outputs") / "result.json").read_text()) == result
    # Bound by the harness provisioner, so the scheduler placed the pod.
    pvc = api.read_namespaced_persistent_volume_claim("outputs", namespace)
    assert pvc.status is not None
    assert pvc.status.phase == "Bound"


def test_failing_container_reports_exit_code_and_log_fallback(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    api = core(control_plane)
    code = "import sys; print('something broke'); sys.exit(3)"
    container = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    api.create_namespaced_pod(namespace, python_pod("fails", code, container=container))
    pod = wait_pod(api, namespace, "fails", ("Succeeded", "Failed"))
    assert pod.status is not None
    assert pod.status.phase == "Failed"
    term = terminated(pod)
    assert term.exit_code == 3
    assert term.reason == "Error"
    assert "something broke" in (term.message or "")


def test_deleted_pod_is_killed_and_removed(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    api = core(control_plane)
    api.create_namespaced_pod(namespace, python_pod("sleeper", "import time; time.sleep(600)"))
    wait_pod(api, namespace, "sleeper", ("Running",))
    started = time.monotonic()
    api.delete_namespaced_pod("sleeper", namespace, grace_period_seconds=5)

    def gone() -> bool:
        try:
            api.read_namespaced_pod("sleeper", namespace)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for("pod sleeper to be removed", gone, timeout=30)
    assert time.monotonic() - started < 15


def test_rbac_is_enforced(control_plane: ControlPlane, namespace: str) -> None:
    api = core(control_plane)
    api.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    user = f"system:serviceaccount:{namespace}:nobody"
    can = control_plane.kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={user}", check=False)
    assert can.stdout.strip() == "no", can
    assert can.returncode == 1
    admin = control_plane.kubectl("auth", "can-i", "list", "pods", "-n", namespace)
    assert admin.stdout.strip() == "yes"

    # And with a real token over HTTPS, not only the authorizer's opinion.
    token = api.create_namespaced_service_account_token("nobody", namespace, {"spec": {}}).status.token
    request = urllib.request.Request(
        f"{control_plane.server}/api/v1/namespaces/{namespace}/pods",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=control_plane.server_ssl_context(), timeout=10)
    assert refused.value.code == 403
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["iss"] == control_plane.server


def test_pod_talks_to_api_with_its_service_account(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    api = core(control_plane)
    # What an in-cluster client (kopf, the kubernetes package) does.
    code = """
import os, ssl, urllib.request, urllib.error
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
ns = open(f"{sa}/namespace").read()
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
req = urllib.request.Request(f"https://{host}:{port}/api/v1/namespaces/{ns}/pods",
                             headers={"Authorization": "Bearer " + open(f"{sa}/token").read()})
try:
    urllib.request.urlopen(req, context=ctx, timeout=10)
    result = "200"
except urllib.error.HTTPError as exc:
    result = str(exc.code)
open("/dev/termination-log", "w").write(result)
"""
    api.create_namespaced_pod(namespace, python_pod("incluster", code))
    pod = wait_pod(api, namespace, "incluster", ("Succeeded", "Failed"))
    # Authenticated (not 401) as the default ServiceAccount, which may not list pods.
    assert terminated(pod).message == "403", gpu_node.pod_log(namespace, "incluster", "main")


def test_kubectl_apply_roundtrip(control_plane: ControlPlane, namespace: str) -> None:
    manifest = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1"}}
    )
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    got = control_plane.kubectl("get", "configmap", "applied", "-n", namespace, "-o", "jsonpath={.data.a}")
    assert got.stdout == "1"


def test_kubectl_failure_raises(control_plane: ControlPlane) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        control_plane.kubectl("get", "nosuchkind")


def test_port_clash_is_retried_and_death_is_reported(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken between picking and binding costs a retry, not the session;
    a component that dies is reported with its log instead of hanging."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    picks = iter([busy.getsockname()[1]])
    real = controlplane.free_port
    monkeypatch.setattr(controlplane, "free_port", lambda: next(picks, None) or real())
    cp = ControlPlane(control_plane.bin_dir, tmp_path / "cp")
    try:
        cp.start()
        assert "address already in use" in (tmp_path / "cp" / "logs" / "etcd.log").read_text()
        cp.check_alive()
        cp.components["kube-scheduler"].stop()
        with pytest.raises(controlplane.ControlPlaneError, match="kube-scheduler") as died:
            cp.check_alive()
        assert "--- kube-scheduler (exited" in str(died.value)
    finally:
        cp.stop()
        busy.close()


def test_helm_install_waits_for_a_ready_deployment(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str, tmp_path: Path
) -> None:
    """What the e2e tier does with the real chart: helm install --wait needs the
    Deployment's pod Ready, via the ReplicaSet controller and the node agent."""
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "tiny"}},
            "template": {
                "metadata": {"labels": {"app": "tiny"}},
                "spec": {
                    "containers": [
                        {"name": "main", "image": "tiny:1", "command": ["python", "-c", "import time; time.sleep(600)"]}
                    ]
                },
            },
        },
    }
    (chart / "templates" / "deployment.yaml").write_text(json.dumps(deployment))
    control_plane.helm("install", "tiny", str(chart), "-n", namespace, "--wait", "--timeout", "90s")
    status = control_plane.helm("status", "tiny", "-n", namespace, "-o", "json").stdout
    assert json.loads(status)["info"]["status"] == "deployed"
    control_plane.helm("uninstall", "tiny", "-n", namespace, "--wait", "--timeout", "60s")


# Serves /ready: 503 until someone has asked for /go, 200 after.
GATED_SERVER = """
import http.server, sys
go = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/go":
            go.append(1)
        self.send_response(200 if go else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_readiness_probe_holds_ready_until_it_passes(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    api = core(control_plane)
    port = controlplane.free_port()
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}
    container = {
        "command": ["python", "-c", GATED_SERVER, str(port)],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": probe,
    }
    api.create_namespaced_pod(namespace, python_pod("gated", "", container=container))
    # The control: started, no probe, so Ready at once (what every container was before probes ran).
    api.create_namespaced_pod(namespace, python_pod("control", "import time; time.sleep(600)"))

    def ready(name: str) -> bool:
        pod = api.read_namespaced_pod(name, namespace)
        statuses = pod.status.container_statuses or []
        return bool(statuses) and bool(statuses[0].ready)

    wait_for("the control Ready", lambda: ready("control"), timeout=60, interval=0.5)
    wait_pod(api, namespace, "gated", ("Running",))

    def answers() -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return None

    # Its server runs and answers the probe's path with 503: probed every second, it stays not Ready.
    assert wait_for("the gated server to answer", answers, timeout=60, interval=0.5) == 503
    time.sleep(3)
    gated = api.read_namespaced_pod("gated", namespace)
    assert gated.status.phase == "Running"
    assert gated.status.container_statuses[0].started is True
    assert gated.status.container_statuses[0].ready is False
    assert {c.type: c.status for c in gated.status.conditions}["Ready"] == "False"
    # Once the path answers 200, the next probe makes it Ready.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/go", timeout=2) as response:
        assert response.status == 200
    wait_for("the gated pod Ready", lambda: ready("gated"), timeout=30, interval=0.5)
    conditions = {c.type: c.status for c in api.read_namespaced_pod("gated", namespace).status.conditions}
    assert conditions["Ready"] == "True"


def test_on_failure_restarts_then_succeeds(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    api = core(control_plane)
    # Fails on the first run, succeeds on the second: the marker survives in an emptyDir.
    code = """
import pathlib, sys
marker = pathlib.Path("/scratch/ran-once")
if not marker.exists():
    marker.write_text("x")
    sys.exit(1)
"""
    pod = python_pod(
        "flaky",
        code,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    api.create_namespaced_pod(namespace, pod)
    done = wait_pod(api, namespace, "flaky", ("Succeeded", "Failed"))
    assert done.status.phase == "Succeeded"
    status = done.status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1


def test_active_deadline_fails_the_pod(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    api = core(control_plane)
    api.create_namespaced_pod(namespace, python_pod("slow", "import time; time.sleep(600)", activeDeadlineSeconds=2))
    pod = wait_pod(api, namespace, "slow", ("Succeeded", "Failed"))
    assert pod.status.phase == "Failed"
    assert pod.status.reason == "DeadlineExceeded"


def test_job_backoff_limit_fails_the_job(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    batch: Any = client.BatchV1Api(control_plane.api_client())
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "broken"},
        "spec": {"backoffLimit": 1, "template": {"spec": python_pod("x", "raise SystemExit(7)")["spec"]}},
    }
    batch.create_namespaced_job(namespace, job)

    def failed() -> str | None:
        status = batch.read_namespaced_job("broken", namespace).status
        conds = {c.type: c for c in status.conditions or []}
        return conds["Failed"].reason if "Failed" in conds and conds["Failed"].status == "True" else None

    assert wait_for("job broken to fail", failed, timeout=120) == "BackoffLimitExceeded"
    pods = core(control_plane).list_namespaced_pod(namespace, label_selector="job-name=broken").items
    assert [terminated(p).exit_code for p in pods] == [7, 7]


def test_tmp_emptydir_does_not_hide_other_volumes(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    """The operator's Job mounts an emptyDir at /tmp; the harness keeps its own
    files under /tmp too, and must still mount them (podinit opens every source
    before the first mount)."""
    api = core(control_plane)
    api.create_namespaced_config_map(namespace, {"metadata": {"name": "spec"}, "data": {"request.yaml": "x: 1\n"}})
    code = """
import os, pathlib
pathlib.Path("/tmp/scratch").write_text("ok")
out = [pathlib.Path("/etc/unlearning/request.yaml").read_text(), sorted(os.listdir("/tmp")), os.getcwd() != "/"]
pathlib.Path("/dev/termination-log").write_text(repr(out))
"""
    pod = python_pod(
        "tmpmount",
        code,
        container={
            "volumeMounts": [
                {"name": "spec", "mountPath": "/etc/unlearning", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
            ]
        },
        volumes=[{"name": "spec", "configMap": {"name": "spec"}}, {"name": "tmp", "emptyDir": {}}],
    )
    api.create_namespaced_pod(namespace, pod)
    done = wait_pod(api, namespace, "tmpmount", ("Succeeded", "Failed"))
    # A checkout under /tmp (the venv and working tree the process runs from)
    # is bound back inside the emptyDir, as if the image contained it.
    kept = {PurePath(p).relative_to("/tmp").parts[0] for p in KEEP_VISIBLE if p.startswith("/tmp/")}
    expected = ["x: 1\n", sorted({"scratch", *kept}), True]
    assert terminated(done).message == repr(expected), gpu_node.pod_log(namespace, "tmpmount", "main")


def test_node_lease_is_renewed_and_node_stays_ready(control_plane: ControlPlane, gpu_node: GpuNode) -> None:
    """Renewals that fail silently leave the node NotReady and tainted ~40 s
    into a session (it happened: a Lease replace without resourceVersion is a
    422 on 1.37); catch that in seconds instead."""
    coord: Any = client.CoordinationV1Api(control_plane.api_client())
    first = coord.read_namespaced_lease(gpu_node.name, "kube-node-lease").spec.renew_time

    def renewed() -> bool:
        return bool(coord.read_namespaced_lease(gpu_node.name, "kube-node-lease").spec.renew_time != first)

    wait_for("the node Lease to be renewed", renewed, timeout=20)
    node = core(control_plane).read_node(gpu_node.name)
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert not node.spec.taints
    assert node.status.allocatable["nvidia.com/gpu"] == str(gpu_node.gpus)
    assert "heartbeat failed" not in gpu_node.log.read_text()


INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
FAILURES_ANNOTATION = "batch.kubernetes.io/job-index-failure-count"


def indexed_job(name: str, code: str, completions: int, **spec: Any) -> dict[str, Any]:
    """An Indexed Job whose pods run ``python -c code <index>``: the index passed as the operator passes it,
    through ``$(JOB_COMPLETION_INDEX)`` declared from the pod's completion-index annotation."""
    pod = python_pod("unused", code)["spec"]
    container = pod["containers"][0]
    container["command"] = [*container["command"], "$(JOB_COMPLETION_INDEX)"]
    container["env"] = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
        },
        {
            "name": "FAILURES",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{FAILURES_ANNOTATION}']"}},
        },
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": 2,
            "backoffLimitPerIndex": 1,
            "maxFailedIndexes": 0,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailIndex", "onExitCodes": {"containerName": "main", "operator": "In", "values": [4]}}
                ]
            },
            "template": {"spec": pod},
            **spec,
        },
    }


def job_condition(batch: Any, namespace: str, name: str) -> tuple[str, str] | None:
    """(type, reason) of the Job's Complete or Failed condition once it has one."""
    status = batch.read_namespaced_job(name, namespace).status
    for condition in (status.conditions or []) if status else []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type, condition.reason or ""
    return None


def test_indexed_job_pods_get_their_index(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str) -> None:
    """What the real Job controller sets on an Indexed pod reaches the process: the completion-index
    annotation (and label), the JOB_COMPLETION_INDEX it injects from them, $(VAR) in the command, and
    the host name <job>-<index>."""
    code = (
        "import json, os, sys; open('/dev/termination-log', 'w').write(json.dumps("
        "{'argv': sys.argv[1], 'env': os.environ['JOB_COMPLETION_INDEX'], 'host': os.environ['HOSTNAME']}))"
    )
    batch: Any = client.BatchV1Api(control_plane.api_client())
    batch.create_namespaced_job(namespace, indexed_job("folds", code, 3))
    assert wait_for("indexed job folds", lambda: job_condition(batch, namespace, "folds"), timeout=120) == (
        "Complete",
        "CompletionsReached",
    )
    assert batch.read_namespaced_job("folds", namespace).status.completed_indexes == "0-2"
    pods = core(control_plane).list_namespaced_pod(namespace, label_selector="job-name=folds").items
    seen = {}
    for pod in pods:
        index = pod.metadata.annotations[INDEX_ANNOTATION]
        assert pod.metadata.labels[INDEX_ANNOTATION] == index
        assert pod.spec.hostname == f"folds-{index}"
        seen[index] = json.loads(terminated(pod).message or "")
    assert seen == {str(i): {"argv": str(i), "env": str(i), "host": f"folds-{i}"} for i in range(3)}


def test_indexed_job_retries_one_index_alone_and_fails_an_index_at_once_on_exit_4(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    batch: Any = client.BatchV1Api(control_plane.api_client())
    # Index 1 crashes on its first attempt (the controller counts an index's failures in an annotation).
    flaky = "import os, sys; sys.exit(1 if sys.argv[1] == '1' and os.environ['FAILURES'] == '0' else 0)"
    batch.create_namespaced_job(namespace, indexed_job("flaky", flaky, 3))
    assert wait_for("job flaky", lambda: job_condition(batch, namespace, "flaky"), timeout=120)[0] == "Complete"
    pods = core(control_plane).list_namespaced_pod(namespace, label_selector="job-name=flaky").items
    runs: dict[str, list[int]] = {}
    for pod in pods:
        runs.setdefault(pod.metadata.annotations[INDEX_ANNOTATION], []).append(terminated(pod).exit_code)
    assert {index: sorted(codes) for index, codes in runs.items()} == {"0": [0], "1": [0, 1], "2": [0]}

    # Exit 4 on index 2 fails that index at once (no retry), and maxFailedIndexes 0 fails the Job.
    invalid = "import sys; sys.exit(4 if sys.argv[1] == '2' else 0)"
    batch.create_namespaced_job(namespace, indexed_job("invalid", invalid, 3, parallelism=3))
    kind, reason = wait_for("job invalid", lambda: job_condition(batch, namespace, "invalid"), timeout=120)
    assert (kind, reason) == ("Failed", "MaxFailedIndexesExceeded")
    assert batch.read_namespaced_job("invalid", namespace).status.failed_indexes == "2"
    pods = core(control_plane).list_namespaced_pod(namespace, label_selector="job-name=invalid").items
    failed = [p for p in pods if p.metadata.annotations[INDEX_ANNOTATION] == "2"]
    assert [terminated(p).exit_code for p in failed] == [4]
