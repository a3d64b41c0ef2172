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
Files are read through ``files.Place`` (regular files only, no link out of
their claim, bounded). An ``.npz`` is read member by member: each array's
header is checked against the bytes the member holds and against the memory
the job may use before anything is allocated, so a truncated file or a
header that claims 10^12 rows is bad input (exit 4), not a ``BadZipFile``
or ``MemoryError`` crash that the Job would retry. Indices must be whole
numbers as written: JSON ``true``, ``3.0`` or ``"17"`` is refused, and so is
a text line that is not plain ASCII digits.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets, transforms

from unlearn.errors import InvalidInputError
from unlearn.files import Place, gib, memory_budget, resolve
from unlearning_contracts.spec import DataSpec, ForgetSpec, Location

# An index file holds at most one index per training sample; this much room per index (digits,
# separators, a comment now and then) plus a fixed allowance bounds what is read.
INDEX_FILE_BYTES_PER_SAMPLE = 32
INDEX_FILE_BASE_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")

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
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InvalidInputError(f"{where}: x must be real numbers (float32), got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(f"{where}: y must hold integer class labels (int64), got dtype {y.dtype}")
    x32 = x.astype(np.float32, copy=False)
    if not np.isfinite(x32).all():
        raise InvalidInputError(f"{where}: x contains NaN or infinite values: clean or drop those samples")
    if int(y.min()) < 0:
        raise InvalidInputError(f"{where}: y contains negative label {int(y.min())}: labels must be 0..classes-1")
    return Arrays(np.ascontiguousarray(x32), y.astype(np.int64, copy=False))


def _npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format version {version} is not supported: save with numpy.savez")
    return tuple(shape), dtype


def _npz_member(archive: zipfile.ZipFile, name: str, where: str, budget: int) -> npt.NDArray[Any]:
    """One array of an .npz: its header checked against the member's size and the memory budget first."""
    info = archive.getinfo(name)
    with archive.open(info) as member:
        shape, dtype = _npy_header(member)
        header = member.tell()
    array_name = name.removesuffix(".npy")
    if dtype.hasobject:
        raise InvalidInputError(f"{where}: {array_name} holds Python objects: save numeric arrays")
    count = math.prod(shape)
    declared = count * dtype.itemsize
    held = info.file_size - header
    if declared > held:
        raise InvalidInputError(
            f"{where}: {array_name} declares shape {shape} ({declared} bytes) but holds {max(held, 0)} bytes: "
            "the file is truncated or corrupt"
        )
    needed = max(declared, count * 4)  # the float32 copy the job makes
    if needed > budget:
        raise InvalidInputError(
            f"{where}: {array_name} needs {gib(needed)} in memory, more than the job may use ({gib(budget)}): "
            "raise spec.job.memory or use less data"
        )
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _load_npz(place: Place) -> Arrays:
    where = place.where
    budget = memory_budget()
    try:
        with place.open() as handle, zipfile.ZipFile(handle) as archive:
            members = {n.removesuffix(".npy"): n for n in archive.namelist() if n.endswith(".npy")}
            if "x" not in members or "y" not in members:
                raise InvalidInputError(f"{where}: the .npz needs arrays named x and y, found {sorted(members)}")
            x = _npz_member(archive, members["x"], where, budget)
            y = _npz_member(archive, members["y"], where, budget)
    except InvalidInputError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise InvalidInputError(f"{where}: cannot read as .npz ({_first_line(error)})") from None
    return _check_arrays(x, y, where)


def _load_image_folder(place: Place) -> Arrays:
    where = place.where
    place.require_folder()
    place.check_tree()
    try:
        folder = datasets.ImageFolder(str(place.real()), transform=transforms.ToTensor())
    except (OSError, FileNotFoundError, RuntimeError) as error:
        raise InvalidInputError(
            f"{where}: not an image folder with one sub-folder per class ({_first_line(error)})"
        ) from None
    xs, ys = [], []
    for i in range(len(folder)):
        try:
            image, label = folder[i]
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # a corrupt image, or a bomb
            raise InvalidInputError(f"{where}: cannot read {folder.samples[i][0]} ({_first_line(error)})") from None
        xs.append(image.numpy())
        ys.append(label)
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise InvalidInputError(f"{where}: images have different sizes {sorted(shapes)[:3]}: resize them to one size")
    return _check_arrays(np.stack(xs), np.asarray(ys, dtype=np.int64), where)


def _load_torchvision(place: Place, name: str, train: bool) -> Arrays:
    """A torchvision dataset folder, read from its arrays (never downloaded), scaled to [0, 1]."""
    where = place.where
    cls = getattr(datasets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, datasets.VisionDataset):
        raise InvalidInputError(
            f"data.torchvisionDataset: torchvision has no dataset {name!r} (for example CIFAR10, MNIST)"
        )
    place.require_folder()
    place.check_tree()
    try:
        dataset = cls(str(place.real()), train=train, download=False)
    except TypeError:
        raise InvalidInputError(
            f"data.torchvisionDataset: {name} has no train/test split argument: use image-folder"
        ) from None
    except (RuntimeError, OSError, ValueError) as error:
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
    place = resolve(location, volume_root, field)
    if spec.source == "npz":
        return _load_npz(place)
    if spec.source == "image-folder":
        return _load_image_folder(place)
    assert spec.torchvision_dataset is not None  # the spec enforces it
    return _load_torchvision(place, spec.torchvision_dataset, train)


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


def index_file_limit(n_train: int) -> int:
    """The most bytes an index file for ``n_train`` training samples can need."""
    return INDEX_FILE_BASE_BYTES + INDEX_FILE_BYTES_PER_SAMPLE * n_train


def _read_index_file(place: Place, n_train: int) -> list[int]:
    where = place.where
    data = place.read_bytes(index_file_limit(n_train))
    try:
        if place.path.suffix == ".npy":
            buffer = io.BytesIO(data)
            shape, dtype = _npy_header(buffer)
            if len(shape) != 1:
                raise InvalidInputError(f"{where}: expected a 1-D array of indices, got shape {shape}")
            if not np.issubdtype(dtype, np.integer):
                raise InvalidInputError(f"{where}: indices must be integers, got dtype {dtype}")
            if shape[0] * dtype.itemsize > len(data) - buffer.tell():
                raise InvalidInputError(f"{where}: declares {shape[0]} indices but holds fewer: truncated or corrupt")
            buffer.seek(0)
            values: Any = np.load(buffer, allow_pickle=False)
            return [int(v) for v in values]
        text = data.decode("utf-8")
        if place.path.suffix == ".json":
            values = json.loads(text)
            if not isinstance(values, list):
                raise InvalidInputError(f"{where}: expected a JSON list of indices")
            return [_json_index(v, where) for v in values]
        lines = (line.strip() for line in text.splitlines())
        return [_text_index(line, where) for line in lines if line and not line.startswith("#")]
    except InvalidInputError:
        raise
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{where}: not UTF-8 text (byte {error.start}): write one index per line") from None
    except (ValueError, EOFError, RecursionError) as error:
        raise InvalidInputError(f"{where}: cannot read the indices ({_first_line(error)})") from None


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (bool, int, float, str)) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."


def _json_index(value: Any, where: str) -> int:
    # bool is an int in Python: JSON true must not become the index 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidInputError(f'{where}: {_shown(value)} is not an index: write whole numbers (17, not 17.0 or "17")')


def _text_index(line: str, where: str) -> int:
    # Plain ASCII digits: int() would also take "+17", "1_7" and other scripts' digits.
    if _DIGITS.fullmatch(line):
        return int(line)
    raise InvalidInputError(f"{where}: {_shown(line)} is not an index: write one whole number per line")


def load_forget_indices(spec: ForgetSpec, n_train: int, volume_root: Path) -> IntArray:
    """Validated forget indices (sorted, unique, in range, within forget.maxShare)."""
    if spec.indices is not None:
        field = "forget.indices"
        indices = list(spec.indices)  # whole numbers already: the spec is strict
    else:
        assert spec.indices_file is not None  # the spec enforces exactly one
        place = resolve(spec.indices_file, volume_root, "forget.indicesFile")
        field = place.where
        indices = _read_index_file(place, n_train)
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
