"""Loading training data, held-out data and the forget set into memory.

Everything is read once into numpy arrays (x float32, y int64) and later
moved to the device as whole tensors: the unlearning loops batch by indexing
instead of a per-sample DataLoader, which is where the speed comes from. The
trade-off is that the data must fit in host (and device) memory; unlearning
requests address small forget sets on datasets that fit, and larger ones are
better served by ``method.retainSubset``.

Index convention: forget indices refer to rows of the *training* part. When no
held-out location is given, a deterministic split (``data.testFraction``,
``data.splitSeed``) declares some rows held-out; the training part keeps the
remaining rows in their original order, and the model must have been trained
on exactly that split (``declared_split`` is what the demo uses too).

Every failure is an ``InvalidInputError`` whose message names the field or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from torchvision import datasets, transforms

from unlearn.errors import InvalidInputError
from unlearning_contracts.spec import DataSpec, ForgetSpec, Location

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Arrays:
    """Samples and integer labels, in memory."""

    x: FloatArray
    y: IntArray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: npt.NDArray[np.int64]) -> Arrays:
        return Arrays(self.x[index], self.y[index])


@dataclass(frozen=True)
class LoadedData:
    train: Arrays
    test: Arrays
    description: str


def declared_split(n: int, test_fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    """Deterministic (train rows, held-out rows), each sorted ascending."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    test = np.sort(order[:n_test]).astype(np.int64)
    train = np.sort(order[n_test:]).astype(np.int64)
    return train, test


def load_digits_arrays() -> Arrays:
    """scikit-learn's bundled 8x8 digits, flattened to 64 features scaled to [0, 1]."""
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return Arrays(x, y)


def _check_arrays(x: Any, y: Any, where: str) -> Arrays:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or y.ndim != 1:
        raise InvalidInputError(
            f"{where}: expected x of shape (N, ...) and y of shape (N,), got {x.shape} and {y.shape}"
        )
    if len(x) != len(y):
        raise InvalidInputError(f"{where}: x has {len(x)} rows but y has {len(y)}: give one label per sample")
    if len(y) == 0:
        raise InvalidInputError(f"{where}: the data is empty")
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(f"{where}: x must be numeric (float32), got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(f"{where}: y must hold integer class labels (int64), got dtype {y.dtype}")
    x32 = x.astype(np.float32, copy=False)
    if not np.isfinite(x32).all():
        raise InvalidInputError(f"{where}: x contains NaN or infinite values: clean or drop those samples")
    if int(y.min()) < 0:
        raise InvalidInputError(f"{where}: y contains negative label {int(y.min())}: labels must be 0..classes-1")
    return Arrays(np.ascontiguousarray(x32), y.astype(np.int64, copy=False))


def _resolve_existing(location: Location, volume_root: Path, field: str) -> Path:
    path = location.resolve(volume_root)
    if not path.exists():
        raise InvalidInputError(f"{field}: {location.uri} not found (looked at {path}): fix the path or claim")
    return path


def _load_npz(path: Path, field: str) -> Arrays:
    where = f"{field} {path}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise InvalidInputError(f"{where}: the .npz needs arrays named x and y, found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except InvalidInputError:
        raise
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{where}: cannot read as .npz ({_first_line(error)})") from None
    return _check_arrays(x, y, where)


def _load_image_folder(path: Path, field: str) -> Arrays:
    where = f"{field} {path}"
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.ToTensor())
    except (OSError, FileNotFoundError, RuntimeError) as error:
        raise InvalidInputError(
            f"{where}: not an image folder with one sub-folder per class ({_first_line(error)})"
        ) from None
    xs, ys = [], []
    for i in range(len(folder)):
        try:
            image, label = folder[i]
        except OSError as error:
            raise InvalidInputError(f"{where}: cannot read {folder.samples[i][0]} ({_first_line(error)})") from None
        xs.append(image.numpy())
        ys.append(label)
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise InvalidInputError(f"{where}: images have different sizes {sorted(shapes)[:3]}: resize them to one size")
    return _check_arrays(np.stack(xs), np.asarray(ys, dtype=np.int64), where)


def _load_torchvision(path: Path, name: str, train: bool, field: str) -> Arrays:
    """A torchvision dataset folder, read from its arrays (never downloaded), scaled to [0, 1]."""
    where = f"{field} {path}"
    cls = getattr(datasets, name, None)
    if cls is None:
        raise InvalidInputError(
            f"data.torchvisionDataset: torchvision has no dataset {name!r} (for example CIFAR10, MNIST)"
        )
    try:
        dataset = cls(str(path), train=train, download=False)
    except TypeError:
        raise InvalidInputError(
            f"data.torchvisionDataset: {name} has no train/test split argument: use image-folder"
        ) from None
    except (RuntimeError, OSError) as error:
        raise InvalidInputError(
            f"{where}: no {name} files there ({_first_line(error)}); download=False at run time"
        ) from None
    raw = np.asarray(dataset.data)
    targets = np.asarray(dataset.targets, dtype=np.int64)
    x = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0)
    if x.ndim == 3:  # (N, H, W) grey images -> (N, 1, H, W)
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return _check_arrays(x, targets, where)


