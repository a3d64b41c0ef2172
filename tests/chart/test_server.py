"""The chart and the examples against the real API server of the test control plane.

``kubectl apply --dry-run=server`` runs every admission step (schema, CEL
rules, RBAC escalation checks, Pod Security) without persisting anything, so
a manifest that a real cluster would refuse fails here. The release namespace
enforces the restricted Pod Security Standard, as a careful platform team's
would. The last test installs the chart for real and runs `helm test`: the
operator runs on the fake GPU node under the chart's RBAC, so a missing
permission shows as an operator that never becomes healthy.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.chart.conftest import CHART, RELEASE, ROOT, VALUES, VALUES_FILES, template_args
from tests.cluster.controlplane import ControlPlane, free_port
from tests.cluster.fixtures import GpuNode, wait_for
from unlearning_contracts.api import API_GROUP, API_VERSION, CALIBRATION, REQUEST
from unlearning_contracts.calibration import parse_calibration_spec
from unlearning_contracts.spec import load_manifest

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((ROOT / "examples" / "requests").glob("*.yaml"))
CALIBRATION_EXAMPLES = sorted((ROOT / "examples" / "calibrations").glob("*.yaml"))
CRD_NAME = REQUEST.crd_name
PLURAL = REQUEST.plural
# Namespaces the values files name (watchNamespaces, the dashboard's namespace).
EXTRA_NAMESPACES = ("team-a", "team-b", "monitoring")
MONITORING_CRDS = ("servicemonitors", "podmonitors")


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> str:
    """The chart's CRD, applied the way docs/upgrade.md tells users to."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    for name in (CRD_NAME, CALIBRATION.crd_name):
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return CRD_NAME


@pytest.fixture(scope="session")
def extra_namespaces(control_plane: ControlPlane) -> tuple[str, ...]:
    for name in EXTRA_NAMESPACES:
        manifest = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        control_plane.kubectl("apply", "-f", "-", input=manifest)
    return EXTRA_NAMESPACES


@pytest.fixture
def restricted(control_plane: ControlPlane, namespace: str) -> str:
    """The test namespace, enforcing (and warning about) the restricted Pod Security Standard."""
    labels = [f"pod-security.kubernetes.io/{mode}=restricted" for mode in ("enforce", "warn")]
    control_plane.kubectl("label", "namespace", namespace, *labels)
    return namespace


