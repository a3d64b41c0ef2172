"""The calibration spec: what it accepts, and the message it gives for what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from unlearning_contracts.calibration import (
    DEFAULT_FOLDS,
    CalibrationManifest,
    CalibrationRecord,
    FoldRecord,
    UnlearningCalibrationSpec,
    load_any_manifest,
    parse_any_manifest,
    parse_calibration_manifest,
)
from unlearning_contracts.spec import CalibrationUse, Manifest, SpecError, load_manifest

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
    assert parsed.folds == DEFAULT_FOLDS == 4
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
