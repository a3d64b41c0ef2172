"""End to end: ``helm upgrade`` changes what the running operator does, ``helm uninstall`` keeps the audit trail.

A release of its own (the module release of test_requests.py stays
untouched), in one namespace that is both the release's and the watched
one. The requests here fail fast on purpose (their model file does not
exist, which only the job can find out): a failed run still writes its
immutable audit record, and two such runs show the Job cap at work in a
few seconds of pod time instead of minutes of unlearning.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.e2e.harness import (
    CHART,
    Api,
    ChartImages,
    E2EContext,
    Release,
    condition,
    create_namespace,
    example,
    job_finished_at,
    kubectl_apply,
    models_workspace,
    new_release,
    phase,
    wait_request,
    when,
)
from unlearning_contracts.api import REQUEST

pytestmark = pytest.mark.e2e


@pytest.fixture
def life(
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    e2e_api: Api,
    *,
    e2e_context: E2EContext,
    chart_images: ChartImages | None,
    tmp_path: Path,
) -> Iterator[Release]:
    """A release (not yet installed) of its own, in a namespace that it also watches; removed after."""
    ns = f"e2e-life-{uuid.uuid4().hex[:6]}"
    create_namespace(e2e_api, ns)
    rel = new_release(
        control_plane, gpu_node, e2e_api, name="life", namespace=ns, watched=(ns,), workdir=tmp_path,
        images=chart_images, maxConcurrentJobs=4,
    )  # fmt: skip
    e2e_context.releases.append(rel)
    try:
        yield rel
    finally:
        if rel.helm("status", rel.name, "-n", ns, check=False).returncode == 0:
            rel.uninstall(check=False)
        e2e_api.core.delete_namespace(ns)


def test_helm_upgrade_then_uninstall_keeps_audit_records(
    control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api, demo_model: Path, life: Release
) -> None:
    rel, ns = life, life.namespace
    rel.install()
    first = rel.wait_ready()
    assert env_of(first)["UNLEARNING_MAX_CONCURRENT_JOBS"] == "4"
    old = {p["metadata"]["uid"] for p in rel.operator_pods()}

    # Upgrade to one Job at a time; the rolling update replaces both pods, one at a time.
    rel.helm(
        "upgrade", rel.name, str(CHART), "-n", ns, "--reuse-values", "--set", "job.maxConcurrentJobs=1",
        "--wait", "--timeout=120s",
    )  # fmt: skip
    second = rel.wait_ready(other_than=old)
    assert env_of(second)["UNLEARNING_MAX_CONCURRENT_JOBS"] == "1"
    assert "max_concurrent_jobs=1" in rel.operator_log(), rel.operator_log()
    assert json.loads(rel.helm("status", rel.name, "-n", ns, "-o", "json").stdout)["version"] == 2

    # The new setting is in effect: two requests on two models, and the second Job is made
    # only once the first has ended (the cap, not the GPU: the old cap created both at once).
    models_workspace(e2e_api, gpu_node, ns, demo_model)
    manifests = []
    for name in ("missing-a", "missing-b"):
        model = {
            "name": f"model-{name}",
            "format": "exported",
            "source": {"claimName": "models", "path": "nope.pt2"},
        }
        manifests.append(example(name, model=model))
    applied = kubectl_apply(control_plane, ns, *manifests)
    assert applied.returncode == 0, applied.stderr
    audits = {}
    for name in ("missing-a", "missing-b"):
        obj = wait_request(e2e_api, gpu_node, ns, name)
        assert phase(obj) == "Failed", json.dumps(obj["status"], indent=1)
        complete = condition(obj, "Complete")
        assert complete["reason"] == "InvalidInput"
        assert "nope.pt2" in complete["message"]
        assert "not found" in complete["message"]
        audits[name] = e2e_api.configmap(ns, obj["status"]["auditConfigMap"])
    jobs = sorted(
        (job for name in ("missing-a", "missing-b") for job in e2e_api.jobs(ns, name)),
        key=lambda job: job["metadata"]["creationTimestamp"],
    )
    assert len(jobs) == 2
    assert when(jobs[1]["metadata"]["creationTimestamp"]) >= job_finished_at(jobs[0])

    # Uninstall removes the operator and its RBAC, and nothing of the audit trail.
    rel.uninstall()
    # helm deletes the Deployment; its ReplicaSet and pod go by background garbage collection.
    wait_for("the operator pod to be gone", lambda: not rel.api.pods(ns, rel.selector), timeout=60, interval=0.5)
    assert not rel.healthy()
    for kind in ("deployment", "serviceaccount", "role", "rolebinding", "service"):
        got = control_plane.kubectl("get", kind, rel.fullname, "-n", ns, check=False)
        assert got.returncode != 0, f"{kind} {rel.fullname} survived helm uninstall"
        assert "NotFound" in got.stderr
    for kind in ("clusterrole", "clusterrolebinding"):
        got = control_plane.kubectl("get", kind, f"{rel.fullname}-cluster-read", check=False)
        assert "NotFound" in got.stderr, f"{kind} survived helm uninstall"
    kept = e2e_api.configmaps(ns, "unlearn.dev/audit=true")
    assert sorted(cm["metadata"]["name"] for cm in kept) == sorted(a["metadata"]["name"] for a in audits.values())
    for cm in kept:
        assert cm["immutable"] is True
        assert cm["data"] == next(a["data"] for a in audits.values() if a["metadata"]["name"] == cm["metadata"]["name"])
        assert json.loads(cm["data"]["outcome.json"])["phase"] == "Failed"
    # The CRD (helm never deletes crds/) and the requests with their status stay too.
    control_plane.kubectl("get", "crd", REQUEST.crd_name)
    assert phase(e2e_api.request(ns, "missing-a")) == "Failed"


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}
