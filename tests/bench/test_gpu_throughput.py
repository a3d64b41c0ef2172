"""The GPU throughput script runs end to end on the CPU with ``--smoke`` (tiny sizes, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import gpu_throughput

pytestmark = pytest.mark.job


def test_smoke_run_measures_every_loop_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_throughput.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    names = [m["name"] for m in doc["measurements"]]
    assert names[0] == "tutorial loop (DataLoader)"
    assert any(n.startswith("engine loop") for n in names)
    assert any(n.startswith("unlearn: " + doc["defaultMethod"]) for n in names)
    assert any(n.startswith("retrain") for n in names)
    for m in doc["measurements"]:
        assert m["error"] == ""
        assert m["samples"] > 0
        assert m["samplesPerSecond"] > 0
    (speed,) = doc["speedups"]  # on the CPU only float32 runs
    assert speed["precision"] == "fp32"
    assert speed["speedupMeasured"] > 0
    assert speed["retrainSecondsExtrapolated"] == pytest.approx(
        speed["retrainSeconds"] / speed["retrainEpochs"] * speed["recipeEpochs"]
    )
    printed = capsys.readouterr().out
    assert "EXTRAPOLATED" in printed
    assert "samples/s" in printed


def test_no_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # On a machine with a GPU, the GPU is hidden (as CUDA_VISIBLE_DEVICES="" would hide it) so the case runs.
    monkeypatch.setattr(gpu_throughput.torch.cuda, "is_available", lambda: False)
    assert gpu_throughput.main(["--out", "/dev/null"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_samples_trained_counts_every_pass_of_each_method() -> None:
    base = gpu_throughput.engine_hyper(batch=64, mixed_precision=False)
    fixed = {"forget_epochs": 2, "retain_epochs": 3, "forget_batch": 64, "retain_batch": 64}
    count = gpu_throughput.samples_trained
    assert count(replace(base, **fixed), 10, 100) == 2 * 10 + 3 * 100  # ascent passes, then fine-tuning passes
    assert count(replace(base, method="scrub", **fixed), 10, 100) == 2 * 10 + 3 * 100
    # scrub's max steps have a floor: 4 steps of the 10-row forget set per phase, however small it is.
    assert count(replace(base, method="scrub", forget_steps_floor=4, **fixed), 10, 100) == 2 * 4 * 10 + 3 * 100
    # Every retain step (2 of them for 100 samples) carries a forget batch of min(64, 10) samples.
    assert count(replace(base, method="neggrad-plus", **fixed), 10, 100) == 2 * (100 + 2 * 10) + 3 * 100
    assert count(replace(base, method="retrain", **fixed), 10, 100) == 3 * 100
