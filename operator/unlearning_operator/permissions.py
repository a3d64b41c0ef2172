"""RBAC: exactly what the operator (and kopf underneath it) calls. The chart is tested against this.

Nothing on Secrets. Checked against kopf 1.45 with ``standalone=True``
(no peering objects) and no namespace globs:

* kopf lists and watches ``customresourcedefinitions`` to discover the
  resources it serves (cluster-wide mode; with explicit namespaces the
  operator disables scanning, see main.py, so this rule is then unused).
* kopf lists and watches every resource with a handler or index:
  unlearningrequests and jobs. Pods are never watched: the operator lists
  one Job's pods (by the job-name label) when that Job ends or waits.
* kopf posts core/v1 ``events`` (create) for kopf.event() and handler errors.
* The operator creates Jobs and ConfigMaps (spec, audit, lineage), reads
  them back on 409 to adopt, updates lineage ConfigMaps, lists a Job's pods
  and patches requests' status. It patches a Job once, to set its
  ``ttlSecondsAfterFinished`` after its result is recorded. It never
  deletes anything: garbage collection removes a request's Job and spec
  ConfigMap through owner references, the TTL controller a finished Job.

The integration tests run the operator as a user bound to exactly these
rules, so a missing verb fails them.
"""

from __future__ import annotations

from typing import Any

from unlearning_contracts.api import API_GROUP, REQUEST

RULES: list[dict[str, Any]] = [
    # kopf: resource discovery watch (cluster-wide mode only; list + watch, no get).
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    # kopf: the request watch and index.
    {"apiGroups": [API_GROUP], "resources": [REQUEST.plural], "verbs": ["list", "watch"]},
    # Status patches (merge patch on the status subresource).
    {"apiGroups": [API_GROUP], "resources": [f"{REQUEST.plural}/status"], "verbs": ["patch"]},
    # kopf: the Job watch and index; the operator creates Jobs, reads one back on 409 or to check it exists,
    # and patches one's ttlSecondsAfterFinished once its result is recorded.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # A Job's pods: termination messages and pending reasons (listed by job-name label, never watched).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # Spec, audit and lineage ConfigMaps: create if absent, read back, replace the lineage.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
    # Events on requests (the operator's and kopf's).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
