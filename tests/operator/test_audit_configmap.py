"""The audit ConfigMap: immutable, outlives the request, names no person."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.operator.factories import REF, raw_spec, record, spec
from unlearning_operator import status as st
from unlearning_operator.audit_configmap import PHASE_DELETED, build_audit_configmap

pytestmark = pytest.mark.unit

T = datetime(2026, 1, 1, tzinfo=UTC)


def final_status() -> dict[str, object]:
    running = st.running(
        st.pending(None, 1, T),
        job_name="digits-gdpr-1",
        attempt=1,
        model_version=1,
        input_model={},
        generation=1,
        now=T,
    )
    return st.finished(running, record(), T)


@pytest.mark.parametrize(
    ("the_record", "keys"),
    [
        (record(), {"outcome.json", "request.json", "record.json"}),
        (None, {"outcome.json", "request.json"}),
    ],
)
def test_shape(the_record: object, keys: set[str]) -> None:
    cm = build_audit_configmap(REF, spec(), final_status(), the_record)  # type: ignore[arg-type]
    assert cm["immutable"] is True
    meta = cm["metadata"]
    assert "ownerReferences" not in meta
    assert meta["name"] == "unlearn-audit-digits-gdpr-" + meta["name"].rsplit("-", 1)[1]
    assert len(meta["name"].rsplit("-", 1)[1]) == 8
    assert meta["labels"]["unlearn.dev/audit"] == "true"
    assert meta["labels"]["unlearn.dev/request"] == "digits-gdpr"
    assert meta["labels"]["unlearn.dev/model"] == "digits-mlp"
    assert meta["labels"]["app.kubernetes.io/component"] == "audit-record"
    assert set(cm["data"]) == keys


def test_contents_name_no_person() -> None:
    cm = build_audit_configmap(REF, spec(), final_status(), record())
    request = json.loads(cm["data"]["request.json"])
    assert request["forget"]["indices"] == "<3 indices, see record.json forgetDigest>"
    assert "42" not in cm["data"]["request.json"]
    saved = json.loads(cm["data"]["record.json"])
    assert saved["forgetDigest"] == "ab" * 32
    assert saved["post"]["miaAuc"] == 0.52
    outcome = json.loads(cm["data"]["outcome.json"])
    assert outcome["phase"] == "Succeeded"
    assert outcome["reason"] == "Passed"
    assert outcome["requestId"] == "GDPR-1"
    assert outcome["uid"] == REF.uid


def test_name_differs_per_request_object() -> None:
    a = build_audit_configmap(REF, spec(), final_status(), None)
    b = build_audit_configmap(REF.__class__(REF.name, REF.namespace, "other-uid"), spec(), final_status(), None)
    assert a["metadata"]["name"] != b["metadata"]["name"]


def test_a_rejected_invalid_request_keeps_its_spec_as_submitted() -> None:
    raw = raw_spec(**{"forget.indices": [3, 3], "model.name": "Not A Label!"})
    rejected = st.rejected(None, st.REASON_INVALID_SPEC, "spec.forget: forget.indices has duplicates", 1, T)
    cm = build_audit_configmap(REF, raw, rejected, None)
    outcome = json.loads(cm["data"]["outcome.json"])
    assert (outcome["phase"], outcome["reason"]) == ("Rejected", "InvalidSpec")
    assert outcome["message"] == "spec.forget: forget.indices has duplicates"
    submitted = json.loads(cm["data"]["request.json"])
    assert submitted["forget"]["indices"] == "<2 indices, see record.json forgetDigest>"
    assert submitted["model"]["name"] == "Not A Label!"
    # Not a valid label value: the label is left empty rather than making the ConfigMap invalid.
    assert cm["metadata"]["labels"]["unlearn.dev/model"] == ""
    assert "record.json" not in cm["data"]


def test_a_huge_submitted_spec_is_not_copied() -> None:
    raw = raw_spec(**{"model.architecture": {"torchvision": "resnet18", "kwargs": {"blob": "x" * 100_000}}})
    cm = build_audit_configmap(REF, raw, st.rejected(None, st.REASON_INVALID_SPEC, "bad", 1, T), None)
    assert json.loads(cm["data"]["request.json"]).startswith("<the submitted spec, ")
    assert len(cm["data"]["request.json"]) < 200


def test_deleted_while_running_and_the_lineage_digest() -> None:
    status = st.failed(final_status(), st.REASON_REQUEST_DELETED, "deleted while Job x ran", T)
    status["phase"] = PHASE_DELETED
    cm = build_audit_configmap(REF, spec(), status, None, lineage_digest="d" * 64)
    outcome = json.loads(cm["data"]["outcome.json"])
    assert (outcome["phase"], outcome["reason"]) == ("Deleted", "RequestDeleted")
    assert outcome["lineageDigest"] == "d" * 64
    assert "lineageDigest" not in json.loads(build_audit_configmap(REF, spec(), status, None)["data"]["outcome.json"])
