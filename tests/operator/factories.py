"""Small factories for requests, calibrations, records, Jobs and pods (table-driven tests build on these)."""

from __future__ import annotations

import copy
from typing import Any

from unlearning_contracts.calibration import CalibrationRecord, UnlearningCalibrationSpec, parse_calibration_spec
from unlearning_contracts.record import SUMMARY_KEYS, CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec, parse_spec
from unlearning_operator.calibration_jobs import CalibrationRef
from unlearning_operator.jobs import RequestRef
from unlearning_operator.lineage import Version

BASE_SPEC: dict[str, Any] = {
    "requestId": "GDPR-1",
    "model": {"name": "digits-mlp", "format": "exported", "source": {"claimName": "models", "path": "digits/m.pt2"}},
    "data": {"source": "digits"},
    "forget": {"indices": [3, 17, 42]},
    "output": {"location": {"claimName": "models", "path": "digits/versions"}},
}

REF = RequestRef(name="digits-gdpr", namespace="team-a", uid="0f1e2d3c-aaaa-bbbb-cccc-123456789abc")
V0 = Version(version=0, uri="pvc://models/digits/m.pt2", sha256="", request="digits-gdpr", parent=None)


def raw_spec(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with dotted-path overrides: raw_spec(**{"job.gpus": 2}); None deletes."""
    spec = copy.deepcopy(BASE_SPEC)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = spec
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return spec


def spec(**overrides: Any) -> UnlearningRequestSpec:
    return parse_spec(raw_spec(**overrides))


def summary(**values: float) -> dict[str, float]:
    return {key: 0.0 for key in SUMMARY_KEYS} | values


def record(**overrides: Any) -> CompactRecord:
    raw: dict[str, Any] = {
        "schemaVersion": 1,
        "requestId": "GDPR-1",
        "model": "digits-mlp",
        "modelVersion": 1,
        "method": "neggrad-plus",
        "verdict": "Passed",
        "reasons": [],
        "exitCode": 0,
        "forgetSamples": 3,
        "forgetDigest": "ab" * 32,
        # Every summary number the record declares (0.0 unless set here), so a new one needs no edit.
        "pre": summary(forgetAccuracy=100.0, retainAccuracy=99.5, testAccuracy=97.1, confidenceGap=0.08, miaAuc=0.71),
        "post": summary(forgetAccuracy=66.7, retainAccuracy=99.1, testAccuracy=96.4, confidenceGap=0.01, miaAuc=0.52),
        "attemptCount": 1,
        "inputModel": {"uri": "pvc://models/digits/m.pt2", "sha256": "11" * 32},
        "outputModel": {"uri": "pvc://models/digits/versions/v1/model.pt2", "sha256": "22" * 32, "format": "exported"},
        "startedAt": "2026-01-01T00:00:00Z",
        "finishedAt": "2026-01-01T00:01:00Z",
    }
    raw.update(overrides)
    return CompactRecord.model_validate(raw)


def job(conditions: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "digits-gdpr-1234abcd",
            "namespace": "team-a",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"backoffLimit": 2, "activeDeadlineSeconds": 21600, **spec},
        "status": {"conditions": conditions or []},
    }


def pod(
    phase: str = "Failed",
    terminated: dict[str, Any] | None = None,
    waiting: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if terminated is not None:
        state["terminated"] = terminated
    if waiting is not None:
        state["waiting"] = waiting
    return {
        "metadata": {"name": "digits-gdpr-1234abcd-xyz12", "creationTimestamp": created},
        "spec": {"containers": [{"name": "unlearn", "image": "job:1", "resources": {"limits": {"memory": "16Gi"}}}]},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "unlearn", "state": state}],
        },
    }


# ---- calibrations ---------------------------------------------------------------------

CAL_SPEC: dict[str, Any] = {
    "model": {"name": "digits-mlp", "format": "exported", "source": {"claimName": "models", "path": "digits/m.pt2"}},
    "data": {"source": "digits"},
    "recipe": {"epochs": 150, "batchSize": 64, "optimizer": {"name": "adam", "lr": 0.001}},
    "folds": 4,
    "output": {"location": {"claimName": "banks", "path": "digits"}},
}

CAL_REF = CalibrationRef(name="digits-cal", namespace="team-a", uid="7c6b5a49-aaaa-bbbb-cccc-123456789abc")


def raw_calibration(**overrides: Any) -> dict[str, Any]:
    """CAL_SPEC with dotted-path overrides, as ``raw_spec``."""
    spec = copy.deepcopy(CAL_SPEC)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = spec
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return spec


def calibration(**overrides: Any) -> UnlearningCalibrationSpec:
    return parse_calibration_spec(raw_calibration(**overrides))


def reference(fold: int, **values: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "fold": fold,
        "trainRows": 1010,
        "heldOutRows": 337,
        "testAccuracy": 96.0 + fold * 0.2,
        "foldAccuracy": 95.5 + fold * 0.2,
        "agreement": 97.0 + fold * 0.5,
        "durationSeconds": 12.0,
    }
    return raw | values


def bank_record(**overrides: Any) -> CalibrationRecord:
    raw: dict[str, Any] = {
        "schemaVersion": 1,
        "calibration": "team-a/digits-cal",
        "model": "digits-mlp",
        "inputModel": {"uri": "pvc://models/digits/m.pt2", "sha256": "11" * 32},
        "dataDigest": "dd" * 32,
        "folds": 4,
        "seed": 0,
        "exitCode": 0,
        "bank": {"uri": "pvc://banks/digits/digits-cal-7c6b5a49/bank.npz", "sha256": "ba" * 32},
        "originalTestAccuracy": 97.1,
        "references": [reference(k) for k in range(4)],
        "cost": {"wallSeconds": 61.0, "deviceSeconds": 48.5, "retrainEquivalents": 3.0},
        "startedAt": "2026-01-01T12:00:00Z",
        "finishedAt": "2026-01-01T12:01:01Z",
    }
    raw.update(overrides)
    return CalibrationRecord.model_validate(raw)
