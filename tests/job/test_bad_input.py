"""Every kind of bad input ends with exit code 4 and one line naming the field or file.

Each case also checks that the input model's bytes are unchanged and that no
output (model, record, temporary file) was left in the output folder.
Divergence is not bad input: it is a failed attempt (exit code 3).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.job.conftest import RunCli, request
from unlearn import cli
from unlearn.data import declared_split, load_digits_arrays
from unlearn.demo import mlp
from unlearning_contracts.record import EXIT_GATES_FAILED, EXIT_INVALID_INPUT

pytestmark = pytest.mark.job

Case = Callable[[Path, Path], dict[str, Any]]  # (workdir with a copy of the model, output dir) -> manifest


def _digits_npz(path: Path, *, features: int = 64, label_shift: int = 0, nan: bool = False) -> Path:
    full = load_digits_arrays()
    train_rows, _ = declared_split(len(full), 0.25, 0)
    x, y = full.x[train_rows][:, :features].copy(), full.y[train_rows].copy()
    if label_shift:
        y[5] = 9 + label_shift
    if nan:
        x[7, 3] = np.nan
    np.savez(path, x=x, y=y)
    return path


def _npz_spec(path: Path) -> dict[str, Any]:
    return {"data": {"source": "npz", "train": {"path": str(path)}, "testFraction": 0.2}}


def _model(work: Path) -> str:
    return str(work / "digits-mlp.pt2")


CASES: dict[str, tuple[Case, str]] = {
    "missing model": (
        lambda w, o: request(str(w / "nope.pt2"), str(o)),
        "model.source",
    ),
    "model that does not load": (
        lambda w, o: request(str(_garbage(w / "broken.pt2")), str(o)),
        "cannot load as model.format exported",
    ),
    "model file is a folder": (
        lambda w, o: request(str(w), str(o)),
        "model.source",
    ),
    "missing data file": (
        lambda w, o: request(_model(w), str(o), spec=_npz_spec(w / "absent.npz")),
        "data.train",
    ),
    "unreadable data file": (
        lambda w, o: request(_model(w), str(o), spec=_npz_spec(_garbage(w / "bad.npz"))),
        "cannot read as .npz",
    ),
    "shape mismatch": (
        lambda w, o: request(_model(w), str(o), spec=_npz_spec(_digits_npz(w / "narrow.npz", features=32))),
        "data: samples have shape (32,)",
    ),
    "label out of range": (
        lambda w, o: request(_model(w), str(o), spec=_npz_spec(_digits_npz(w / "labels.npz", label_shift=3))),
        "label 12 is out of range",
    ),
    "NaN in the data": (
        lambda w, o: request(_model(w), str(o), spec=_npz_spec(_digits_npz(w / "nan.npz", nan=True))),
        "x contains NaN",
    ),
    "index out of range": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indices": [1, 5000]}}),
        "forget.indices: index 5000 is out of range",
    ),
    "duplicated inline index": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indices": [1, 2, 1]}}),
        "forget.indices has duplicates",
    ),
    "duplicated index in a file": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indicesFile": {"path": str(_json(w, [4, 4]))}}}),
        "index 4 appears more than once",
    ),
    "empty inline forget set": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indices": []}}),
        "forget.indices is empty",
    ),
    "empty forget file": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indicesFile": {"path": str(_text(w, ""))}}}),
        "the forget set is empty",
    ),
    "missing forget file": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indicesFile": {"path": str(w / "none.txt")}}}),
        "forget.indicesFile",
    ),
    "forget share over maxShare": (
        lambda w, o: request(_model(w), str(o), spec={"forget": {"indices": list(range(300)), "maxShare": 0.2}}),
        "over forget.maxShare 20%",
    ),
    "model gives non-finite outputs": (
        lambda w, o: request(str(_infinite_model(w)), str(o)),
        "non-finite outputs",
    ),
    "weights that do not fit the architecture": (
        lambda w, o: request(
            str(_mlp_safetensors(w)),
            str(o),
            spec={
                "model": {
                    "name": "digits-mlp",
                    "format": "state-dict",
                    "source": {"path": str(w / "mlp.safetensors")},
                    "architecture": {"torchvision": "resnet18", "kwargs": {"num_classes": 10}},
                }
            },
        ),
        "do not fit model.architecture",
    ),
    "output over the input": (
        lambda w, o: request(str(shutil.copy(w / "digits-mlp.pt2", w / "digits-mlp-v1.pt2")), str(w)),
        "output.location",
    ),
}


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a model\x00\x01")
    return path


def _json(work: Path, values: list[int]) -> Path:
    path = work / "forget.json"
    path.write_text(json.dumps(values))
    return path


def _text(work: Path, text: str) -> Path:
    path = work / "forget.txt"
    path.write_text(text)
    return path


def _infinite_model(work: Path) -> Path:
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    path = work / "inf.pt2"
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return path


def _mlp_safetensors(work: Path) -> Path:
    path = work / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_code_and_one_line(case: str, demo_root: Path, tmp_path: Path, run_cli: RunCli) -> None:
    build, expected = CASES[case]
    work = tmp_path / "in"
    work.mkdir()
    shutil.copy(demo_root / "models" / "digits" / "digits-mlp.pt2", work / "digits-mlp.pt2")
    out = tmp_path / "out"
    manifest = build(work, out)
    model_path = Path(manifest["spec"]["model"]["source"]["path"])
    before = model_path.read_bytes() if model_path.is_file() else None
    inputs_before = sorted(p.name for p in work.iterdir())

    result = run_cli(manifest, "--model-version", "1")

    assert result.code == EXIT_INVALID_INPUT, result.stderr[-1500:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert expected in error_lines[0], error_lines[0]
    if result.record is not None:  # a spec error stops before a record exists
        assert expected in result.record["error"]
        assert "\n" not in result.record["error"]
        assert result.record["exitCode"] == EXIT_INVALID_INPUT
        assert "outputModel" not in result.record
    assert result.termination is not None
    assert expected in json.loads(result.termination)["error"]
    if before is not None:
        assert model_path.read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == inputs_before  # nothing written beside the inputs
    assert not out.exists() or not any(out.iterdir())


def test_missing_manifest_is_invalid_input(run_cli: RunCli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "absent.yaml"), "--termination-log", str(tmp_path / "t")]) == 4
    err = capsys.readouterr().err
    assert "absent.yaml: cannot read the manifest" in err


def test_divergence_is_a_failed_verdict_not_a_crash(demo_root: Path, tmp_path: Path, run_cli: RunCli) -> None:
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    before = model.read_bytes()
    manifest = request(
        str(model),
        str(tmp_path / "out"),
        spec={
            "method": {"name": "gradient-ascent", "forget": {"lr": 1.0, "epochs": 30}, "retain": {"epochs": 0}},
            "tuning": {"maxAttempts": 1},
        },
    )
    result = run_cli(manifest)
    assert result.code == EXIT_GATES_FAILED
    assert result.record is not None
    assert result.record["verdict"] == "Failed"
    assert result.record["reasons"][0].startswith("diverged: the forget (ascent) loss")
    assert "lower method.forget.lr" in result.record["reasons"][0]
    assert "post" not in result.record["attempts"][0]
    assert model.read_bytes() == before
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["digits-mlp-v1.failed.json"]  # the record of what was tried, and no model


class _BreaksOnLargeBatches(nn.Module):
    """Loads and passes the two-sample probe, then fails like a crash would (a bug, not bad input)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("simulated CUDA error: an illegal memory access")
        return self.net(x)  # type: ignore[no-any-return]


def breaks_on_large_batches() -> nn.Module:
    return _BreaksOnLargeBatches()


def test_an_unexpected_error_is_retryable_and_recorded(tmp_path: Path, run_cli: RunCli) -> None:
    weights = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in breaks_on_large_batches().state_dict().items()}, str(weights))
    before = weights.read_bytes()
    manifest = request(
        str(weights),
        str(tmp_path / "out"),
        spec={
            "model": {
                "name": "digits-mlp",
                "format": "state-dict",
                "source": {"path": str(weights)},
                "architecture": {"factory": "tests.job.test_bad_input:breaks_on_large_batches"},
            }
        },
    )
    result = run_cli(manifest)
    assert result.code not in (0, EXIT_GATES_FAILED, EXIT_INVALID_INPUT)
    assert result.record is not None
    assert result.record["exitCode"] == result.code
    assert result.record["error"].startswith("unexpected error: RuntimeError: simulated CUDA error")
    assert result.termination is not None
    assert json.loads(result.termination)["exitCode"] == result.code
    assert weights.read_bytes() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
