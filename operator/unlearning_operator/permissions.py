"""RBAC: exactly what the operator (and kopf underneath it) calls. The chart is tested against this.

Nothing on Secrets. Checked against kopf 1.45 with ``standalone=True``
(no peering objects) and no namespace globs:

* kopf lists and watches ``customresourcedefinitions`` to discover the
  resources it serves (cluster-wide mode; with explicit namespaces the
  operator disables scanning, see main.py, so this rule is then unused).
* kopf lists and watches every resource with a handler or index:
  unlearningrequests, unlearningcalibrations and jobs. Pods are never watched: the operator lists
  one Job's pods (by the job-name label) when that Job ends or waits.
* kopf posts core/v1 ``events`` (create) for kopf.event() and handler errors.
* The operator creates Jobs, ConfigMaps (spec, audit, lineage) and each
  Job's NetworkPolicy, reads them back on 409 to adopt, updates lineage
  ConfigMaps, lists a Job's pods and patches requests' and calibrations'
  status. It patches a request's Job once, to set its
  ``ttlSecondsAfterFinished`` after its result is recorded. It never deletes
  anything: garbage collection removes a request's (or a calibration's) Jobs,
  spec ConfigMap and NetworkPolicy through owner references, the TTL
  controller a finished Job.

The integration tests run the operator as a user bound to exactly these
rules, so a missing verb fails them.

``leader_election_rules`` are granted only in the operator's own namespace
(a Role the chart makes there), and only on the one Lease for get and
update; ``create`` cannot be limited by name in RBAC.
"""

from __future__ import annotations

from typing import Any

from unlearning_contracts.api import API_GROUP, CALIBRATION, REQUEST

RULES: list[dict[str, Any]] = [
    # kopf: resource discovery watch (cluster-wide mode only; list + watch, no get).
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    # kopf: the request and calibration watches and indexes.
    {"apiGroups": [API_GROUP], "resources": [REQUEST.plural, CALIBRATION.plural], "verbs": ["list", "watch"]},
    # Status patches (merge patch on the status subresource).
    {
        "apiGroups": [API_GROUP],
        "resources": [f"{REQUEST.plural}/status", f"{CALIBRATION.plural}/status"],
        "verbs": ["patch"],
    },
    # kopf: the Job watch and index; the operator creates Jobs, reads one back on 409 or to check it exists,
    # and patches a request Job's ttlSecondsAfterFinished once its result is recorded.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # A Job's pods: termination messages and pending reasons (listed by job-name label, never watched).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # Spec, audit and lineage ConfigMaps: create if absent, read back, replace the lineage.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
    # Events on requests (the operator's and kopf's).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # The NetworkPolicy that isolates a request's Job pod: create if absent, read back on 409.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create"]},
]


def leader_election_rules(lease_name: str) -> list[dict[str, Any]]:
    """The Lease that decides which replica reconciles (leader.py): read, renew, take over; create once."""
    return [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": [lease_name],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
