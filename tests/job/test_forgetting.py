"""Forgetting, judged against a model retrained without the forget set.

The forget set is 40 deliberately mislabelled training samples: the original
model memorised their wrong labels, a retrained model predicts their true
classes. Accuracy under the wrong labels is therefore the memorisation signal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from tests.job.conftest import Mislabelled, RunCli, request
from unlearn.engine import Context, predict
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT, result_json_schema

pytestmark = pytest.mark.job


def noisy_request(world: Mislabelled, output: Path, method: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data": {
            "source": "npz",
            "train": {"path": str(world.root / "data" / "train.npz")},
            "test": {"path": str(world.root / "data" / "test.npz")},
        },
        "forget": {"indices": world.forget},
    }
    if method is not None:
        spec["method"] = method
    return request(str(world.model), str(output), name="digits-noisy", spec=spec)


def test_the_original_memorised_and_retraining_forgets(mislabelled: Mislabelled) -> None:
    # The premise of the tests below, checked rather than assumed.
    assert mislabelled.original_forget_accuracy >= 95.0
    assert mislabelled.retrained_forget_accuracy <= 10.0


def test_default_method_forgets_like_retraining_and_keeps_test_accuracy(
    mislabelled: Mislabelled, run_cli: RunCli, tmp_path: Path
) -> None:
    out = tmp_path / "versions"
    before = mislabelled.model.read_bytes()
    result = run_cli(noisy_request(mislabelled, out))
    record = result.record
    assert record is not None
    assert result.code == 0, record["reasons"]
    assert record["verdict"] == "Passed"
    post, pre = record["post"], record["pre"]
    assert pre["forgetAccuracy"] == pytest.approx(mislabelled.original_forget_accuracy)
    assert abs(post["forgetAccuracy"] - mislabelled.retrained_forget_accuracy) <= 10.0
    assert post["testAccuracy"] >= mislabelled.original_test_accuracy - 2.0
    # The default membership gate (the label-free classifier) failed the original and not the unlearned model.
    assert pre["intervals"]["miaClassifierAccuracy"]["low"] > 0.6
    assert post["intervals"]["miaClassifierAccuracy"]["low"] <= 0.6
    assert post["intervals"]["forgetAccuracy"]["n"] == len(mislabelled.forget)
    assert post["intervals"]["testAccuracyDrop"]["high"] <= 2.0
    assert {g["gate"] for g in record["attempts"][-1]["gates"]} == {"maxTestAccuracyDrop", "maxMiaClassifierAccuracy"}

    # The published model is the audited one, the record beside it is complete and valid.
    model_path = out / "digits-noisy-v1.pt2"
    assert record["outputModel"]["uri"].endswith("digits-noisy-v1.pt2")
    saved = torch.export.load(str(model_path)).module()
    data = np.load(mislabelled.root / "data" / "train.npz")
    forget = np.asarray(mislabelled.forget)
    logits = predict(saved, torch.from_numpy(data["x"][forget]), Context(torch.device("cpu"), 10))
    assert 100.0 * np.mean(logits.argmax(1) == data["y"][forget]) == pytest.approx(post["forgetAccuracy"])
    beside = json.loads((out / "digits-noisy-v1.json").read_text())
    jsonschema.validate(beside, result_json_schema())
    assert beside["outputModel"]["sha256"] == record["outputModel"]["sha256"]
    assert len(result.termination.encode()) <= TERMINATION_MESSAGE_LIMIT  # type: ignore[union-attr]
    assert mislabelled.model.read_bytes() == before  # the input is never touched


def test_tutorial_gradient_ascent_defaults_leave_the_memorised_labels_and_the_gates_say_so(
    mislabelled: Mislabelled, run_cli: RunCli, tmp_path: Path
) -> None:
    """The classic defaults (Adam 1e-4 x 5 epochs ascent, 5e-5 x 3 epochs fine-tune), reported honestly."""
    result = run_cli(
        noisy_request(mislabelled, tmp_path / "v", {"name": "gradient-ascent"}),
        "--model-version",
        "7",
    )
    record = result.record
    assert record is not None
    first = record["attempts"][0]
    assert first["hyperparameters"]["forget_lr"] == 1e-4
    assert first["hyperparameters"]["forget_epochs"] == 5
    # The ascent barely moves the model: the wrong labels are still predicted, far above retraining...
    assert first["post"]["forgetAccuracy"] >= mislabelled.retrained_forget_accuracy + 50.0
    # ...and the loss attack cannot see it (memorised wrong labels look *less* familiar than held-out rows)...
    assert first["post"]["miaAuc"] < 0.5
    # ...but the default gate, the label-free classifier, does: the attempt fails and the tuner forgets harder.
    assert first["verdict"] == "Failed"
    assert first["failedGates"] == ["maxMiaClassifierAccuracy"]
    assert record["attempts"][1]["hyperparameters"]["forget_lr"] == 2e-4
    assert record["modelVersion"] == 7


def test_demo_runs_and_prints_the_table(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    unlearn = Path(sys.executable).with_name("unlearn")
    cold = subprocess.run([str(unlearn), "demo"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert cold.returncode == 0, cold.stderr[-2000:]
    for row in ("forget accuracy %", "test accuracy %", "MIA loss AUC", "before", "after", "verdict Passed"):
        assert row in cold.stdout
    model = tmp_path / "cache" / "unlearning-operator" / "demo" / "volumes" / "models" / "digits" / "digits-mlp.pt2"
    stamp = model.stat().st_mtime_ns
    warm = subprocess.run([str(unlearn), "demo"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert model.stat().st_mtime_ns == stamp  # the cached model was reused, not retrained
    assert (model.parent / "versions" / "digits-mlp-v1.pt2").is_file()
