"""pytest plugin: a real control plane, a fake GPU node and per-test namespaces.

Load with ``pytest_plugins = ["tests.cluster.fixtures"]`` in tests/conftest.py.

Fixtures:

* ``control_plane`` (session): a started :class:`ControlPlane` (``.kubeconfig``,
  ``.server``, ``.bin_dir``, ``.kubectl(*args)``, ``.helm(*args)``,
  ``.api_client()``). Builds the binaries first if needed (tests/cluster/build.sh).
* ``gpu_node`` (session): the node agent running ``gpu-node-0`` with one
  ``nvidia.com/gpu``; ``.pvc_path(ns, claim)`` is the host dir behind a claim.
* ``namespace`` (function): a fresh namespace whose ``default`` ServiceAccount
  and ``kube-root-ca.crt`` exist; deleted after the test.
* ``helm`` (function): ``helm(*args)`` with the built helm against the cluster.
* ``images`` (session): the operator and job images built by
  ``images/build.py`` (cached by input hash) and pushed to a local registry
  (tests/cluster/registry.py); ``images["job"].pushed`` is
  ``127.0.0.1:PORT/unlearn-job@sha256:...``, which the node agent pulls and
  runs with runc. The build runs at collection, before the first test's
  timeout starts, when a collected test uses the fixture.
* ``gpu_node_image_commands`` (session): override to give images without a
  ``command`` in their pod spec an entrypoint; ``gpu_node_gpus`` (session):
  override the node's GPU count (default 1).

A component that dies mid-session fails the tests that use it with its log;
the tails of the component logs (and of the test's pod logs) are attached to
every failing test that used the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane, ControlPlaneError, build_binaries, die_with_parent, tail
from tests.cluster.registry import Built, ImagesError, Registry, build_images

# Inner loop only: e2e pods run from the venv instead of the images (no build, no registry).
VENV_FAST_PATH = os.environ.get("UNLEARNING_TEST_VENV_FAST_PATH") == "1"
NODE_NAME = "gpu-node-0"
NODE_GPUS = 1
AGENT = Path(__file__).resolve().parent / "nodeagent.py"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class GpuNode:
    """The node agent subprocess and where its pods keep their files."""

    name: str
    gpus: int
    root: Path
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def pvc_root(self) -> Path:
        return self.root / "pvcs"

    def pvc_path(self, namespace: str, claim: str) -> Path:
        """Host dir that backs PersistentVolumeClaim ``claim``; created here so
        tests can put inputs in place before the pod starts."""
        path = self.pvc_root / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pod_dirs(self, namespace: str | None = None) -> list[Path]:
        pods = self.root / "pods"
        if not pods.is_dir():
            return []
        return sorted(p for p in pods.iterdir() if namespace is None or p.name.startswith(f"{namespace}_"))

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """What the container wrote to stdout/stderr (``kubectl logs`` needs a
        kubelet API the agent does not serve)."""
        # Newest first: a Job's or a test's pod may reuse a name.
        dirs = [d for d in self.pod_dirs(namespace) if d.name.rsplit("_", 1)[0] == f"{namespace}_{pod}"]
        for d in sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True):
            return (d / f"{container}.log").read_text(errors="replace")
        raise FileNotFoundError(f"no log for {namespace}/{pod}/{container} under {self.root / 'pods'}")

    def runtime_facts(self, namespace: str, pod: str, container: str) -> dict[str, Any]:
        """What /proc said about a container run from its image (uid, gid, groups, root mount): the
        agent's ``<container>.runtime.json``, newest pod of that name first."""
        dirs = [d for d in self.pod_dirs(namespace) if d.name.rsplit("_", 1)[0] == f"{namespace}_{pod}"]
        for d in sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True):
            return dict(json.loads((d / f"{container}.runtime.json").read_text()))
        raise FileNotFoundError(f"no runtime facts for {namespace}/{pod}/{container} under {self.root / 'pods'}")

    def kill_container(self, container_id: str) -> None:
        """SIGKILL a container, as the OOM killer or a crash would: ``runc://ID`` (from an image) or
        ``harness://PID`` (the venv fast path, a process group)."""
        if container_id.startswith("runc://"):
            runc = shutil.which("runc") or "runc"
            cid = container_id.removeprefix("runc://")
            subprocess.run([runc, "--root", str(self.root / "runc"), "kill", cid, "KILL"], check=True)
        else:
            os.killpg(int(container_id.removeprefix("harness://")), signal.SIGKILL)

    def check_alive(self) -> None:
        if (code := self.popen.poll()) is not None:
            raise ControlPlaneError(f"node agent exited with {code}; log {self.log}:\n{tail(self.log)}")

    def diagnostics(self, namespace: str | None = None) -> str:
        parts = [f"--- node agent, log {self.log}, last lines:\n{tail(self.log)}"]
        for d in self.pod_dirs(namespace) if namespace else []:
            for f in sorted(d.glob("*.log")):
                parts.append(f"--- pod {d.name} container {f.stem}:\n{tail(f, 20)}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


_BIN_DIR = pytest.StashKey[Path | ControlPlaneError]()
_IMAGES = pytest.StashKey[dict[str, Built] | ImagesError]()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build here rather than in the fixture: a cold build takes many minutes
    # on a small CI machine and would count against the first test's timeout.
    if session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    wants_images = ("images", "chart_images")
    if not VENV_FAST_PATH and any(set(wants_images) & set(getattr(item, "fixturenames", ())) for item in session.items):
        if reporter is not None:
            reporter.write_line("images/build.py: operator and job images (cached; first build: ~10 min) ...")
        try:
            session.stash[_IMAGES] = build_images()
        except ImagesError as exc:
            session.stash[_IMAGES] = exc
    if not any("control_plane" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if reporter is not None:
        reporter.write_line("tests/cluster/build.sh: control-plane binaries (first build: ~10-20 min) ...")
    try:
        session.stash[_BIN_DIR] = build_binaries()
    except ControlPlaneError as exc:
        session.stash[_BIN_DIR] = exc


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    built = request.session.stash.get(_BIN_DIR, None)
    if built is None:  # e.g. the plugin was loaded after collection
        try:
            built = build_binaries()
        except ControlPlaneError as exc:
            built = exc
    if isinstance(built, ControlPlaneError):
        pytest.fail(f"cluster binaries: {built}", pytrace=False)
    bin_dir = built
    cp = ControlPlane(bin_dir, tmp_path_factory.mktemp("cluster"))
    try:
        cp.start()
    except ControlPlaneError as exc:
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, Built]]:
    built = request.session.stash.get(_IMAGES, None)
    if isinstance(built, ImagesError):
        pytest.fail(f"images: {built}", pytrace=False)
    registry = Registry(tmp_path_factory.mktemp("registry"))
    try:
        registry.start()
        # Built already (at collection): this finds them in the cache and pushes what the registry lacks.
        pushed = build_images(push_to=registry)
    except ImagesError as exc:
        registry.stop()
        pytest.fail(f"images: {exc}", pytrace=False)
    try:
        yield pushed
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def gpu_node_image_commands() -> dict[str, list[str]]:
    """Entrypoints of images whose pods set no ``command`` (the agent cannot
    read an image's ENTRYPOINT). Override in a conftest, e.g.
    ``{"ghcr.io/x/unlearning-operator": ["unlearning-operator"]}``; keys match
    the image with or without its tag."""
    return {}