def dry_run(cp: ControlPlane, manifests: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
    where = ["-n", namespace] if namespace else []
    return cp.kubectl("apply", "--dry-run=server", *where, "-f", "-", input=manifests, check=False)


def create_service_accounts(cp: ControlPlane, objects: list[dict[str, Any]]) -> None:
    """Create the release's ServiceAccounts for real: a dry-run pod is admitted only if its account exists."""
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    cp.kubectl("apply", "-f", "-", input="---\n".join(yaml.safe_dump(a) for a in accounts))


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_rendered_chart_is_accepted_by_the_api_server(
    control_plane: ControlPlane, crd: str, extra_namespaces: tuple[str, ...], restricted: str, values_file: str | None
) -> None:
    done = control_plane.helm(*template_args(*([values_file] if values_file else []), namespace=restricted))
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    create_service_accounts(control_plane, objects)
    applied = dry_run(control_plane, done.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "PodSecurity" not in applied.stderr, applied.stderr
    # Every object went through admission, the helm test pod under "enforce".
    assert applied.stdout.count("(server dry run)") == len(objects)
    assert {"Deployment", "Pod", "Service"} <= {o["kind"] for o in objects}


def test_the_api_server_refuses_what_restricted_forbids(control_plane: ControlPlane, crd: str, restricted: str) -> None:
    # The control for the test above: the same namespace does refuse a pod that may escalate.
    done = control_plane.helm(*template_args(namespace=restricted))
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    create_service_accounts(control_plane, objects)
    pod = next(o for o in objects if o["kind"] == "Pod")
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    applied = dry_run(control_plane, yaml.safe_dump(pod))
    assert applied.returncode != 0
    assert "violates PodSecurity" in applied.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_valid_for_the_crd_and_the_spec(
    control_plane: ControlPlane, crd: str, namespace: str, example: Path
) -> None:
    manifest = load_manifest(example)
    assert manifest.spec.model.name
    applied = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert applied.returncode == 0, applied.stderr
    assert "created (server dry run)" in applied.stdout


@pytest.mark.parametrize("example", CALIBRATION_EXAMPLES, ids=[p.stem for p in CALIBRATION_EXAMPLES])
def test_calibration_example_is_valid_for_the_crd_and_the_spec(
    control_plane: ControlPlane, crd: str, namespace: str, example: Path
) -> None:
    raw = yaml.safe_load(example.read_text())
    assert raw["kind"] == CALIBRATION.kind
    assert parse_calibration_spec(raw["spec"]).model.name
    applied = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert applied.returncode == 0, applied.stderr
    assert "created (server dry run)" in applied.stdout


def _calibration(name: str = "cal", **spec: Any) -> dict[str, Any]:
    raw = yaml.safe_load(CALIBRATION_EXAMPLES[0].read_text())
    raw["metadata"]["name"] = name
    raw["spec"]["recipe"].update(spec.pop("recipe", {}))
    raw["spec"].update(spec)
    return dict(raw)


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        (
            _calibration(folds=33),
            "spec.folds: Invalid value: 33: spec.folds in body should be less than or equal to 32",
        ),
        (_calibration(folds=1), "spec.folds in body should be greater than or equal to 2"),
        (_calibration("c" * 49), "metadata.name must be at most 48 characters"),
        (
            _calibration(recipe={"optimizer": {"name": "adam", "lr": 0.001, "momentum": 0.9}}),
            "recipe.optimizer.momentum and nesterov apply to sgd only",
        ),
        (
            _calibration(recipe={"optimizer": {"name": "sgd", "lr": 0.1, "nesterov": True}}),
            "recipe.optimizer.nesterov needs a momentum above 0",
        ),
        (
            _calibration(recipe={"schedule": {"name": "step"}}),
            "recipe.schedule.stepEpochs is required for schedule step",
        ),
        (
            _calibration(recipe={"augmentations": ["random-crop", "random-crop"]}),
            "recipe.augmentations: list each augmentation once",
        ),
        (_calibration(recipe={"augmentations": ["mixup"]}), 'Unsupported value: "mixup"'),
        (
            _calibration(output={"location": {"claimName": "models", "path": "../../etc"}}),
            "path must not contain '..'",
        ),
    ],
)
def test_the_calibration_crd_refuses_what_the_spec_refuses(
    control_plane: ControlPlane, crd: str, namespace: str, manifest: dict[str, Any], words: str
) -> None:
    applied = dry_run(control_plane, yaml.safe_dump(manifest), namespace)
    assert applied.returncode != 0
    assert words in applied.stderr, applied.stderr


def test_calibration_spec_is_immutable_once_its_folds_job_exists(
    control_plane: ControlPlane, crd: str, namespace: str
) -> None:
    """No operator here: the API server's CEL transition rule alone enforces it."""
    api = client.CustomObjectsApi(control_plane.api_client())
    args = (API_GROUP, API_VERSION, namespace, CALIBRATION.plural)
    api.create_namespaced_custom_object(*args, _calibration("frozen"))
    api.patch_namespaced_custom_object(*args, "frozen", {"spec": {"seed": 1}})  # before launch: fine
    api.patch_namespaced_custom_object_status(*args, "frozen", {"status": {"phase": "Running", "jobName": "frozen-1"}})
    with pytest.raises(client.ApiException) as refused:
        api.patch_namespaced_custom_object(*args, "frozen", {"spec": {"seed": 2}})
    assert refused.value.status == 422
    assert "spec is immutable once the folds Job has started" in str(refused.value.body)
    assert api.get_namespaced_custom_object(*args, "frozen")["spec"]["seed"] == 1


