"""The compact record fits the termination message however a tenant fills the request (record.compact).

Every string that reaches the record is bounded by the spec in UTF-8 bytes;
this fills each one to its bound with the costliest characters (a quote
takes two bytes once escaped in JSON) and checks that the compact record
still fits, keeps what the operator cannot learn elsewhere (the output
model's uri and digest, the verdict, the numbers) and says what it shortened.
"""

from __future__ import annotations

import json

import pytest

from unlearning_contracts.record import (
    MAX_CALIBRATION_NOTE_BYTES,
    TERMINATION_MESSAGE_LIMIT,
    AuditMetrics,
    CalibrationUsed,
    CompactRecord,
    Evidence,
    InputModel,
    OutputModel,
    ResultRecord,
    compact,
    numbers,
    truncate_utf8,
)
from unlearning_contracts.spec import (
    MAX_IMAGE_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_COMPONENT_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_REQUEST_NAME_LENGTH,
    GatesSpec,
    Location,
    ObjectMeta,
    UnlearningRequestSpec,
)

pytestmark = pytest.mark.unit


def _longest_path(char: str) -> str:
    """A valid spec path of MAX_PATH_BYTES bytes made of ``char`` (components at their own bound)."""
    size = len(char.encode())
    component = char * (MAX_PATH_COMPONENT_BYTES // size)
    parts: list[str] = []
    while len("/".join([*parts, component]).encode()) <= MAX_PATH_BYTES:
        parts.append(component)
    rest = MAX_PATH_BYTES - len("/".join(parts).encode()) - 1
    if rest >= size:
        parts.append(char * (rest // size))
    path = "/".join(parts)
    Location(claim_name="c" * 63, path=path)  # the spec accepts it
    return path


def _worst(char: str, error: bool) -> ResultRecord:
    claim = "c" * 63
    path = _longest_path(char)
    model = "m" * 63
    interval = {"low": -123456.789012, "high": -123456.789012, "n": 10**6, "against": 10**6}
    metrics = AuditMetrics.model_validate(
        {name: -123456.789012 for name, *_ in numbers()}
        | {"samples": {"forget": 10**6, "retain": 10**6}}
        | {"intervals": {alias: interval for _, alias, *_ in numbers()}}
    )
    request_id = char * (MAX_REQUEST_ID_BYTES // len(char.encode()))
    UnlearningRequestSpec.model_validate(
        {
            "requestId": request_id,
            "model": {"name": model, "source": {"claimName": claim, "path": path}},
            "forget": {"indices": [1]},
            "output": {"location": {"claimName": claim, "path": path}},
        }
    )
    return ResultRecord(
        request_id=request_id,
        request_name=ObjectMeta(name="n" * 253).name,
        namespace="s" * 63,
        model=model,
        model_version=10**9,
        method="gradient-ascent",
        verdict="Failed" if error else "Passed",
        reasons=[char * 1000] * 50,
        notes=[char * 1000] * 10,
        failed_gates=list(GatesSpec.model_fields),
        exit_code=4 if error else 0,
        error=char * 1000 if error else None,
        forget_samples=10**9,
        forget_digest="f" * 64,
        duration_seconds={k: 604800.123 for k in ("load", "preAudit", "unlearn", "postAudit", "save", "total")},
        input_model=InputModel(uri=Location(claim_name=claim, path=path).uri, sha256="a" * 64),
        output_model=None
        if error
        else OutputModel(
            uri=f"{Location(claim_name=claim, path=path).uri}/{model}-v{10**9}.safetensors",
            sha256="b" * 64,
            format="state-dict",
        ),
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:00+00:00",
        evidence=Evidence(
            calibrated=True,
            targets="bank+class-removed+fallback"[:40],
            removed_classes=list(range(10**6, 10**6 + 20)),
            forget_accuracy=-123456.789,
            target_forget_accuracy=-123456.789,
            target_low=-123456.789,
            target_high=-123456.789,
            estimated_gap=-123456.7891,
            gap_parts={k: -123456.789 for k in ("ua", "ra", "ta", "mia")},
            member_rows=10**9,
            audited_rows=10**9,
            member_p_value=1.23e-300,
            class_readability=-0.1234,
            steps=10**9,
            chosen_step=10**9,
            summary="s" * 300,  # the job writes it, in ASCII
        ),
        calibration=CalibrationUsed(
            name=f"{'s' * 63}/{'n' * 253}",
            uri=Location(claim_name=claim, path=path).uri,
            sha256="c" * 64,
            calibrated=not error,
            note=char * (MAX_CALIBRATION_NOTE_BYTES // len(char.encode())),
        ),
        device=char * (64 // len(char.encode())),
        job_image=char * (MAX_IMAGE_BYTES // len(char.encode())),
        code_version="0.1.0",
        pre=metrics,
        post=metrics,
    )


@pytest.mark.parametrize("char", ['"', "\\", "é", "日", "\U0001f600", "a"])
@pytest.mark.parametrize("error", [False, True])
def test_the_worst_record_the_spec_allows_still_fits(char: str, error: bool) -> None:
    record = _worst(char, error)
    text = compact(record)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = CompactRecord.model_validate(json.loads(text))
    assert parsed.verdict == record.verdict
    assert parsed.post is not None
    assert parsed.model == record.model
    if record.output_model is not None:
        assert parsed.output_model == record.output_model  # the lineage needs it whole
    assert parsed.reasons_truncated
    assert parsed.notes_truncated
    assert parsed.post.forget_accuracy == round(-123456.789012, 4)  # the numbers always stay
    assert parsed.truncated  # and says what it shortened
    assert "outputModel.uri" not in parsed.truncated
    assert parsed.calibration.sha256 == record.calibration.sha256  # which bank, whole
    assert parsed.calibration.calibrated == record.calibration.calibrated


def test_an_ordinary_record_is_not_shortened() -> None:
    record = _worst("a", error=False).model_copy(
        update={
            "reasons": ["miaAuc 0.710 > maxMiaAuc 0.600"],
            "failed_gates": ["maxMiaAuc"],
            "request_id": "GDPR-1",
            "job_image": "job:1",
        }
    )
    record = record.model_copy(
        update={
            "input_model": InputModel(uri="pvc://models/digits/digits-mlp.pt2", sha256="a" * 64),
            "output_model": OutputModel(uri="pvc://models/v/m-v2.pt2", sha256="b" * 64, format="exported"),
            "request_name": "r" * MAX_REQUEST_NAME_LENGTH,
            "calibration": CalibrationUsed(
                name="team/digits-mlp",
                uri="pvc://banks/digits/digits-mlp-0a1b2c3d/bank.npz",
                sha256="c" * 64,
                calibrated=True,
                note="the bank was made for this very model file",
            ),
        }
    )
    parsed = CompactRecord.model_validate(json.loads(compact(record)))
    assert parsed.truncated == []
    assert parsed.calibration == record.calibration
    assert not parsed.reasons_truncated
    assert parsed.reasons == ["miaAuc 0.710 > maxMiaAuc 0.600"]


@pytest.mark.parametrize(
    ("text", "size", "kept"), [("abc", 2, "ab"), ("日本", 5, "日"), ("日本", 6, "日本"), ("é", 1, "")]
)
def test_truncate_utf8_cuts_on_a_character(text: str, size: int, kept: str) -> None:
    assert truncate_utf8(text, size) == kept
