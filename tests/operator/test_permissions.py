"""RBAC rules: nothing on Secrets, no wildcards, and every call the operator makes is covered."""

from __future__ import annotations

import pytest

from unlearning_operator.permissions import RULES

pytestmark = pytest.mark.unit


def allowed(group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in RULES)


def test_no_secrets_no_wildcards_no_delete() -> None:
    for rule in RULES:
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]
        assert "delete" not in rule["verbs"]


@pytest.mark.parametrize(
    ("group", "resource", "verb"),
    [
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("unlearn.dev", "unlearningrequests", "list"),
        ("batch", "jobs", "list"),
        ("unlearn.dev", "unlearningrequests", "watch"),
        ("unlearn.dev", "unlearningrequests/status", "patch"),
        ("unlearn.dev", "unlearningcalibrations", "list"),
        ("unlearn.dev", "unlearningcalibrations", "watch"),
        ("unlearn.dev", "unlearningcalibrations/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "get"),
        ("batch", "jobs", "watch"),
        ("batch", "jobs", "patch"),
        ("", "pods", "list"),
        ("", "configmaps", "create"),
        ("", "configmaps", "update"),
        ("", "events", "create"),
    ],
)
def test_calls_the_operator_makes_are_allowed(group: str, resource: str, verb: str) -> None:
    assert allowed(group, resource, verb)
