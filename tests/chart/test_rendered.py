"""The chart as helm renders it: lint, schema errors, and what each object says.

Runs the helm built by tests/cluster/build.sh, offline (no API server): what
the API server thinks of these objects is tests/chart/test_server.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, RELEASE, VALUES, VALUES_FILES, Helm, Render, by_kind, one, template_args
from unlearning_operator.permissions import RULES, leader_election_rules
from unlearning_operator.settings import ENV_VARS, load_settings

pytestmark = pytest.mark.cluster

# Downward-API variables, as the kubelet resolves them for a pod in the release namespace.
FIELD_REFS = {"metadata.namespace": "unlearning"}


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
    return {
        item["name"]: item["value"] if "value" in item else FIELD_REFS[item["valueFrom"]["fieldRef"]["fieldPath"]]
        for item in container["env"]
    }


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


def test_deployment_is_two_replicas_rolling_and_restricted(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    # Two replicas, one active (leader election), so a rolling update that keeps a standby up is safe.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["unlearning-operator"]
    assert container["image"] == "ghcr.io/unlearning-operator/unlearning-operator:0.1.0"
    # Liveness and readiness differ: a leader still starting kopf is alive but not ready.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": "128Mi"}
    assert container["resources"]["limits"] == {"memory": "256Mi", "ephemeral-storage": "256Mi"}
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
    env = operator_env(objects)
    assert env["UNLEARNING_LEADER_ELECTION"] == "true"
    assert env["UNLEARNING_LEASE_NAME"] == deployment["metadata"]["name"]


def test_replicas_spread_and_disruption_budget_select_the_operator_pods_only(render: Render) -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    test_pod = one(objects, "Pod", hook=True)
    selectors = {
        "deployment": deployment["spec"]["selector"]["matchLabels"],
        "pdb": one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "service": one(objects, "Service")["spec"]["selector"],
        **{
            f"spread {c['topologyKey']}": c["labelSelector"]["matchLabels"]
            for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        },
    }
    for what, selector in selectors.items():
        assert selector.items() <= labels.items(), what
        # The helm test pod is no operator pod: a ReplicaSet would adopt it, a Service route to it.
        assert not selector.items() <= test_pod["metadata"]["labels"].items(), what
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert {c["whenUnsatisfiable"] for c in spread} == {"ScheduleAnyway"}


def test_one_replica_without_leader_election_is_refused_only_when_several(offline_helm: Helm) -> None:
    several = offline_helm(*template_args(), "--set", "leaderElection.enabled=false")
    assert several.returncode != 0
    assert "replicaCount > 1 needs leaderElection.enabled" in several.stderr
    single = offline_helm(*template_args(), "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    assert single.returncode == 0, single.stderr
    objects = [d for d in yaml.safe_load_all(single.stdout) if d]
    assert load_settings(operator_env(objects)).leader_election is False
    assert [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")] == []


def test_leader_election_role_is_exactly_the_lease_rules(render: Render) -> None:
    objects = render()
    (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == "unlearning"
    lease = operator_env(objects)["UNLEARNING_LEASE_NAME"]
    assert normalised(role["rules"]) == normalised(leader_election_rules(lease))
    (binding,) = [b for b in by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"][0]["name"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_default_settings_equal_the_operator_defaults(render: Render) -> None:
    settings = load_settings(operator_env(render()))
    # But for leader election, which only the chart (several replicas, a namespace) turns on.
    elected = {"leader_election": True, "lease_namespace": "unlearning", "lease_name": "unlearning-unlearning-operator"}
    assert settings == replace(load_settings({}), **elected)
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


def operator_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Roles that grant RULES (not the leader-election one)."""
    return [r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("-leader-election")]


