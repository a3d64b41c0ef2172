"""End to end: two operator replicas, the active one killed during a burst, then a ``helm upgrade`` during another.

A release of its own with the chart's defaults for leader election (Lease
duration 15 s, renew deadline 10 s, retry 2 s), watching its own namespace.
The requests fail fast on purpose (their model file does not exist, which
only the job can find out, after a real pod start): what is under test is
that every request gets exactly one Job and a final phase however the
operator replicas come and go, and that no phase goes backwards.

The handover time (the kill to the moment another process holds the
Lease, and to its first status write for a request made while nobody led)
is printed and recorded as test properties; docs/operator.md quotes runs.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

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
    kubectl_apply,
    models_workspace,
    new_release,
    phase,
    wait_request,
)
from unlearning_contracts.api import API_GROUP, API_VERSION, REQUEST

pytestmark = pytest.mark.e2e

ORDER = ["Pending", "Queued", "Running", "Failed"]
LEASE_DURATION = 15.0  # the chart's default (values.yaml leaderElection)
RETRY_PERIOD = 2.0


class Phases:
    """Every phase each request passed through, from a watch (polling could miss one)."""

    def __init__(self, api: Api, namespace: str) -> None:
        self.seen: dict[str, list[str]] = {}
        self.changed: list[tuple[float, str, str]] = []
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(api, namespace), daemon=True)
        self._thread.start()

    def _run(self, api: Api, namespace: str) -> None:
        stream = self._watch.stream(
            api.custom.list_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            namespace,
            REQUEST.plural,
            timeout_seconds=900,
        )
        try:
            for event in stream:
                obj = event["object"]
                now = (obj.get("status") or {}).get("phase")
                seen = self.seen.setdefault(obj["metadata"]["name"], [])
                if now and (not seen or seen[-1] != now):
                    seen.append(now)
                    self.changed.append((time.monotonic(), obj["metadata"]["name"], now))
        except Exception:
            return  # the watch ends with the test (stop) or with the cluster

    def until(self, name: str, final: str, timeout: float = 30) -> list[str]:
        """The phases ``name`` went through, once the watch has delivered ``final`` (a poll may be ahead)."""
        wait_for(f"the watch to deliver {name} {final}", lambda: (self.seen.get(name) or [""])[-1] == final, timeout)
        return list(self.seen[name])

    def stop(self) -> None:
        self._watch.stop()


class Holders:
    """The Lease's holder as it changes, from a watch: (monotonic time, holder).

    A watch delivers every write, so a release that a standby takes within
    milliseconds is still seen as an empty holder; polling can miss it.
    """

    def __init__(self, rel: Release) -> None:
        self.changes: list[tuple[float, str]] = []
        self._stopped = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(rel,), daemon=True)
        self._thread.start()

    def _run(self, rel: Release) -> None:
        leases = client.CoordinationV1Api(rel.api.core.api_client)
        selector = f"metadata.name={rel.fullname}"
        while not self._stopped.is_set():  # a stream the server ends is started again (it lists the Lease first)
            try:
                for event in self._watch.stream(leases.list_namespaced_lease, rel.namespace, field_selector=selector):
                    spec = event["object"].spec
                    now = str((spec.holder_identity if spec is not None else "") or "")
                    if not self.changes or self.changes[-1][1] != now:
                        self.changes.append((time.monotonic(), now))
            except Exception:  # the stream ended mid-response (urllib3's ProtocolError) or the API hiccuped
                time.sleep(0.1)

    def released_gaps(self, since: float) -> list[float]:
        """Seconds from each release (empty holder) to the next holder."""
        later = [(t, h) for t, h in self.changes if t >= since]
        return [b[0] - a[0] for a, b in itertools.pairwise(later) if a[1] == "" and b[1]]

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()


@pytest.fixture
def ha(
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    e2e_api: Api,
    *,
    e2e_context: E2EContext,
    chart_images: ChartImages | None,
    tmp_path: Path,
) -> Iterator[Release]:
    """A release of its own in a namespace that it also watches; removed after."""
    ns = f"e2e-ha-{uuid.uuid4().hex[:6]}"
    create_namespace(e2e_api, ns)
    # CPU-only jobs run side by side on the one-GPU node, so a burst takes seconds, not minutes.
    rel = new_release(
        control_plane, gpu_node, e2e_api, name="ha", namespace=ns, watched=(ns,), workdir=tmp_path,
        images=chart_images, gpus=0, maxConcurrentJobs=3,
    )  # fmt: skip
    e2e_context.releases.append(rel)
    try:
        yield rel
    finally:
        if rel.helm("status", rel.name, "-n", ns, check=False).returncode == 0:
            rel.uninstall(check=False)
        e2e_api.core.delete_namespace(ns)


def failing(name: str) -> dict[str, Any]:
    """A request on a model of its own whose file does not exist: its job fails fast with InvalidInput."""
    model = {"name": f"model-{name}", "format": "exported", "source": {"claimName": "models", "path": "nope.pt2"}}
    return example(name, model=model)


def holder(rel: Release) -> str:
    lease = rel.lease()
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def check_burst(e2e_api: Api, gpu_node: GpuNode, ns: str, names: list[str], phases: Phases) -> None:
    """Every request Failed with InvalidInput, exactly one Job each, phases never going backwards."""
    for name in names:
        obj = wait_request(e2e_api, gpu_node, ns, name)
        assert phase(obj) == "Failed", (name, json.dumps(obj["status"], indent=1))
        assert condition(obj, "Complete")["reason"] == "InvalidInput", obj["status"]
        jobs = e2e_api.jobs(ns, name)
        assert [j["metadata"]["name"] for j in jobs] == [obj["status"]["jobName"]], name
        assert obj["status"]["auditConfigMap"]
        assert e2e_api.configmap(ns, obj["status"]["auditConfigMap"])["immutable"] is True
        seen = phases.until(name, "Failed")
        ranks = [ORDER.index(p) for p in seen]
        assert ranks == sorted(ranks), (name, seen)
        assert seen[-2:] == ["Running", "Failed"], (name, seen)


def test_killing_the_active_replica_during_a_burst_hands_over_then_an_upgrade_keeps_reconciling(
    *,
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    e2e_api: Api,
    demo_model: Path,
    ha: Release,
    record_property: Any,
) -> None:
    rel, ns = ha, ha.namespace
    rel.install()
    leader = rel.wait_ready()
    (standby,) = [p for p in rel.operator_pods() if p["metadata"]["uid"] != leader["metadata"]["uid"]]
    assert rel.probe(standby, "/readyz") == 200
    # The PodDisruptionBudget lets a drain take one replica at a time, the spread prefers other nodes.
    pdb = client.PolicyV1Api(e2e_api.core.api_client).read_namespaced_pod_disruption_budget(rel.fullname, ns)
    assert pdb.spec.max_unavailable == 1
    wait_for("the PDB to count both replicas", lambda: _pdb_allows(e2e_api, rel), timeout=60, interval=1)
    models_workspace(e2e_api, gpu_node, ns, demo_model)
    phases = Phases(e2e_api, ns)
    holders = Holders(rel)
    try:
        # -- a burst, and the active replica killed once its first Jobs exist -------------------
        burst = [f"burst-{i}" for i in range(8)]
        applied = kubectl_apply(control_plane, ns, *(failing(n) for n in burst))
        assert applied.returncode == 0, applied.stderr
        wait_for("the first Jobs", lambda: sum(len(e2e_api.jobs(ns, n)) for n in burst) >= 2, timeout=120)
        before = holder(rel)
        killed_at = time.monotonic()
        rel.kill(leader)
        changes_before_kill = len(phases.changed)
        # A request made while nobody leads: its first status can only come from the new leader, so it
        # times the handover whatever the burst's Jobs are doing (they run for a minute from the job
        # image on a loaded machine, and a running Job gives a new leader nothing to write).
        late = "during-handover"
        applied = kubectl_apply(control_plane, ns, failing(late))
        assert applied.returncode == 0, applied.stderr

        def taken() -> str | None:
            now = holder(rel)
            return now if now not in ("", before) else None

        new_holder = wait_for("another process to take the Lease", taken, timeout=90, interval=0.2)
        lease_handover = time.monotonic() - killed_at

        # Nobody may take over before this: a change seen later is the new leader's, not a
        # write of the old one still on its way through the watch.
        earliest = killed_at + LEASE_DURATION - RETRY_PERIOD - 1

        def first_write() -> float | None:
            later = [t for t, name, _ in phases.changed[changes_before_kill:] if name == late]
            return later[0] if later else None

        # The new leader's first status write for the late request (kopf started, state rebuilt from
        # the listing, the request validated and queued or launched).
        written_at = wait_for("the new leader's first status write", first_write, timeout=120, interval=0.2)
        assert written_at > earliest, (written_at - killed_at, phases.changed[changes_before_kill:])
        write_handover = written_at - killed_at
        record_property("lease_handover_seconds", round(lease_handover, 2))
        record_property("first_write_after_kill_seconds", round(write_handover, 2))
        print(
            f"\nhandover after SIGKILL of the leader: Lease taken after {lease_handover:.1f} s "
            f"(by {new_holder}), first status write after {write_handover:.1f} s"
        )
        # A standby may take over only once the Lease has been unchanged for its duration
        # (less the part of a retry period since the dead leader's last renewal).
        assert LEASE_DURATION - RETRY_PERIOD - 1 <= lease_handover <= LEASE_DURATION + 2 * RETRY_PERIOD + 10
        assert not [t for t, _, _ in phases.changed[changes_before_kill:] if killed_at + 1 < t < earliest]
        check_burst(e2e_api, gpu_node, ns, [*burst, late], phases)

        # -- helm upgrade during a second burst: the rolling update hands over on SIGTERM -------
        old = {p["metadata"]["uid"] for p in rel.operator_pods()}
        upgrade_started = time.monotonic()
        second = [f"upgrade-{i}" for i in range(4)]
        applied = kubectl_apply(control_plane, ns, *(failing(n) for n in second))
        assert applied.returncode == 0, applied.stderr
        rel.helm(
            "upgrade", rel.name, str(CHART), "-n", ns, "--reuse-values", "--set", "job.pendingAlertSeconds=300",
            "--wait", "--timeout=180s",
        )  # fmt: skip
        new_leader = rel.wait_ready(other_than=old)
        env = {e["name"]: e.get("value") for e in new_leader["spec"]["containers"][0]["env"]}
        assert env["UNLEARNING_PENDING_ALERT_SECONDS"] == "300"
        check_burst(e2e_api, gpu_node, ns, second, phases)
        # Released on SIGTERM, not expired: a standby takes it on its next poll.
        assert "released Lease" in rel.operator_log(), rel.operator_log()
        gaps = holders.released_gaps(upgrade_started)
        record_property("release_handover_seconds", [round(g, 2) for g in gaps])
        print(f"handover on SIGTERM during helm upgrade: released -> taken in {', '.join(f'{g:.1f} s' for g in gaps)}")
        assert gaps, holders.changes
        # Released, not expired: taken on a standby's next poll, far below the Lease duration.
        assert all(g < LEASE_DURATION / 2 for g in gaps), gaps
        third = "after-upgrade"
        assert kubectl_apply(control_plane, ns, failing(third)).returncode == 0
        check_burst(e2e_api, gpu_node, ns, [third], phases)
    finally:
        phases.stop()
        holders.stop()


def _pdb_allows(api: Api, rel: Release) -> bool:
    pdb = client.PolicyV1Api(api.core.api_client).read_namespaced_pod_disruption_budget(rel.fullname, rel.namespace)
    return bool(pdb.status and pdb.status.current_healthy == 2 and pdb.status.disruptions_allowed == 1)
