"""End to end: the chart installed with helm, requests applied with kubectl, real jobs on the fake GPU node.

One release for the module (see conftest.py); every test that runs requests
takes a namespace of its own from the release's watched pool, so the tests
share the operator but no objects, and pass in any order. Numbers asserted
are ranges that mean something for the digits demo model (it memorised its
training set, so its forget accuracy starts near 100%), not exact values.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.e2e.harness import (
    EXAMPLE,
    Api,
    ChartImages,
    Release,
    Workspace,
    condition,
    example,
    job_finished_at,
    kubectl_apply,
    phase,
    pod_ready,
    terminated,
    wait_request,
    when,
)
from unlearning_operator.jobs import NON_ROOT_UID
from unlearning_operator.permissions import RULES

pytestmark = pytest.mark.e2e

EXAMPLE_NAME = "digits-gdpr-0042"
COMPLETED = "unlearning_requests_completed_total"


def only_job(api: Api, namespace: str, request: str) -> dict[str, Any]:
    jobs = api.jobs(namespace, request)
    assert len(jobs) == 1, f"expected exactly one Job for {request}, found {[j['metadata']['name'] for j in jobs]}"
    return jobs[0]


def assert_ran_from_image(node: GpuNode, pod: dict[str, Any], container: str, image: str) -> None:
    """The container ran from ``image`` (pulled by digest, run by runc) as uid/gid 65532, in group
    65532 (fsGroup), without capabilities, with a read-only root: what /proc said while it ran."""
    (status,) = [s for s in pod["status"]["containerStatuses"] if s["name"] == container]
    assert status["imageID"] == image
    assert status["containerID"].startswith("runc://")
    facts = node.runtime_facts(pod["metadata"]["namespace"], pod["metadata"]["name"], container)
    assert facts["uid"] == [NON_ROOT_UID] * 4, facts
    assert facts["gid"] == [NON_ROOT_UID] * 4, facts
    assert NON_ROOT_UID in facts["groups"], facts
    assert facts["capEff"] == "0000000000000000", facts
    assert facts["noNewPrivs"] == 1, facts
    assert facts["rootReadOnly"] is True, facts["rootMount"]


def test_operator_pods_run_with_the_charts_identity_one_leading(
    release: Release, e2e_api: Api, chart_images: ChartImages | None
) -> None:
    pods = release.operator_pods()
    assert len(pods) == 2
    for pod in pods:
        assert pod_ready(pod)
        assert pod["spec"]["serviceAccountName"] == release.fullname
        assert pod["spec"]["nodeName"] == release.node.name
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["UNLEARNING_WATCH_NAMESPACES"] == ",".join(release.watched)
        assert env["UNLEARNING_JOB_IMAGE"] == (chart_images.job if chart_images else "unlearn-job:e2e")
        if chart_images is not None:
            # The operator image, with the chart's restricted securityContext.
            assert pod["spec"]["containers"][0]["image"] == chart_images.operator
            assert_ran_from_image(release.node, pod, "operator", chart_images.operator)
        # Both alive and ready (a standby is ready to take over), each on its own pod IP.
        assert release.probe(pod, "/healthz") == release.probe(pod, "/readyz") == 200
    assert len({p["status"]["podIP"] for p in pods}) == 2
    if chart_images is not None:
        # The chart's policies select both: each runc container ran in its own sandbox's network
        # namespace, not the node's (so the two bind the same ports and answer on their pod IPs).
        facts = [release.node.runtime_facts(release.namespace, p["metadata"]["name"], "operator") for p in pods]
        netns = {f["netns"] for f in facts}
        assert len(netns) == 2, facts
        assert os.readlink("/proc/self/ns/net") not in netns, facts
    # Exactly one leads: the one the Lease names, whose metrics say so.
    leader = release.leader()
    assert leader is not None
    (standby,) = [p for p in pods if p["metadata"]["uid"] != leader["metadata"]["uid"]]
    assert "unlearning_operator_leader 1.0" in release.metrics_of(leader)
    assert "unlearning_operator_leader 0.0" in release.metrics_of(standby)
    assert "unlearning_requests{" in release.metrics()


def test_digits_example_succeeds_with_audit_record_and_metrics(
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    release: Release,
    e2e_api: Api,
    workspace: Workspace,
    *,
    chart_images: ChartImages | None,
) -> None:
    ns = workspace.namespace
    # Counters are per operator process; a delta keeps this test independent of the others.
    passed_before = release.sample(COMPLETED, verdict="Passed")
    failed_before = release.sample(COMPLETED, verdict="Failed")
    applied = control_plane.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    assert f"unlearningrequest.unlearn.dev/{EXAMPLE_NAME} created" in applied.stdout

    obj = wait_request(e2e_api, gpu_node, ns, EXAMPLE_NAME)
    status = obj["status"]
    assert phase(obj) == "Succeeded", json.dumps(status, indent=1)
    assert status["verdict"] == "Passed"
    assert status["reasons"] == []
    pre, post = status["pre"], status["post"]
    # The demo model memorised its training set; unlearning lowers forget accuracy
    # while held-out accuracy stays high and within the example's 2-point gate.
    assert pre["forgetAccuracy"] >= 90.0
    assert post["forgetAccuracy"] < pre["forgetAccuracy"]
    assert post["testAccuracy"] > 80.0
    assert pre["testAccuracy"] - post["testAccuracy"] <= 2.0
    assert 0.0 <= post["miaAuc"] <= 0.6
    assert post["retainAccuracy"] > 90.0
    assert condition(obj, "Complete")["reason"] == "Passed"
    assert condition(obj, "GatesPassed")["status"] == "True"

    # The new model version is on the claim, with the sha256 the status names.
    assert status["modelVersion"] == 1
    assert status["outputModel"]["uri"] == "pvc://models/digits/versions/digits-mlp-v1.pt2"
    written = workspace.models / "digits" / "versions" / "digits-mlp-v1.pt2"
    assert hashlib.sha256(written.read_bytes()).hexdigest() == status["outputModel"]["sha256"]
    source = workspace.models / "digits" / "digits-mlp.pt2"
    assert status["inputModel"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    job = only_job(e2e_api, ns, EXAMPLE_NAME)
    assert job["metadata"]["name"] == status["jobName"]
    (pod,) = e2e_api.job_pods(ns, status["jobName"])
    assert phase(pod) == "Succeeded"
    assert terminated(pod, "unlearn")["exitCode"] == 0
    if chart_images is not None:
        # The job image a user's cluster runs: non-root, read-only root, its output written as 65532.
        assert_ran_from_image(gpu_node, pod, "unlearn", chart_images.job)
        assert written.stat().st_uid == NON_ROOT_UID

    # kubectl's printer columns show what a person checks first.
    listed = control_plane.kubectl("get", "unlearningrequests", "-n", ns).stdout
    assert "Succeeded" in listed
    assert "Passed" in listed
    # ... with each number at its own fixed precision (status.display), never 95 beside 96.882.
    assert status["display"]["testAccuracy"] == format(post["testAccuracy"], ".1f")
    assert status["display"]["testAccuracy"] in listed.split()

    # The audit record: immutable, labelled, the same numbers, and no forget indices.
    audit = e2e_api.configmap(ns, status["auditConfigMap"])
    assert audit["immutable"] is True
    labels = audit["metadata"]["labels"]
    assert labels["unlearn.dev/audit"] == "true"
    assert labels["unlearn.dev/model"] == "digits-mlp"
    assert labels["unlearn.dev/request"] == EXAMPLE_NAME
    assert not audit["metadata"].get("ownerReferences")
    record = json.loads(audit["data"]["record.json"])
    assert record["verdict"] == "Passed"
    assert record["requestId"] == "GDPR-2026-0042"
    assert record["forgetSamples"] == 20
    assert record["post"]["forgetAccuracy"] == post["forgetAccuracy"]
    assert record["outputModel"]["sha256"] == status["outputModel"]["sha256"]
    redacted = json.loads(audit["data"]["request.json"])["forget"]["indices"]
    assert not isinstance(redacted, list), redacted
    assert "20" in redacted
    refused = control_plane.kubectl(
        "patch", "configmap", status["auditConfigMap"], "-n", ns, "--type=merge",
        "-p", json.dumps({"data": {"record.json": "{}"}}), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "immutable" in refused.stderr, refused.stderr
    assert e2e_api.configmap(ns, status["auditConfigMap"])["data"] == audit["data"]

    # The metrics endpoint counts the completed request (the counter moves just after the status patch).
    expected = passed_before + 1

    def counted() -> bool:
        return release.sample(COMPLETED, verdict="Passed") >= expected

    wait_for("the completed request on /metrics", counted, timeout=30, interval=0.5)
    assert release.sample(COMPLETED, verdict="Passed") == expected
    assert release.sample(COMPLETED, verdict="Passed", method=record["method"]) >= 1
    assert release.sample(COMPLETED, verdict="Failed") == failed_before


def test_failed_gates_end_failed_with_reasons(
    control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    # Forget accuracy 0 with an indistinguishable attack is out of reach; one attempt, no tuning.
    manifest = example(
        "digits-strict",
        gates={"maxForgetAccuracy": 0.0, "maxMiaAuc": 0.5, "maxTestAccuracyDrop": 2.0},
        tuning={"maxAttempts": 1},
    )
    applied = kubectl_apply(control_plane, ns, manifest)
    assert applied.returncode == 0, applied.stderr

    obj = wait_request(e2e_api, gpu_node, ns, "digits-strict")
    status = obj["status"]
    assert phase(obj) == "Failed", json.dumps(status, indent=1)
    assert status["verdict"] == "Failed"
    assert any("maxForgetAccuracy" in reason for reason in status["reasons"]), status["reasons"]
    assert status["post"]["forgetAccuracy"] > 0.0
    complete = condition(obj, "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "GatesFailed")
    assert "maxForgetAccuracy" in complete["message"]
    assert condition(obj, "GatesPassed")["status"] == "False"

    # A failed gate is not retried: the pod exits with the gates code and the Job fails at once.
    job = only_job(e2e_api, ns, "digits-strict")
    (pod,) = e2e_api.job_pods(ns, job["metadata"]["name"])
    assert terminated(pod, "unlearn")["exitCode"] == 3

    audit = e2e_api.configmap(ns, status["auditConfigMap"])
    record = json.loads(audit["data"]["record.json"])
    assert record["verdict"] == "Failed"
    assert record["reasons"] == status["reasons"]
    # The failed version never becomes current: the model's lineage still serves version 0.
    lineage = e2e_api.configmap(ns, "unlearn-model-digits-mlp")
    assert json.loads(lineage["data"]["current"])["version"] == 0


def test_invalid_requests_are_refused_or_rejected(
    control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    # The CRD's CEL rules and schema refuse malformed specs before anything is stored.
    both = example("both-forget-kinds", forget={"indices": [1, 2], "indicesFile": {"path": "forget.json"}})
    refused = kubectl_apply(control_plane, ns, both)
    assert refused.returncode != 0
    assert "set exactly one of forget.indices or forget.indicesFile" in refused.stderr, refused.stderr
    below = example("auc-below-chance", gates={"maxMiaAuc": 0.3})
    refused = kubectl_apply(control_plane, ns, below)
    assert refused.returncode != 0
    assert "spec.gates.maxMiaAuc" in refused.stderr, refused.stderr
    assert "0.5" in refused.stderr
    for name in ("both-forget-kinds", "auc-below-chance"):
        assert not e2e_api.request_exists(ns, name)

    # What only the operator can judge: its image allow-list, and the spec model's own checks.
    image = example("other-image", job={"image": "registry.example.com/not-allowed:1"})
    dupes = example("duplicate-indices", forget={"indices": [3, 17, 3]})
    applied = kubectl_apply(control_plane, ns, image, dupes)
    assert applied.returncode == 0, applied.stderr

    obj = wait_request(e2e_api, gpu_node, ns, "other-image", timeout=60)
    assert phase(obj) == "Rejected", json.dumps(obj["status"], indent=1)
    assert "spec.job.image" in obj["status"]["message"]
    assert "not allowed" in obj["status"]["message"]
    accepted = condition(obj, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "ImageNotAllowed")

    obj = wait_request(e2e_api, gpu_node, ns, "duplicate-indices", timeout=60)
    assert phase(obj) == "Rejected", json.dumps(obj["status"], indent=1)
    assert "forget.indices has duplicates" in obj["status"]["message"]
    assert condition(obj, "Accepted")["reason"] == "InvalidSpec"

    # Rejected means no Job, and the reason is also an Event for `kubectl describe`.
    for name in ("other-image", "duplicate-indices"):
        assert e2e_api.jobs(ns, name) == []

    # (The operator posts the Event just after the status patch.)
    def rejected_event() -> bool:
        return any(e["reason"] == "Rejected" and e["type"] == "Warning" for e in e2e_api.events(ns, "other-image"))

    wait_for("a Rejected event on other-image", rejected_event, timeout=30, interval=0.5)


def test_operator_killed_while_job_runs_adopts_its_job(
    control_plane: ControlPlane, gpu_node: GpuNode, release: Release, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    leader = release.wait_ready()
    lease = release.lease()
    assert lease is not None
    holder = lease["spec"]["holderIdentity"]
    applied = kubectl_apply(control_plane, ns, example("digits-restart"))
    assert applied.returncode == 0, applied.stderr

    def job_pod_running() -> dict[str, Any] | None:
        jobs = e2e_api.jobs(ns, "digits-restart")
        if not jobs:
            return None
        pods = e2e_api.job_pods(ns, jobs[0]["metadata"]["name"])
        return jobs[0] if any(phase(p) == "Running" for p in pods) else None

    job = wait_for("the job pod to run", job_pod_running, timeout=120, interval=0.5)
    killed_at = datetime.now(UTC).replace(microsecond=0)
    release.kill(leader)

    # Another process takes the Lease once it expires: the standby, or the killed container
    # restarted by the node (a new identity, so it waits like any standby). No memory of the old.
    def taken_over() -> str | None:
        now = release.lease()
        current = str(((now or {}).get("spec") or {}).get("holderIdentity") or "")
        return current if current not in ("", holder) else None

    wait_for("another replica to take the Lease", taken_over, timeout=90, interval=0.5)

    obj = wait_request(e2e_api, gpu_node, ns, "digits-restart")
    assert phase(obj) == "Succeeded", json.dumps(obj["status"], indent=1)
    # The restarted operator adopted the Job it had made instead of making another.
    again = only_job(e2e_api, ns, "digits-restart")
    assert again["metadata"]["uid"] == job["metadata"]["uid"]
    assert obj["status"]["jobName"] == job["metadata"]["name"]
    (pod,) = e2e_api.job_pods(ns, job["metadata"]["name"])
    # The job was still running when the operator died: its result reached the new process.
    assert when(terminated(pod, "unlearn")["finishedAt"]) >= killed_at
    assert obj["status"]["modelVersion"] == 1


def test_two_requests_for_one_model_run_one_after_the_other(
    control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    first = example("digits-first", requestId="GDPR-2026-0100", forget={"indices": [5, 6, 7, 8, 9, 10, 11, 12]})
    second = example("digits-second", requestId="GDPR-2026-0101", forget={"indices": [20, 21, 22, 23, 24, 25]})
    # One apply: both exist before either starts, so only the operator's per-model queue orders them.
    applied = kubectl_apply(control_plane, ns, first, second)
    assert applied.returncode == 0, applied.stderr

    done = {name: wait_request(e2e_api, gpu_node, ns, name) for name in ("digits-first", "digits-second")}
    for name, obj in done.items():
        assert phase(obj) == "Succeeded", (name, json.dumps(obj["status"], indent=1))
    by_version = {obj["status"]["modelVersion"]: obj for obj in done.values()}
    assert sorted(by_version) == [1, 2]
    v1, v2 = by_version[1]["status"], by_version[2]["status"]
    # The second ran on the first's output, not on the original.
    assert v1["inputModel"]["uri"] == "pvc://models/digits/digits-mlp.pt2"
    assert v2["inputModel"]["uri"] == v1["outputModel"]["uri"]
    assert v2["inputModel"]["sha256"] == v1["outputModel"]["sha256"]
    assert v2["outputModel"]["uri"] == "pvc://models/digits/versions/digits-mlp-v2.pt2"

    lineage = e2e_api.configmap(ns, "unlearn-model-digits-mlp")
    current = json.loads(lineage["data"]["current"])
    history = json.loads(lineage["data"]["history"])
    assert (current["version"], current["parent"]) == (2, 1)
    assert current["sha256"] == v2["outputModel"]["sha256"]
    assert [(v["version"], v["parent"]) for v in history] == [(0, None), (1, 0), (2, 1)]

    # The second Job was created only after the first had finished.
    job1 = only_job(e2e_api, ns, by_version[1]["metadata"]["name"])
    job2 = only_job(e2e_api, ns, by_version[2]["metadata"]["name"])
    assert when(job2["metadata"]["creationTimestamp"]) >= job_finished_at(job1)
    (pod1,) = e2e_api.job_pods(ns, job1["metadata"]["name"])
    (pod2,) = e2e_api.job_pods(ns, job2["metadata"]["name"])
    assert when(terminated(pod2, "unlearn")["startedAt"]) >= when(terminated(pod1, "unlearn")["finishedAt"])


def can_i(cp: ControlPlane, user: str, verb: str, resource: str, *args: str) -> bool:
    """``kubectl auth can-i`` as ``user``; ``resource`` may name a subresource (``pods/log``)."""
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    done = cp.kubectl("auth", "can-i", verb, resource, *extra, *args, f"--as={user}", check=False)
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource} {args}: {done.stdout}{done.stderr}"
    return answer == "yes"


def test_rbac_operator_may_do_its_job_and_nothing_else(
    control_plane: ControlPlane, release: Release, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    sa = release.service_account
    # Everything permissions.RULES lists is allowed in a watched namespace (CRDs: cluster-wide).
    for rule in RULES:
        for resource in rule["resources"]:
            for group in rule["apiGroups"]:
                name, _, sub = resource.partition("/")
                target = (f"{name}.{group}" if group else name) + (f"/{sub}" if sub else "")
                for verb in rule["verbs"]:
                    assert can_i(control_plane, sa, verb, target, "-n", ns), f"operator cannot {verb} {target}"
    refused = [
        ("get", "secrets", "-n", ns),
        ("list", "secrets", "-n", ns),
        ("get", "secrets", "-n", release.namespace),
        ("list", "secrets", "--all-namespaces"),
        ("create", "deployments.apps", "-n", ns),
        ("create", "pods", "-n", ns),
        ("delete", "jobs.batch", "-n", ns),
        ("delete", "configmaps", "-n", ns),
        ("update", "unlearningrequests.unlearn.dev", "-n", ns),
        ("create", "unlearningrequests.unlearn.dev", "-n", ns),
        ("create", "serviceaccounts/token", "-n", ns),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", ns),
        ("patch", "nodes"),
        ("*", "*"),
        # Outside the watched namespaces it may do nothing at all.
        ("create", "jobs.batch", "-n", "default"),
        ("list", "unlearningrequests.unlearn.dev", "-n", "default"),
        ("create", "configmaps", "-n", "kube-system"),
    ]
    for args in refused:
        assert not can_i(control_plane, sa, *args), f"operator may {' '.join(args)}"


def test_rbac_job_pod_has_no_api_identity(
    control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api, workspace: Workspace
) -> None:
    ns = workspace.namespace
    # More GPUs than the node has: the Job and its pod exist, the pod stays Pending, nothing runs.
    manifest = example("digits-identity", job={"gpus": 2})
    applied = kubectl_apply(control_plane, ns, manifest)
    assert applied.returncode == 0, applied.stderr

    def pod() -> dict[str, Any] | None:
        jobs = e2e_api.jobs(ns, "digits-identity")
        pods = e2e_api.job_pods(ns, jobs[0]["metadata"]["name"]) if jobs else []
        return pods[0] if pods else None

    found = wait_for("the job's pod", pod, timeout=60, interval=0.5)
    spec = found["spec"]
    assert spec["automountServiceAccountToken"] is False
    # No token volume was injected by the ServiceAccount admission plugin.
    assert not any(
        "serviceAccountToken" in json.dumps(v) or v["name"].startswith("kube-api-access") for v in spec["volumes"]
    )
    account = spec.get("serviceAccountName", "default")
    user = f"system:serviceaccount:{ns}:{account}"
    for args in (
        ("get", "pods"),
        ("list", "configmaps"),
        ("get", "secrets"),
        ("get", "unlearningrequests.unlearn.dev"),
        ("patch", "unlearningrequests.unlearn.dev/status"),
        ("create", "jobs.batch"),
        ("create", "events"),
    ):
        assert not can_i(control_plane, user, *args, "-n", ns), f"the job's identity may {' '.join(args)}"
    # Nothing beyond what every authenticated identity may do (self-reviews, discovery):
    # the same list as a ServiceAccount that no binding names.
    e2e_api.core.create_namespaced_service_account(ns, {"metadata": {"name": "nobody"}})

    def rights(account: str) -> list[str]:
        who = f"--as=system:serviceaccount:{ns}:{account}"
        listed = control_plane.kubectl("auth", "can-i", "--list", "-n", ns, who)
        return sorted(listed.stdout.splitlines())

    assert rights(account) == rights("nobody")
    e2e_api.delete_request(ns, "digits-identity")
