"""End to end: with the chart's NetworkPolicies on, a Job pod can open no connection at all.

The test cluster has no CNI; its node agent enforces what it can of
NetworkPolicy (tests/cluster/podnet.py): a pod a policy selects gets a
network namespace of its own with only the traffic the policies allow. So
what this proves is that the policy the operator makes for a request
selects that request's real Job pods, and that its rules leave them
nothing to connect to: not the API server, not the operator, not the node,
not the outside. That a given CNI enforces the same policy is for the
cluster's own tests (docs/network.md).

The job image's own command cannot be made to probe, so the probe runs in
a copy of the real Job's pod template (same labels, same image, same
everything, one command changed), next to the real Job, whose pod is
isolated the same way. All three run from the job image under runc (the
venv with ``UNLEARNING_TEST_VENV_FAST_PATH=1``); each probe also reports
the network namespace it ran in, which for the isolated twin is its
sandbox's and for the control the node's.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.e2e.harness import (
    Api,
    ChartImages,
    Release,
    Workspace,
    example,
    kubectl_apply,
    phase,
    terminated,
    wait_request,
)

pytestmark = pytest.mark.e2e

# Tries each address; writes {"netns": its network namespace, "connect": {"host:port": "ok" | error}}.
PROBE = """
import json, os, socket, sys
targets = json.loads(sys.argv[1])
targets.append([os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])])
out = {}
for host, port in targets:
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[f"{host}:{port}"] = "ok"
    except OSError as error:
        out[f"{host}:{port}"] = type(error).__name__ + ": " + str(error)
netns = os.readlink("/proc/self/ns/net")
open("/dev/termination-log", "w").write(json.dumps({"netns": netns, "connect": out}))
"""


@pytest.fixture
def node_listener() -> Iterator[int]:
    """A port that accepts on the node's 127.0.0.1 (anything on the host network can reach it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def accept() -> None:
        while True:
            try:
                server.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()


def probe_job(job: dict[str, Any], name: str, targets: list[tuple[str, int]], **labels: str) -> dict[str, Any]:
    """The real Job's pod template, its container's command replaced by the probe."""
    template = copy.deepcopy(job["spec"]["template"])
    # Without the labels the Job controller added for the real Job (it adds its own to this one).
    ours = {k: v for k, v in template["metadata"]["labels"].items() if k not in ("controller-uid", "job-name")}
    template["metadata"]["labels"] = {k: v for k, v in ours.items() if not k.startswith("batch.kubernetes.io/")}
    template["metadata"]["labels"].update(labels)
    container = template["spec"]["containers"][0]
    container["command"] = ["python", "-c", PROBE, json.dumps(targets)]
    container.pop("args", None)
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if "persistentVolumeClaim" not in v]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if not m["name"].startswith("pvc-")]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": job["metadata"]["namespace"]},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 600, "template": template},
    }


def probe_result(api: Api, gpu_node: GpuNode, namespace: str, job: str) -> tuple[dict[str, Any], dict[str, str], str]:
    """The probe's pod, what each connection did, and the network namespace it ran in."""

    def finished() -> dict[str, Any] | None:
        gpu_node.check_alive()
        pods = api.job_pods(namespace, job)
        return pods[0] if pods and phase(pods[0]) in ("Succeeded", "Failed") else None

    pod: dict[str, Any] = wait_for(f"probe {job}", finished, timeout=120, interval=0.5)
    found = json.loads(terminated(pod, "unlearn")["message"])
    return pod, found["connect"], found["netns"]


def test_a_job_pod_can_open_no_connection_when_the_network_policy_is_on(
    *,
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    release: Release,
    e2e_api: Api,
    workspace: Workspace,
    chart_images: ChartImages | None,
    node_listener: int,
) -> None:
    ns = workspace.namespace
    applied = kubectl_apply(control_plane, ns, example("isolated-job"))
    assert applied.returncode == 0, applied.stderr
    obj = wait_request(e2e_api, gpu_node, ns, "isolated-job")
    assert phase(obj) == "Succeeded", json.dumps(obj["status"], indent=1)
    (job,) = e2e_api.jobs(ns, "isolated-job")
    # The real Job pod ran (and passed) in a network namespace of its own: a policy selected it.
    (job_pod,) = e2e_api.job_pods(ns, job["metadata"]["name"])
    assert job_pod["status"]["podIP"] != "127.0.0.1"

    operator = release.leader()
    assert operator is not None
    service = e2e_api.core.read_namespaced_service(f"{release.fullname}-metrics", release.namespace)
    targets = [
        ("127.0.0.1", node_listener),  # the node
        (operator["status"]["podIP"], release.metrics_port),  # the operator pod
        (service.spec.cluster_ip, release.metrics_port),  # the operator's Service
        ("1.1.1.1", 53),  # outside
    ]
    api_server = f"127.0.0.1:{control_plane.server.rsplit(':', 1)[1]}"
    kubectl_apply(control_plane, ns, probe_job(job, "probe-isolated", targets))
    # The control: the same template with another request's label, which no policy selects.
    kubectl_apply(control_plane, ns, probe_job(job, "probe-control", targets, **{"unlearn.dev/request": "nobody"}))
    pod, isolated, isolated_netns = probe_result(e2e_api, gpu_node, ns, "probe-isolated")
    control_pod, control, control_netns = probe_result(e2e_api, gpu_node, ns, "probe-control")
    # Both ran from the Job's image (runc), as the real Job did; the twin in a network namespace
    # of its own (its sandbox's, which runc joined), the control in the node's.
    node_netns = os.readlink("/proc/self/ns/net")
    for ran in (job_pod, pod, control_pod):
        (status,) = ran["status"]["containerStatuses"]
        assert status["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"]
        if chart_images is not None:
            assert status["containerID"].startswith("runc://"), status
            assert status["imageID"] == chart_images.job, status
    assert control_netns == node_netns
    assert isolated_netns != node_netns
    if chart_images is not None:
        # What /proc said of the real Job's container while it ran: not on the node's network either.
        facts = gpu_node.runtime_facts(ns, job_pod["metadata"]["name"], "unlearn")
        assert facts["netns"] != node_netns, facts

    # The control reaches the API server, the node and the operator pod (host network, no policy)...
    assert control[api_server] == "ok", control
    assert control[f"127.0.0.1:{node_listener}"] == "ok", control
    assert control[f"{operator['status']['podIP']}:{release.metrics_port}"] == "ok", control
    assert control_pod["status"]["podIP"] == "127.0.0.1"
    # ...the Job's twin reaches nothing at all.
    assert pod["status"]["podIP"] != "127.0.0.1"
    assert set(isolated) == set(control)
    assert all(outcome != "ok" for outcome in isolated.values()), isolated
    # What selected it: exactly the request's policy, made by the operator with the Job.
    policy = next(
        p
        for p in e2e_api.network_policies(ns)
        if p["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert policy["metadata"]["name"] == f"{job['metadata']['name']}-isolation"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert not policy["spec"].get("ingress")
    assert not policy["spec"].get("egress")