def test_server_dry_run_refuses_an_invalid_request(control_plane: ControlPlane, crd: str, namespace: str) -> None:
    # The control for the test above: the CRD's schema really is enforced by the dry run.
    raw = yaml.safe_load((ROOT / "examples" / "requests" / "strict-gates-autotune.yaml").read_text())
    raw["spec"]["tuning"]["maxAttempts"] = 50
    applied = dry_run(control_plane, yaml.safe_dump(raw), namespace)
    assert applied.returncode != 0
    assert "spec.tuning.maxAttempts" in applied.stderr


def test_helm_install_refuses_bad_values(control_plane: ControlPlane, crd: str, namespace: str, tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("job:\n  gpus: two\nwatchNamespace: [team-a]\n")
    done = control_plane.helm("install", RELEASE, str(CHART), "-n", namespace, "--values", str(bad), check=False)
    assert done.returncode != 0
    assert "- at '/job/gpus': got string, want integer" in done.stderr
    assert "additional properties 'watchNamespace' not allowed" in done.stderr
    listed = control_plane.helm("list", "-n", namespace, "-q")
    assert listed.stdout.strip() == ""


def monitoring_crd(plural: str) -> dict[str, Any]:
    """A stand-in for the Prometheus Operator's CRD: same group, version and kind, open schema."""
    kind = {"servicemonitors": "ServiceMonitor", "podmonitors": "PodMonitor"}[plural]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


@pytest.fixture
def monitoring_api(control_plane: ControlPlane) -> Iterator[None]:
    manifests = "---\n".join(yaml.safe_dump(monitoring_crd(p)) for p in MONITORING_CRDS)
    control_plane.kubectl("apply", "-f", "-", input=manifests)
    try:
        for plural in MONITORING_CRDS:
            control_plane.kubectl(
                "wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=60s"
            )
        yield
    finally:
        control_plane.kubectl("delete", "-f", "-", "--wait=true", input=manifests, check=False)


def install_dry_run(cp: ControlPlane, namespace: str, *args: str) -> tuple[list[str], str]:
    """`helm install --dry-run=server`: the kinds it would create and its NOTES."""
    done = cp.helm("install", RELEASE, str(CHART), "-n", namespace, "--dry-run=server", *args)
    manifest, _, notes = done.stdout.partition("NOTES:")
    kinds = [d["kind"] for d in yaml.safe_load_all(manifest.split("MANIFEST:", 1)[1]) if d]
    return kinds, notes


def test_monitors_follow_the_clusters_monitoring_api(
    control_plane: ControlPlane, crd: str, namespace: str, request: pytest.FixtureRequest
) -> None:
    monitoring = ("--values", str(VALUES / "monitoring-on.yaml"))
    kinds, notes = install_dry_run(control_plane, namespace, *monitoring)
    assert "ServiceMonitor" not in kinds
    assert "PodMonitor" not in kinds
    assert "no ServiceMonitor was created" in notes
    assert "no PodMonitor was created" in notes

    request.getfixturevalue("monitoring_api")

    def served() -> bool:
        kinds, _ = install_dry_run(control_plane, namespace, *monitoring)
        return "ServiceMonitor" in kinds

    wait_for("helm to see monitoring.coreos.com/v1", served, timeout=60, interval=2)
    kinds, notes = install_dry_run(control_plane, namespace, *monitoring)
    assert kinds.count("ServiceMonitor") == kinds.count("PodMonitor") == 1
    assert "SKIPPED" not in notes
    assert "ServiceMonitor unlearning-unlearning-operator created" in notes
    rendered = control_plane.helm(
        *template_args("monitoring-on.yaml", namespace=namespace), "--api-versions", "monitoring.coreos.com/v1"
    )
    monitors = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] in ("ServiceMonitor", "PodMonitor")]
    applied = dry_run(control_plane, "---\n".join(yaml.safe_dump(m) for m in monitors))
    assert applied.returncode == 0, applied.stderr


