"""The reference bank on real data: honest references, the file, the CLI's three commands, and use by requests.

The bank under test calibrates the mislabelled digits model of conftest.py
(40 training rows carry a wrong label, which the original memorised) with
the demo's own recipe, K = 4, through ``unlearn calibrate``: the same code a
fold of the Indexed Job runs. The CLI's fold/merge path and its faults use a
short recipe on the demo model, so they cost seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.job.conftest import NoisyBank, RunCli, calibration, noisy_data, request
from unlearn import bank as bank_format
from unlearn import calibrate, cli
from unlearn.bank import load_bank
from unlearn.data import declared_split, load_digits_arrays
from unlearn.demo import RECIPE, Recipe, export_to, mlp, train_digits_model
from unlearn.errors import InvalidInputError
from unlearn.model_io import sha256_file
from unlearning_contracts.calibration import DEFAULT_FOLDS, CalibrationManifest, CalibrationRecord, FoldRecord
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT

# The first test that uses the bank pays for it (three retrains of the demo recipe, and the mislabelled
# model's two trainings when no other test made them): on a loaded shared machine that alone can pass
# the project's 900 s per test.
pytestmark = [pytest.mark.job, pytest.mark.timeout(1800)]

# Two-sided 0.1% bound of a standard normal: a reference whose accuracy on its unseen fold differs from its
# test accuracy by more than this many standard errors did not see its fold as unseen data.
Z_BOUND = 3.29


@dataclass
class Cli:
    code: int
    out: str
    err: str
    termination: str | None


def invoke(capsys: pytest.CaptureFixture[str], where: Path, manifest: dict[str, Any], *args: str) -> Cli:
    """``unlearn <args[0]> MANIFEST <args[1:]>`` in-process, with a termination-message file."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    termination = where / "termination-log"
    termination.unlink(missing_ok=True)
    code = cli.main([args[0], str(path), "--device", "cpu", "--termination-log", str(termination), *args[1:]])
    captured = capsys.readouterr()
    return Cli(code, captured.out, captured.err, termination.read_text() if termination.exists() else None)


def test_references_are_as_accurate_on_their_unseen_fold_as_on_test_data(noisy_bank: NoisyBank) -> None:
    """A two-proportion z test per reference: on the clean training rows of its fold (which it never saw)
    against the test rows, |z| <= 3.29 (two-sided alpha 0.001 each; 0.011 over the ten and the pooled test).
    The same test rejects the original on those rows (it trained on them), so it has the power to tell."""
    b = noisy_bank.bank
    clean = np.ones(b.train_rows, dtype=bool)
    clean[noisy_bank.world.forget] = False
    out = b.out.predictions()
    test = b.test.predictions()
    n_test = len(noisy_bank.test_labels)
    fold_accuracies, test_accuracies = [], []
    for k in range(b.k):
        rows = np.flatnonzero((b.folds == k) & clean)
        fold_acc = bank_format.accuracy(out[rows], noisy_bank.labels[rows])
        test_acc = bank_format.accuracy(test[k], noisy_bank.test_labels)
        z = bank_format.two_proportion_z(fold_acc, len(rows), test_acc, n_test)
        assert abs(z) <= Z_BOUND, f"reference {k}: fold {fold_acc:.2f}% vs test {test_acc:.2f}% (z {z:.2f})"
        fold_accuracies.append(fold_acc)
        test_accuracies.append(test_acc)
        # The record's fold accuracy counts the mislabelled rows too (against their wrong labels).
        assert noisy_bank.record.references[k].test_accuracy == pytest.approx(test_acc, abs=1e-3)
    rows = np.flatnonzero(clean)
    pooled = bank_format.accuracy(out[rows], noisy_bank.labels[rows])
    assert abs(bank_format.two_proportion_z(pooled, len(rows), float(np.mean(test_accuracies)), n_test)) <= Z_BOUND
    original = bank_format.accuracy(b.original_train.predictions()[rows], noisy_bank.labels[rows])
    original_test = bank_format.accuracy(b.original_test.predictions(), noisy_bank.test_labels)
    assert original == 100.0
    assert bank_format.two_proportion_z(original, len(rows), original_test, n_test) > Z_BOUND


