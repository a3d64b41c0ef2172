"""Pod networking for the fake node: the part of NetworkPolicy a node without a CNI can enforce.

Pods that no NetworkPolicy selects keep the host's network, as before (a pod
without a policy may talk to anyone; the host network is the closest the
node agent has). A pod that a policy selects gets what a CNI gives it:

* **Its own network namespace** (a "pause" process holds it, as the
  kubelet's sandbox does; every container of the pod joins it), with only
  ``lo`` and a pod IP of its own (``127.x.y.z``, unique on this host). Nothing
  outside is routable from there: a connection the agent does not forward
  fails with "network unreachable" or "connection refused".
* **Egress, forwarded only where the policies allow it.** Two destinations
  are modelled: the API server (``KUBERNETES_SERVICE_HOST:PORT``, which the
  agent points at ``127.0.0.1``), reached when a rule allows that address and
  port; and the Services of the pod's namespace, at their ClusterIP (an
  address on the namespace's ``lo``) and by name (``/etc/hosts``, as cluster
  DNS would answer), forwarded to a ready endpoint pod on this node when the
  source's egress rules and the endpoint's ingress rules both allow it.
* **Ingress from the node** (the tests, pods on the host network): the agent
  listens on ``<pod IP>:<containerPort>`` for each port a rule opens to the
  node's address (a rule without ``from``, or an ``ipBlock`` holding
  127.0.0.1) and forwards into the namespace.

What is not modelled: pod-to-pod traffic by pod IP, egress to anything but
the API server and Services, UDP, policies changed after a pod started
(its namespace's forwarders are fixed then; Service connections are checked
when made), and ``endPort``. Everything not modelled is denied, so a test
can show that a policy blocks; showing that a real CNI enforces it is out of
reach here (docs/network.md says what is and is not proven). The node is
treated like any other address, which is stricter than NetworkPolicy's
definition (traffic between a pod and its own node is always allowed there;
Calico still drops pod-to-node by default, as this agent does).

Needs root (network namespaces, as podinit's mount namespaces do); the agent
reads policies, Services and namespaces with the provisioner's credentials
(a CNI runs with its own identity: a node may not read policies).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("nodeagent.net")

CLONE_NEWNET = 0x40000000
PODINIT = Path(__file__).resolve().parent / "podinit.py"
NODE_ADDRESS = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"

_libc = ctypes.CDLL(None, use_errno=True)


# ---- NetworkPolicy semantics (pure) ------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector; an empty one matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (labels, namespace) or an address outside the pod network."""

    ip: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    """Named container ports (a named port in a rule resolves against the destination pod)."""

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


def selecting(policies: Iterable[Mapping[str, Any]], pod: Endpoint) -> list[Mapping[str, Any]]:
    return [
        p
        for p in policies
        if p["metadata"].get("namespace") == pod.namespace
        and selector_matches(p["spec"].get("podSelector"), pod.labels)
    ]


def policy_types(policy: Mapping[str, Any]) -> set[str]:
    declared = policy["spec"].get("policyTypes")
    if declared:
        return set(declared)
    # The API's default: Ingress always, Egress when there are egress rules.
    return {"Ingress", *(["Egress"] if policy["spec"].get("egress") else [])}


def isolated(policies: Iterable[Mapping[str, Any]], pod: Endpoint, direction: str) -> bool:
    return any(direction in policy_types(p) for p in selecting(policies, pod))


def _peer_matches(peer: Mapping[str, Any], other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list[Mapping[str, Any]] | None, port: int, protocol: str, target: Endpoint) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, int) and wanted == port:
            return True
        if isinstance(wanted, str) and target.ports.get(wanted) == port:
            return True
    return False