def test_notes_name_the_next_commands(control_plane: ControlPlane, crd: str, namespace: str) -> None:
    _, notes = install_dry_run(control_plane, namespace)
    assert "kubectl apply -n default -f examples/requests/digits-gdpr.yaml" in notes
    assert f"helm test {RELEASE} -n {namespace}" in notes
    assert "kubectl get configmaps -A -l unlearn.dev/audit=true" in notes
    assert "kubectl apply --server-side -f charts/unlearning-operator/crds/" in notes
    _, namespaced = install_dry_run(control_plane, namespace, "--values", str(VALUES / "namespaced.yaml"))
    assert "kubectl apply -n team-a -f examples/requests/digits-gdpr.yaml" in namespaced


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_helm_install_then_helm_test(
    control_plane: ControlPlane, gpu_node: GpuNode, crd: str, namespace: str, mode: str
) -> None:
    health, metrics = free_port(), free_port()
    api_port = control_plane.server.rsplit(":", 1)[1]
    # The chart's defaults but for where the API server is: the fake node's own address and
    # port instead of 443/6443 (docs/network.md: set these to your cluster's endpoints). The
    # helm test pod uses the default URL, the Service's name, which the node resolves and
    # routes for pods a NetworkPolicy isolates (tests/cluster/podnet.py).
    settings = [
        f"ports.health={health}",
        f"ports.metrics={metrics}",
        "networkPolicy.apiServer.cidrs={127.0.0.1/32}",
        f"networkPolicy.apiServer.ports={{{api_port}}}",
    ]
    if mode == "namespaced":
        settings.append(f"watchNamespaces={{{namespace}}}")
    args = [arg for setting in settings for arg in ("--set", setting)]
    control_plane.helm("install", RELEASE, str(CHART), "-n", namespace, *args, "--wait", "--timeout=120s")
    try:
        core = client.CoreV1Api(control_plane.api_client())

        def ready_replicas() -> list[str]:
            pods = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator").items
            ips = [p.status.pod_ip for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp]
            ready = []
            for ip in ips:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://{ip}:{health}/readyz", timeout=2) as response,
                ):
                    if response.status == 200:
                        ready.append(ip)
            return ready if len(ready) == 2 else []

        # Two replicas, each on a pod IP of its own (the NetworkPolicy isolates them), both ready.
        ips = wait_for("both operator replicas ready", ready_replicas, timeout=90, interval=1)
        assert len(set(ips)) == 2
        tested = control_plane.helm("test", RELEASE, "-n", namespace, "--timeout=120s", check=False)
        assert tested.returncode == 0, tested.stdout + tested.stderr + gpu_node.diagnostics(namespace)
        assert "Phase:          Succeeded" in tested.stdout
        assert "CRD served: unlearn.dev/v1alpha1 unlearningrequests" in gpu_node.pod_log(
            namespace, "unlearning-unlearning-operator-test", "check"
        )
        # The operator really serves requests under the chart's RBAC: one naming an image
        # outside the allow-list is Rejected by the operator (a status patch, no Job).
        api = client.CustomObjectsApi(control_plane.api_client())
        raw = yaml.safe_load((ROOT / "examples" / "requests" / "digits-gdpr.yaml").read_text())
        raw["spec"]["job"] = {"image": "registry.example.com/not-allowed:1"}
        name = raw["metadata"]["name"]
        api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, raw)

        def phase() -> str | None:
            obj = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
            assert isinstance(obj, dict)
            value = (obj.get("status") or {}).get("phase")
            return str(value) if value else None

        wait_for("the request to be Rejected", lambda: phase() == "Rejected", timeout=60, interval=1)
        # Deleted while the operator still runs, so no finalizer outlives it.
        api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)

        def gone() -> bool:
            try:
                api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
            except client.ApiException as error:
                return bool(error.status == 404)
            return False

        wait_for("the request to be deleted", gone, timeout=60, interval=1)
    finally:
        control_plane.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout=60s", check=False)
