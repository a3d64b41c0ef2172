"""The operator as a subprocess against the real control plane (tests/cluster).

``operator_process`` starts ``python -m unlearning_operator`` as a user bound
to exactly ``permissions.RULES``, watching only the test's namespace, and stops it after the test
(its log is attached to a failing test). ``models_pvc`` creates the ``models``
claim and fills it with the demo model from ``unlearn prepare-demo``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.cluster.controlplane import ControlPlane, free_port
from tests.cluster.fixtures import GpuNode, wait_for
from unlearning_contracts.api import API_GROUP, API_VERSION, CALIBRATION, REQUEST
from unlearning_operator.permissions import RULES

ROOT = Path(__file__).resolve().parents[2]
CRDS = [ROOT / "crds" / f"{kind.crd_name}.yaml" for kind in (REQUEST, CALIBRATION)]
GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, REQUEST.plural
JOB_IMAGE = "unlearn-job:test"


@dataclass
class OperatorProcess:
    control_plane: ControlPlane
    namespace: str
    log: Path
    kubeconfig: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    health_port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "UNLEARNING_WATCH_NAMESPACES": self.namespace,
            "UNLEARNING_JOB_IMAGE": JOB_IMAGE,
            "UNLEARNING_JOB_CPU": "1",
            "UNLEARNING_JOB_MEMORY": "2Gi",
            "UNLEARNING_METRICS_PORT": str(self.metrics_port),
            "UNLEARNING_HEALTH_PORT": str(self.health_port),
            **self.env_overrides,
        }
        with self.log.open("ab") as out:
            out.write(f"=== start {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "unlearning_operator"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("operator readiness endpoint", self.healthy, timeout=60)

    def probe(self, path: str) -> int | None:
        """The HTTP status of /healthz or /readyz; None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def healthy(self) -> bool:
        """Ready: kopf has started (or, with leader election, the replica can take over)."""
        self.check_alive()
        return self.probe("/readyz") == 200

    def check_alive(self) -> None:
        if self.popen is not None and (code := self.popen.poll()) is not None:
            raise AssertionError(f"operator exited with {code}:\n{self.tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> None:
    """Both kinds' CRDs, as the chart installs them."""
    for path, kind in zip(CRDS, (REQUEST, CALIBRATION), strict=True):
        control_plane.kubectl("apply", "-f", str(path))
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{kind.crd_name}", "--timeout=60s")


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane) -> Path:
    """A user bound to exactly permissions.RULES: a missing verb fails the tests, an extra one is not used."""
    rbac = client.RbacAuthorizationV1Api(control_plane.api_client())
    name = "unlearning-operator-test"
    rbac.create_cluster_role({"metadata": {"name": name}, "rules": RULES})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "unlearning-operator"}],
        }
    )
    return control_plane.kubeconfig_for("unlearning-operator", "/CN=unlearning-operator")


@pytest.fixture
def operator_env() -> dict[str, str]:
    """Settings for this test's operator; override the fixture (or mutate it) per test."""
    return {}


@pytest.fixture
def operator_process(
    *,
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    crd: None,
    namespace: str,
    operator_env: dict[str, str],
    operator_kubeconfig: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(control_plane, namespace, tmp_path / "operator.log", operator_kubeconfig, operator_env)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log (last lines):\n{process.tail(120)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    process = getattr(item, "funcargs", {}).get("operator_process")
    if report.failed and isinstance(process, OperatorProcess):
        report.sections.append(("operator log", process.tail(150)))


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model from ``unlearn prepare-demo``, trained once per session (about 15 s)."""
    root = tmp_path_factory.mktemp("demo")
    unlearn = Path(sys.executable).parent / "unlearn"
    subprocess.run([str(unlearn), "prepare-demo", str(root)], check=True, capture_output=True)
    return root / "digits" / "digits-mlp.pt2"


@pytest.fixture
def models_pvc(control_plane: ControlPlane, gpu_node: GpuNode, namespace: str, demo_model: Path) -> Path:
    api = client.CoreV1Api(control_plane.api_client())
    api.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    path = gpu_node.pvc_path(namespace, "models")
    (path / "digits").mkdir(parents=True, exist_ok=True)
    (path / "digits" / "digits-mlp.pt2").write_bytes(demo_model.read_bytes())
    return path


class PhaseRecorder:
    """Every phase each request passed through, from a watch (polling would miss Pending)."""

    def __init__(self, api_client: client.ApiClient, namespace: str, plural: str = PLURAL) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.plural = plural
        self.phases: dict[str, list[str]] = {}
        self.watch = watch.Watch()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            for event in self.watch.stream(
                self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, self.plural, timeout_seconds=600
            ):
                obj = event["object"]
                phase = (obj.get("status") or {}).get("phase")
                seen = self.phases.setdefault(obj["metadata"]["name"], [])
                if phase and (not seen or seen[-1] != phase):
                    seen.append(phase)

    def until(self, name: str, final: str, timeout: float = 30) -> list[str]:
        """The phases ``name`` went through, once the watch has delivered ``final``: a poll that read
        it first may be ahead of the watch on a loaded machine."""
        wait_for(f"the watch to deliver {name} {final}", lambda: (self.phases.get(name) or [""])[-1] == final, timeout)
        return list(self.phases[name])

    def stop(self) -> None:
        self.watch.stop()


@pytest.fixture
def phases(control_plane: ControlPlane, namespace: str) -> Iterator[PhaseRecorder]:
    recorder = PhaseRecorder(control_plane.api_client(), namespace)
    try:
        yield recorder
    finally:
        recorder.stop()


def request_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """The digits request from examples/, named ``name``, with top-level spec overrides."""
    base: dict[str, Any] = {
        "requestId": f"GDPR-{name}",
        "model": {
            "name": "digits-mlp",
            "format": "exported",
            "source": {"claimName": "models", "path": "digits/digits-mlp.pt2"},
        },
        "data": {"source": "digits"},
        "forget": {"indices": [3, 17, 42, 58, 91, 104, 133, 178, 202, 251]},
        "gates": {"maxTestAccuracyDrop": 5.0, "maxMiaAuc": 0.75},
        "output": {"location": {"claimName": "models", "path": "digits/versions"}},
    }
    base.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "UnlearningRequest", "metadata": {"name": name}, "spec": base}