def test_cluster_wide_rbac_is_exactly_the_operator_rules(render: Render) -> None:
    objects = render("cluster-wide.yaml")
    assert operator_roles(objects) == []
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
    roles = operator_roles(objects)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in by_kind(objects, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")]
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
    assert [p.name for p in chart_crds] == [
        "unlearningcalibrations.unlearn.dev.yaml",
        "unlearningrequests.unlearn.dev.yaml",
    ]
    for path in chart_crds:
        assert path.read_bytes() == (CHART.parents[1] / "crds" / path.name).read_bytes(), (
            f"{path} differs from crds/{path.name}: run `make crds`"
        )
    done = offline_helm(*template_args(), "--include-crds")
    assert done.returncode == 0, done.stderr
    crds = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "unlearningcalibrations.unlearn.dev",
        "unlearningrequests.unlearn.dev",
    ]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels-only LabelSelector against a pod's labels (all the chart's policies use)."""
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


def test_network_policies_select_exactly_their_pods(render: Render) -> None:
    objects = render()
    operator_pod = one(objects, "Deployment")["spec"]["template"]
    test_pod = one(objects, "Pod", hook=True)
    operator_policy = one(objects, "NetworkPolicy")
    test_policy = one(objects, "NetworkPolicy", hook=True)
    assert matches(operator_policy["spec"]["podSelector"], operator_pod["metadata"]["labels"])
    assert not matches(operator_policy["spec"]["podSelector"], test_pod["metadata"]["labels"])
    assert matches(test_policy["spec"]["podSelector"], test_pod["metadata"]["labels"])
    assert not matches(test_policy["spec"]["podSelector"], operator_pod["metadata"]["labels"])
    for policy in (operator_policy, test_policy):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_operator_policy_allows_metrics_and_health_in_and_the_api_server_out(render: Render) -> None:
    objects = render()
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    named_ports = {p["name"] for p in container["ports"]}
    spec = one(objects, "NetworkPolicy")["spec"]
    scrape, helm_test = spec["ingress"]
    # Named ports resolve against the operator container's ports; without ingressFrom, any source.
    assert {p["port"] for p in scrape["ports"]} == named_ports == {"metrics", "health"}
    assert "from" not in scrape
    test_labels = one(objects, "Pod", hook=True)["metadata"]["labels"]
    assert [p["port"] for p in helm_test["ports"]] == ["health"]
    assert matches(helm_test["from"][0]["podSelector"], test_labels)
    # Out: the API server's endpoint ports only; no DNS (the operator uses KUBERNETES_SERVICE_HOST).
    assert spec["egress"] == [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}]


def test_test_pod_policy_reaches_the_operator_health_port_dns_and_the_api_server(render: Render) -> None:
    objects = render()
    operator_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    spec = one(objects, "NetworkPolicy", hook=True)["spec"]
    assert "ingress" not in spec
    to_operator, dns, api = spec["egress"]
    assert matches(to_operator["to"][0]["podSelector"], operator_labels)
    assert to_operator["ports"] == [{"port": "health", "protocol": "TCP"}]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert api == one(objects, "NetworkPolicy")["spec"]["egress"][0]


def test_network_policies_follow_the_values(offline_helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "narrow.yaml"
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    store = [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 9000, "protocol": "TCP"}]}]
    values.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {
                    "apiServer": {"cidrs": ["172.18.0.2/32"], "ports": [6443]},
                    "operator": {"ingressFrom": monitoring},
                    "job": {"egress": store},
                }
            }
        )
    )
    done = offline_helm(*template_args(), "--values", str(values))
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    spec = one(objects, "NetworkPolicy")["spec"]
    assert spec["ingress"][0]["from"] == monitoring
    assert spec["egress"] == [
        {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}]}
    ]
    settings = load_settings(operator_env(objects))
    assert settings.job_network_policy is True
    assert [dict(rule) for rule in settings.job_egress] == store

    off = offline_helm(*template_args(), "--set", "networkPolicy.enabled=false")
    assert off.returncode == 0, off.stderr
    objects = [d for d in yaml.safe_load_all(off.stdout) if d]
    assert by_kind(objects, "NetworkPolicy") == []
    assert load_settings(operator_env(objects)).job_network_policy is False


def test_job_storage_values_become_settings(offline_helm: Helm) -> None:
    done = offline_helm(*template_args(), "--set", "job.ephemeralStorage=20Gi", "--set", "job.tmpSizeLimit=16Gi")
    assert done.returncode == 0, done.stderr
    settings = load_settings(operator_env([d for d in yaml.safe_load_all(done.stdout) if d]))
    assert (settings.job_ephemeral_storage, settings.job_tmp_size) == ("20Gi", "16Gi")
