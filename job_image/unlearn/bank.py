"""The reference bank of a model: its file format, the statistics it is made of, and its reader.

A calibration (``unlearning_contracts.calibration``) trains K reference models
with the original's recipe, reference ``k`` on every training row outside fold
``k``. This module holds everything about the result that is not training:
the fold assignment, the per-row scores, the likeness and cost numbers, the
data digest, and the two file formats, with a reader that verifies before it
hands anything out. The training is the thin edge in ``unlearn.calibrate``.

The bank file (``bank.npz``, format version 1)
-----------------------------------------------
An uncompressed ``.npz`` read with ``allow_pickle=False``; N is the number of
training rows (in the declared train split, indexed as forget indices are), M
the number of test rows, C the classes, K the folds:

=========================  ==================  ===============================================
array                      dtype, shape        what
=========================  ==================  ===============================================
``meta``                   str, ()             JSON: formatVersion, calibration, model, folds,
                                               seed, dataDigest, inputModel {uri, sha256},
                                               recipe, classes, trainRows, testRows, storage,
                                               topK, originalTestAccuracy, createdAt,
                                               codeVersion
``folds``                  int16 [N]           the fold of each training row: reference
                                               ``folds[i]`` never saw row ``i``
``out_logits``             float32 [N, C]      each row's logits from the reference that
                                               never saw it (its OUT prediction)
``phi``                    float32 [K, N]      every reference's score on every row, IN and
                                               OUT alike: phi = log p_y - log(1 - p_y)
``test_logits``            float32 [K, M, C]   every reference on the test rows
``test_phi``               float32 [K, M]      the same as scores (RMIA's population)
``original_train_logits``  float32 [N, C]      the original on the training rows
``original_train_phi``     float32 [N]
``original_test_logits``   float32 [M, C]      the original on the test rows
``original_test_phi``      float32 [M]
=========================  ==================  ===============================================

``phi`` is LiRA's logit-scaled confidence of the row's own label, computed as
``z_y - logsumexp_{j != y} z_j`` from the logits ``z`` (the softmax normaliser
cancels, so it is exact where ``log(1 - p_y)`` would round to zero). For row
``i`` the OUT score is ``phi[folds[i], i]`` and the K - 1 others are IN scores.

Size bound: a logit table is stored whole while it holds at most
``DENSE_LIMIT`` numbers (2^25, 128 MiB of float32). Above that (many rows
times many classes: ImageNet's 1.28 M x 1,000) it is stored as its ``TOP_K``
largest logits and their classes plus each row's log-sum-exp, under
``<name>_topk_values`` (float32 [..., k]), ``<name>_topk_classes`` (int32
[..., k]) and ``<name>_logsumexp`` (float32 [...]); the ``phi`` arrays keep
the own-label probability exact (``p_y = sigmoid(phi)``). ``meta.storage``
says which form each table has. ``LogitTable.log_probs`` reads either form:
exact when whole, and for top-k the k probabilities exact with the rest of
the mass spread evenly over the other classes.

The fold files (``fold-<k>.npz``) hold what reference ``k`` contributes: its
fold's rows (``rows``, int64) and logits (``held_out_logits``), the
original's logits and scores on those rows (``original_held_out_logits``,
``original_held_out_phi``), its ``phi`` on every training row, its test
logits and scores, the original's test logits and scores, and a ``meta`` JSON
(the bank's keys, plus the fold, its optimiser steps, seconds and likeness).
The merge checks every fold file against the sha256 in its ``fold-<k>.json``
and against the others before it assembles the bank.

The data digest
---------------
sha256 over the loaded data in one canonical form: the ASCII line
``unlearn data digest v1``, then for ``train`` and then ``test`` the line
``<part> x <shape, comma-separated> y <rows>`` followed by the samples as
C-ordered little-endian float32 and the labels as little-endian int64 (each
line ends in ``\\n``). It is computed by the job from the arrays exactly as
``unlearn.data.load_data`` returns them, so the same data reached through
another source (an ``.npz`` instead of a torchvision folder) has the same
digest, and any change to a sample, a label, the split or the row order
changes it. The operator never computes it: a request's job recomputes it and
compares it with the bank's before using the bank.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from unlearn.data import _npz_member as npz_member  # the data's own checked .npy reader
from unlearn.draft import bounded
from unlearn.errors import InvalidInputError
from unlearn.files import Place, memory_budget, plain, resolve
from unlearn.preflight import BankRef, bank_location
from unlearning_contracts.calibration import MAX_FOLDS, Likeness, ReferenceLikeness
from unlearning_contracts.record import MAX_CALIBRATION_NOTE_BYTES, CalibrationUsed

FORMAT_VERSION = 1
DENSE_LIMIT = 1 << 25
TOP_K = 10
DIGEST_HEADER = b"unlearn data digest v1\n"
META_BYTES_BOUND = 1 << 20
"""A bank's or fold file's meta JSON is at most this many bytes (the recipe and a few names and numbers)."""
MAX_NPZ_MEMBERS = 64

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Storage = Literal["dense", "top-k"]

# The logit tables of the bank and of a fold file, by array name.
BANK_TABLES = ("out_logits", "test_logits", "original_train_logits", "original_test_logits")
FOLD_TABLES = ("held_out_logits", "original_held_out_logits", "test_logits", "original_test_logits")


class BankError(InvalidInputError):
    """A bank or fold file that cannot be used as it is; the message says which file and why."""


# -- pure parts: folds, scores, likeness, cost, digest ----------------------------------------------------


def assign_folds(n: int, k: int, seed: int) -> npt.NDArray[np.int16]:
    """The fold (0..k-1) of each of ``n`` rows: a seeded permutation dealt round-robin, so folds differ
    in size by at most one row and do not follow the rows' order (which often follows the label)."""
    if not 2 <= k <= n:
        raise ValueError(f"cannot split {n} rows into {k} folds: need 2 <= folds <= rows")
    order = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=np.int16)
    folds[order] = (np.arange(n) % k).astype(np.int16)
    return folds


