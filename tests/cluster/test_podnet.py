"""The fake node's NetworkPolicy semantics (pure), table by table, against the API's documented rules."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.podnet import Endpoint, allowed, hosts_file, isolated, selector_matches

pytestmark = pytest.mark.unit

NS = "team-a"
JOB = Endpoint("127.5.0.2", NS, {"app": "job"}, {"kubernetes.io/metadata.name": NS})
OPERATOR = Endpoint("127.5.0.3", NS, {"app": "op"}, {"kubernetes.io/metadata.name": NS}, {"health": 8081})
OTHER_NS = Endpoint("127.5.0.4", "team-b", {"app": "op"}, {"kubernetes.io/metadata.name": "team-b"})
API = Endpoint("127.0.0.1")
NODE = Endpoint("127.0.0.1")


def policy(selector: dict[str, Any], types: list[str] | None = None, **rules: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector, **rules}
    if types is not None:
        spec["policyTypes"] = types
    return {"metadata": {"name": "p", "namespace": NS}, "spec": spec}


DENY_ALL = policy({"matchLabels": {"app": "job"}}, ["Ingress", "Egress"])
OPERATOR_POLICY = policy(
    {"matchLabels": {"app": "op"}},
    ["Ingress", "Egress"],
    ingress=[{"ports": [{"port": "health", "protocol": "TCP"}]}],
    egress=[{"ports": [{"port": 6443}], "to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}]}],
)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "x"}, False),
    ],
)
def test_selector(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


def test_unselected_pods_are_not_isolated() -> None:
    assert not isolated([DENY_ALL], OPERATOR, "Egress")
    assert allowed([DENY_ALL], OPERATOR, API, 6443)
    assert isolated([DENY_ALL], JOB, "Egress")
    assert isolated([DENY_ALL], JOB, "Ingress")


def test_policy_types_default_to_ingress_and_egress_only_with_egress_rules() -> None:
    ingress_only = policy({"matchLabels": {"app": "job"}})
    assert isolated([ingress_only], JOB, "Ingress")
    assert not isolated([ingress_only], JOB, "Egress")
    with_egress = policy({"matchLabels": {"app": "job"}}, egress=[{"ports": [{"port": 53}]}])
    assert isolated([with_egress], JOB, "Egress")


@pytest.mark.parametrize(
    ("source", "destination", "port", "expected"),
    [
        (JOB, API, 6443, False),  # deny-all: not even the API server
        (JOB, OPERATOR, 8081, False),  # its egress is denied, whatever the operator's ingress says
        (NODE, JOB, 8080, False),
        (OPERATOR, API, 6443, True),  # ipBlock + port
        (OPERATOR, API, 443, False),  # another port
        (OPERATOR, Endpoint("10.0.0.1"), 6443, False),  # outside the CIDR
        (NODE, OPERATOR, 8081, True),  # named port "health" -> 8081, any source
        (NODE, OPERATOR, 8080, False),
    ],
)
def test_allowed(source: Endpoint, destination: Endpoint, port: int, expected: bool) -> None:
    assert allowed([DENY_ALL, OPERATOR_POLICY], source, destination, port) is expected


def test_peers_by_pod_and_namespace_selector_and_ip_block_except() -> None:
    same_ns = policy({"matchLabels": {"app": "op"}}, ["Ingress"], ingress=[{"from": [{"podSelector": {}}]}])
    assert allowed([same_ns], JOB, OPERATOR, 8081)
    assert not allowed([same_ns], OTHER_NS, OPERATOR, 8081)  # podSelector alone: the policy's namespace only
    assert not allowed([same_ns], NODE, OPERATOR, 8081)  # not a pod
    any_ns = policy(
        {"matchLabels": {"app": "op"}},
        ["Ingress"],
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-b"}}}]}],
    )
    assert allowed([any_ns], OTHER_NS, OPERATOR, 8081)
    assert not allowed([any_ns], JOB, OPERATOR, 8081)
    block = policy(
        {"matchLabels": {"app": "op"}},
        ["Egress"],
        egress=[{"to": [{"ipBlock": {"cidr": "127.0.0.0/8", "except": ["127.0.0.1/32"]}}]}],
    )
    assert not allowed([block], OPERATOR, API, 6443)
    assert allowed([block], OPERATOR, Endpoint("127.9.9.9"), 6443)


def test_policies_add_up() -> None:
    # A second policy selecting the job pod can only allow more (the admin's widening).
    widen = policy(
        {"matchLabels": {"app": "job"}}, ["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}]
    )
    assert allowed([DENY_ALL, widen], JOB, Endpoint("10.20.1.1"), 9000)
    assert not allowed([DENY_ALL, widen], JOB, API, 6443)


def test_hosts_file_names_services_as_cluster_dns_would() -> None:
    services = [
        {"metadata": {"name": "op-metrics"}, "spec": {"clusterIP": "10.0.0.17"}},
        {"metadata": {"name": "headless"}, "spec": {"clusterIP": "None"}},
    ]
    text = hosts_file("127.5.0.9", "pod-x", NS, services)
    lines = text.splitlines()
    assert "127.5.0.9\tpod-x" in lines
    assert "10.0.0.17\top-metrics.team-a.svc.cluster.local op-metrics.team-a.svc op-metrics.team-a op-metrics" in lines
    assert "headless" not in text
