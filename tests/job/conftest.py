"""Shared fixtures of the job tier: real digits models, trained once per session.

* ``demo_root``: a volume root whose ``models`` claim holds the demo model
  (``unlearn prepare-demo``), trained on the clean digits split.
* ``mislabelled``: the same architecture trained on a copy of the digits
  training data in which 40 samples carry a wrong label. The model memorises
  them (it predicts the wrong labels); a model retrained without them does not.
  Its numbers are what the unlearning tests are judged against.

One thread: the models are small, and on a shared two-core machine a second
OpenMP thread makes each step many times slower, not faster.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from unlearn import cli
from unlearn.bank import Bank, load_bank
from unlearn.data import declared_split, load_digits_arrays
from unlearn.demo import RECIPE, export_to, prepare_demo, train_digits_model
from unlearn.engine import Context, predict
from unlearning_contracts.calibration import CalibrationRecord

torch.set_num_threads(1)

MISLABELLED_COUNT = 40


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Volume root with the demo model at models/digits/digits-mlp.pt2."""
    root = tmp_path_factory.mktemp("volumes")
    prepare_demo(root / "models")
    return root


@dataclass(frozen=True)
class Mislabelled:
    root: Path  # volume root (claims: models, data)
    model: Path  # the original (memorising) model, .pt2
    retrained: Path  # the same recipe without the forget set, .pt2 (what unlearning should approach)
    forget: list[int]  # training rows whose labels are wrong
    original_forget_accuracy: float  # under the wrong labels, percent
    original_test_accuracy: float
    retrained_forget_accuracy: float  # retrained without the forget set, under the wrong labels
    retrained_test_accuracy: float


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = predict(model, torch.from_numpy(x), Context(device=torch.device("cpu"), num_classes=10))
    return float(100.0 * np.mean(logits.argmax(1) == y))


@pytest.fixture(scope="session")
def mislabelled(tmp_path_factory: pytest.TempPathFactory) -> Mislabelled:
    root = tmp_path_factory.mktemp("mislabelled")
    full = load_digits_arrays()
    train_rows, test_rows = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    train, test = full.take(train_rows), full.take(test_rows)
    rng = np.random.default_rng(7)
    forget = np.sort(rng.choice(len(train), MISLABELLED_COUNT, replace=False))
    y = train.y.copy()
    y[forget] = (y[forget] + rng.integers(1, 10, len(forget))) % 10  # a wrong label, never the true one
    (root / "data").mkdir()
    np.savez(root / "data" / "train.npz", x=train.x, y=y)
    np.savez(root / "data" / "test.npz", x=test.x, y=test.y)

    x = torch.from_numpy(train.x)
    original = train_digits_model(x, torch.from_numpy(y))
    model_path = root / "models" / "noisy" / "digits-noisy.pt2"
    export_to(original, x, model_path)
    keep = np.setdiff1d(np.arange(len(y)), forget)
    retrained = train_digits_model(x[keep], torch.from_numpy(y[keep]))
    retrained_path = root / "models" / "noisy" / "digits-noisy-retrained.pt2"
    export_to(retrained, x, retrained_path)
    return Mislabelled(
        root=root,
        model=model_path,
        retrained=retrained_path,
        forget=[int(i) for i in forget],
        original_forget_accuracy=_accuracy(original, train.x[forget], y[forget]),
        original_test_accuracy=_accuracy(original, test.x, test.y),
        retrained_forget_accuracy=_accuracy(retrained, train.x[forget], y[forget]),
        retrained_test_accuracy=_accuracy(retrained, test.x, test.y),
    )


