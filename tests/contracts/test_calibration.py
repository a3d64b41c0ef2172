"""The calibration spec: what it accepts, and the message it gives for what it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from unlearning_contracts.calibration import (
    DEFAULT_FOLDS,
    BankFile,
    CalibrationManifest,
    CalibrationRecord,
    FoldRecord,
    Likeness,
    ReferenceLikeness,
    UnlearningCalibrationSpec,
    compact_calibration,
    compact_fold,
    load_any_manifest,
    parse_any_manifest,
    parse_calibration_manifest,
)
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT, InputModel
from unlearning_contracts.spec import (
    MAX_IMAGE_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_COMPONENT_BYTES,
    CalibrationUse,
    Location,
    Manifest,
    SpecError,
    load_manifest,
)

pytestmark = pytest.mark.unit


def spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"name": "digits", "source": {"claimName": "models", "path": "digits/digits-mlp.pt2"}},
        "recipe": {"epochs": 150, "batchSize": 64, "optimizer": {"lr": 1e-3}},
        "output": {"location": {"claimName": "models", "path": "calibrations/digits"}},
    }
    raw.update(overrides)
    return raw


def test_defaults() -> None:
    parsed = UnlearningCalibrationSpec.model_validate(spec())
    assert parsed.folds == DEFAULT_FOLDS == 10
    assert parsed.recipe.optimizer.name == "adam"
    assert parsed.recipe.schedule.name == "constant"
    assert parsed.recipe.augmentations == []
    assert parsed.data.source == "digits"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"folds": 1}, "greater than or equal to 2"),
        ({"folds": 33}, "less than or equal to 32"),
        ({"recipe": {"epochs": 0, "batchSize": 64, "optimizer": {"lr": 1e-3}}}, "greater than or equal to 1"),
        (
            {"recipe": {"epochs": 5, "batchSize": 64, "optimizer": {"name": "adam", "lr": 1e-3, "momentum": 0.9}}},
            "momentum and nesterov apply to sgd only",
        ),
        (
            {"recipe": {"epochs": 5, "batchSize": 64, "optimizer": {"name": "sgd", "lr": 0.1, "nesterov": True}}},
            "nesterov needs a momentum",
        ),
        (
            {"recipe": {"epochs": 5, "batchSize": 64, "optimizer": {"lr": 0.1}, "schedule": {"name": "step"}}},
            "stepEpochs is required",
        ),
        (
            {
                "recipe": {
                    "epochs": 5,
                    "batchSize": 64,
                    "optimizer": {"lr": 0.1},
                    "augmentations": ["random-crop", "random-crop"],
                }
            },
            "list each augmentation once",
        ),
        ({"recipe": {"epochs": 5, "batchSize": 64, "optimizer": {"lr": 0.1}, "typo": 1}}, "Extra inputs"),
    ],
)
def test_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UnlearningCalibrationSpec.model_validate(spec(**overrides))


def test_sgd_recipe() -> None:
    recipe = {
        "epochs": 30,
        "batchSize": 128,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weightDecay": 5e-4},
        "schedule": {"name": "cosine", "warmupEpochs": 1},
        "augmentations": ["random-crop", "horizontal-flip"],
    }
    parsed = UnlearningCalibrationSpec.model_validate(spec(recipe=recipe))
    assert parsed.recipe.optimizer.momentum == 0.9
    assert parsed.recipe.schedule.warmup_epochs == 1


def test_records_round_trip_camel_case() -> None:
    fold = FoldRecord(calibration="ns/cal", fold=2, exit_code=0, started_at="t0", finished_at="t1")
    assert fold.dump()["exitCode"] == 0
    assert FoldRecord.model_validate(fold.dump()) == fold
    assert FoldRecord.model_validate({**fold.dump(), "somethingNew": 1}) == fold
    record = CalibrationRecord(
        calibration="ns/cal", model="digits", folds=4, seed=0, exit_code=0, started_at="t0", finished_at="t1"
    )
    dumped = record.dump()
    assert dumped["calibration"] == "ns/cal"
    # A newer job may add fields an older operator does not know: the record still parses.
    assert CalibrationRecord.model_validate({**dumped, "somethingNew": 1}) == record


# -- manifests of either kind ------------------------------------------------------------------------------


def calibration_manifest(**spec_overrides: Any) -> dict[str, Any]:
    return {
        "apiVersion": "unlearn.dev/v1alpha1",
        "kind": "UnlearningCalibration",
        "metadata": {"name": "digits", "namespace": "team"},
        "spec": spec(**spec_overrides),
    }


def test_calibration_manifest_parses_and_names_itself() -> None:
    parsed = parse_calibration_manifest(calibration_manifest(folds=8))
    assert parsed.spec.folds == 8
    assert parsed.calibration_id == "team/digits"
    assert isinstance(parse_any_manifest(calibration_manifest()), CalibrationManifest)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**calibration_manifest(), "apiVersion": "unlearn.dev/v2"}, "apiVersion must be unlearn.dev/v1alpha1"),
        (calibration_manifest(folds=40), "manifest.spec.folds"),
        ([1, 2], "expected a YAML mapping"),
        ({**calibration_manifest(), "data": {"source": "digits"}}, "manifest.data: unknown top-level field"),
        (calibration_manifest(recipe={**spec()["recipe"], "epoch": 3}), "manifest.spec.recipe.epoch: unknown field"),
        (calibration_manifest(folds=True), "manifest.spec.folds: Input should be a valid integer"),
        (calibration_manifest(folds="4"), "manifest.spec.folds: Input should be a valid integer"),
        ({**calibration_manifest(), "metadata": {"name": "Not_A_Name"}}, "manifest.metadata.name"),
    ],
)
def test_calibration_manifest_refused(raw: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_calibration_manifest(raw)


def test_calibration_manifest_files_are_read_bounded_and_strictly(tmp_path: Path) -> None:
    """The request's reader (safe_yaml): a key given twice, an alias bomb, an empty file are refused."""
    text = yaml.safe_dump(calibration_manifest())
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "kind: UnlearningCalibration\n")
    with pytest.raises(SpecError, match="kind"):
        load_any_manifest(twice)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(8)
        )
    )
    with pytest.raises(SpecError, match="aliases"):
        load_any_manifest(bomb)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="empty: expected one UnlearningRequest or UnlearningCalibration document"):
        load_any_manifest(empty)


