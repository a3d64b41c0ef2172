"""Helpers for the end-to-end tier: a helm release of the chart and the objects it makes.

The operator under test is the chart's Deployment pod, run by the fake GPU
node agent (tests/cluster/nodeagent.py) from the operator image that
images/build.py built from this checkout, pulled by digest from the
session's local registry and run with runc; the Jobs it creates run the job
image the same way. So what runs is exactly what a user installs, and the
operator talks to the API server with the token of the chart's
ServiceAccount, i.e. exactly the chart's RBAC. With
``UNLEARNING_TEST_VENV_FAST_PATH=1`` the chart gets image names no registry
serves and the agent runs their commands from this checkout's venv instead:
a fast path for inner-loop runs, not what CI checks. The chart's
NetworkPolicies select the operator pods (and the operator's select its Job
pods), so the agent gives each of them a network namespace and pod IP of its
own (tests/cluster/podnet.py), which its runc container joins: two replicas
bind the same ports, and the tests read metrics and health on the pod IPs.
The release's values point the policies' API server rule at the test API
server's address and port.

Reads go through the Python client with ``_preload_content=False``: plain
camelCase dicts as the API serves them (the same shape the operator and
the status assertions speak), without spawning kubectl in every poll.
Writes a user would do with kubectl (apply, patch, auth can-i) use kubectl.
"""

from __future__ import annotations

import copy
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.controlplane import ControlPlane, free_port
from tests.cluster.fixtures import GpuNode, wait_for
from unlearning_contracts.api import API_GROUP, API_VERSION, CALIBRATION, REQUEST

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "unlearning-operator"
EXAMPLE = ROOT / "examples" / "requests" / "digits-gdpr.yaml"
CHART_NAME = "unlearning-operator"
TERMINAL = ("Succeeded", "Failed", "Rejected")
# Generous: one digits job is ~30 s on an idle core, several times that on a loaded CI runner.
JOB_TIMEOUT = 420.0
OPERATOR_TIMEOUT = 120.0


class Api:
    """Plain-dict reads (and a few writes) as the cluster admin."""

    def __init__(self, cp: ControlPlane) -> None:
        api_client = cp.api_client()
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return dict(json.loads(response.data))

    def request(self, namespace: str, name: str) -> dict[str, Any]:
        return self._json(
            self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, REQUEST.plural, name, _preload_content=False
            )
        )

    def request_exists(self, namespace: str, name: str) -> bool:
        try:
            self.request(namespace, name)
        except client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def delete_request(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, REQUEST.plural, name)

    def jobs(self, namespace: str, request: str) -> list[dict[str, Any]]:
        found = self.batch.list_namespaced_job(
            namespace, label_selector=f"unlearn.dev/request={request}", _preload_content=False
        )
        return list(self._json(found)["items"])

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(self._json(found)["items"])

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.pods(namespace, f"batch.kubernetes.io/job-name={job}")

    def configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return self._json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))

    def configmaps(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_config_map(namespace, label_selector=selector, _preload_content=False)
        return list(self._json(found)["items"])

    def network_policies(self, namespace: str) -> list[dict[str, Any]]:
        found = client.NetworkingV1Api(self.core.api_client).list_namespaced_network_policy(
            namespace, _preload_content=False
        )
        return list(self._json(found)["items"])

    def events(self, namespace: str, involved: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={involved}", _preload_content=False
        )
        return list(self._json(found)["items"])


def phase(obj: dict[str, Any]) -> str | None:
    value = (obj.get("status") or {}).get("phase")
    return str(value) if value else None


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    raise AssertionError(f"no condition {kind} in {json.dumps(obj.get('status'), indent=1)}")


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
    return phase(pod) == "Running" and conditions.get("Ready") == "True"


def terminated(pod: dict[str, Any], container: str) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status["name"] == container:
            return dict(status.get("state", {}).get("terminated") or {})
    return {}


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def job_finished_at(job: dict[str, Any]) -> datetime:
    """When the Job controller declared the Job finished (Complete or Failed condition)."""
    for cond in job["status"].get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return when(cond["lastTransitionTime"])
    raise AssertionError(f"Job {job['metadata']['name']} has not finished: {job['status']}")


def example(name: str | None = None, **spec_changes: Any) -> dict[str, Any]:
    """examples/requests/digits-gdpr.yaml, renamed and with top-level spec keys replaced."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest = copy.deepcopy(manifest)
    if name is not None:
        manifest["metadata"]["name"] = name
    manifest["spec"].update(spec_changes)
    return manifest


def kubectl_apply(cp: ControlPlane, namespace: str, *manifests: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``kubectl apply -f -`` of the manifests; never raises (the caller checks the outcome)."""
    text = "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests)
    return cp.kubectl("apply", "-n", namespace, "-f", "-", input=text, check=False)


@dataclass
class E2EContext:
    """What a failing test's report should show: releases and namespaces it used."""

    releases: list[Release] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)


