"""The fake node's pod network: a pod a NetworkPolicy selects gets only the traffic the policies allow.

Every test has a control: the same probe from a pod no policy selects (host
network) does connect, so a failure to connect means the policy, not a
broken probe. What these tests can and cannot prove about a real CNI is in
docs/network.md.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import GpuNode, wait_for
from tests.cluster.test_harness import core, python_pod, terminated, wait_pod

pytestmark = pytest.mark.cluster

# Tries each address, prints one JSON line {"host:port": "ok" | error}.
PROBE = """
import json, os, socket, sys
targets = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
targets.append([os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])])
out = {}
for host, port in targets:
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[f"{host}:{port}"] = "ok"
    except OSError as error:
        out[f"{host}:{port}"] = type(error).__name__ + ": " + str(error)
open("/dev/termination-log", "w").write(json.dumps(out))
"""


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP port on the node's 127.0.0.1 that accepts (what a pod must not reach when isolated)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        server.close()


def deny_all(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress", "Egress"]},
    }


def probe(
    cp: ControlPlane, ns: str, name: str, labels: dict[str, str], targets: list[tuple[str, int]]
) -> dict[str, str]:
    api = core(cp)
    pod = python_pod(name, PROBE)
    pod["metadata"]["labels"] = labels
    pod["spec"]["containers"][0]["args"] = [json.dumps(targets)]
    api.create_namespaced_pod(ns, pod)
    done = wait_pod(api, ns, name, ("Succeeded", "Failed"))
    result: dict[str, str] = json.loads(terminated(done).message)
    return result


def apply(cp: ControlPlane, ns: str, *objects: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))


def test_a_deny_all_pod_reaches_nothing_and_an_unselected_one_everything(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str, host_listener: int
) -> None:
    cp = control_plane
    apply(cp, namespace, deny_all("isolate-jobs", {"role": "job"}))
    api_server = f"127.0.0.1:{cp.server.rsplit(':', 1)[1]}"
    targets = [("127.0.0.1", host_listener), ("10.0.0.1", 443), ("1.1.1.1", 53)]
    isolated = probe(cp, namespace, "isolated", {"role": "job"}, targets)
    free = probe(cp, namespace, "free", {"role": "other"}, targets)
    # The control: the same probe, not selected, reaches the API server and the node's listener.
    assert free[api_server] == "ok", free
    assert free[f"127.0.0.1:{host_listener}"] == "ok", free
    # Selected by the deny-all policy: nothing opens, not the API server, not the node, not outside.
    assert set(isolated) == set(free)
    for target, outcome in isolated.items():
        assert outcome != "ok", (target, isolated)
    assert isolated[api_server].startswith("ConnectionRefusedError"), isolated
    assert isolated["1.1.1.1:53"].startswith("OSError: [Errno 101]"), isolated  # network unreachable
    pods = {p.metadata.name: p for p in core(cp).list_namespaced_pod(namespace).items}
    assert pods["free"].status.pod_ip == "127.0.0.1"
    assert pods["isolated"].status.pod_ip.startswith("127.")
    assert pods["isolated"].status.pod_ip != "127.0.0.1"


def test_egress_to_the_api_server_only_where_a_rule_allows_it(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str, host_listener: int
) -> None:
    cp = control_plane
    port = int(cp.server.rsplit(":", 1)[1])
    to_api = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "api-only"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "operator"}},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}], "ports": [{"port": port, "protocol": "TCP"}]}],
        },
    }
    wrong_port = json.loads(json.dumps(to_api))
    wrong_port["metadata"]["name"] = "api-wrong-port"
    wrong_port["spec"]["podSelector"]["matchLabels"] = {"role": "misconfigured"}
    wrong_port["spec"]["egress"][0]["ports"] = [{"port": 6443, "protocol": "TCP"}]
    apply(cp, namespace, to_api, wrong_port)
    api_server = f"127.0.0.1:{port}"
    allowed = probe(cp, namespace, "allowed", {"role": "operator"}, [("127.0.0.1", host_listener)])
    assert allowed[api_server] == "ok", allowed
    assert allowed[f"127.0.0.1:{host_listener}"] != "ok", allowed
    misconfigured = probe(cp, namespace, "misconfigured", {"role": "misconfigured"}, [])
    assert misconfigured[api_server] != "ok", misconfigured


def server_pod(name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    code = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'hello from ' + self.path.encode())\n"
        f"h.HTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    )
    pod = python_pod(name, code, container={"ports": [{"name": "web", "containerPort": port}]})
    pod["metadata"]["labels"] = labels
    return pod


def test_ingress_from_the_node_and_through_a_service_by_name_follow_the_policies(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    cp = control_plane
    api = core(cp)
    # Two servers on one port (each in its own namespace: no clash), reached on their pod IPs.
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"port": "web"}]}],
        },
    }
    clients = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "clients"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "client"}},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "web"}}}], "ports": [{"port": "web"}]}],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"role": "web"}, "ports": [{"port": 80, "targetPort": "web"}]},
    }
    apply(cp, namespace, policy, clients, service)
    port = 18080
    for name in ("web-a", "web-b"):
        api.create_namespaced_pod(namespace, server_pod(name, {"role": "web"}, port))
    ips = [wait_pod(api, namespace, name, ("Running",)).status.pod_ip for name in ("web-a", "web-b")]
    assert len(set(ips)) == 2
    assert "127.0.0.1" not in ips

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=3) as response:
            return str(response.read().decode())

    for ip in ips:
        wait_for(f"web on {ip}", lambda ip=ip: _ok(lambda: get(f"http://{ip}:{port}/x")), timeout=30)
        assert get(f"http://{ip}:{port}/node") == "hello from /node"

    fetch = (
        "import sys, urllib.request\n"
        "try:\n"
        "    body = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()\n"
        "except OSError as error:\n"
        "    body = 'error: ' + str(error)\n"
        "open('/dev/termination-log', 'w').write(body)\n"
    )
    url = f"http://web.{namespace}.svc/svc"
    for name, labels in (("client", {"role": "client"}), ("stranger", {"role": "stranger"})):
        pod = python_pod(name, fetch)
        pod["metadata"]["labels"] = labels
        pod["spec"]["containers"][0]["args"] = [url]
        api.create_namespaced_pod(namespace, pod)
    allowed = terminated(wait_pod(api, namespace, "client", ("Succeeded", "Failed"))).message
    # The client's egress allows the web pods' port, and their ingress allows any source: it gets through.
    assert allowed == "hello from /svc", allowed
    # A pod no policy selects is on the host network, where Services do not route (no kube-proxy here).
    denied = terminated(wait_pod(api, namespace, "stranger", ("Succeeded", "Failed"))).message
    assert denied.startswith("error:"), denied


def _ok(fn: Any) -> bool:
    try:
        fn()
    except OSError:
        return False
    return True


def test_the_network_namespace_goes_with_the_pod(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    cp = control_plane
    api = core(cp)
    apply(cp, namespace, deny_all("isolate", {"role": "job"}))
    pod = server_pod("short", {"role": "job"}, 18081)
    pod["spec"]["containers"][0]["command"] = ["python", "-c", "import time; time.sleep(600)"]
    api.create_namespaced_pod(namespace, pod)
    wait_pod(api, namespace, "short", ("Running",))
    sandboxes = _sandboxes()
    assert sandboxes, "no network sandbox process for the isolated pod"
    api.delete_namespaced_pod("short", namespace, grace_period_seconds=0)

    def gone() -> bool:
        try:
            api.read_namespaced_pod("short", namespace)
        except client.ApiException as error:
            return bool(error.status == 404)
        return False

    wait_for("the pod to go", gone, timeout=60)
    wait_for("its sandbox to go", lambda: not (sandboxes & _sandboxes()), timeout=30)


def _sandboxes() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"--sandbox" in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def test_a_readiness_probe_reaches_into_an_isolated_pod_that_nothing_else_reaches(
    control_plane: ControlPlane, gpu_node: GpuNode, namespace: str
) -> None:
    # Kubelet probes come from the node and are always allowed, whatever the policies say: the agent runs
    # them inside the pod's network namespace. Two isolated servers on one port, one answering the probe's
    # path with 200 and one with 503 (the control: a probe that reached it and failed).
    cp = control_plane
    api = core(cp)
    apply(cp, namespace, deny_all("isolate", {"role": "job"}))
    port = 18082
    for name, path in (("answers", "/x"), ("refuses", "/fail")):
        pod = server_pod(name, {"role": "job"}, port)
        code = pod["spec"]["containers"][0]["command"][2]
        pod["spec"]["containers"][0]["command"][2] = code.replace(
            "self.send_response(200)", "self.send_response(503 if self.path == '/fail' else 200)"
        )
        pod["spec"]["containers"][0]["readinessProbe"] = {
            "httpGet": {"path": path, "port": "web"},
            "periodSeconds": 1,
            "failureThreshold": 1,
        }
        api.create_namespaced_pod(namespace, pod)

    def ready(name: str) -> bool:
        statuses = api.read_namespaced_pod(name, namespace).status.container_statuses or []
        return bool(statuses) and bool(statuses[0].ready)

    wait_for("the isolated server that answers to be Ready", lambda: ready("answers"), timeout=60, interval=0.5)
    refuses = wait_pod(api, namespace, "refuses", ("Running",))
    # Probed every second for three more: the one answering 503 stays Running but not Ready.
    time.sleep(3)
    refuses = api.read_namespaced_pod("refuses", namespace)
    assert refuses.status.container_statuses[0].started is True
    assert refuses.status.container_statuses[0].ready is False
    assert ready("answers")
    # What the probe reached, nothing else does: the deny-all policy keeps the node out of the pod.
    ip = api.read_namespaced_pod("answers", namespace).status.pod_ip
    assert ip != "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, port), timeout=3).close()
