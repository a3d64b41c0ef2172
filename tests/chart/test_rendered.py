"""The chart as helm renders it: lint, schema errors, and what each object says.

Runs the helm built by tests/cluster/build.sh, offline (no API server): what
the API server thinks of these objects is tests/chart/test_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, RELEASE, VALUES, VALUES_FILES, Helm, Render, by_kind, one, template_args
from unlearning_operator.permissions import RULES
from unlearning_operator.settings import ENV_VARS, load_settings

pytestmark = pytest.mark.cluster


def triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a rule list grants."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def normalised(rules: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], ...]]:
    keys = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")
    return sorted(tuple(tuple(sorted(rule.get(k, []))) for k in keys) for rule in rules)


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_lint_strict(offline_helm: Helm, values_file: str | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values_file:
        args += ["--values", str(VALUES / values_file)]
    done = offline_helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_template_renders_and_settings_parse(render: Render, values_file: str | None) -> None:
    objects = render(*([values_file] if values_file else []))
    kinds = {o["kind"] for o in objects}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "Pod"} <= kinds
    env = operator_env(objects)
    assert set(env) == set(ENV_VARS)
    # The operator's own parser accepts exactly what the chart renders.
    load_settings(env)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"job": {"gpus": "two"}}, "/job/gpus"),
        ({"watchNamespace": ["team-a"]}, "watchNamespace"),
        ({"job": {"nodeselector": {"a": "b"}}}, "nodeselector"),
        ({"job": {"memory": "16 GB"}}, "/job/memory"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        ({"job": {"bounds": {"maxGpus": "all"}}}, "/job/bounds/maxGpus"),
        ({"job": {"bounds": {"maxMemory": "lots"}}}, "/job/bounds/maxMemory"),
        ({"job": {"allowedFactoryModules": ["os:system"]}}, "/job/allowedFactoryModules"),
        ({"job": {"kueue": {"required": "yes"}}}, "/job/kueue/required"),
        ({"job": {"maxConcurrentJobsPerNamespace": -1}}, "/job/maxConcurrentJobsPerNamespace"),
    ],
)
def test_bad_values_fail_with_the_schema_message(
    offline_helm: Helm, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    done = offline_helm("template", RELEASE, str(CHART), "--values", str(bad))
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert message in done.stderr, done.stderr


def test_image_digests_pin_both_images(render: Render) -> None:
    operator_digest, job_digest = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    objects = render(extra=("--set", f"image.digest={operator_digest}", "--set", f"job.image.digest={job_digest}"))
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    # By digest, the tag ignored: what the release records and the tests install.
    assert container["image"] == f"ghcr.io/unlearning-operator/unlearning-operator@{operator_digest}"
    assert operator_env(objects)["UNLEARNING_JOB_IMAGE"] == f"ghcr.io/unlearning-operator/unlearn-job@{job_digest}"


def test_deployment_is_single_recreate_and_restricted(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["unlearning-operator"]
    assert container["image"] == "ghcr.io/unlearning-operator/unlearning-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert container["resources"]["limits"] == {"memory": "256Mi"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_default_settings_equal_the_operator_defaults(render: Render) -> None:
    settings = load_settings(operator_env(render()))
    assert settings == load_settings({})
    assert settings.clusterwide


def test_job_defaults_become_operator_settings(render: Render) -> None:
    values = yaml.safe_load((VALUES / "cluster-wide.yaml").read_text())["job"]
    settings = load_settings(operator_env(render("cluster-wide.yaml")))
    assert settings.job_image == "registry.example.com/ml/unlearn-job:0.1.0-cu124"
    assert settings.allowed_images == set(values["allowedImages"])
    assert settings.image_allowed(settings.job_image)
    assert settings.job_gpus == 2
    assert (settings.job_cpu, settings.job_memory) == ("8", "48Gi")
    assert dict(settings.job_node_selector) == values["nodeSelector"]
    assert [dict(t) for t in settings.job_tolerations] == values["tolerations"]
    assert dict(settings.job_affinity) == values["affinity"]
    assert settings.job_priority_class == "gpu-batch"
    assert settings.job_deadline_seconds == 7200
    assert settings.job_backoff_limit == 1
    assert settings.job_ttl_seconds == 3600
    assert settings.max_concurrent_jobs == 2
    assert settings.pending_alert_seconds == 600
    # The admin's bounds and allow-lists.
    assert settings.allowed_factory_modules == ("mylab.models",)
    assert (settings.max_job_gpus, settings.max_job_cpu, settings.max_job_memory) == (4, "16", "128Gi")
    assert settings.max_job_deadline_seconds == 43200
    assert settings.allowed_priority_classes == {"gpu-batch-high"}
    assert settings.allow_keyless_tolerations is True
    assert (settings.job_queue_name, settings.require_queue_name) == ("gpu-queue", True)
    assert settings.max_concurrent_jobs_per_namespace == 1


def test_large_integers_are_not_rendered_in_float_notation(offline_helm: Helm, tmp_path: Path) -> None:
    # Helm reads numbers in values files as float64; without `int` 1000000 would render as "1e+06".
    values = tmp_path / "big.yaml"
    values.write_text("job:\n  ttlSecondsAfterFinished: 1000000\n  activeDeadlineSeconds: 2000000\n")
    done = offline_helm(*template_args(), "--values", str(values))
    assert done.returncode == 0, done.stderr
    env = operator_env([d for d in yaml.safe_load_all(done.stdout) if d])
    assert env["UNLEARNING_JOB_TTL_SECONDS"] == "1000000"
    assert env["UNLEARNING_JOB_DEADLINE_SECONDS"] == "2000000"


def test_cluster_wide_rbac_is_exactly_the_operator_rules(render: Render) -> None:
    objects = render("cluster-wide.yaml")
    assert by_kind(objects, "Role") == []
    role = one(objects, "ClusterRole")
    assert normalised(role["rules"]) == normalised(RULES)
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(objects, "ServiceAccount")["metadata"]["name"],
            "namespace": "unlearning",
        }
    ]


def test_namespaced_rbac_is_a_role_per_namespace(render: Render) -> None:
    objects = render("namespaced.yaml")
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    cluster_role = one(objects, "ClusterRole")
    for role in roles:
        # Together with the small ClusterRole, each namespace grants exactly RULES.
        assert normalised(role["rules"] + cluster_role["rules"]) == normalised(RULES)
    # Only cluster-scoped reads are cluster-wide: nothing namespaced, no write verb.
    cluster_wide = triples(cluster_role["rules"])
    assert {resource for _, resource, _ in cluster_wide} == {"customresourcedefinitions"}
    assert {verb for _, _, verb in cluster_wide} <= {"get", "list", "watch"}
    assert operator_env(objects)["UNLEARNING_WATCH_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_nothing_on_secrets(render: Render, values_file: str | None) -> None:
    objects = render(*([values_file] if values_file else []))
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for group, resource, verb in triples(role["rules"]):
            assert resource != "secrets", role["metadata"]["name"]
            assert "*" not in (group, resource, verb), role["metadata"]["name"]


def test_monitors_need_the_monitoring_api(render: Render) -> None:
    without_api = render("monitoring-on.yaml")
    assert by_kind(without_api, "ServiceMonitor") == []
    assert by_kind(without_api, "PodMonitor") == []
    with_api = render("monitoring-on.yaml", extra=("--api-versions", "monitoring.coreos.com/v1"))
    service_monitor = one(with_api, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert service_monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    service = one(with_api, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_monitor = one(with_api, "PodMonitor")
    pod_labels = one(with_api, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_dashboard_configmap_is_opt_in_and_labelled(render: Render) -> None:
    assert [o for o in render() if o["kind"] == "ConfigMap"] == []
    objects = render("dashboard-on.yaml")
    config_map = one(objects, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["team"] == "ml-platform"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML platform"}
    shipped = json.loads(config_map["data"]["unlearning-operator.json"])
    assert shipped == json.loads((CHART / "dashboards" / "unlearning-operator.json").read_text())


def test_helm_test_hook_checks_health_and_crd(render: Render) -> None:
    objects = render()
    pod = one(objects, "Pod", hook=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert one(objects, "ServiceAccount", hook=True)["metadata"]["name"] == pod["spec"]["serviceAccountName"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HEALTH_URL"] == "http://unlearning-unlearning-operator-metrics.unlearning.svc:8081/healthz"
    script = container["command"][2]
    assert "get_api_resources" in script
    assert "unlearningrequests" in script
    compile(script, "helm-test", "exec")
    assert container["securityContext"]["runAsNonRoot"] is True
    # Its ServiceAccount has no role: API discovery is open to any authenticated client.
    test_sa = pod["spec"]["serviceAccountName"]
    for binding in by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding"):
        assert all(s["name"] != test_sa for s in binding["subjects"])


def test_crds_are_packaged_and_equal_the_generated_copy(offline_helm: Helm) -> None:
    chart_crds = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in chart_crds] == ["unlearningrequests.unlearn.dev.yaml"]
    for path in chart_crds:
        assert path.read_bytes() == (CHART.parents[1] / "crds" / path.name).read_bytes(), (
            f"{path} differs from crds/{path.name}: run `make crds`"
        )
    done = offline_helm(*template_args(), "--include-crds")
    assert done.returncode == 0, done.stderr
    crds = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["unlearningrequests.unlearn.dev"]
