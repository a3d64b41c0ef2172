"""RBAC: exactly what the operator (and kopf underneath it) calls. The chart is tested against this.

Nothing on Secrets. Checked against kopf 1.45 with ``standalone=True``
(no peering objects) and no namespace globs:

* kopf lists and watches ``customresourcedefinitions`` to discover the
  resources it serves (cluster-wide mode; with explicit namespaces the
  operator disables scanning, see main.py, so this rule is then unused).
* kopf lists and watches every resource with a handler or index:
  unlearningrequests, jobs, pods.
* kopf posts core/v1 ``events`` (create) for kopf.event() and handler errors.
* The operator creates Jobs and ConfigMaps (spec, audit, lineage), reads
  them back on 409 to adopt, updates lineage ConfigMaps, and patches
  requests' status. It never deletes anything: garbage collection removes a
  request's Job and spec ConfigMap through owner references.
"""

from __future__ import annotations

from typing import Any

from unlearn.spec import API_GROUP, PLURAL

RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