def request(model: str, output: str, *, name: str = "digits-mlp", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest dict with plain paths; ``spec`` entries replace the defaults."""
    body: dict[str, Any] = {
        "requestId": "TEST-1",
        "model": {"name": name, "format": "exported", "source": {"path": model}},
        "data": {"source": "digits"},
        "forget": {"indices": [3, 17, 42, 58, 91, 104, 133, 178, 202, 251]},
        "output": {"location": {"path": output}},
    }
    body.update(spec or {})
    return {"apiVersion": "unlearn.dev/v1alpha1", "kind": "UnlearningRequest", "metadata": {"name": "t"}, "spec": body}


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    record: dict[str, Any] | None
    termination: str | None


RunCli = Callable[..., CliResult]


@pytest.fixture
def run_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> RunCli:
    """Write the manifest, run ``unlearn run`` in-process, return code, output and the records."""

    def run(manifest: dict[str, Any], *args: str) -> CliResult:
        path = tmp_path / "request.yaml"
        path.write_text(yaml.safe_dump(manifest))
        result, termination = tmp_path / "result.json", tmp_path / "termination-log"
        result.unlink(missing_ok=True)
        termination.unlink(missing_ok=True)
        code = cli.main(
            ["run", str(path), "--device", "cpu", "--result", str(result), "--termination-log", str(termination), *args]
        )
        out = capsys.readouterr()
        record = json.loads(result.read_text()) if result.exists() else None
        term = termination.read_text() if termination.exists() else None
        return CliResult(code, out.out, out.err, record, term)

    return run


def calibration(
    model: dict[str, Any], data: dict[str, Any], output: str, *, epochs: int = RECIPE.epochs, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "unlearn.dev/v1alpha1",
        "kind": "UnlearningCalibration",
        "metadata": {"name": "digits", "namespace": "team"},
        "spec": {
            "model": model,
            "data": data,
            "recipe": {"epochs": epochs, "batchSize": RECIPE.batch, "optimizer": {"name": "adam", "lr": RECIPE.lr}},
            "output": {"location": {"path": output}},
            **spec,
        },
    }


# -- the mislabelled model's bank (the demo recipe, the default K = 10) ---------------------------------------


@dataclass(frozen=True)
class NoisyBank:
    world: Mislabelled
    folder: Path
    bank: Bank
    record: CalibrationRecord
    labels: np.ndarray  # the training labels the model was trained on (40 wrong)
    true_labels: np.ndarray
    test_labels: np.ndarray
    printed: str
    termination: str


def noisy_data(world: Mislabelled) -> dict[str, Any]:
    return {
        "source": "npz",
        "train": {"path": str(world.root / "data" / "train.npz")},
        "test": {"path": str(world.root / "data" / "test.npz")},
    }


@pytest.fixture(scope="session")
def noisy_bank(mislabelled: Mislabelled, tmp_path_factory: pytest.TempPathFactory) -> NoisyBank:
    where = tmp_path_factory.mktemp("noisy-bank")
    folder = where / "bank"
    manifest = calibration(
        {"name": "digits-noisy", "source": {"path": str(mislabelled.model)}}, noisy_data(mislabelled), str(folder)
    )
    path = where / "calibration.yaml"
    path.write_text(yaml.safe_dump(manifest))
    termination = where / "termination-log"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["calibrate", str(path), "--device", "cpu", "--termination-log", str(termination)])
    assert code == 0, termination.read_text()
    record = CalibrationRecord.model_validate_json((folder / "bank.json").read_text())
    assert record.bank is not None
    full = load_digits_arrays()
    train_rows, test_rows = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    with np.load(mislabelled.root / "data" / "train.npz") as archive:
        labels = archive["y"]
    return NoisyBank(
        world=mislabelled,
        folder=folder,
        bank=load_bank(folder / "bank.npz", record.bank.sha256),
        record=record,
        labels=labels,
        true_labels=full.y[train_rows],
        test_labels=full.y[test_rows],
        printed=out.getvalue(),
        termination=termination.read_text(),
    )


# -- the demo model's bank, and models retrained without a typical set and without a class -------------------


@dataclass(frozen=True)
class CleanWorld:
    """The demo model, its bank, and what retraining without each forget set gives (percent)."""

    root: Path
    model: Path
    bank: Path
    bank_sha256: str
    train_labels: np.ndarray
    test_x: np.ndarray
    test_labels: np.ndarray
    typical: list[int]  # a random 10% of the training rows
    unremarkable: list[int]  # the 10% of rows whose references score them alike whether they trained on them or not
    removed_class: int
    class_rows: list[int]  # every training row of removed_class
    retrained_typical_forget_accuracy: float
    retrained_typical_test_accuracy: float
    retrained_class_forget_accuracy: float
    retrained_class_other_test_accuracy: float  # on the held-out rows of the other classes
    retrained_unremarkable_forget_accuracy: float
    train_x: np.ndarray
    retrained: dict[str, torch.nn.Module]  # "typical", "class", "unremarkable"


REMOVED_CLASS = 3


@pytest.fixture(scope="session")
def clean_world(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> CleanWorld:
    """Calibrates the demo model (the default K = 10, the demo recipe) and retrains it three times."""
    where = tmp_path_factory.mktemp("clean-bank")
    folder = where / "bank"
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    path = where / "calibration.yaml"
    path.write_text(
        yaml.safe_dump(
            calibration({"name": "digits-mlp", "source": {"path": str(model)}}, {"source": "digits"}, str(folder))
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["calibrate", str(path), "--device", "cpu", "--termination-log", str(where / "log")])
    assert code == 0, (where / "log").read_text()
    record = CalibrationRecord.model_validate_json((folder / "bank.json").read_text())
    assert record.bank is not None
    full = load_digits_arrays()
    train_rows, test_rows = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    train, test = full.take(train_rows), full.take(test_rows)
    typical = np.sort(np.random.default_rng(11).choice(len(train), len(train) // 10, replace=False))
    class_rows = np.flatnonzero(train.y == REMOVED_CLASS)
    # Rows a model does not remember: the references that trained on them score them (phi) no higher than
    # the one that did not. Chosen from the bank's references alone, never from the original.
    bank = load_bank(folder / "bank.npz", record.bank.sha256)
    everything = np.arange(len(train))
    remembered = bank.in_phi(everything).mean(axis=1) - bank.out_phi(everything)
    unremarkable = np.sort(np.argsort(remembered, kind="stable")[: len(train) // 10])
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    numbers = {}
    models = {}
    for name, rows in (("typical", typical), ("class", class_rows), ("unremarkable", unremarkable)):
        keep = np.setdiff1d(np.arange(len(train)), rows)
        models[name] = retrained = train_digits_model(x[keep], y[keep])
        numbers[name] = (
            _accuracy(retrained, train.x[rows], train.y[rows]),
            _accuracy(retrained, test.x, test.y),
            _accuracy(retrained, test.x[test.y != REMOVED_CLASS], test.y[test.y != REMOVED_CLASS]),
        )
    return CleanWorld(
        root=demo_root,
        model=model,
        bank=folder / "bank.npz",
        bank_sha256=record.bank.sha256,
        train_labels=train.y,
        test_x=test.x,
        test_labels=test.y,
        typical=[int(i) for i in typical],
        unremarkable=[int(i) for i in unremarkable],
        removed_class=REMOVED_CLASS,
        class_rows=[int(i) for i in class_rows],
        retrained_typical_forget_accuracy=numbers["typical"][0],
        retrained_typical_test_accuracy=numbers["typical"][1],
        retrained_class_forget_accuracy=numbers["class"][0],
        retrained_class_other_test_accuracy=numbers["class"][2],
        retrained_unremarkable_forget_accuracy=numbers["unremarkable"][0],
        train_x=train.x,
        retrained=models,
    )