def _load_source(spec: DataSpec, location: Location, volume_root: Path, field: str, train: bool) -> Arrays:
    path = _resolve_existing(location, volume_root, field)
    if spec.source == "npz":
        return _load_npz(path, field)
    if spec.source == "image-folder":
        return _load_image_folder(path, field)
    assert spec.torchvision_dataset is not None  # the spec enforces it
    return _load_torchvision(path, spec.torchvision_dataset, train, field)


def load_data(spec: DataSpec, volume_root: Path) -> LoadedData:
    """The training part (forget indices refer to it) and the held-out part."""
    if spec.source == "digits":
        full = load_digits_arrays()
        train_rows, test_rows = declared_split(len(full), spec.test_fraction, spec.split_seed)
        return LoadedData(full.take(train_rows), full.take(test_rows), "digits (scikit-learn)")
    assert spec.train is not None  # the spec enforces it
    full = _load_source(spec, spec.train, volume_root, "data.train", train=True)
    if spec.test is not None:
        test = _load_source(spec, spec.test, volume_root, "data.test", train=spec.source != "torchvision")
        if test.x.shape[1:] != full.x.shape[1:]:
            raise InvalidInputError(
                f"data.test: samples have shape {test.x.shape[1:]} but data.train has {full.x.shape[1:]}"
            )
        return LoadedData(full, test, f"{spec.source} {spec.train.uri} + {spec.test.uri}")
    train_rows, test_rows = declared_split(len(full), spec.test_fraction, spec.split_seed)
    if len(train_rows) < 2:
        raise InvalidInputError("data.train: too few samples to split off a held-out part: give data.test")
    return LoadedData(full.take(train_rows), full.take(test_rows), f"{spec.source} {spec.train.uri} (split)")


def _read_index_file(path: Path, field: str) -> list[Any]:
    try:
        if path.suffix == ".npy":
            values: Any = np.load(path, allow_pickle=False)
            if values.ndim != 1:
                raise InvalidInputError(f"{field} {path}: expected a 1-D array of indices, got shape {values.shape}")
            if not np.issubdtype(values.dtype, np.integer):
                raise InvalidInputError(f"{field} {path}: indices must be integers, got dtype {values.dtype}")
            return [int(v) for v in values]
        text = path.read_text()
        if path.suffix == ".json":
            values = json.loads(text)
            if not isinstance(values, list):
                raise InvalidInputError(f"{field} {path}: expected a JSON list of indices")
            return list(values)
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    except InvalidInputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{field} {path}: cannot read the indices ({_first_line(error)})") from None


def _as_int(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{field}: {value!r} is not an index: use whole numbers")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise InvalidInputError(f"{field}: {value!r} is not an index: use whole numbers")


def load_forget_indices(spec: ForgetSpec, n_train: int, volume_root: Path) -> IntArray:
    """Validated forget indices (sorted, unique, in range, within forget.maxShare)."""
    if spec.indices is not None:
        field = "forget.indices"
        raw: list[Any] = list(spec.indices)
    else:
        assert spec.indices_file is not None  # the spec enforces exactly one
        path = _resolve_existing(spec.indices_file, volume_root, "forget.indicesFile")
        field = f"forget.indicesFile {path}"
        raw = _read_index_file(path, "forget.indicesFile")
    indices = [_as_int(v, field) for v in raw]
    if not indices:
        raise InvalidInputError(f"{field}: the forget set is empty: name at least one training sample")
    seen: set[int] = set()
    for i in indices:
        if i < 0 or i >= n_train:
            raise InvalidInputError(
                f"{field}: index {i} is out of range: the training data has {n_train} samples (0..{n_train - 1})"
            )
        if i in seen:
            raise InvalidInputError(f"{field}: index {i} appears more than once: list each sample once")
        seen.add(i)
    share = len(indices) / n_train
    if share > spec.max_share:
        raise InvalidInputError(
            f"{field}: {len(indices)} samples are {share:.0%} of the training data, over forget.maxShare "
            f"{spec.max_share:.0%}: use method retrain or raise forget.maxShare"
        )
    if len(indices) == n_train:
        raise InvalidInputError(f"{field}: the forget set is the whole training data: nothing would be retained")
    return np.asarray(sorted(indices), dtype=np.int64)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
