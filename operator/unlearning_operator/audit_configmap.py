"""The audit ConfigMap: the immutable record a regulator asks for. Pure builder.

One ConfigMap per request object, written when its Job ends (passed, failed
gates, or failed to run: a failed attempt is part of the record too).

* ``immutable: true``: nobody, the operator included, can edit it later.
* No owner reference: it outlives the request (deleting the request deletes
  the Job and the spec ConfigMap through garbage collection, not this).
* Labelled by model and request, and ``unlearn.dev/audit: "true"``, so
  ``kubectl get configmap -l unlearn.dev/audit=true,unlearn.dev/model=<m>``
  lists a model's history.
* It names no person: the forget set appears only as its count and sha256
  digest (the job computes them); inline indices from the spec are left out.
"""

from __future__ import annotations

import json
from typing import Any

from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec

from .jobs import RequestRef
from .labels import ANNOTATION_REQUEST_UID, COMPONENT_AUDIT, LABEL_AUDIT, request_labels
from .names import audit_configmap_name
from .status import COMPLETE, get_condition

RECORD_KEY = "record.json"
REQUEST_KEY = "request.json"
OUTCOME_KEY = "outcome.json"


def redacted_spec(spec: UnlearningRequestSpec) -> dict[str, Any]:
    """The spec as run, without inline forget indices (the record names no person)."""
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    forget = raw.get("forget", {})
    if "indices" in forget:
        forget["indices"] = f"<{len(forget['indices'])} indices, see record.json forgetDigest>"
    return dict(raw)


def build_audit_configmap(
    ref: RequestRef,
    spec: UnlearningRequestSpec,
    status: dict[str, Any],
    record: CompactRecord | None,
) -> dict[str, Any]:
    """The immutable ConfigMap; ``status`` is the final status (phase, reason, job, times)."""
    labels = request_labels(request=ref.name, component=COMPONENT_AUDIT, model=spec.model.name)
    labels[LABEL_AUDIT] = "true"
    complete = get_condition(status, COMPLETE) or {}
    outcome = {
        "request": ref.name,
        "namespace": ref.namespace,
        "uid": ref.uid,
        "requestId": spec.request_id or f"{ref.namespace}/{ref.name}",
        "model": spec.model.name,
        "phase": status.get("phase"),
        "reason": complete.get("reason"),
        "message": status.get("message"),
        "jobName": status.get("jobName"),
        "attempt": status.get("attempt"),
        "modelVersion": status.get("modelVersion"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
    }
    data = {
        OUTCOME_KEY: json.dumps(outcome, indent=1, sort_keys=True),
        REQUEST_KEY: json.dumps(redacted_spec(spec), indent=1, sort_keys=True),
    }
    if record is not None:
        data[RECORD_KEY] = json.dumps(record.dump(), indent=1, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": audit_configmap_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_REQUEST_UID: ref.uid},
        },
        "immutable": True,
        "data": data,
    }
