"""How a request asks for its model's bank (spec.calibration), and how its record says whether it used one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.factories import raw_spec
from unlearning_contracts.calibration import MAX_CALIBRATION_NAME_LENGTH, parse_calibration_spec
from unlearning_contracts.record import CalibrationUsed, CompactRecord, ResultRecord, compact
from unlearning_contracts.spec import SpecError, parse_spec

pytestmark = pytest.mark.unit


def test_default_is_if_available() -> None:
    use = parse_spec(raw_spec()).calibration
    assert (use.policy, use.name) == ("IfAvailable", None)


@pytest.mark.parametrize(
    ("use", "words"),
    [
        ({"policy": "Sometimes"}, "spec.calibration.policy: Input should be 'IfAvailable', 'Required' or 'Disabled'"),
        ({"name": "Digits_Cal"}, "spec.calibration.name: String should match pattern"),
        ({"policy": "Required", "typo": 1}, "spec.calibration.typo: unknown field"),
    ],
)
def test_refused_with_the_field_to_change(use: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(raw_spec(calibration=use))


def test_calibration_spec_errors_name_the_field() -> None:
    raw = {
        "model": {"name": "m", "source": {"path": "m.pt2"}},
        "recipe": {"epochs": 1, "batchSize": 8, "optimizer": {"lr": 0.1}},
        "folds": 1,
        "output": {"location": {"path": "out"}},
    }
    with pytest.raises(SpecError, match=r"spec.folds: Input should be greater than or equal to 2"):
        parse_calibration_spec(raw)
    assert MAX_CALIBRATION_NAME_LENGTH == 48


def record(**calibration: Any) -> ResultRecord:
    return ResultRecord.model_validate(
        {
            "requestId": "GDPR-1",
            "requestName": "r",
            "namespace": "a",
            "model": "m",
            "method": "scrub",
            "verdict": "Passed",
            "exitCode": 0,
            "startedAt": "t0",
            "finishedAt": "t1",
            **({"calibration": calibration} if calibration else {}),
        }
    )


def test_the_record_names_the_bank_and_the_compact_copy_keeps_it() -> None:
    used = {"name": "a/cal", "uri": "pvc://banks/c/bank.npz", "sha256": "ba" * 32, "calibrated": True, "note": ""}
    full = record(**used)
    assert full.dump()["calibration"] == used
    parsed = CompactRecord.model_validate(json.loads(compact(full)))
    assert parsed.calibration == CalibrationUsed.model_validate(used)
    # Without a bank: calibrated false and why.
    plain = record(calibrated=False, note="no bank was given: run without --calibration-bank")
    assert CompactRecord.model_validate(json.loads(compact(plain))).calibration == CalibrationUsed(
        calibrated=False, note="no bank was given: run without --calibration-bank"
    )
    # A record from a job that predates the field parses as uncalibrated, saying no bank was given.
    old = json.loads(compact(record()))
    del old["calibration"]
    assert CompactRecord.model_validate(old).calibration == CalibrationUsed(note="no calibration bank was given")