def allowed(
    policies: Iterable[Mapping[str, Any]], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    """Whether NetworkPolicy lets ``source`` open ``destination:port`` (both directions checked)."""
    listed = list(policies)
    if source.is_pod and isolated(listed, source, "Egress"):
        rules = [
            (rule, p["metadata"]["namespace"])
            for p in selecting(listed, source)
            if "Egress" in policy_types(p)
            for rule in p["spec"].get("egress") or []
        ]
        if not any(
            _port_matches(rule.get("ports"), port, protocol, destination)
            and (not rule.get("to") or any(_peer_matches(peer, destination, ns) for peer in rule["to"]))
            for rule, ns in rules
        ):
            return False
    if destination.is_pod and isolated(listed, destination, "Ingress"):
        rules = [
            (rule, p["metadata"]["namespace"])
            for p in selecting(listed, destination)
            if "Ingress" in policy_types(p)
            for rule in p["spec"].get("ingress") or []
        ]
        if not any(
            _port_matches(rule.get("ports"), port, protocol, destination)
            and (not rule.get("from") or any(_peer_matches(peer, source, ns) for peer in rule["from"]))
            for rule, ns in rules
        ):
            return False
    return True


def container_ports(pod: Mapping[str, Any]) -> dict[str, int]:
    return {
        p["name"]: int(p["containerPort"])
        for c in pod["spec"].get("containers") or []
        for p in c.get("ports") or []
        if p.get("name") and p.get("protocol", "TCP") == "TCP"
    }


def all_container_ports(pod: Mapping[str, Any]) -> list[int]:
    return sorted(
        {
            int(p["containerPort"])
            for c in pod["spec"].get("containers") or []
            for p in c.get("ports") or []
            if p.get("protocol", "TCP") == "TCP"
        }
    )


def hosts_file(pod_ip: str, hostname: str, namespace: str, services: Iterable[Mapping[str, Any]]) -> str:
    """/etc/hosts as the kubelet writes it, plus the namespace's Services (what cluster DNS would answer)."""
    lines = ["127.0.0.1\tlocalhost", f"{pod_ip}\t{hostname}"]
    for service in services:
        ip = (service.get("spec") or {}).get("clusterIP")
        if not ip or ip == "None":
            continue
        name = service["metadata"]["name"]
        fqdn = f"{name}.{namespace}.svc"
        lines.append(f"{ip}\t{fqdn}.{CLUSTER_DOMAIN} {fqdn} {name}.{namespace} {name}")
    return "\n".join(lines) + "\n"


# ---- network namespaces ------------------------------------------------------------


def run_in_netns(ns_fd: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a thread that has entered the network namespace (setns is per thread)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


_SIOCSIFADDR, _SIOCSIFNETMASK = 0x8916, 0x891C


def add_loopback_address(ip: str, label: int) -> None:
    """``ip addr add <ip>/32 dev lo`` in the calling thread's namespace (a ClusterIP inside a pod)."""

    def sockaddr(address: str) -> bytes:
        name = f"lo:{label}".encode()
        return struct.pack("16sH2s4s8s", name, socket.AF_INET, b"\0\0", socket.inet_aton(address), b"\0" * 8)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, _SIOCSIFADDR, sockaddr(ip))
        fcntl.ioctl(s, _SIOCSIFNETMASK, sockaddr("255.255.255.255"))


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    return sock


def _splice(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            readable, _, _ = select.select([a, b], [], [], 60)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                (b if sock is a else a).sendall(data)
    except OSError:
        return
    finally:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.close()


class Forwarder(threading.Thread):
    """Accepts on ``listener``; each connection goes where ``connect`` says (None or an error: closed)."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket | None], name: str) -> None:
        super().__init__(name=f"fwd {name}", daemon=True)
        self.listener = listener
        self.connect = connect
        self.what = name

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), name=f"conn {self.what}", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self.connect()
        except OSError as exc:
            log.info("%s: %s", self.what, exc)
            upstream = None
        if upstream is None:
            client.close()
            return
        _splice(client, upstream)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@dataclass
class PodNetwork:
    """The namespace, address and forwarders of one isolated pod."""

    uid: str
    namespace: str
    name: str
    pod_ip: str
    sandbox: subprocess.Popen[bytes]
    ns_fd: int
    hosts: Path
    forwarders: list[Forwarder] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.sandbox.pid}/ns/net"

    def connect_inside(self, port: int, timeout: float = 10.0) -> socket.socket:
        def dial() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)

        sock: socket.socket = run_in_netns(self.ns_fd, dial)
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()
        with contextlib.suppress(OSError):
            os.close(self.ns_fd)
        if self.sandbox.poll() is None:
            self.sandbox.kill()
            self.sandbox.wait()


@dataclass(frozen=True)
class PodView:
    """What the network needs to know of a pod the agent runs."""

    pod: Mapping[str, Any]
    net: PodNetwork | None
    ready: bool


class Network:
    """Decides per pod whether it is isolated, and wires the isolated ones up."""

    def __init__(self, admin: Any, networking: Any, api_port: int, pods: Callable[[], list[PodView]]) -> None:
        self.core = admin
        self.networking = networking
        self.api_port = api_port
        self.pods = pods
        # A /16 of 127/8 per agent: two agents on one host (two test sessions) do not collide.
        self._base = random.randrange(16, 250)
        self._second = random.randrange(0, 256)
        self._next = itertools.count(2)
        self._lock = threading.Lock()

    # ---- API reads (admin credentials) -----------------------------------------
    def policies(self, namespace: str) -> list[dict[str, Any]]:
        found = self.networking.list_namespaced_network_policy(namespace, _preload_content=False)
        return [dict(p, metadata={**p["metadata"], "namespace": namespace}) for p in _json(found)["items"]]

    def services(self, namespace: str) -> list[dict[str, Any]]:
        return list(_json(self.core.list_namespaced_service(namespace, _preload_content=False))["items"])

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        found = _json(self.core.read_namespace(namespace, _preload_content=False))
        return dict(found["metadata"].get("labels") or {})

    def endpoint(self, pod: Mapping[str, Any], ip: str) -> Endpoint:
        meta = pod["metadata"]
        return Endpoint(
            ip=ip,
            namespace=meta["namespace"],
            labels=dict(meta.get("labels") or {}),
            namespace_labels=self.namespace_labels(meta["namespace"]),
            ports=container_ports(pod),
        )

    # ---- pods ------------------------------------------------------------------
    def attach(self, pod: Mapping[str, Any], root: Path) -> PodNetwork | None:
        """A namespace and forwarders when a policy selects the pod; None: the host network."""
        meta = pod["metadata"]
        policies = self.policies(meta["namespace"])
        probe = self.endpoint(pod, NODE_ADDRESS)
        if not selecting(policies, probe):
            return None
        with self._lock:
            number = next(self._next)
        pod_ip = f"127.{self._base}.{(self._second + number // 250) % 256}.{number % 250 + 2}"
        sandbox = subprocess.Popen(
            [sys.executable, "-I", "-S", str(PODINIT), "--sandbox"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert sandbox.stdout is not None
        if sandbox.stdout.readline().strip() != b"ready":
            sandbox.kill()
            raise OSError(f"pod {meta['namespace']}/{meta['name']}: the network sandbox did not start")
        ns_fd = os.open(f"/proc/{sandbox.pid}/ns/net", os.O_RDONLY)
        services = self.services(meta["namespace"])
        hosts = root / "hosts"
        hosts.write_text(hosts_file(pod_ip, meta["name"], meta["namespace"], services))
        net = PodNetwork(meta["uid"], meta["namespace"], meta["name"], pod_ip, sandbox, ns_fd, hosts)
        try:
            self._wire(net, pod, policies, services)
        except BaseException:
            net.close()
            raise
        log.info("pod %s/%s: own network namespace, IP %s", meta["namespace"], meta["name"], pod_ip)
        return net

    def _wire(
        self, net: PodNetwork, pod: Mapping[str, Any], policies: list[dict[str, Any]], services: list[dict[str, Any]]
    ) -> None:
        me = self.endpoint(pod, net.pod_ip)
        # Egress to the API server, where the agent points KUBERNETES_SERVICE_HOST.
        if allowed(policies, me, Endpoint(NODE_ADDRESS), self.api_port):
            listener = run_in_netns(net.ns_fd, lambda: _listen(NODE_ADDRESS, self.api_port))
            api = ("127.0.0.1", self.api_port)
            self._start(net, listener, lambda: socket.create_connection(api, timeout=10), "api server")
        # The namespace's Services at their ClusterIPs, where this pod's egress may reach their pods
        # (each connection is checked again when made). Not on a port the pod serves itself: a
        # listener on ClusterIP:port would keep its own 0.0.0.0:port from binding (kube-proxy
        # rewrites addresses instead of listening).
        own = set(all_container_ports(pod))
        label = 0
        for service in services:
            ip = service["spec"].get("clusterIP") or "None"
            selector = service["spec"].get("selector") or {}
            if ip == "None" or not selector:
                continue
            ports = [
                p
                for p in service["spec"].get("ports") or []
                if p.get("protocol", "TCP") == "TCP"
                and int(p["port"]) not in own
                and self._may_reach(policies, me, selector, p.get("targetPort", p["port"]))
            ]
            if not ports:
                continue
            label += 1
            run_in_netns(net.ns_fd, lambda ip=ip, label=label: add_loopback_address(ip, label))
            for port in ports:
                listener = run_in_netns(net.ns_fd, lambda ip=ip, p=int(port["port"]): _listen(ip, p))
                connect = self._service_connector(me, service, port)
                self._start(net, listener, connect, f"service {service['metadata']['name']}:{port['port']}")
        # Ingress from the node: a listener on the pod IP for each port a rule opens to it.
        node = Endpoint(NODE_ADDRESS)
        for port in all_container_ports(pod):
            if allowed(policies, node, me, port):
                listener = _listen(net.pod_ip, port)
                self._start(net, listener, lambda port=port: net.connect_inside(port), f"ingress :{port}")

    @staticmethod
    def _may_reach(
        policies: list[dict[str, Any]], source: Endpoint, selector: Mapping[str, str], target: int | str
    ) -> bool:
        """Whether the source's egress lets it reach a pod with these labels on this (named) port."""
        # A stand-in endpoint pod: the Service's labels, the target port under its name if it has one.
        named, number = ({target: 1}, 1) if isinstance(target, str) else ({}, int(target))
        stand_in = Endpoint("0.0.0.0", source.namespace, dict(selector), source.namespace_labels, named)
        return allowed(policies, source, stand_in, number)

    def _start(self, net: PodNetwork, listener: socket.socket, connect: Callable[[], Any], what: str) -> None:
        forwarder = Forwarder(listener, connect, f"{net.namespace}/{net.name} {what}")
        net.forwarders.append(forwarder)
        forwarder.start()

    def _service_connector(
        self, source: Endpoint, service: Mapping[str, Any], port: Mapping[str, Any]
    ) -> Callable[[], socket.socket | None]:
        namespace = service["metadata"]["namespace"]
        selector = service["spec"].get("selector") or {}
        target = port.get("targetPort", port["port"])

        def connect() -> socket.socket | None:
            policies = self.policies(namespace)
            for view in self.pods():
                meta = view.pod["metadata"]
                if meta["namespace"] != namespace or not view.ready or not selector:
                    continue
                if not selector_matches({"matchLabels": selector}, meta.get("labels") or {}):
                    continue
                number = container_ports(view.pod).get(target) if isinstance(target, str) else int(target)
                if number is None:
                    continue
                destination = self.endpoint(view.pod, view.net.pod_ip if view.net else NODE_ADDRESS)
                if not allowed(policies, source, destination, number):
                    log.info("%s -> %s:%d denied by policy", source.ip, destination.ip, number)
                    return None
                if view.net is not None:
                    return view.net.connect_inside(number)
                return socket.create_connection((NODE_ADDRESS, number), timeout=10)
            return None

        return connect


def _json(response: Any) -> dict[str, Any]:
    return dict(json.loads(response.data))