@dataclass
class Workspace:
    """A watched namespace with the ``models`` claim holding the demo model."""

    namespace: str
    models: Path
    """Host dir behind the claim (what the job pod sees at /volumes/models)."""


@dataclass
class Release:
    """One helm release of the chart and its operator pod(s)."""

    cp: ControlPlane
    node: GpuNode
    api: Api
    name: str
    namespace: str
    watched: tuple[str, ...]
    values: Path
    metrics_port: int = 0
    health_port: int = 0
    pool: list[str] = field(default_factory=list)

    @property
    def fullname(self) -> str:
        return self.name if CHART_NAME in self.name else f"{self.name}-{CHART_NAME}"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name},app.kubernetes.io/name={CHART_NAME}"

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cp.helm(*args, check=check)

    def install(self) -> None:
        self.helm(
            "install", self.name, str(CHART), "-n", self.namespace, "--create-namespace",
            "--values", str(self.values), "--wait", f"--timeout={OPERATOR_TIMEOUT:.0f}s",
        )  # fmt: skip

    def uninstall(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.helm("uninstall", self.name, "-n", self.namespace, "--wait", "--timeout=90s", check=check)

    # ---- the operator pod -------------------------------------------------------
    def operator_pods(self) -> list[dict[str, Any]]:
        selector = f"{self.selector},app.kubernetes.io/component=operator"
        return [p for p in self.api.pods(self.namespace, selector) if not p["metadata"].get("deletionTimestamp")]

    def probe(self, pod: dict[str, Any], path: str = "/readyz") -> int | None:
        """The HTTP status of a replica's /healthz or /readyz on its pod IP; None while nothing answers."""
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            return None
        try:
            with urllib.request.urlopen(f"http://{ip}:{self.health_port}{path}", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (urllib.error.URLError, OSError):
            return None

    def healthy(self) -> bool:
        """Some replica answers its liveness endpoint."""
        return any(self.probe(p, "/healthz") == 200 for p in self.operator_pods())

    def lease(self) -> dict[str, Any] | None:
        try:
            found = client.CoordinationV1Api(self.api.core.api_client).read_namespaced_lease(
                self.fullname, self.namespace, _preload_content=False
            )
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(json.loads(found.data))

    def leader(self) -> dict[str, Any] | None:
        """The replica the Lease names (identities are <pod name>_<random>), if it runs."""
        lease = self.lease()
        holder = str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")
        pod_name = holder.rsplit("_", 1)[0]
        return next((p for p in self.operator_pods() if p["metadata"]["name"] == pod_name), None)

    def wait_ready(self, other_than: set[str] | None = None, replicas: int = 2) -> dict[str, Any]:
        """``replicas`` operator pods Running and Ready, one of them the leader; returns the leader.

        ``other_than``: pod uids that must all have been replaced (after an upgrade).
        """

        def ready() -> dict[str, Any] | None:
            self.node.check_alive()
            pods = self.operator_pods()
            if len(pods) != replicas or any(p["metadata"]["uid"] in (other_than or set()) for p in pods):
                return None
            if not all(pod_ready(p) and self.probe(p) == 200 for p in pods):
                return None
            leader = self.leader()
            return leader if leader is not None and self.metrics_of(leader) else None

        pod: dict[str, Any] = wait_for(f"operator of release {self.name} Ready", ready, OPERATOR_TIMEOUT, 0.5)
        return pod

    def kill(self, pod: dict[str, Any]) -> str:
        """SIGKILL a replica's container, as an OOM kill or a crash would: no clean shutdown.

        Returns the killed container's id (``runc://...``, or ``harness://<pid>`` on the venv fast path).
        """
        container_id = str(pod["status"]["containerStatuses"][0]["containerID"])
        self.node.kill_container(container_id)
        return container_id

    def operator_log(self, lines: int = 200) -> str:
        """Every operator container log of this release (old pods included), last ``lines`` each."""
        parts = []
        for pod_dir in self.node.pod_dirs(self.namespace):
            log = pod_dir / "operator.log"
            if pod_dir.name.startswith(f"{self.namespace}_{self.fullname}-") and log.is_file():
                text = log.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- operator log {pod_dir.name}:\n" + "\n".join(text))
        return "\n".join(parts) or f"(no operator log under {self.node.root / 'pods'})"

    # ---- metrics ------------------------------------------------------------------
    def metrics_of(self, pod: dict[str, Any]) -> str:
        """A replica's /metrics ("" while it does not answer)."""
        ip = (pod.get("status") or {}).get("podIP")
        try:
            with urllib.request.urlopen(f"http://{ip}:{self.metrics_port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError):
            return ""

    def metrics(self) -> str:
        """The leader's metrics (a standby's counters stay at zero)."""
        leader = self.leader()
        if leader is None:
            raise AssertionError(f"release {self.name}: no replica holds the Lease")
        return self.metrics_of(leader)

    def sample(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels`` (0 when there is none yet)."""
        return sum(
            float(sample.value)
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    # ---- namespaces and requests -------------------------------------------------
    def take_namespace(self) -> str:
        if not self.pool:
            raise AssertionError(f"release {self.name}: every watched namespace is taken; add to the pool")
        return self.pool.pop(0)


@dataclass(frozen=True)
class ChartImages:
    """The operator and job images the chart is installed with, by digest (``host/name@sha256:...``)."""

    operator: str
    job: str

    @staticmethod
    def values(ref: str) -> dict[str, str]:
        repository, _, digest = ref.partition("@")
        return {"repository": repository, "digest": digest}


def release_values(
    path: Path,
    watched: tuple[str, ...],
    metrics_port: int,
    health_port: int,
    *,
    api_port: int,
    images: ChartImages | None,
    **job: Any,
) -> tuple[Path, int, int]:
    """Values for the test cluster: the images by digest, free host ports, a small Job, one GPU, the
    given namespaces. ``images`` None: names no registry serves, which the node agent runs from the
    project venv (the fast path). The NetworkPolicies' API server rule names the test API server's
    address and port, as a cluster's values name its endpoints (docs/network.md)."""
    operator_image = ChartImages.values(images.operator) if images else {"repository": "unlearning-operator"}
    job_image = ChartImages.values(images.job) if images else {"repository": "unlearn-job"}
    values = {
        "image": {**operator_image, "tag": "e2e"},
        "watchNamespaces": list(watched),
        "ports": {"metrics": metrics_port, "health": health_port},
        "networkPolicy": {"apiServer": {"cidrs": ["127.0.0.1/32"], "ports": [api_port]}},
        "job": {
            "image": {**job_image, "tag": "e2e"},
            "gpus": 1,
            "cpu": "1",
            "memory": "2Gi",
            "activeDeadlineSeconds": 900,
            **job,
        },
    }
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path, metrics_port, health_port


def new_release(
    cp: ControlPlane, node: GpuNode, api: Api, *, name: str, namespace: str, watched: tuple[str, ...], workdir: Path,
    images: ChartImages | None, **job: Any,
) -> Release:  # fmt: skip
    api_port = int(cp.server.rsplit(":", 1)[1])
    values, metrics_port, health_port = release_values(
        workdir / f"{name}-values.yaml", watched, free_port(), free_port(), api_port=api_port, images=images, **job
    )
    return Release(cp, node, api, name, namespace, watched, values, metrics_port, health_port)


def create_namespace(api: Api, name: str) -> None:
    api.core.create_namespace({"metadata": {"name": name, "labels": {"unlearning-operator.test": "e2e"}}})

    def populated() -> bool:
        sas = api.core.list_namespaced_service_account(name, field_selector="metadata.name=default").items
        return bool(sas)

    # The ServiceAccount admission plugin refuses pods until `default` exists.
    wait_for(f"namespace {name} to get its default ServiceAccount", populated, timeout=30)


def models_workspace(api: Api, node: GpuNode, namespace: str, demo_model: Path) -> Workspace:
    """The ``models`` claim the example names, holding digits/digits-mlp.pt2."""
    api.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    models = node.pvc_path(namespace, "models")
    (models / "digits").mkdir(parents=True, exist_ok=True)
    (models / "digits" / "digits-mlp.pt2").write_bytes(demo_model.read_bytes())
    return Workspace(namespace, models)


def wait_request(
    api: Api, node: GpuNode, namespace: str, name: str, *,
    until: Callable[[dict[str, Any]], bool] | None = None, timeout: float = JOB_TIMEOUT,
) -> dict[str, Any]:  # fmt: skip
    """Poll the request until ``until(obj)`` (default: a terminal phase); the node must stay up."""
    done = until or (lambda obj: phase(obj) in TERMINAL)

    def check() -> dict[str, Any] | None:
        node.check_alive()
        obj = api.request(namespace, name)
        return obj if done(obj) else None

    result: dict[str, Any] = wait_for(f"request {namespace}/{name}", check, timeout, 0.5)
    return result


def diagnostics(cp: ControlPlane, api: Api, node: GpuNode, namespaces: list[str]) -> str:
    """What a person needs to see when an e2e test fails: objects, statuses, pod logs."""
    parts = []
    for ns in namespaces:
        kinds = "unlearningrequests,unlearningcalibrations,jobs,pods,pvc,configmaps"
        listed = cp.kubectl("get", kinds, "-n", ns, "-o", "wide", check=False)
        parts.append(f"=== namespace {ns}\n{listed.stdout}{listed.stderr}")
        requests: dict[str, Any]
        try:
            requests = api.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, REQUEST.plural)
        except client.ApiException as error:
            requests = {"items": [], "error": str(error)}
        for obj in requests.get("items", []):
            dumped = yaml.safe_dump(obj.get("status"), sort_keys=False)
            parts.append(f"--- request {obj['metadata']['name']} status:\n{dumped}")
        try:
            calibrations = api.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, CALIBRATION.plural)
        except client.ApiException as error:
            calibrations = {"items": [], "error": str(error)}
        for obj in calibrations.get("items", []):
            dumped = yaml.safe_dump(obj.get("status"), sort_keys=False)
            parts.append(f"--- calibration {obj['metadata']['name']} status:\n{dumped}")
        try:
            for pod in api.pods(ns, ""):
                pod_status = pod.get("status") or {}
                containers = pod_status.get("containerStatuses") or []
                states = [(c["name"], c.get("state"), c.get("restartCount")) for c in containers]
                parts.append(f"--- pod {pod['metadata']['name']}: {pod_status.get('phase')} {states}")
        except client.ApiException as error:
            parts.append(f"--- pods: {error}")
        # The node agent's own log is in the cluster plugin's section; here the containers' output.
        for pod_dir in node.pod_dirs(ns):
            for log in sorted(pod_dir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- pod {pod_dir.name} container {log.stem}:\n" + "\n".join(tail))
    return "\n".join(parts)