@pytest.fixture(scope="session")
def gpu_node_gpus() -> int:
    """``nvidia.com/gpu`` capacity of the fake node; override in a conftest."""
    return NODE_GPUS


@pytest.fixture(scope="session")
def gpu_node(
    control_plane: ControlPlane, gpu_node_image_commands: dict[str, list[str]], gpu_node_gpus: int
) -> Iterator[GpuNode]:
    # The agent authenticates as a real node, so the Node authorizer and the
    # NodeRestriction admission plugin hold it to what a kubelet may do.
    kubeconfig = control_plane.kubeconfig_for(NODE_NAME, f"/O=system:nodes/CN=system:node:{NODE_NAME}")
    root = control_plane.workdir / "node"
    root.mkdir(exist_ok=True)
    log = control_plane.workdir / "logs" / "nodeagent.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [
                # TERM: the agent's shutdown ends its containers and mount points.
                *die_with_parent("TERM"),
                sys.executable,
                str(AGENT),
                f"--kubeconfig={kubeconfig}",
                f"--root={root}",
                f"--node-name={NODE_NAME}",
                f"--gpus={gpu_node_gpus}",
                f"--provisioner-kubeconfig={control_plane.kubeconfig}",
                *(f"--image-command={image}={json.dumps(cmd)}" for image, cmd in gpu_node_image_commands.items()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = GpuNode(NODE_NAME, gpu_node_gpus, root, log, popen)
    api = client.CoreV1Api(control_plane.api_client())

    def ready() -> bool:
        node.check_alive()
        try:
            obj = api.read_node(NODE_NAME)
        except client.ApiException:
            return False
        conditions = {c.type: c.status for c in (obj.status.conditions if obj.status else None) or []}
        return conditions.get("Ready") == "True" and not (obj.spec and obj.spec.taints)

    try:
        wait_for(f"node {NODE_NAME} Ready and untainted", ready, timeout=60)
    except (TimeoutError, ControlPlaneError) as exc:
        node.stop()
        pytest.fail(f"{exc}\n{node.diagnostics()}\n{control_plane.diagnostics()}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    api = client.CoreV1Api(control_plane.api_client())
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    api.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"unlearning-operator.test": "true"}))
    )

    # Pods are refused until the ServiceAccount controller made `default`, and
    # their token volume waits for root-ca-cert-publisher's ConfigMap.
    def populated() -> bool:
        sas = api.list_namespaced_service_account(name, field_selector="metadata.name=default").items
        cms = api.list_namespaced_config_map(name, field_selector="metadata.name=kube-root-ca.crt").items
        return bool(sas) and bool(cms)

    wait_for(f"namespace {name} to get its default ServiceAccount", populated, timeout=30)
    try:
        yield name
    finally:
        with contextlib.suppress(client.ApiException):
            api.delete_namespace(name)


@pytest.fixture
def helm(control_plane: ControlPlane) -> Callable[..., subprocess.CompletedProcess[str]]:
    return control_plane.helm


@pytest.fixture(autouse=True)
def _cluster_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    # Fail fast, with the logs, instead of letting a test time out against a
    # control plane or node agent that has already died.
    watched: list[ControlPlane | GpuNode] = []
    for name in ("control_plane", "gpu_node"):
        if name in request.fixturenames:
            watched.append(request.getfixturevalue(name))
    for thing in watched:
        try:
            thing.check_alive()
        except ControlPlaneError as exc:
            pytest.fail(str(exc), pytrace=False)
    yield
    for thing in watched:
        try:
            thing.check_alive()
        except ControlPlaneError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    cp = funcargs.get("control_plane")
    node = funcargs.get("gpu_node")
    if isinstance(cp, ControlPlane):
        report.sections.append(("control plane logs", cp.diagnostics()))
    if isinstance(node, GpuNode):
        ns = funcargs.get("namespace")
        report.sections.append(("node agent and pod logs", node.diagnostics(ns if isinstance(ns, str) else None)))