def test_out_predictions_give_mislabelled_rows_their_true_label(noisy_bank: NoisyBank) -> None:
    b, forget = noisy_bank.bank, np.asarray(noisy_bank.world.forget)
    wrong, true = noisy_bank.labels[forget], noisy_bank.true_labels[forget]
    assert (wrong != true).all()
    out = b.out.predictions()[forget]
    original = b.original_train.predictions()[forget]
    assert np.mean(out == true) >= 0.8  # mostly the true label: the references that never saw the row
    assert np.mean(original == wrong) >= 0.95  # the original memorised the wrong one
    # Per row, the references that trained on it memorised it too (IN), the one that did not (OUT) did not:
    # the evidence a LiRA-style test reads. On mislabelled rows the IN-OUT gap dwarfs that of clean rows.
    gap = b.in_phi(forget).mean(axis=1) - b.out_phi(forget)
    clean = np.setdiff1d(np.arange(b.train_rows), forget)
    clean_gap = b.in_phi(clean).mean(axis=1) - b.out_phi(clean)
    assert np.mean(b.in_phi(forget).min(axis=1) > b.out_phi(forget)) >= 0.9
    assert np.median(gap) > np.median(clean_gap) + 5.0
    # The original looks like an IN model on them.
    assert np.median(b.original_train_phi[forget]) > np.median(b.out_phi(forget)) + 5.0