def test_any_manifest_dispatches_on_kind(tmp_path: Path) -> None:
    request = {
        "apiVersion": "unlearn.dev/v1alpha1",
        "kind": "UnlearningRequest",
        "metadata": {"name": "r"},
        "spec": {
            "model": {"name": "digits", "source": {"path": "m.pt2"}},
            "forget": {"indices": [1]},
            "output": {"location": {"path": "out"}},
        },
    }
    assert isinstance(parse_any_manifest(request), Manifest)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(calibration_manifest()))
    assert isinstance(load_any_manifest(path), CalibrationManifest)
    with pytest.raises(SpecError, match="Input should be 'UnlearningRequest'"):
        load_manifest(path)  # a request loader names the kind it expects
    with pytest.raises(SpecError, match="Input should be 'UnlearningRequest'"):
        parse_any_manifest({**request, "kind": "Unknown"})


def test_request_calibration_policy_defaults_to_if_available() -> None:
    assert CalibrationUse().policy == "IfAvailable"
    assert CalibrationUse(policy="Required", name="digits").name == "digits"
    with pytest.raises(ValidationError):
        CalibrationUse.model_validate({"policy": "Always"})
    with pytest.raises(ValidationError):
        CalibrationUse.model_validate({"name": "Not_A_Name"})


def _longest_uri(char: str) -> str:
    """A pvc:// uri whose path is as long as the spec allows, made of ``char``."""
    size = len(char.encode())
    component = char * (MAX_PATH_COMPONENT_BYTES // size)
    parts: list[str] = []
    while len("/".join([*parts, component]).encode()) <= MAX_PATH_BYTES:
        parts.append(component)
    rest = MAX_PATH_BYTES - len("/".join(parts).encode()) - 1
    if rest >= size:
        parts.append(char * (rest // size))
    return Location(claim_name="c" * 63, path="/".join(parts)).uri  # the spec accepts it


@pytest.mark.parametrize("char", ['"', "\\", "é", "日", "\U0001f600", "a"])
def test_the_worst_calibration_records_the_spec_allows_still_fit(char: str) -> None:
    """Every string at its bound (the spec's paths and names, the job's image and device, a long error):
    the compact records fit the termination message and keep what the operator reads whole."""
    uri = _longest_uri(char)
    name = f"{'s' * 63}/{'n' * 253}"
    reference = ReferenceLikeness(
        fold=31,
        train_rows=10**9,
        held_out_rows=10**8,
        test_accuracy=99.123,
        fold_accuracy=99.123,
        agreement=99.123,
        duration_seconds=604800.123,
    )
    bank = BankFile(uri=f"{uri}/bank.npz", sha256="b" * 64)
    record = CalibrationRecord(
        calibration=name,
        model="m" * 63,
        input_model=InputModel(uri=uri, sha256="a" * 64),
        data_digest="d" * 64,
        folds=32,
        seed=2**63,
        exit_code=0,
        bank=bank,
        original_test_accuracy=99.0,
        likeness=Likeness(
            test_accuracy_mean=99.1,
            test_accuracy_min=99.1,
            fold_accuracy_mean=99.1,
            fold_accuracy_min=99.1,
            agreement_mean=99.1,
            agreement_min=99.1,
        ),
        references=[reference.model_copy(update={"fold": k}) for k in range(32)],
        cost={k: 1e12 for k in ("wallSeconds", "deviceSeconds", "trainSeconds", "steps", "retrainEquivalents")},
        recipe={},
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:00+00:00",
        job_image=char * (MAX_IMAGE_BYTES // len(char.encode())),
        code_version="0.1.0",
    )
    text = compact_calibration(record)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = CalibrationRecord.model_validate_json(text)
    assert parsed.bank == bank  # where the bank is and its digest, whole
    assert parsed.input_model is not None
    assert parsed.input_model.sha256 == "a" * 64
    assert parsed.likeness == record.likeness
    failed = record.model_copy(update={"exit_code": 4, "bank": None, "error": char * 1000})
    assert len(compact_calibration(failed).encode()) <= TERMINATION_MESSAGE_LIMIT
    fold = FoldRecord(
        calibration=name,
        fold=31,
        exit_code=1,
        error=char * (1000 // len(char.encode())),
        reference=reference,
        outputs=BankFile(uri=f"{uri}/fold-31.npz", sha256="f" * 64),
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:00+00:00",
        device=char * (64 // len(char.encode())),
    )
    text = compact_fold(fold)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert FoldRecord.model_validate_json(text).outputs == fold.outputs


def test_an_ordinary_calibration_record_is_not_shortened() -> None:
    record = CalibrationRecord(
        calibration="team/digits",
        model="digits-mlp",
        folds=4,
        seed=0,
        exit_code=0,
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:00+00:00",
        job_image="job:1",
    )
    assert "truncated" not in json.loads(compact_calibration(record))
