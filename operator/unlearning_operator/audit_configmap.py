"""The audit ConfigMap: the immutable record a regulator asks for. Pure builder.

One ConfigMap per request object that reached an end: its Job ended (passed,
failed gates, or failed to run: a failed attempt is part of the record too),
it was Rejected (nothing ran; the record says why, with the spec as
submitted), or it was deleted while its Job ran (phase ``Deleted``: the
Job is garbage-collected with it, so this record is all that says it ran).

* ``immutable: true``: nobody, the operator included, can edit it later.
* No owner reference: it outlives the request (deleting the request deletes
  the Job and the spec ConfigMap through garbage collection, not this).
* Labelled by model and request, and ``unlearn.dev/audit: "true"``, so
  ``kubectl get configmap -l unlearn.dev/audit=true,unlearn.dev/model=<m>``
  lists a model's history.
* It names no person: the forget set appears only as its count and sha256
  digest (the job computes them); inline indices from the spec are left out.
* A run that added a model version records that version's lineage digest
  (``lineageDigest``): the immutable anchor of the lineage's chain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from unlearning_contracts.calibration import CalibrationRecord, UnlearningCalibrationSpec
from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec

from . import calibration_status as cal
from .calibration_jobs import CalibrationRef
from .jobs import RequestRef
from .labels import (
    ANNOTATION_CALIBRATION_UID,
    ANNOTATION_REQUEST_UID,
    COMPONENT_AUDIT,
    COMPONENT_CALIBRATION_RECORD,
    LABEL_AUDIT,
    calibration_labels,
    request_labels,
)
from .names import audit_configmap_name, calibration_record_name
from .status import COMPLETE, get_condition

RECORD_KEY = "record.json"
REQUEST_KEY = "request.json"
OUTCOME_KEY = "outcome.json"

PHASE_DELETED = "Deleted"
"""The outcome's phase of a request deleted while its Job ran (never a status phase: the object is gone)."""

# A Rejected request's spec is kept as submitted, up to this many bytes of JSON
# (free-form fields such as architecture.kwargs are otherwise unbounded).
MAX_SUBMITTED_SPEC_BYTES = 64 * 1024
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _redact(raw: dict[str, Any]) -> dict[str, Any]:
    forget = raw.get("forget")
    if isinstance(forget, dict) and isinstance(forget.get("indices"), list):
        forget["indices"] = f"<{len(forget['indices'])} indices, see record.json forgetDigest>"
    return raw


def redacted_spec(spec: UnlearningRequestSpec) -> dict[str, Any]:
    """The spec as run, without inline forget indices (the record names no person)."""
    return _redact(spec.model_dump(mode="json", by_alias=True, exclude_none=True))


def submitted_spec(raw: Mapping[str, Any]) -> Any:
    """A spec that did not parse, as submitted (redacted, and bounded in size)."""
    redacted = _redact(json.loads(json.dumps(dict(raw), default=str)))
    size = len(json.dumps(redacted).encode())
    if size > MAX_SUBMITTED_SPEC_BYTES:
        return f"<the submitted spec, {size} bytes of JSON, is not kept: over {MAX_SUBMITTED_SPEC_BYTES}>"
    return redacted


def build_audit_configmap(
    ref: RequestRef,
    spec: UnlearningRequestSpec | Mapping[str, Any],
    status: dict[str, Any],
    record: CompactRecord | None,
    *,
    lineage_digest: str | None = None,
) -> dict[str, Any]:
    """The immutable ConfigMap; ``status`` is the final status (phase, reason, job, times).

    ``spec`` is the parsed spec, or the raw one of a request Rejected as invalid.
    """
    if isinstance(spec, UnlearningRequestSpec):
        model, request_id, request_json = spec.model.name, spec.request_id, redacted_spec(spec)
    else:
        raw_model = spec.get("model")
        model = str(raw_model.get("name", "")) if isinstance(raw_model, dict) else ""
        request_id = spec.get("requestId") if isinstance(spec.get("requestId"), str) else None
        request_json = submitted_spec(spec)
    labels = request_labels(
        request=ref.name,
        component=COMPONENT_AUDIT,
        model=model if len(model) <= 63 and _LABEL_VALUE.match(model) else "",
    )
    labels[LABEL_AUDIT] = "true"
    complete = get_condition(status, COMPLETE) or {}
    outcome = {
        "request": ref.name,
        "namespace": ref.namespace,
        "uid": ref.uid,
        "requestId": request_id or f"{ref.namespace}/{ref.name}",
        "model": model,
        "phase": status.get("phase"),
        "reason": complete.get("reason"),
        "message": status.get("message"),
        "jobName": status.get("jobName"),
        "attempt": status.get("attempt"),
        "modelVersion": status.get("modelVersion"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
    }
    if lineage_digest is not None:
        outcome["lineageDigest"] = lineage_digest
    data = {
        OUTCOME_KEY: json.dumps(outcome, indent=1, sort_keys=True),
        REQUEST_KEY: json.dumps(request_json, indent=1, sort_keys=True),
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


CALIBRATION_KEY = "calibration.json"
BANK_KEY = "bank.json"


def build_calibration_record_configmap(
    ref: CalibrationRef,
    spec: UnlearningCalibrationSpec,
    status: dict[str, Any],
    record: CalibrationRecord | None,
) -> dict[str, Any]:
    """The immutable record of one calibration: how the bank was made, and where it is.

    Requests' audit records name a bank by location and sha256; this record
    (like theirs: immutable, no owner reference, labelled by model) keeps
    the rest after the calibration object is deleted: the spec as run (the
    recipe and folds), the outcome, and the bank's compact record (likeness
    of every reference model, cost, data digest, the original's sha256).
    """
    labels = calibration_labels(calibration=ref.name, component=COMPONENT_CALIBRATION_RECORD, model=spec.model.name)
    labels[LABEL_AUDIT] = "true"
    ready = cal.get_ready_condition(status) or {}
    outcome = {
        "calibration": ref.name,
        "namespace": ref.namespace,
        "uid": ref.uid,
        "model": spec.model.name,
        "phase": status.get("phase"),
        "reason": ready.get("reason"),
        "message": status.get("message"),
        "jobName": status.get("jobName"),
        "mergeJobName": status.get("mergeJobName"),
        "folds": status.get("folds"),
        "foldsDone": status.get("foldsDone"),
        "output": status.get("output"),
        "bank": status.get("bank"),
        "cost": status.get("cost"),
        "likeness": status.get("likeness"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
    }
    data = {
        OUTCOME_KEY: json.dumps(outcome, indent=1, sort_keys=True),
        CALIBRATION_KEY: json.dumps(
            spec.model_dump(mode="json", by_alias=True, exclude_none=True), indent=1, sort_keys=True
        ),
    }
    if record is not None:
        data[BANK_KEY] = json.dumps(record.dump(), indent=1, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": calibration_record_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_CALIBRATION_UID: ref.uid},
        },
        "immutable": True,
        "data": data,
    }
