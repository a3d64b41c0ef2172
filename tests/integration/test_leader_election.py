"""Two operator processes, one Lease: exactly one reconciles, and a crash or a clean stop hands over.

Against the real API server, with the real jobs on the fake GPU node. The
jobs fail fast on purpose (their model file does not exist, which only the
job finds out, after a real pod start): what is under test is that each
request gets exactly one Job and a final phase however the operators come
and go, not the unlearning. Short Lease timings keep the tier fast; the
chart's defaults are measured end to end (tests/e2e/test_high_availability.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.integration.conftest import OperatorProcess, PhaseRecorder, request_manifest
from tests.integration.test_operator import condition, create, get, jobs_of, wait_phase
from unlearning_operator.permissions import leader_election_rules
from unlearning_operator.settings import load_settings

pytestmark = pytest.mark.cluster

LEASE = "unlearning-operator-it"
TIMING = {
    "UNLEARNING_LEASE_DURATION_SECONDS": "6",
    "UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS": "4",
    "UNLEARNING_LEASE_RETRY_PERIOD_SECONDS": "1",
}
TERMINAL = ("Succeeded", "Failed", "Rejected")


@pytest.fixture
def lease_role(control_plane: ControlPlane, namespace: str) -> None:
    """The chart's leader-election Role, for the operator's test user, in the test namespace."""
    rbac = client.RbacAuthorizationV1Api(control_plane.api_client())
    rbac.create_namespaced_role(
        namespace, {"metadata": {"name": "leader-election"}, "rules": leader_election_rules(LEASE)}
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "leader-election"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leader-election"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "unlearning-operator"}],
        },
    )


@pytest.fixture
def replicas(
    *,
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    crd: None,
    namespace: str,
    operator_kubeconfig: Path,
    lease_role: None,
    tmp_path: Path,
) -> Iterator[list[OperatorProcess]]:
    env = {
        "UNLEARNING_LEADER_ELECTION": "true",
        "UNLEARNING_LEASE_NAMESPACE": namespace,
        "UNLEARNING_LEASE_NAME": LEASE,
        # CPU-only jobs run side by side on the one-GPU node: a burst is over in seconds.
        "UNLEARNING_JOB_GPUS": "0",
        "UNLEARNING_MAX_CONCURRENT_JOBS": "3",
        **TIMING,
    }
    load_settings(env)  # the combination the chart would render must parse
    made = [
        OperatorProcess(control_plane, namespace, tmp_path / f"operator-{i}.log", operator_kubeconfig, dict(env))
        for i in range(2)
    ]
    try:
        for process in made:
            process.start()
        yield made
    finally:
        for process in made:
            process.stop()


def leader_of(replicas: list[OperatorProcess]) -> OperatorProcess | None:
    """The replica whose metrics say it leads (exactly one, or None while nobody does)."""
    leading = [p for p in replicas if p.popen is not None and p.popen.poll() is None and _leads(p)]
    assert len(leading) <= 1, "two replicas lead at once"
    return leading[0] if leading else None


def _leads(process: OperatorProcess) -> bool:
    try:
        return "unlearning_operator_leader 1.0" in process.metrics()
    except OSError:
        return False


def lease_holder(cp: ControlPlane, namespace: str) -> str:
    lease = client.CoordinationV1Api(cp.api_client()).read_namespaced_lease(LEASE, namespace)
    return str(lease.spec.holder_identity or "")


def failing_request(name: str) -> dict[str, Any]:
    """A request on a model of its own whose file does not exist: the job fails fast (InvalidInput)."""
    model = {"name": f"model-{name}", "format": "exported", "source": {"claimName": "models", "path": "nope.pt2"}}
    return request_manifest(name, model=model)


def test_one_leader_a_killed_leader_hands_over_with_one_job_per_request(
    *,
    control_plane: ControlPlane,
    namespace: str,
    models_pvc: Path,
    replicas: list[OperatorProcess],
    phases: PhaseRecorder,
) -> None:
    cp = control_plane
    leader = wait_for("a leader", lambda: leader_of(replicas), timeout=30)
    standby = next(p for p in replicas if p is not leader)
    # Both ready (a drain's PodDisruptionBudget counts ready pods), both alive; only one leads.
    assert leader.probe("/readyz") == standby.probe("/readyz") == 200
    assert leader.probe("/healthz") == standby.probe("/healthz") == 200
    assert "unlearning_operator_leader 0.0" in standby.metrics()
    names = [f"burst-{i}" for i in range(4)]
    for name in names:
        create(cp, namespace, failing_request(name))
    wait_for("the first Jobs", lambda: sum(len(jobs_of(cp, namespace, n)) for n in names) >= 2, timeout=60)

    holder = lease_holder(cp, namespace)
    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)
    wait_for("the standby to lead", lambda: leader_of(replicas) is standby, timeout=30, interval=0.2)
    handover = time.monotonic() - killed_at
    # Not before the Lease expired (6 s, as the standby saw it), and not much after.
    assert 5.0 <= handover <= 6 + 1 + 5, handover
    assert lease_holder(cp, namespace) not in ("", holder)

    done = {n: wait_phase(cp, namespace, n, TERMINAL, timeout=240) for n in names}
    order = ["Pending", "Queued", "Running", "Failed"]
    for name, obj in done.items():
        assert obj["status"]["phase"] == "Failed", obj["status"]
        assert condition(obj, "Complete")["reason"] == "InvalidInput", obj["status"]
        assert len(jobs_of(cp, namespace, name)) == 1, name
        assert obj["status"]["auditConfigMap"]
        # No phase went backwards across the handover: the new leader rebuilt its state, it did not guess.
        went = phases.until(name, "Failed")
        seen = [order.index(p) for p in went]
        assert seen == sorted(seen), (name, went)
        assert went[-2:] == ["Running", "Failed"], went


def test_a_clean_stop_hands_over_within_a_retry_period(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, replicas: list[OperatorProcess]
) -> None:
    leader = wait_for("a leader", lambda: leader_of(replicas), timeout=30)
    standby = next(p for p in replicas if p is not leader)
    stopped_at = time.monotonic()
    leader.stop(signal.SIGTERM)
    assert leader.popen is not None
    assert leader.popen.returncode == 0, leader.tail()
    assert "released Lease" in leader.tail()
    wait_for("the standby to lead", lambda: leader_of(replicas) is standby, timeout=15, interval=0.1)
    # Released, so one poll (1 s here) plus kopf's start, not the 6 s Lease duration.
    assert time.monotonic() - stopped_at < 5.0
    create(control_plane, namespace, failing_request("after-stop"))
    obj = wait_phase(control_plane, namespace, "after-stop", TERMINAL, timeout=120)
    assert obj["status"]["phase"] == "Failed"
    assert len(jobs_of(control_plane, namespace, "after-stop")) == 1


def test_the_job_pod_is_selected_by_its_own_network_policy(
    control_plane: ControlPlane, namespace: str, models_pvc: Path, operator_process: OperatorProcess
) -> None:
    # The real pod the Job controller made, not the template: its labels must match the policy.
    cp = control_plane
    create(cp, namespace, failing_request("isolated"))
    obj = wait_phase(cp, namespace, "isolated", TERMINAL, timeout=120)
    job = obj["status"]["jobName"]
    net = client.NetworkingV1Api(cp.api_client())
    (policy,) = net.list_namespaced_network_policy(namespace, label_selector="unlearn.dev/request=isolated").items
    assert policy.metadata.name == f"{job}-isolation"
    assert policy.metadata.owner_references[0].uid == get(cp, namespace, "isolated")["metadata"]["uid"]
    assert policy.spec.policy_types == ["Ingress", "Egress"]
    assert not policy.spec.ingress
    assert not policy.spec.egress
    core = client.CoreV1Api(cp.api_client())
    (pod,) = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    selector = policy.spec.pod_selector.match_labels
    assert selector.items() <= pod.metadata.labels.items()
    # ...and only that request's pods: the selector names it.
    assert selector["unlearn.dev/request"] == "isolated"
    policies = net.list_namespaced_network_policy(namespace).items
    matching = [
        p.metadata.name for p in policies if p.spec.pod_selector.match_labels.items() <= pod.metadata.labels.items()
    ]
    assert matching == [policy.metadata.name]