def test_the_bank_record_cost_and_files(noisy_bank: NoisyBank) -> None:
    record, b, folder = noisy_bank.record, noisy_bank.bank, noisy_bank.folder
    world = noisy_bank.world
    assert record.exit_code == 0
    assert record.calibration == "team/digits"
    assert record.bank is not None
    assert record.bank.sha256 == sha256_file(folder / "bank.npz") == b.sha256
    assert record.input_model is not None
    assert record.input_model.sha256 == sha256_file(world.model)
    with np.load(world.root / "data" / "train.npz") as tr, np.load(world.root / "data" / "test.npz") as te:
        assert record.data_digest == bank_format.data_digest((tr["x"], tr["y"]), (te["x"], te["y"]))
    assert record.data_digest == b.data_digest
    assert (record.folds, b.k, len(record.references)) == (DEFAULT_FOLDS,) * 3 == (10,) * 3
    assert sum(r.held_out_rows for r in record.references) == b.train_rows == 1348
    assert all(r.train_rows + r.held_out_rows == b.train_rows for r in record.references)
    steps = [bank_format.steps_per_training(r.train_rows, RECIPE.epochs, RECIPE.batch) for r in record.references]
    full = bank_format.steps_per_training(b.train_rows, RECIPE.epochs, RECIPE.batch)
    assert record.cost["retrainEquivalents"] == pytest.approx(sum(steps) / full, abs=1e-3)
    assert record.cost["retrainEquivalents"] == pytest.approx(8.636, abs=0.01)  # 10 x 2,850 steps / 3,300
    assert record.cost["deviceSeconds"] > 0
    assert record.original_test_accuracy == pytest.approx(world.original_test_accuracy, abs=1e-3)
    assert record.likeness is not None
    # Likeness to the original: each reference trains on 9/10 of the rows, so a little less accurate.
    assert record.likeness.test_accuracy_min >= world.original_test_accuracy - 5.0
    assert record.likeness.agreement_min >= 93.0
    assert b.meta["recipe"] == record.recipe
    for k in range(b.k):
        assert (folder / f"fold-{k}.npz").is_file()
        assert FoldRecord.model_validate_json((folder / f"fold-{k}.json").read_text()).exit_code == 0
    assert not list(folder.glob(".*tmp*"))  # no temporary files left
    # 4 (2C + K + 1) + 2 bytes per training row, 4 (K + 1)(C + 1) per test row (docs/calibration.md):
    # 1,348 x 126 + 449 x 484 = 387 kB at K = 10, plus the archive's headers.
    assert (folder / "bank.npz").stat().st_size < 400_000
    compact = json.loads(noisy_bank.termination)
    assert len(noisy_bank.termination.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert compact["bank"]["sha256"] == record.bank.sha256
    assert "recipe" not in compact
    assert "retrain-equivalents" in noisy_bank.printed
    assert "bank " in noisy_bank.printed


# -- a request names the bank ----------------------------------------------------------------------------------


def noisy_run(
    noisy_bank: NoisyBank,
    run: RunCli,
    output: Path,
    *args: str,
    policy: str | None = None,
    data: dict[str, Any] | None = None,
) -> Any:
    world = noisy_bank.world
    spec: dict[str, Any] = {
        "data": data or noisy_data(world),
        "forget": {"indices": world.forget[:10]},
        # The bank is only loaded and named here: a one-epoch method keeps the run short.
        "method": {"name": "gradient-ascent", "forget": {"epochs": 1}, "retain": {"epochs": 1}},
        "tuning": {"maxAttempts": 1},
        # One gate any model passes: the verdict is not what these tests look at.
        "gates": {
            "maxTestAccuracyDrop": None,
            "maxMiaAuc": None,
            "maxMiaClassifierAccuracy": None,
            "maxEstimatedGap": None,
            "minMembershipPValue": None,
            "maxForgetAccuracy": 100.0,
        },
    }
    if policy is not None:
        spec["calibration"] = {"policy": policy}
    return run(request(str(world.model), str(output), name="digits-noisy", spec=spec), *args)


def bank_args(noisy_bank: NoisyBank, sha: str | None = None) -> tuple[str, ...]:
    assert noisy_bank.record.bank is not None
    return (
        "--calibration-bank",
        str(noisy_bank.folder / "bank.npz"),
        "--calibration-sha256",
        sha or noisy_bank.record.bank.sha256,
        "--calibration-name",
        "team/digits",
    )


def test_a_request_names_the_bank_in_its_record(noisy_bank: NoisyBank, run_cli: RunCli, tmp_path: Path) -> None:
    result = noisy_run(noisy_bank, run_cli, tmp_path / "out", *bank_args(noisy_bank))
    assert result.code == 0, result.stderr
    used = result.record["calibration"]
    assert used == {
        "name": "team/digits",
        "uri": str(noisy_bank.folder / "bank.npz"),
        "sha256": noisy_bank.record.bank.sha256,  # type: ignore[union-attr]
        "calibrated": True,
        "note": "the bank was made for this very model file",
    }
    assert json.loads(result.termination)["calibration"] == used
    assert result.record["config"]["calibration"]["policy"] == "IfAvailable"


@pytest.mark.parametrize(
    "case",
    [
        ("IfAvailable", "none", 0, False, "no calibration bank was given"),
        ("Required", "none", 4, False, "spec.calibration.policy Required"),
        ("Disabled", "bank", 0, False, "policy is Disabled"),
        ("IfAvailable", "data", 0, False, "made on other data"),
        ("Required", "data", 4, False, "made on other data"),
        ("IfAvailable", "sha", 0, False, "the file changed after the calibration wrote it"),
        ("Required", "sha", 4, False, "the file changed after the calibration wrote it"),
    ],
)
def test_a_bank_that_does_not_fit_is_refused_or_noted_by_policy(
    noisy_bank: NoisyBank, run_cli: RunCli, tmp_path: Path, case: tuple[str, str, int, bool, str]
) -> None:
    policy, change, code, calibrated, says = case
    args: tuple[str, ...] = ()
    data = None
    if change in ("bank", "data"):
        args = bank_args(noisy_bank)
    if change == "data":
        data = {"source": "digits"}  # the clean labels: another data digest
    if change == "sha":
        args = bank_args(noisy_bank, sha="0" * 64)
    result = noisy_run(noisy_bank, run_cli, tmp_path / "out", *args, policy=policy, data=data)
    assert result.code == code, result.stderr
    assert result.record["calibration"]["calibrated"] is calibrated
    assert says in result.record["calibration"]["note"]
    if code == 4:
        assert says in result.record["error"]
        assert "calibration" in result.record["error"]


# -- the Indexed Job's path: calibrate-fold and calibrate-merge ------------------------------------------------

SHORT = 3  # epochs: these tests exercise the commands, not the references' quality


def demo_calibration(demo_root: Path, output: Path, **spec: Any) -> dict[str, Any]:
    model = {"name": "digits-mlp", "source": {"path": str(demo_root / "models" / "digits" / "digits-mlp.pt2")}}
    return calibration(model, {"source": "digits"}, str(output), epochs=SHORT, **{"folds": 2, **spec})


@pytest.fixture(scope="module")
def indexed(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folds 0 and 1 written by calibrate-fold (fold 1 from $JOB_COMPLETION_INDEX); not merged."""
    where = tmp_path_factory.mktemp("indexed")
    path = where / "manifest.yaml"
    path.write_text(yaml.safe_dump(demo_calibration(demo_root, where / "out")))
    assert cli.main(["calibrate-fold", str(path), "--fold", "0", "--device", "cpu"]) == 0
    os.environ["JOB_COMPLETION_INDEX"] = "1"
    try:
        assert cli.main(["calibrate-fold", str(path), "--device", "cpu"]) == 0
    finally:
        del os.environ["JOB_COMPLETION_INDEX"]
    return where / "out"


def copy_folds(indexed: Path, dest: Path) -> Path:
    shutil.copytree(indexed, dest)
    return dest


def test_folds_then_merge_write_the_same_bank_as_a_local_run(
    demo_root: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_folds(indexed, tmp_path / "cluster")
    fold = FoldRecord.model_validate_json((folder / "fold-1.json").read_text())
    assert fold.exit_code == 0
    assert fold.outputs is not None
    assert fold.outputs.sha256 == sha256_file(folder / "fold-1.npz")
    merged = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder), "calibrate-merge")
    assert merged.code == 0, merged.err
    assert merged.termination is not None
    assert CalibrationRecord.model_validate_json(merged.termination).bank is not None
    local = invoke(capsys, tmp_path / "l", demo_calibration(demo_root, tmp_path / "local"), "calibrate")
    assert local.code == 0, local.err
    cluster_bank, local_bank = load_bank(folder / "bank.npz"), load_bank(tmp_path / "local" / "bank.npz")
    for name, array in cluster_bank.arrays().items():
        if np.issubdtype(array.dtype, np.floating):
            # Two trainings of the same fold agree to float rounding, not always to the bit: the CPU's
            # GEMM kernels may sum in another order depending on how a buffer happens to be aligned.
            np.testing.assert_allclose(array, local_bank.arrays()[name], rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(array, local_bank.arrays()[name], err_msg=name)
    assert {k: v for k, v in cluster_bank.meta.items() if k != "createdAt"} == {
        k: v for k, v in local_bank.meta.items() if k != "createdAt"
    }
    # Merging again, or running the whole calibration again, keeps the bank (idempotent, never replaced).
    before = (folder / "bank.npz").stat().st_mtime_ns
    again = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder), "calibrate-merge")
    assert again.code == 0
    assert (folder / "bank.npz").stat().st_mtime_ns == before
    rerun = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder), "calibrate")
    assert rerun.code == 0
    assert (folder / "bank.npz").stat().st_mtime_ns == before
    # A merge killed between the bank and its record: the retry writes the record and keeps the bank.
    sha = json.loads((folder / "bank.json").read_text())["bank"]["sha256"]
    (folder / "bank.json").unlink()
    retried = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder), "calibrate-merge")
    assert retried.code == 0, retried.err
    assert (folder / "bank.npz").stat().st_mtime_ns == before
    assert json.loads((folder / "bank.json").read_text())["bank"]["sha256"] == sha == sha256_file(folder / "bank.npz")


def test_a_fold_already_written_is_not_trained_again(
    demo_root: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_folds(indexed, tmp_path / "out")
    before = (folder / "fold-0.npz").stat().st_mtime_ns
    result = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder), "calibrate-fold", "--fold", "0")
    assert result.code == 0
    assert (folder / "fold-0.npz").stat().st_mtime_ns == before
    assert result.termination is not None
    assert FoldRecord.model_validate_json(result.termination).reference is not None


def _break(folder: Path, how: str) -> None:
    if how == "missing-fold":
        (folder / "fold-1.json").unlink()
    elif how == "tampered-fold":
        with (folder / "fold-0.npz").open("ab") as handle:
            handle.write(b"\0")
    elif how == "foreign-bank":
        (folder / "bank.npz").write_bytes(b"not this calibration's bank")


@pytest.mark.parametrize(
    "case",
    [
        ("calibrate-merge", "missing-fold", {}, "fold-1.json is missing"),
        ("calibrate-merge", "tampered-fold", {}, "the file changed after fold 0 wrote it"),
        ("calibrate-merge", "none", {"seed": 1}, "spec.seed: the fold files"),
        ("calibrate-merge", "foreign-bank", {}, "a bank is never replaced"),
        ("calibrate", "foreign-bank", {}, "a bank is never replaced"),
        ("calibrate-fold", "none", {"seed": 1}, "was made for another calibration"),
        ("calibrate-fold", "none", {"folds": 3}, "was made for another calibration"),
    ],
)
def test_merge_and_folds_refuse_what_is_not_theirs(
    demo_root: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple[Any, ...]
) -> None:
    command, how, spec, message = case
    folder = copy_folds(indexed, tmp_path / "out")
    _break(folder, how)
    args = ("--fold", "0") if command == "calibrate-fold" else ()
    result = invoke(capsys, tmp_path / "m", demo_calibration(demo_root, folder, **spec), command, *args)
    assert result.code == 4
    assert message in result.err
    assert result.termination is not None
    assert message in json.loads(result.termination)["error"]
    failed = folder / ("fold-0.failed.json" if command == "calibrate-fold" else "bank.failed.json")
    assert message in json.loads(failed.read_text())["error"]
    assert not (folder / "bank.json").exists()


def test_wrong_fold_and_wrong_kind_are_invalid_input(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = demo_calibration(demo_root, tmp_path / "out")
    result = invoke(capsys, tmp_path / "a", manifest, "calibrate-fold", "--fold", "2")
    assert result.code == 4
    assert "--fold 2: the calibration has folds 0..1" in result.err
    result = invoke(capsys, tmp_path / "b", manifest, "calibrate-fold")
    assert result.code == 4
    assert "$JOB_COMPLETION_INDEX" in result.err
    req = request("m.pt2", str(tmp_path / "v"))
    result = invoke(capsys, tmp_path / "c", req, "calibrate")
    assert result.code == 4
    assert "a UnlearningRequest manifest: run it with `unlearn run`" in result.err
    result = invoke(capsys, tmp_path / "d", manifest, "run")
    assert result.code == 4
    assert "a UnlearningCalibration manifest: run it with `unlearn calibrate`" in result.err


def test_augmentations_on_flat_samples_are_invalid_input(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = demo_calibration(demo_root, tmp_path / "out")
    manifest["spec"]["recipe"]["augmentations"] = ["horizontal-flip"]
    result = invoke(capsys, tmp_path / "m", manifest, "calibrate-fold", "--fold", "0")
    assert result.code == 4
    assert "recipe.augmentations: horizontal-flip need images of shape C x H x W" in result.err


# -- from scratch, in every format ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The demo architecture, trained to about the demo's test accuracy, in the three formats the job loads."""
    root = tmp_path_factory.mktemp("formats")
    full = load_digits_arrays()
    train_rows, _ = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    x = torch.from_numpy(full.x[train_rows])
    model = train_digits_model(x, torch.from_numpy(full.y[train_rows]), Recipe(epochs=30))
    export_to(model, x, root / "m.pt2")
    torch.save(model.state_dict(), root / "m.pt")
    torch.jit.save(torch.jit.script(model), str(root / "m.ts"))
    return {
        "exported": {"name": "m", "format": "exported", "source": {"path": str(root / "m.pt2")}},
        "state-dict": {
            "name": "m",
            "format": "state-dict",
            "source": {"path": str(root / "m.pt")},
            "architecture": {"factory": "unlearn.demo:mlp", "kwargs": {}},
        },
        "torchscript": {"name": "m", "format": "torchscript", "source": {"path": str(root / "m.ts")}},
    }


@pytest.mark.parametrize("fmt", ["exported", "state-dict", "torchscript"])
def test_references_start_from_fresh_weights_in_every_format(
    fmt: str,
    formats: dict[str, dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a learning rate too small to learn anything, a reference is as good as its initial weights:
    near chance if they were drawn afresh, the original's accuracy if they were kept."""
    manifest = calibration(formats[fmt], {"source": "digits"}, str(tmp_path / "out"), epochs=1, folds=2)
    manifest["spec"]["recipe"]["optimizer"]["lr"] = 1e-9
    result = invoke(capsys, tmp_path, manifest, "calibrate-fold", "--fold", "0", "--allow-factory", "unlearn.demo")
    assert result.code == 0, result.err
    fold = FoldRecord.model_validate_json(result.termination or "")
    assert fold.reference is not None
    outputs = bank_format.FoldOutputs.load(tmp_path / "out" / "fold-0.npz")
    assert outputs.meta["originalTestAccuracy"] > 90.0
    assert fold.reference.test_accuracy < 30.0
    assert fold.reference.agreement < 30.0


def test_an_sgd_recipe_with_schedule_and_augmentations_trains_a_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Digits as 1 x 8 x 8 images under SGD with Nesterov momentum, weight decay, warm-up then cosine,
    random crops and flips: every part of the recipe runs in a real fold, and the reference learns."""
    full = load_digits_arrays()
    train_rows, test_rows = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    images = full.x.reshape(-1, 1, 8, 8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz", x=images[train_rows], y=full.y[train_rows])
    np.savez(tmp_path / "data" / "test.npz", x=images[test_rows], y=full.y[test_rows])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), *mlp(64, (128,), 10))
    export_to(net, torch.from_numpy(images[:2]), tmp_path / "m.pt2")
    manifest = calibration(
        {"name": "m", "source": {"path": str(tmp_path / "m.pt2")}},
        {
            "source": "npz",
            "train": {"path": str(tmp_path / "data" / "train.npz")},
            "test": {"path": str(tmp_path / "data" / "test.npz")},
        },
        str(tmp_path / "out"),
        folds=2,
    )
    manifest["spec"]["recipe"] = {
        "epochs": 8,
        "batchSize": 32,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weightDecay": 5e-4},
        "schedule": {"name": "cosine", "warmupEpochs": 1},
        "augmentations": ["random-crop", "horizontal-flip"],
        "cropPadding": 1,
    }
    result = invoke(capsys, tmp_path, manifest, "calibrate-fold", "--fold", "1")
    assert result.code == 0, result.err
    fold = FoldRecord.model_validate_json(result.termination or "")
    assert fold.reference is not None
    assert fold.reference.test_accuracy > 60.0  # chance is 10%
    assert bank_format.FoldOutputs.load(tmp_path / "out" / "fold-1.npz").meta["recipe"]["optimizer"]["name"] == "sgd"


# -- files: checked before torch, read inside their claims, never replaced -------------------------------------

# Run as a process: the CLI's own main, reporting at the end whether torch was imported (as test_bad_input).
PROBE = (
    "import sys\n"
    "from unlearn import cli\n"
    "code = cli.main(sys.argv[1:])\n"
    "sys.stderr.write('probe: torch imported\\n' if 'torch' in sys.modules else 'probe: torch not imported\\n')\n"
    "sys.exit(code)\n"
)
ROOT = Path(__file__).resolve().parents[2]


def claimed_calibration(volumes: Path, output: str = "banks/digits") -> dict[str, Any]:
    """The demo model's calibration with every location in a claim under ``volumes``."""
    manifest = calibration(
        {"name": "digits-mlp", "source": {"claimName": "models", "path": "digits/digits-mlp.pt2"}},
        {"source": "digits"},
        "unused",
        epochs=SHORT,
        folds=2,
    )
    manifest["spec"]["output"] = {"location": {"claimName": "out", "path": output}}
    return manifest


@pytest.mark.parametrize(
    ("command", "change", "message"),
    [
        ("calibrate-fold", "plain-paths", "digits-mlp.pt2 names no claim"),
        ("calibrate-fold", "no-model", "model.source pvc://models/digits/digits-mlp.pt2: not found"),
        ("calibrate", "factory", "module os is not allowed"),
        ("calibrate-merge", "output-is-a-file", "not a folder"),
        ("calibrate-merge", "output-link-out", "a symlink leads outside the claim out"),
    ],
)
def test_calibration_commands_refuse_before_torch(
    demo_root: Path, tmp_path: Path, command: str, change: str, message: str
) -> None:
    volumes = tmp_path / "volumes"
    (volumes / "models" / "digits").mkdir(parents=True)
    (volumes / "out" / "banks").mkdir(parents=True)
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    shutil.copy(model, volumes / "models" / "digits" / "digits-mlp.pt2")
    manifest = claimed_calibration(volumes)
    if change == "plain-paths":
        manifest = calibration({"name": "m", "source": {"path": str(model)}}, {"source": "digits"}, "unused")
    elif change == "no-model":
        (volumes / "models" / "digits" / "digits-mlp.pt2").unlink()
    elif change == "factory":
        manifest["spec"]["model"] = {
            "name": "m",
            "format": "state-dict",
            "source": {"claimName": "models", "path": "digits/digits-mlp.pt2"},
            "architecture": {"factory": "os:system"},
        }
    elif change == "output-is-a-file":
        (volumes / "out" / "banks" / "digits").write_text("a file")
    elif change == "output-link-out":
        (tmp_path / "elsewhere").mkdir()
        (volumes / "out" / "banks" / "digits").symlink_to(tmp_path / "elsewhere")
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(manifest))
    termination = tmp_path / "termination-log"
    args = ["--fold", "0"] if command == "calibrate-fold" else []
    args += ["--volume-root", str(volumes), "--require-claims", "--termination-log", str(termination)]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, command, str(path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 4, done.stderr[-2000:]
    assert "probe: torch not imported" in done.stderr, done.stderr[-2000:]
    assert message in done.stderr
    told = json.loads(termination.read_text())
    assert told["exitCode"] == 4
    assert message in told["error"]
    record = FoldRecord if command == "calibrate-fold" else CalibrationRecord
    assert record.model_validate(told).calibration == "team/digits"  # the operator parses it as usual
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())


def test_files_in_the_output_claim_are_read_inside_it_and_never_replaced(
    demo_root: Path, indexed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fold file swapped for a link out of the claim is refused, not followed; a bank already there is kept."""
    volumes = tmp_path / "volumes"
    folder = copy_folds(indexed, volumes / "out" / "banks" / "digits")
    (volumes / "models" / "digits").mkdir(parents=True)
    shutil.copy(demo_root / "models" / "digits" / "digits-mlp.pt2", volumes / "models" / "digits" / "digits-mlp.pt2")
    outside = tmp_path / "outside.npz"
    shutil.move(folder / "fold-1.npz", outside)
    (folder / "fold-1.npz").symlink_to(outside)
    manifest = claimed_calibration(volumes)
    args = ("--volume-root", str(volumes), "--require-claims")
    merged = invoke(capsys, tmp_path / "m", manifest, "calibrate-merge", *args)
    assert merged.code == 4, merged.err
    assert "a symlink leads outside the claim out" in merged.err
    assert not (folder / "bank.npz").exists()
    # Put back, the merge publishes the bank and its record together (link(2): never over a file).
    (folder / "fold-1.npz").unlink()
    shutil.move(outside, folder / "fold-1.npz")
    merged = invoke(capsys, tmp_path / "m", manifest, "calibrate-merge", *args)
    assert merged.code == 0, merged.err
    record = CalibrationRecord.model_validate_json((folder / "bank.json").read_text())
    assert record.bank is not None
    assert record.bank.uri == "pvc://out/banks/digits/bank.npz"
    assert record.bank.sha256 == sha256_file(folder / "bank.npz")
    assert (folder / "bank.npz").stat().st_nlink == 1  # the temporary name is gone
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    # A fold retried after its files were published keeps them as they are (the folds were written by the
    # manifest with plain paths, whose model uri is part of what a fold must match).
    fold_manifest = demo_calibration(demo_root, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = invoke(capsys, tmp_path / "f", fold_manifest, "calibrate-fold", "--fold", "1")
    assert again.code == 0, again.err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # A fold killed between its two links (npz published, record not): the retry finishes the record.
    sha = json.loads((folder / "fold-1.json").read_text())["outputs"]["sha256"]
    (folder / "fold-1.json").unlink()
    again = invoke(capsys, tmp_path / "f", fold_manifest, "calibrate-fold", "--fold", "1")
    assert again.code == 0, again.err
    assert json.loads((folder / "fold-1.json").read_text())["outputs"]["sha256"] == sha
    assert (folder / "fold-1.npz").stat().st_mtime_ns == before["fold-1.npz"]


def test_a_fold_published_meanwhile_by_another_pod_is_kept(demo_root: Path, indexed: Path, tmp_path: Path) -> None:
    """Two pods of one index (a replacement starting while the first still terminates): the second to
    publish finds the first's files, checks they are this calibration's, and keeps them."""
    folder = copy_folds(indexed, tmp_path / "out")
    manifest = CalibrationManifest.model_validate(demo_calibration(demo_root, folder))
    prepared = calibrate.prepare(manifest, calibrate.CalibrateOptions(device="cpu"))
    mine = bank_format.FoldOutputs.load(folder / "fold-0.npz")
    before = (folder / "fold-0.npz").stat().st_mtime_ns
    record = calibrate.write_fold(prepared, mine, "2026-01-01T00:00:00+00:00")
    assert record == FoldRecord.model_validate_json((folder / "fold-0.json").read_text())
    assert (folder / "fold-0.npz").stat().st_mtime_ns == before
    # Another calibration's fold file under the name is still refused.
    other = CalibrationManifest.model_validate(demo_calibration(demo_root, folder, seed=1))
    with pytest.raises(InvalidInputError, match="was made for another calibration"):
        calibrate.write_fold(calibrate.prepare(other, calibrate.CalibrateOptions(device="cpu")), mine, "")


def test_a_fold_over_its_scratch_limit_ends_as_invalid_input(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As unlearn run: a pod's /tmp past its share of the limit stops the fold with exit 4 and a record."""
    monkeypatch.setenv("UNLEARN_TMP_LIMIT", "1Ki")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "filler").write_bytes(b"\0" * 4096)
    result = invoke(
        capsys, tmp_path / "m", demo_calibration(demo_root, tmp_path / "out"), "calibrate-fold", "--fold", "0"
    )
    assert result.code == 4, result.err
    assert result.termination is not None
    assert "scratch space" in json.loads(result.termination)["error"]
    assert not (tmp_path / "out" / "fold-0.npz").exists()