def fold_seed(seed: int, fold: int) -> int:
    """The seed of reference ``fold``'s weights and shuffles: independent across folds and calibration seeds."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def phi(logits: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> FloatArray:
    """log p_y - log(1 - p_y) per row, as ``z_y - logsumexp_{j != y} z_j`` (stable where p_y rounds to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    own = z[rows, labels]
    others = z.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    rest = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return np.asarray(own - rest, dtype=np.float32)


def accuracy(predictions: npt.NDArray[np.integer], labels: npt.NDArray[np.integer]) -> float:
    """Percent of rows whose prediction is the label."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.asarray(predictions) == np.asarray(labels)))


def agreement(a: npt.NDArray[np.integer], b: npt.NDArray[np.integer]) -> float:
    """Percent of rows on which two models predict the same class."""
    return accuracy(a, b)


def two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """z statistic of two accuracies (percent) on independent samples of n1 and n2 rows (pooled variance).

    Under the hypothesis that both samples come from rows the model never saw
    (the same accuracy), |z| exceeds 3.29 with probability 0.001.
    """
    a, b = p1 / 100.0, p2 / 100.0
    pooled = (a * n1 + b * n2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0 if a == b else math.copysign(math.inf, a - b)
    return (a - b) / math.sqrt(variance)


def steps_per_training(rows: int, epochs: int, batch: int) -> int:
    """Optimiser steps of a training run: the last, partial batch of an epoch is a step too."""
    return epochs * -(-rows // batch)


def retrain_equivalents(steps: Sequence[int], full_steps: int) -> float:
    """The cost of a calibration in retrains: its optimiser steps over those of one retrain on every row."""
    return float(sum(steps)) / full_steps if full_steps > 0 else float("nan")


def summarise_likeness(references: Sequence[ReferenceLikeness]) -> Likeness:
    """Mean and minimum of each likeness number over the references."""

    def column(name: str) -> list[float]:
        return [float(getattr(r, name)) for r in references]

    return Likeness(
        test_accuracy_mean=round(float(np.mean(column("test_accuracy"))), 3),
        test_accuracy_min=round(min(column("test_accuracy")), 3),
        fold_accuracy_mean=round(float(np.mean(column("fold_accuracy"))), 3),
        fold_accuracy_min=round(min(column("fold_accuracy")), 3),
        agreement_mean=round(float(np.mean(column("agreement"))), 3),
        agreement_min=round(min(column("agreement")), 3),
    )


def data_digest(
    train: tuple[npt.NDArray[Any], npt.NDArray[Any]], test: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> str:
    """sha256 of the loaded data in the canonical form of the module docstring."""
    digest = hashlib.sha256(DIGEST_HEADER)
    for part, (x, y) in (("train", train), ("test", test)):
        xs = np.ascontiguousarray(x, dtype="<f4")
        ys = np.ascontiguousarray(y, dtype="<i8")
        digest.update(f"{part} x {','.join(str(s) for s in xs.shape)} y {len(ys)}\n".encode())
        digest.update(xs.data)
        digest.update(ys.data)
    return digest.hexdigest()


# -- logit tables: whole, or top-k above the size bound ---------------------------------------------------


def storage_for(entries: int, limit: int = DENSE_LIMIT) -> Storage:
    """Whole while a table holds at most ``limit`` numbers, top-k above."""
    return "dense" if entries <= limit else "top-k"


@dataclass(frozen=True)
class LogitTable:
    """Logits of shape [..., C], held whole or as their top-k (see the module docstring)."""

    classes: int
    dense: FloatArray | None = None
    top_values: FloatArray | None = None
    top_classes: npt.NDArray[np.int32] | None = None
    logsumexp: FloatArray | None = None

    @classmethod
    def from_logits(cls, logits: npt.NDArray[np.floating], storage: Storage, top_k: int = TOP_K) -> LogitTable:
        z = np.asarray(logits, dtype=np.float32)
        classes = int(z.shape[-1])
        if storage == "dense" or top_k >= classes:
            return cls(classes, dense=np.ascontiguousarray(z))
        top = np.argpartition(-z, top_k - 1, axis=-1)[..., :top_k]
        values = np.take_along_axis(z, top, axis=-1)
        order = np.argsort(-values, axis=-1)  # largest first, so the prediction is column 0
        z64 = z.astype(np.float64)
        peak = z64.max(axis=-1, keepdims=True)
        lse = (peak + np.log(np.exp(z64 - peak).sum(axis=-1, keepdims=True)))[..., 0]
        return cls(
            classes,
            top_values=np.take_along_axis(values, order, axis=-1).astype(np.float32),
            top_classes=np.take_along_axis(top, order, axis=-1).astype(np.int32),
            logsumexp=lse.astype(np.float32),
        )

    @property
    def storage(self) -> Storage:
        return "dense" if self.dense is not None else "top-k"

    @property
    def shape(self) -> tuple[int, ...]:
        """The leading dimensions (rows, or references x rows)."""
        if self.dense is not None:
            return tuple(self.dense.shape[:-1])
        assert self.logsumexp is not None
        return tuple(self.logsumexp.shape)

    def take(self, index: Any) -> LogitTable:
        """The table at ``index`` of its leading dimension(s) (numpy indexing)."""
        if self.dense is not None:
            return LogitTable(self.classes, dense=self.dense[index])
        assert self.top_values is not None
        assert self.top_classes is not None
        assert self.logsumexp is not None
        return LogitTable(
            self.classes,
            top_values=self.top_values[index],
            top_classes=self.top_classes[index],
            logsumexp=self.logsumexp[index],
        )

    def predictions(self) -> IntArray:
        if self.dense is not None:
            return np.asarray(self.dense.argmax(axis=-1), dtype=np.int64)
        assert self.top_classes is not None
        return np.asarray(self.top_classes[..., 0], dtype=np.int64)

    def log_probs(self) -> FloatArray:
        """log-softmax, [..., C]: exact when whole; top-k classes exact, the rest share what is left evenly."""
        if self.dense is not None:
            z = self.dense.astype(np.float64)
            peak = z.max(axis=-1, keepdims=True)
            out = z - peak - np.log(np.exp(z - peak).sum(axis=-1, keepdims=True))
            return np.asarray(out, dtype=np.float32)
        assert self.top_values is not None
        assert self.top_classes is not None
        assert self.logsumexp is not None
        top = self.top_values.astype(np.float64) - self.logsumexp.astype(np.float64)[..., None]
        k = top.shape[-1]
        rest = np.clip(1.0 - np.exp(top).sum(axis=-1), 1e-12, 1.0) / max(1, self.classes - k)
        out = np.broadcast_to(np.log(rest)[..., None], (*top.shape[:-1], self.classes)).copy()
        np.put_along_axis(out, self.top_classes.astype(np.int64), top, axis=-1)
        return np.asarray(out, dtype=np.float32)

    def arrays(self, name: str) -> dict[str, npt.NDArray[Any]]:
        """The npz entries of this table under ``name``."""
        if self.dense is not None:
            return {name: self.dense}
        assert self.top_values is not None
        assert self.top_classes is not None
        assert self.logsumexp is not None
        return {
            f"{name}_topk_values": self.top_values,
            f"{name}_topk_classes": self.top_classes,
            f"{name}_logsumexp": self.logsumexp,
        }

    @classmethod
    def read(cls, archive: Mapping[str, npt.NDArray[Any]], name: str, classes: int, where: str) -> LogitTable:
        if name in archive:
            dense = np.asarray(archive[name])
            _expect(dense, np.float32, None, f"{where}: {name}")
            if dense.shape[-1] != classes:
                raise BankError(f"{where}: {name} has {dense.shape[-1]} classes, the meta says {classes}")
            return cls(classes, dense=dense)
        keys = (f"{name}_topk_values", f"{name}_topk_classes", f"{name}_logsumexp")
        if not all(key in archive for key in keys):
            raise BankError(f"{where}: no array {name} (whole or top-k): the file is not a complete bank")
        values, top, lse = (np.asarray(archive[key]) for key in keys)
        _expect(values, np.float32, None, f"{where}: {keys[0]}")
        _expect(top, np.int32, values.shape, f"{where}: {keys[1]}")
        _expect(lse, np.float32, values.shape[:-1], f"{where}: {keys[2]}")
        if top.size and (int(top.min()) < 0 or int(top.max()) >= classes):
            raise BankError(f"{where}: {keys[1]} holds classes outside 0..{classes - 1}")
        return cls(classes, top_values=values, top_classes=top, logsumexp=lse)

    @classmethod
    def scatter(cls, parts: Sequence[tuple[IntArray, LogitTable]], n: int, classes: int) -> LogitTable:
        """One table over ``n`` rows from (rows, table) parts that cover every row once."""
        storages = {table.storage for _, table in parts}
        if len(storages) != 1:
            raise BankError("the fold files store their logits in different forms (whole and top-k): rerun them")
        if storages == {"dense"}:
            dense = np.zeros((n, classes), dtype=np.float32)
            for rows, table in parts:
                dense[rows] = table.dense
            return cls(classes, dense=dense)
        k = parts[0][1].top_values.shape[-1]  # type: ignore[union-attr]
        values = np.zeros((n, k), dtype=np.float32)
        top = np.zeros((n, k), dtype=np.int32)
        lse = np.zeros(n, dtype=np.float32)
        for rows, table in parts:
            assert table.top_values is not None
            assert table.top_classes is not None
            assert table.logsumexp is not None
            values[rows] = table.top_values
            top[rows] = table.top_classes
            lse[rows] = table.logsumexp
        return cls(classes, top_values=values, top_classes=top, logsumexp=lse)

    @classmethod
    def stack(cls, tables: Sequence[LogitTable]) -> LogitTable:
        """References stacked along a new leading dimension."""
        first = tables[0]
        if any(t.storage != first.storage for t in tables):
            raise BankError("the fold files store their logits in different forms (whole and top-k): rerun them")
        if first.dense is not None:
            return cls(first.classes, dense=np.stack([t.dense for t in tables]))  # type: ignore[misc]
        return cls(
            first.classes,
            top_values=np.stack([t.top_values for t in tables]),  # type: ignore[misc]
            top_classes=np.stack([t.top_classes for t in tables]),  # type: ignore[misc]
            logsumexp=np.stack([t.logsumexp for t in tables]),  # type: ignore[misc]
        )


def _expect(array: npt.NDArray[Any], dtype: type[np.generic], shape: tuple[int, ...] | None, what: str) -> None:
    if array.dtype != dtype:
        raise BankError(f"{what}: dtype {array.dtype}, expected {np.dtype(dtype).name}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise BankError(f"{what}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise BankError(f"{what}: holds NaN or infinite values")


# -- npz I/O -------------------------------------------------------------------------------------------------


def npz_bytes(arrays: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any]) -> bytes:
    """An uncompressed npz with ``meta`` as a JSON string array (no pickles anywhere), in memory: the
    job publishes it with ``files.OutputFolder.publish`` (never over an existing file)."""
    payload = {"meta": np.array(json.dumps(meta, sort_keys=True)), **arrays}
    buffer = io.BytesIO()
    np.savez(buffer, **payload)  # type: ignore[arg-type]  # numpy's stubs type the keyword arrays narrowly
    return buffer.getvalue()


def save_npz(path: Path, arrays: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any]) -> None:
    """``npz_bytes`` written to a path of the caller's own (tests, benchmarks)."""
    path.write_bytes(npz_bytes(arrays, meta))


def as_place(source: Place | Path, field: str) -> Place:
    """A file to read: a place inside a claim (``files.resolve``), or a path of the caller's own."""
    return source if isinstance(source, Place) else plain(source, field)


def read_npz(source: Place | Path, limit: int | None = None) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """Every array of an npz and its ``meta`` JSON, read as ``files`` reads inputs: a regular file, never
    through a link out of its claim, at most ``limit`` bytes (default: the memory the job may use)."""
    place = as_place(source, "npz")
    return parse_npz(read_place(place, limit), place.where)


def read_place(place: Place, limit: int | None = None) -> bytes:
    """The whole file (``files.Place.read_bytes``: regular, inside its claim, at most ``limit`` bytes,
    default the memory the job may use); what it refuses is a BankError, in its own words."""
    try:
        return place.read_bytes(limit if limit is not None else memory_budget())
    except BankError:
        raise
    except InvalidInputError as error:
        raise BankError(str(error)) from None


def table_bytes(rows: int, classes: int, storage: Storage) -> int:
    """Bytes of a logit table's arrays over ``rows`` rows (see the size bound in the module docstring)."""
    if storage == "dense" or classes <= TOP_K:
        return rows * classes * 4
    return rows * (TOP_K * 8 + 4)


def bank_bytes_bound(train_rows: int, test_rows: int, classes: int, max_folds: int = MAX_FOLDS) -> int:
    """The most bytes a bank of these data can take (any K up to ``max_folds``): a larger file is refused
    before it is read. The arrays' exact sizes, plus room for the meta and the zip and .npy headers."""
    n, m, c = train_rows, test_rows, classes
    largest = 0
    for k in range(2, max_folds + 1):
        test_storage = storage_for(k * m * c)
        arrays = (
            2 * n  # folds
            + 4 * k * (n + m)  # phi, test_phi
            + 4 * (n + m)  # original_train_phi, original_test_phi
            + 2 * table_bytes(n, c, storage_for(n * c))  # out_logits, original_train_logits
            + table_bytes(k * m, c, test_storage)
            + table_bytes(m, c, test_storage)
        )
        largest = max(largest, arrays)
    return largest + META_BYTES_BOUND + 32 * 1024


def parse_npz(data: bytes, where: str) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """The arrays and meta of npz bytes (a bank's sha256 and its arrays come from the same read).

    Each member's .npy header is checked against the bytes it holds and the memory the job may use
    before it is read (``unlearn.data.npz_member``, as for the data): a header that claims 10^12 rows,
    a compressed member that would expand past its size, or a pickled object is refused, not read.
    """
    budget = memory_budget()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [name for name in archive.namelist() if name.endswith(".npy")]
            if len(members) > MAX_NPZ_MEMBERS:
                raise BankError(f"{where}: {len(members)} arrays, more than any bank or fold file holds")
            arrays = {name.removesuffix(".npy"): npz_member(archive, name, where, budget) for name in members}
    except BankError:
        raise
    except InvalidInputError as error:  # the data's reader refused a member: the same words, as a BankError
        raise BankError(str(error)) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as error:
        raise BankError(f"{where}: cannot read as .npz ({str(error).splitlines()[0][:200]})") from None
    meta_array = arrays.pop("meta", None)
    if meta_array is None or meta_array.ndim != 0 or meta_array.dtype.kind != "U":
        raise BankError(f"{where}: no meta (a JSON string): not a bank or fold file of this job")
    text = str(meta_array)
    if len(text.encode("utf-8", "surrogatepass")) > META_BYTES_BOUND:
        raise BankError(f"{where}: its meta is over {META_BYTES_BOUND} bytes: not a bank or fold file of this job")
    try:
        meta = json.loads(text)
    except ValueError:
        raise BankError(f"{where}: its meta is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BankError(f"{where}: its meta is not a JSON object")
    return arrays, meta


def _check_version(meta: Mapping[str, Any], where: str) -> None:
    version = meta.get("formatVersion")
    if version != FORMAT_VERSION:
        raise BankError(f"{where}: format version {version!r}; this job reads version {FORMAT_VERSION}")


# -- fold files ----------------------------------------------------------------------------------------------


@dataclass
class FoldOutputs:
    """What one reference contributes to the bank (the contents of ``fold-<k>.npz``)."""

    meta: dict[str, Any]
    rows: IntArray
    held_out: LogitTable
    original_held_out: LogitTable
    original_held_out_phi: FloatArray
    phi: FloatArray
    test: LogitTable
    test_phi: FloatArray
    original_test: LogitTable
    original_test_phi: FloatArray

    @property
    def fold(self) -> int:
        return int(self.meta["fold"])

    def to_bytes(self) -> bytes:
        arrays: dict[str, npt.NDArray[Any]] = {
            "rows": self.rows.astype(np.int64),
            "original_held_out_phi": self.original_held_out_phi,
            "phi": self.phi,
            "test_phi": self.test_phi,
            "original_test_phi": self.original_test_phi,
        }
        for name, table in zip(
            FOLD_TABLES, (self.held_out, self.original_held_out, self.test, self.original_test), strict=True
        ):
            arrays.update(table.arrays(name))
        return npz_bytes(arrays, self.meta)

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def load(cls, source: Place | Path) -> FoldOutputs:
        place = as_place(source, "fold file")
        return cls.from_bytes(read_place(place), place.where)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> FoldOutputs:
        """A fold file's contents (the merge hashes and parses the same bytes it read once)."""
        arrays, meta = parse_npz(data, where)
        _check_version(meta, where)
        try:
            classes, n, m = int(meta["classes"]), int(meta["trainRows"]), int(meta["testRows"])
        except (KeyError, TypeError, ValueError):
            raise BankError(f"{where}: its meta lacks classes, trainRows or testRows") from None
        for name in ("rows", "original_held_out_phi", "phi", "test_phi", "original_test_phi"):
            if name not in arrays:
                raise BankError(f"{where}: no array {name}: not a complete fold file")
        rows = arrays["rows"]
        _expect(rows, np.int64, None, f"{where}: rows")
        held_out, original_held_out, test, original_test = (
            LogitTable.read(arrays, name, classes, where) for name in FOLD_TABLES
        )
        k = len(rows)
        for name, table, shape in (
            ("held_out_logits", held_out, (k,)),
            ("original_held_out_logits", original_held_out, (k,)),
            ("test_logits", test, (m,)),
            ("original_test_logits", original_test, (m,)),
        ):
            if table.shape != shape:
                raise BankError(f"{where}: {name} covers {table.shape} rows, expected {shape}")
        _expect(arrays["original_held_out_phi"], np.float32, (k,), f"{where}: original_held_out_phi")
        _expect(arrays["phi"], np.float32, (n,), f"{where}: phi")
        _expect(arrays["test_phi"], np.float32, (m,), f"{where}: test_phi")
        _expect(arrays["original_test_phi"], np.float32, (m,), f"{where}: original_test_phi")
        return cls(
            meta=meta,
            rows=rows,
            held_out=held_out,
            original_held_out=original_held_out,
            original_held_out_phi=arrays["original_held_out_phi"],
            phi=arrays["phi"],
            test=test,
            test_phi=arrays["test_phi"],
            original_test=original_test,
            original_test_phi=arrays["original_test_phi"],
        )


# Meta keys every fold of one calibration must agree on (and the bank repeats).
SHARED_META = (
    "formatVersion",
    "folds",
    "seed",
    "dataDigest",
    "inputModel",
    "recipe",
    "classes",
    "trainRows",
    "testRows",
)


# -- the bank ------------------------------------------------------------------------------------------------


@dataclass
class Bank:
    """A loaded, verified bank: what a request (and its audit) reads."""

    meta: dict[str, Any]
    folds: npt.NDArray[np.int16]
    out: LogitTable
    phi: FloatArray
    test: LogitTable
    test_phi: FloatArray
    original_train: LogitTable
    original_train_phi: FloatArray
    original_test: LogitTable
    original_test_phi: FloatArray
    sha256: str = ""
    path: Path | None = field(default=None, compare=False)

    @property
    def k(self) -> int:
        return int(self.phi.shape[0])

    @property
    def classes(self) -> int:
        return self.out.classes

    @property
    def train_rows(self) -> int:
        return len(self.folds)

    @property
    def test_rows(self) -> int:
        return int(self.test_phi.shape[1])

    @property
    def data_digest(self) -> str:
        return str(self.meta.get("dataDigest", ""))

    @property
    def input_sha256(self) -> str:
        return str((self.meta.get("inputModel") or {}).get("sha256", ""))

    def out_phi(self, rows: IntArray) -> FloatArray:
        """Each row's score under the reference that never saw it."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.asarray(self.phi[self.folds[rows].astype(np.int64), rows], dtype=np.float32)

    def in_phi(self, rows: IntArray) -> FloatArray:
        """[len(rows), K - 1]: each row's scores under the references that trained on it."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = self.phi[:, rows].T
        mask = np.arange(self.k)[None, :] != self.folds[rows].astype(np.int64)[:, None]
        return np.asarray(scores[mask].reshape(len(rows), self.k - 1), dtype=np.float32)

    def out_log_probs(self, rows: IntArray) -> FloatArray:
        """[len(rows), C]: each row's OUT prediction as log-probabilities (its target when it is forgotten)."""
        return self.out.take(np.asarray(rows, dtype=np.int64)).log_probs()

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        arrays: dict[str, npt.NDArray[Any]] = {
            "folds": self.folds,
            "phi": self.phi,
            "test_phi": self.test_phi,
            "original_train_phi": self.original_train_phi,
            "original_test_phi": self.original_test_phi,
        }
        for name, table in zip(
            BANK_TABLES, (self.out, self.test, self.original_train, self.original_test), strict=True
        ):
            arrays.update(table.arrays(name))
        return arrays

    def to_bytes(self) -> bytes:
        return npz_bytes(self.arrays(), self.meta)

    def save(self, path: Path) -> None:
        save_npz(path, self.arrays(), self.meta)


def merge_folds(outputs: Sequence[FoldOutputs], meta: dict[str, Any]) -> Bank:
    """Assemble the bank from every fold's outputs (pure; raises BankError when they do not fit together).

    ``meta`` is the bank's meta; its shared keys must equal every fold's.
    """
    k = int(meta["folds"])
    n, classes = int(meta["trainRows"]), int(meta["classes"])
    by_fold = {o.fold: o for o in outputs}
    missing = sorted(set(range(k)) - set(by_fold))
    if missing or len(outputs) != k:
        raise BankError(f"folds {missing or 'repeated'}: a bank needs exactly one output of each of the {k} folds")
    expected = assign_folds(n, k, int(meta["seed"]))
    for fold, o in sorted(by_fold.items()):
        for key in SHARED_META:
            if o.meta.get(key) != meta.get(key):
                raise BankError(
                    f"fold-{fold}: its {key} ({o.meta.get(key)!r:.80}) differs from the calibration's "
                    f"({meta.get(key)!r:.80}): the folds were made for another model, data or recipe"
                )
        if not np.array_equal(o.rows, np.flatnonzero(expected == fold)):
            raise BankError(f"fold-{fold}: its rows are not fold {fold} of the assignment under seed {meta['seed']}")
    ordered = [by_fold[f] for f in range(k)]
    original_train_phi = np.zeros(n, dtype=np.float32)
    for o in ordered:
        original_train_phi[o.rows] = o.original_held_out_phi
    return Bank(
        meta=meta,
        folds=expected,
        out=LogitTable.scatter([(o.rows, o.held_out) for o in ordered], n, classes),
        phi=np.stack([o.phi for o in ordered]).astype(np.float32),
        test=LogitTable.stack([o.test for o in ordered]),
        test_phi=np.stack([o.test_phi for o in ordered]).astype(np.float32),
        original_train=LogitTable.scatter([(o.rows, o.original_held_out) for o in ordered], n, classes),
        original_train_phi=original_train_phi,
        original_test=ordered[0].original_test,
        original_test_phi=ordered[0].original_test_phi,
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_bank(source: Place | Path, expected_sha256: str | None = None, limit: int | None = None) -> Bank:
    """Read and verify a bank file: its sha256 (when given), format version, and every array's dtype and shape.

    ``source``: a place inside a claim (``files.resolve``: never read through a link out of it) or a
    path of the caller's own. ``limit``: refuse a file over this many bytes before reading it (a
    request's job passes ``bank_bytes_bound`` of its data; default: the memory the job may use).
    Raises BankError (an InvalidInputError) naming the file and what is wrong.
    """
    place = as_place(source, "bank")
    where = place.where
    data = read_place(place, limit)
    sha = sha256_bytes(data)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise BankError(
            f"{where}: sha256 {sha[:16]}... is not the calibration's {expected_sha256[:16]}...: "
            "the file changed after the calibration wrote it"
        )
    arrays, meta = parse_npz(data, where)
    _check_version(meta, where)
    try:
        k, n, m, classes = (int(meta[key]) for key in ("folds", "trainRows", "testRows", "classes"))
    except (KeyError, TypeError, ValueError):
        raise BankError(f"{where}: its meta lacks folds, trainRows, testRows or classes") from None
    for name in ("folds", "phi", "test_phi", "original_train_phi", "original_test_phi"):
        if name not in arrays:
            raise BankError(f"{where}: no array {name}: not a complete bank")
    folds = arrays["folds"]
    _expect(folds, np.int16, (n,), f"{where}: folds")
    if n and (int(folds.min()) < 0 or int(folds.max()) >= k):
        raise BankError(f"{where}: folds holds values outside 0..{k - 1}")
    if len(np.unique(folds)) != k:
        raise BankError(f"{where}: some of the {k} folds have no rows")
    _expect(arrays["phi"], np.float32, (k, n), f"{where}: phi")
    _expect(arrays["test_phi"], np.float32, (k, m), f"{where}: test_phi")
    _expect(arrays["original_train_phi"], np.float32, (n,), f"{where}: original_train_phi")
    _expect(arrays["original_test_phi"], np.float32, (m,), f"{where}: original_test_phi")
    out, test, original_train, original_test = (LogitTable.read(arrays, name, classes, where) for name in BANK_TABLES)
    for name, table, shape in (
        ("out_logits", out, (n,)),
        ("test_logits", test, (k, m)),
        ("original_train_logits", original_train, (n,)),
        ("original_test_logits", original_test, (m,)),
    ):
        if table.shape != shape:
            raise BankError(f"{where}: {name} covers {table.shape}, expected {shape}")
    return Bank(
        meta=meta,
        folds=folds,
        out=out,
        phi=arrays["phi"],
        test=test,
        test_phi=arrays["test_phi"],
        original_train=original_train,
        original_train_phi=arrays["original_train_phi"],
        original_test=original_test,
        original_test_phi=arrays["original_test_phi"],
        sha256=sha,
        path=place.path,
    )


# -- a request's use of a bank ------------------------------------------------------------------------------


def bank_problem(bank: Bank, *, data_digest: str, train_rows: int, classes: int) -> str | None:
    """Why a verified bank does not describe this request's model and data, or None when it does."""
    if bank.data_digest != data_digest:
        return (
            f"the bank was made on other data (data digest {bank.data_digest[:12]}..., this request's "
            f"{data_digest[:12]}...): calibrate the model on the data the request names"
        )
    if bank.train_rows != train_rows:
        return f"the bank covers {bank.train_rows} training rows, the data has {train_rows}"
    if bank.classes != classes:
        return f"the bank has {bank.classes} classes, the model {classes}"
    return None


def lineage_note(bank: Bank, input_sha256: str) -> str:
    """How the bank relates to the model this run starts from."""
    if bank.input_sha256 == input_sha256:
        return "the bank was made for this very model file"
    return (
        f"the bank was made for model sha256 {bank.input_sha256[:12]}... and this run starts from "
        f"{input_sha256[:12]}...: valid when that is an earlier version of the same lineage (the operator picks "
        "the model's own calibration), since the references stand for the original's training on these data"
    )


def decide_use(
    policy: str, ref: BankRef | None, problem: str | None, note: str = ""
) -> tuple[bool, CalibrationUsed, str | None]:
    """(use the bank, what the record says, the invalid-input error) for a policy and what was found.

    ``problem`` is why the given bank cannot be used (None when it can); under
    ``Required`` any problem, or no bank at all, is invalid input; under
    ``IfAvailable`` the run goes on uncalibrated and the note says why.
    """
    name, uri, sha = (ref.name, ref.uri, ref.sha256 or "") if ref is not None else ("", "", "")

    def record(calibrated: bool, text: str) -> CalibrationUsed:
        return CalibrationUsed(
            name=name, uri=uri, sha256=sha, calibrated=calibrated, note=bounded(text, MAX_CALIBRATION_NOTE_BYTES)
        )

    if policy == "Disabled":
        return False, record(False, "spec.calibration.policy is Disabled: no bank used"), None
    if ref is None:
        text = "no calibration bank was given (no Ready calibration of this model with these data)"
        if policy == "Required":
            refusal = f"spec.calibration.policy Required: {text}: give one"
            return False, record(False, refusal), refusal
        return False, record(False, text + ": ran uncalibrated"), None
    if problem is not None:
        if policy == "Required":
            return False, record(False, problem), f"calibration {name or uri}: {problem}"
        return False, record(False, f"{problem}: ran uncalibrated"), None
    return True, record(True, note or "bank verified"), None


def use_bank(
    policy: str,
    ref: BankRef | None,
    *,
    volume_root: Path,
    digest: Callable[[], str],
    train_rows: int,
    test_rows: int,
    classes: int,
    input_sha256: str,
    require_claims: bool = False,
) -> tuple[Bank | None, CalibrationUsed, str | None]:
    """Load and verify the bank a request was given, and decide by its policy.

    Returns (the bank when it is used, the record's ``calibration`` entry, the
    invalid-input error under ``Required``). ``digest`` computes the request's
    data digest; it runs only when there is a bank to compare with. The file is
    read as the job reads every input (``files``: a regular file, never through a
    link out of its claim) and refused unread when it is larger than any bank of
    these data can be (``bank_bytes_bound``).
    """
    if policy == "Disabled" or ref is None:
        return None, *decide_use(policy, ref, None)[1:]
    problem: str | None
    bank: Bank | None = None
    try:
        place = resolve(bank_location(ref, require_claims), volume_root, "--calibration-bank")
        bank = load_bank(place, ref.sha256, limit=bank_bytes_bound(train_rows, test_rows, classes))
    except InvalidInputError as error:  # a BankError, or the file is not where it should be
        problem = str(error)
    else:
        ref = replace(ref, sha256=bank.sha256)
        problem = bank_problem(bank, data_digest=digest(), train_rows=train_rows, classes=classes)
    note = lineage_note(bank, input_sha256) if bank is not None and problem is None else ""
    use, record, refusal = decide_use(policy, ref, problem, note)
    return (bank if use else None), record, refusal
