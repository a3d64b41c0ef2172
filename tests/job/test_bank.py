"""Unit tests of the reference bank's pure parts: folds, scores, likeness, cost, digest, storage, the reader."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unlearn import bank
from unlearn.bank import Bank, BankError, BankRef, FoldOutputs, LogitTable
from unlearn.calibrate import augmenter, check_recipe, horizontal_flip, lr_factor, random_crop, reset_statistics
from unlearn.demo import RECIPE
from unlearn.errors import InvalidInputError
from unlearn.files import resolve
from unlearn.model_io import sha256_file
from unlearning_contracts.calibration import (
    DEFAULT_FOLDS,
    CalibrationManifest,
    CalibrationRecord,
    FoldRecord,
    RecipeSpec,
    ReferenceLikeness,
    ScheduleSpec,
    compact_calibration,
    compact_fold,
    load_any_manifest,
)
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT
from unlearning_contracts.spec import Location

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "calibrations" / "digits.yaml"

RNG = np.random.default_rng(0)


# -- folds and seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(10, 2), (1347, 4), (1347, 8), (7, 7), (100, 32)])
def test_folds_are_balanced_and_deterministic(n: int, k: int) -> None:
    folds = bank.assign_folds(n, k, seed=3)
    assert folds.dtype == np.int16
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == n
    np.testing.assert_array_equal(folds, bank.assign_folds(n, k, seed=3))
    if n > 2 * k:
        assert not np.array_equal(folds, bank.assign_folds(n, k, seed=4))
        # Not the rows' order: the first rows (often one label) spread over the folds.
        assert len(set(folds[: 4 * k].tolist())) > 1


@pytest.mark.parametrize(("n", "k"), [(3, 4), (5, 1)])
def test_folds_refuse_impossible_splits(n: int, k: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        bank.assign_folds(n, k, 0)


def test_fold_seeds_differ_by_fold_and_calibration_seed() -> None:
    seeds = {bank.fold_seed(s, k) for s in range(3) for k in range(8)}
    assert len(seeds) == 24


# -- scores ------------------------------------------------------------------------------------------------


def test_phi_is_the_logit_of_the_own_label_probability() -> None:
    logits = RNG.normal(size=(50, 10)) * 3
    labels = RNG.integers(0, 10, 50)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[np.arange(50), labels]
    np.testing.assert_allclose(bank.phi(logits, labels), np.log(py) - np.log1p(-py), rtol=1e-4, atol=1e-4)


def test_phi_stays_finite_where_the_probability_rounds_to_one() -> None:
    logits = np.array([[60.0, 0.0, 0.0], [0.0, -60.0, 0.0], [5.0, 5.0, 5.0]])
    scores = bank.phi(logits, np.array([0, 1, 0]))
    assert scores[0] == pytest.approx(60.0 - math.log(2.0), abs=1e-4)  # log p - log(1-p), p = 1 - 2e-26
    assert scores[1] == pytest.approx(-60.0 - math.log(2.0), abs=1e-4)
    assert scores[2] == pytest.approx(-math.log(2.0), abs=1e-5)  # p = 1/3: log(1/3) - log(2/3)


@pytest.mark.parametrize(
    ("p1", "n1", "p2", "n2", "expected"),
    [
        (95.0, 300, 95.0, 450, 0.0),
        # 0.9 vs 0.8 on 100 rows each: pooled 0.85, se sqrt(0.85*0.15*0.02) = 0.0505
        (90.0, 100, 80.0, 100, 1.980295),
        (80.0, 100, 90.0, 100, -1.980295),
        (100.0, 50, 100.0, 60, 0.0),
    ],
)
def test_two_proportion_z(p1: float, n1: int, p2: float, n2: int, expected: float) -> None:
    assert bank.two_proportion_z(p1, n1, p2, n2) == pytest.approx(expected, abs=1e-5)


# -- cost ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "epochs", "batch", "steps"), [(1348, 150, 64, 3300), (1011, 150, 64, 2400), (64, 2, 64, 2), (65, 2, 64, 4)]
)
def test_steps_count_the_last_partial_batch(rows: int, epochs: int, batch: int, steps: int) -> None:
    assert bank.steps_per_training(rows, epochs, batch) == steps


def test_retrain_equivalents_of_k_folds_is_about_k_minus_one() -> None:
    n, epochs, batch = 60000, 10, 128
    for k in (2, 4, 8):
        folds = bank.assign_folds(n, k, 0)
        steps = [bank.steps_per_training(int((folds != f).sum()), epochs, batch) for f in range(k)]
        assert bank.retrain_equivalents(steps, bank.steps_per_training(n, epochs, batch)) == pytest.approx(
            k - 1, rel=0.01
        )
    assert math.isnan(bank.retrain_equivalents([10], 0))


def test_likeness_summary_is_mean_and_minimum() -> None:
    refs = [
        ReferenceLikeness(fold=i, train_rows=3, held_out_rows=1, test_accuracy=t, fold_accuracy=f, agreement=a)
        for i, (t, f, a) in enumerate([(90.0, 88.0, 95.0), (94.0, 92.0, 97.0)])
    ]
    summary = bank.summarise_likeness(refs)
    assert (summary.test_accuracy_mean, summary.test_accuracy_min) == (92.0, 90.0)
    assert (summary.fold_accuracy_mean, summary.fold_accuracy_min) == (90.0, 88.0)
    assert (summary.agreement_mean, summary.agreement_min) == (96.0, 95.0)


# -- the data digest ---------------------------------------------------------------------------------------


def _data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    x = RNG.random((20, 4)).astype(np.float32)
    y = RNG.integers(0, 3, 20).astype(np.int64)
    return (x[:15], y[:15]), (x[15:], y[15:])


def test_data_digest_is_canonical() -> None:
    train, test = _data()
    digest = bank.data_digest(train, test)
    assert len(digest) == 64
    # The same values in other dtypes or memory layouts give the same digest.
    wide = ((train[0].astype(np.float64), train[1].astype(np.int32)), (np.asfortranarray(test[0]), test[1]))
    assert bank.data_digest(*wide) == digest
    # The canonical form, spelled out as the docstring does.
    h = hashlib.sha256(b"unlearn data digest v1\n")
    for part, (x, y) in (("train", train), ("test", test)):
        h.update(f"{part} x {x.shape[0]},{x.shape[1]} y {len(y)}\n".encode())
        h.update(x.astype("<f4").tobytes())
        h.update(y.astype("<i8").tobytes())
    assert h.hexdigest() == digest


def test_data_digest_changes_with_any_sample_label_order_or_split() -> None:
    train, test = _data()
    digest = bank.data_digest(train, test)
    label = train[1].copy()
    label[3] = (label[3] + 1) % 3
    sample = train[0].copy()
    sample[0, 0] += 1e-6
    order = np.arange(15)[::-1]
    moved = (
        (np.concatenate([train[0], test[0][:1]]), np.concatenate([train[1], test[1][:1]])),
        (test[0][1:], test[1][1:]),
    )
    others = [
        bank.data_digest((train[0], label), test),
        bank.data_digest((sample, train[1]), test),
        bank.data_digest((train[0][order], train[1][order]), test),
        bank.data_digest(*moved),
        bank.data_digest(test, train),
    ]
    assert digest not in others
    assert len(set(others)) == len(others)


# -- logit tables -------------------------------------------------------------------------------------------


def test_dense_table_is_exact() -> None:
    z = RNG.normal(size=(30, 10)).astype(np.float32)
    table = LogitTable.from_logits(z, "dense")
    assert table.storage == "dense"
    assert table.shape == (30,)
    np.testing.assert_array_equal(table.predictions(), z.argmax(1))
    lp = table.log_probs()
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lp - lp[:, :1], z - z[:, :1], atol=1e-5)


def test_top_k_table_keeps_the_top_classes_exactly_and_the_rest_evenly() -> None:
    z = RNG.normal(size=(2, 30, 100)).astype(np.float32) * 4
    table = LogitTable.from_logits(z, "top-k", top_k=5)
    assert table.storage == "top-k"
    assert table.shape == (2, 30)
    np.testing.assert_array_equal(table.predictions(), z.argmax(-1))
    exact = LogitTable.from_logits(z, "dense").log_probs()
    approx = table.log_probs()
    np.testing.assert_allclose(np.exp(approx).sum(-1), 1.0, rtol=1e-5)
    top = np.argsort(-z, axis=-1)[..., :5]
    np.testing.assert_allclose(
        np.take_along_axis(approx, top, -1), np.take_along_axis(exact, top, -1), rtol=1e-4, atol=1e-5
    )
    # Every other class gets the same share of what is left.
    rest = np.ones_like(z, dtype=bool)
    np.put_along_axis(rest, top, False, -1)
    leftover = approx[0, 0][rest[0, 0]]
    np.testing.assert_allclose(leftover, leftover[0], rtol=1e-5)
    # Stored arrays: values, classes and log-sum-exp under the table's name.
    arrays = table.arrays("test_logits")
    assert sorted(arrays) == ["test_logits_logsumexp", "test_logits_topk_classes", "test_logits_topk_values"]
    assert arrays["test_logits_topk_classes"].dtype == np.int32


def test_top_k_is_a_no_op_when_there_are_few_classes() -> None:
    z = RNG.normal(size=(3, 4)).astype(np.float32)
    assert LogitTable.from_logits(z, "top-k", top_k=10).storage == "dense"


@pytest.mark.parametrize(("entries", "storage"), [(60000 * 10, "dense"), (2**25, "dense"), (1281167 * 1000, "top-k")])
def test_size_bound(entries: int, storage: str) -> None:
    assert bank.storage_for(entries) == storage


@pytest.mark.parametrize("storage", ["dense", "top-k"])
def test_scatter_and_stack(storage: bank.Storage) -> None:
    z = RNG.normal(size=(12, 20)).astype(np.float32)
    rows = [np.array([0, 3, 5, 7, 9, 11]), np.array([1, 2, 4, 6, 8, 10])]
    parts = [(r, LogitTable.from_logits(z[r], storage, top_k=4)) for r in rows]
    whole = LogitTable.scatter(parts, 12, 20)
    np.testing.assert_allclose(whole.log_probs(), LogitTable.from_logits(z, storage, top_k=4).log_probs(), atol=1e-6)
    stacked = LogitTable.stack([t for _, t in parts])
    assert stacked.shape == (2, 6)
    mixed = [parts[0], (rows[1], LogitTable.from_logits(z[rows[1]], "dense"))]
    if storage == "top-k":
        with pytest.raises(BankError, match="different forms"):
            LogitTable.scatter(mixed, 12, 20)


# -- fold files, the merge and the reader --------------------------------------------------------------------

N, M, C, K = 23, 7, 3, 3


def _meta(**extra: Any) -> dict[str, Any]:
    return {
        "formatVersion": bank.FORMAT_VERSION,
        "folds": K,
        "seed": 5,
        "dataDigest": "d" * 64,
        "inputModel": {"uri": "m.pt2", "sha256": "a" * 64},
        "recipe": {"epochs": 1},
        "classes": C,
        "trainRows": N,
        "testRows": M,
        **extra,
    }


def _fold(k: int, **meta: Any) -> FoldOutputs:
    rows = np.flatnonzero(bank.assign_folds(N, K, 5) == k).astype(np.int64)
    z = RNG.normal(size=(N, C)).astype(np.float32)
    t = RNG.normal(size=(M, C)).astype(np.float32)
    return FoldOutputs(
        meta=_meta(fold=k, **meta),
        rows=rows,
        held_out=LogitTable.from_logits(z[rows], "dense"),
        original_held_out=LogitTable.from_logits(z[rows] + 1, "dense"),
        original_held_out_phi=np.full(len(rows), float(k), dtype=np.float32),
        phi=np.full(N, float(k), dtype=np.float32),
        test=LogitTable.from_logits(t, "dense"),
        test_phi=np.zeros(M, dtype=np.float32),
        original_test=LogitTable.from_logits(t, "dense"),
        original_test_phi=np.zeros(M, dtype=np.float32),
    )


def _bank(tmp_path: Path) -> tuple[Bank, Path]:
    merged = bank.merge_folds([_fold(k) for k in range(K)], _meta())
    path = tmp_path / "bank.npz"
    merged.save(path)
    return merged, path


def test_fold_file_round_trip(tmp_path: Path) -> None:
    fold = _fold(1)
    fold.save(tmp_path / "fold-1.npz")
    again = FoldOutputs.load(tmp_path / "fold-1.npz")
    assert again.meta == fold.meta
    np.testing.assert_array_equal(again.rows, fold.rows)
    np.testing.assert_array_equal(again.held_out.dense, fold.held_out.dense)


def test_merge_assembles_out_rows_and_in_out_scores(tmp_path: Path) -> None:
    merged, path = _bank(tmp_path)
    loaded = bank.load_bank(path, sha256_file(path))
    assert loaded.k == K
    assert (loaded.train_rows, loaded.test_rows, loaded.classes) == (N, M, C)
    np.testing.assert_array_equal(loaded.folds, bank.assign_folds(N, K, 5))
    rows = np.arange(N)
    # phi of reference k is k everywhere: OUT is the row's own fold, IN the other K - 1.
    np.testing.assert_array_equal(loaded.out_phi(rows), loaded.folds.astype(np.float32))
    ins = loaded.in_phi(rows)
    assert ins.shape == (N, K - 1)
    for i in rows:
        assert sorted(ins[i].tolist()) == sorted(set(range(K)) - {int(loaded.folds[i])})
    # OUT logits of each row come from the fold that held it out; the original's too.
    fold0 = _fold(0)
    np.testing.assert_array_equal(merged.original_train_phi[fold0.rows], 0.0)
    assert loaded.out_log_probs(np.array([0, 5])).shape == (2, C)
    assert loaded.test.shape == (K, M)
    for array in np.load(path, allow_pickle=False).values():
        assert array.dtype != object


def test_bank_meta_is_a_json_string(tmp_path: Path) -> None:
    _, path = _bank(tmp_path)
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        assert archive["folds"].dtype == np.int16
        assert archive["out_logits"].shape == (N, C)
        assert archive["phi"].shape == (K, N)
        assert archive["test_logits"].shape == (K, M, C)
    assert meta["formatVersion"] == 1


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        (lambda: [_fold(0), _fold(1)], "exactly one output of each"),
        (lambda: [_fold(0), _fold(1), _fold(1)], "exactly one output of each"),
        (lambda: [_fold(0), _fold(1), _fold(2, dataDigest="e" * 64)], "its dataDigest"),
        (lambda: [_fold(0), _fold(1), _fold(2, recipe={"epochs": 2})], "its recipe"),
    ],
)
def test_merge_refuses_folds_that_do_not_fit(folds: Any, message: str) -> None:
    with pytest.raises(BankError, match=message):
        bank.merge_folds(folds(), _meta())


def test_merge_refuses_rows_of_another_assignment() -> None:
    fold = _fold(2)
    fold.rows = fold.rows[::-1].copy()
    with pytest.raises(BankError, match="not fold 2 of the assignment"):
        bank.merge_folds([_fold(0), _fold(1), fold], _meta())


def test_reader_verifies_digest_version_and_arrays(tmp_path: Path) -> None:
    merged, path = _bank(tmp_path)
    with pytest.raises(BankError, match="the file changed"):
        bank.load_bank(path, "0" * 64)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:500])
    with pytest.raises(BankError, match=r"cannot read as \.npz"):
        bank.load_bank(broken)
    arrays = merged.arrays()
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({}, {"formatVersion": 2}, "format version 2"),
        ({"phi": arrays["phi"].astype(np.float64)}, {}, "phi: dtype float64"),
        ({"folds": arrays["folds"][:-1]}, {}, r"folds: shape \(22,\)"),
        ({"folds": np.full(N, 7, dtype=np.int16)}, {}, "outside 0..2"),
        ({"out_logits": np.full((N, C), np.nan, dtype=np.float32)}, {}, "NaN"),
        ({"test_logits": arrays["test_logits"][:2]}, {}, "test_logits covers"),
    ]
    for change, meta_change, message in cases:
        bad = tmp_path / "bad.npz"
        bank.save_npz(bad, {**arrays, **change}, {**merged.meta, **meta_change})
        with pytest.raises(BankError, match=message):
            bank.load_bank(bad)
    missing = {k: v for k, v in arrays.items() if k != "test_phi"}
    bank.save_npz(tmp_path / "bad.npz", missing, merged.meta)
    with pytest.raises(BankError, match="no array test_phi"):
        bank.load_bank(tmp_path / "bad.npz")
    (tmp_path / "pickle.npz").write_bytes(b"")
    np.savez(tmp_path / "pickle.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BankError):
        bank.load_bank(tmp_path / "pickle.npz")


def test_a_bank_over_the_bound_of_its_data_is_refused_before_it_is_read(tmp_path: Path) -> None:
    _, path = _bank(tmp_path)
    size = path.stat().st_size
    bound = bank.bank_bytes_bound(N, M, C)
    assert size <= bound  # every bank of these data fits (any K up to 32)
    assert bank.bank_bytes_bound(N, M, C, max_folds=K) < bound
    with pytest.raises(BankError, match=f"{size} bytes, more than the {size - 1} this input can need"):
        bank.load_bank(path, limit=size - 1)
    # The bound follows the storage rule: whole tables up to DENSE_LIMIT numbers, top-k above.
    assert bank.table_bytes(1000, 10, "dense") == 40_000
    assert bank.table_bytes(1000, 1000, "top-k") == 1000 * (bank.TOP_K * 8 + 4)
    big = bank.bank_bytes_bound(1_281_167, 50_000, 1000)  # ImageNet-1k
    assert big < 2 * 1_281_167 * (2 + 4 * 32 + 4 + 2 * (bank.TOP_K * 8 + 4)) + (64 << 20)


def test_an_npz_member_that_claims_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    """An array header claiming 10^9 rows is refused from its header, before a byte of it is read."""
    _, path = _bank(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (K, 10**9)})
    lying = tmp_path / "lying.npz"
    shutil.copy(path, lying)
    with zipfile.ZipFile(lying, "a") as archive:
        archive.writestr("huge.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(BankError, match=r"huge declares shape \(3, 1000000000\).*truncated or corrupt"):
        bank.load_bank(lying)


def test_a_bank_inside_a_claim_is_never_read_through_a_link_out_of_it(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    _, path = _bank(tmp_path / "elsewhere")
    claim = tmp_path / "volumes" / "banks"
    (claim / "digits").mkdir(parents=True)
    (claim / "digits" / "bank.npz").symlink_to(path)
    location = Location.from_uri("pvc://banks/digits/bank.npz")
    place = resolve(location, tmp_path / "volumes", "--calibration-bank")
    with pytest.raises(BankError, match="a symlink leads outside the claim banks"):
        bank.load_bank(place)
    # Inside the claim, a link is fine; the fifo a tenant might leave is refused without blocking.
    shutil.copy(path, claim / "real.npz")
    (claim / "digits" / "bank.npz").unlink()
    (claim / "digits" / "bank.npz").symlink_to(claim / "real.npz")
    assert bank.load_bank(resolve(location, tmp_path / "volumes", "--calibration-bank")).k == K
    os.mkfifo(claim / "fifo.npz")
    with pytest.raises(BankError, match="not a regular file"):
        bank.load_bank(resolve(Location.from_uri("pvc://banks/fifo.npz"), tmp_path / "volumes", "bank"))


def test_use_bank_decides_by_policy_when_the_file_is_out_of_bounds(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    _, path = _bank(tmp_path / "elsewhere")
    claim = tmp_path / "volumes" / "banks"
    claim.mkdir(parents=True)
    (claim / "bank.npz").symlink_to(path)
    ref = BankRef(uri="pvc://banks/bank.npz", sha256=sha256_file(path), name="team/digits")
    common: dict[str, Any] = {
        "volume_root": tmp_path / "volumes",
        "digest": lambda: "d" * 64,
        "train_rows": N,
        "test_rows": M,
        "classes": C,
        "input_sha256": "a" * 64,
    }
    used, record, refusal = bank.use_bank("IfAvailable", ref, **common)
    assert used is None
    assert not record.calibrated
    assert "a symlink leads outside the claim banks" in record.note
    assert "ran uncalibrated" in record.note
    assert refusal is None
    _, _, refusal = bank.use_bank("Required", ref, **common)
    assert refusal is not None
    assert "outside the claim" in refusal
    (claim / "bank.npz").unlink()
    shutil.copy(path, claim / "bank.npz")
    used, record, refusal = bank.use_bank("Required", ref, **common)
    assert used is not None
    assert record.calibrated
    assert refusal is None
    _, record, refusal = bank.use_bank("Required", BankRef(uri=str(path)), **common, require_claims=True)
    assert refusal is not None
    assert "--calibration-bank" in refusal
    assert "names no claim" in refusal


# -- a request's use of a bank: the policy decision ---------------------------------------------------------

REF = BankRef(uri="pvc://banks/digits/bank.npz", sha256="b" * 64, name="team/digits")


@pytest.mark.parametrize(
    ("policy", "ref", "problem", "expected"),
    [
        ("IfAvailable", REF, None, (True, "bank verified", None)),
        ("Required", REF, None, (True, "bank verified", None)),
        ("Disabled", REF, None, (False, "policy is Disabled", None)),
        ("IfAvailable", None, None, (False, "no calibration bank was given", None)),
        ("Required", None, None, (False, "no calibration bank was given", "policy Required")),
        ("IfAvailable", REF, "made on other data", (False, "made on other data: ran uncalibrated", None)),
        ("Required", REF, "made on other data", (False, "made on other data", "calibration team/digits: made on")),
    ],
)
def test_policy_decides_use(
    policy: str, ref: BankRef | None, problem: str | None, expected: tuple[bool, str, str | None]
) -> None:
    used, note, error = expected
    use, record, refusal = bank.decide_use(policy, ref, problem)
    assert use is used
    assert record.calibrated is used
    assert note in record.note
    if ref is not None:
        assert (record.name, record.uri, record.sha256) == (REF.name, REF.uri, REF.sha256)
    if error is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert error in refusal


def test_bank_problems_and_lineage_note(tmp_path: Path) -> None:
    merged, _ = _bank(tmp_path)
    assert bank.bank_problem(merged, data_digest="d" * 64, train_rows=N, classes=C) is None
    assert "other data" in str(bank.bank_problem(merged, data_digest="e" * 64, train_rows=N, classes=C))
    assert "23 training rows" in str(bank.bank_problem(merged, data_digest="d" * 64, train_rows=24, classes=C))
    assert "3 classes" in str(bank.bank_problem(merged, data_digest="d" * 64, train_rows=N, classes=4))
    assert bank.lineage_note(merged, "a" * 64) == "the bank was made for this very model file"
    assert "earlier version of the same lineage" in bank.lineage_note(merged, "c" * 64)


# -- the recipe: schedule, augmentations, statistics ---------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "epochs", "step", "factor"),
    [
        ({"name": "constant"}, 10, 0, 1.0),
        ({"name": "constant"}, 10, 99, 1.0),
        ({"name": "constant", "warmupEpochs": 2}, 10, 0, 1 / 20),
        ({"name": "constant", "warmupEpochs": 2}, 10, 19, 1.0),
        ({"name": "constant", "warmupEpochs": 2}, 10, 20, 1.0),
        ({"name": "cosine"}, 10, 0, 1.0),
        ({"name": "cosine"}, 10, 50, 0.5),
        ({"name": "cosine"}, 10, 100, 0.0),
        ({"name": "cosine", "warmupEpochs": 2}, 10, 20, 1.0),
        ({"name": "cosine", "warmupEpochs": 2}, 10, 60, 0.5),
        ({"name": "step", "stepEpochs": 3, "gamma": 0.1}, 10, 29, 1.0),
        ({"name": "step", "stepEpochs": 3, "gamma": 0.1}, 10, 30, 0.1),
        ({"name": "step", "stepEpochs": 3, "gamma": 0.1}, 10, 95, 0.001),
    ],
)
def test_lr_factor(schedule: dict[str, Any], epochs: int, step: int, factor: float) -> None:
    assert lr_factor(ScheduleSpec.model_validate(schedule), epochs, 10, step) == pytest.approx(factor, abs=1e-12)


def _recipe(**extra: Any) -> RecipeSpec:
    return RecipeSpec.model_validate({"epochs": 1, "batchSize": 8, "optimizer": {"lr": 0.1}, **extra})


def test_augmentations_need_images() -> None:
    check_recipe(_recipe(augmentations=["random-crop"]), (3, 32, 32))
    check_recipe(_recipe(), (64,))
    with pytest.raises(InvalidInputError, match="need images of shape C x H x W"):
        check_recipe(_recipe(augmentations=["random-crop"]), (64,))


def test_random_crop_shifts_within_the_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    torch.testing.assert_close(random_crop(x, 0, gen), x)
    out = random_crop(x, 2, gen)
    assert out.shape == x.shape
    for b in range(2):
        # Each crop is the image shifted by the same (dy, dx) in every channel, zeros where it left the image.
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[b])
                src = x[b][:, max(0, dy) : 6 + min(0, dy), max(0, dx) : 6 + min(0, dx)]
                shifted[:, max(0, -dy) : 6 + min(0, -dy), max(0, -dx) : 6 + min(0, -dx)] = src
                found = found or bool(torch.equal(shifted, out[b]))
        assert found


def test_horizontal_flip_mirrors_about_half_the_images() -> None:
    x = torch.rand(400, 1, 2, 5)
    out = horizontal_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(400)])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(400)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250
    assert augmenter(_recipe(), torch.Generator()) is None


def test_reset_statistics_of_a_scripted_batch_norm() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net.train()
    net(torch.rand(16, 4) * 10)
    scripted = torch.jit.script(net)
    assert float(scripted.state_dict()["1.running_mean"].abs().sum()) > 0
    reset_statistics(scripted)
    state = scripted.state_dict()
    assert float(state["1.running_mean"].abs().sum()) == 0.0
    torch.testing.assert_close(state["1.running_var"], torch.ones(3))
    assert int(state["1.num_batches_tracked"]) == 0


# -- the calibration's compact records ----------------------------------------------------------------------


def test_compact_calibration_fits_with_32_references() -> None:
    refs = [
        ReferenceLikeness(
            fold=k,
            train_rows=1_234_567,
            held_out_rows=40_000,
            test_accuracy=97.123,
            fold_accuracy=96.987,
            agreement=98.765,
            duration_seconds=12345.678,
        )
        for k in range(32)
    ]
    record = CalibrationRecord(
        calibration="a-namespace/" + "c" * 60,
        model="m" * 63,
        folds=32,
        seed=0,
        exit_code=0,
        likeness=bank.summarise_likeness(refs),
        references=refs,
        recipe={"epochs": 1, "notes": "x" * 3000},
        cost={"wallSeconds": 1.0, "deviceSeconds": 2.0, "retrainEquivalents": 31.0},
        started_at="t0",
        finished_at="t1",
    )
    text = compact_calibration(record)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = json.loads(text)
    assert parsed["referencesTruncated"] is True
    assert "recipe" not in parsed
    assert parsed["likeness"]["agreementMin"] == pytest.approx(98.765)
    assert CalibrationRecord.model_validate(parsed).likeness == record.likeness
    few = record.model_copy(update={"references": refs[:4], "folds": 4})
    assert len(json.loads(compact_calibration(few))["references"]) == 4


def test_compact_fold_trims_a_long_error() -> None:
    record = FoldRecord(calibration="ns/c", fold=3, exit_code=1, error="e" * 10000, started_at="t", finished_at="t")
    text = compact_fold(record)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert FoldRecord.model_validate_json(text).fold == 3


# -- the example manifest ---------------------------------------------------------------------------------


def test_example_matches_the_demo_models_recipe() -> None:
    parsed = load_any_manifest(EXAMPLE)
    assert isinstance(parsed, CalibrationManifest)
    recipe = parsed.spec.recipe
    assert (recipe.epochs, recipe.batch_size, recipe.optimizer.name, recipe.optimizer.lr) == (
        RECIPE.epochs,
        RECIPE.batch,
        "adam",
        RECIPE.lr,
    )
    assert recipe.schedule.name == "constant"
    assert not recipe.augmentations
    assert parsed.spec.data.source == "digits"
    assert (parsed.spec.data.test_fraction, parsed.spec.data.split_seed) == (RECIPE.test_fraction, RECIPE.split_seed)
    assert parsed.spec.folds == DEFAULT_FOLDS
