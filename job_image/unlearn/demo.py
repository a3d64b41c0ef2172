"""The digits demo: an original model that memorised its training data, and a local run.

The model is an MLP (64-512-256-10) trained on scikit-learn's bundled digits
with the declared split the spec defaults to (``testFraction`` 0.25,
``splitSeed`` 0), long enough to fit its training set exactly: the kind of
model that memorises, so that forgetting has something to remove. It is
exported with ``torch.export`` (the format the example request names) and
cached under ``${XDG_CACHE_HOME:-~/.cache}/unlearning-operator/demo/``; a
recipe stamp beside it rebuilds it whenever the recipe below changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn.data import declared_split, load_digits_arrays
from unlearn.engine import Context, TensorSet, descend
from unlearn.files import atomic_write, resolve, within
from unlearning_contracts.spec import Manifest

DEMO_MODEL = Path("digits") / "digits-mlp.pt2"


@dataclass(frozen=True)
class Recipe:
    """How the demo model is trained; the cache is rebuilt when any of this changes."""

    hidden: tuple[int, ...] = (512, 256)
    epochs: int = 150  # long enough to fit every training sample, mislabelled ones included
    lr: float = 1e-3
    batch: int = 64
    seed: int = 0
    test_fraction: float = 0.25  # the spec's default declared split
    split_seed: int = 0
    version: int = 1


RECIPE = Recipe()


def mlp(inputs: int = 64, hidden: tuple[int, ...] = RECIPE.hidden, classes: int = 10) -> nn.Sequential:
    """The demo architecture (no dropout or batch norm: it ships as an exported program)."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def train_digits_model(x: torch.Tensor, y: torch.Tensor, recipe: Recipe = RECIPE, classes: int = 10) -> nn.Sequential:
    """Train the demo MLP from scratch on (x, y) under the recipe's seed (CPU: same weights every time)."""
    torch.manual_seed(recipe.seed)
    model = mlp(x.shape[1], recipe.hidden, classes).to(x.device)
    ctx = Context(device=x.device, num_classes=classes, gen=torch.Generator().manual_seed(recipe.seed))
    descend(model, TensorSet(x, y), lr=recipe.lr, epochs=recipe.epochs, batch=recipe.batch, ctx=ctx, name="train")
    return model


def export_to(module: nn.Module, example: torch.Tensor, dest: Path) -> None:
    """Export with a dynamic batch dimension and write atomically."""
    # clone(): a slice would keep (and serialise) the whole training tensor as the example input.
    program = torch.export.export(module, (example[:2].clone(),), dynamic_shapes=({0: torch.export.Dim.AUTO},))

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            torch.export.save(program, handle)

    atomic_write(dest, write)


def prepare_demo(models_root: Path, recipe: Recipe = RECIPE) -> Path:
    """Train the demo model and write it to ``models_root/digits/digits-mlp.pt2``."""
    full = load_digits_arrays()
    train_rows, _ = declared_split(len(full), recipe.test_fraction, recipe.split_seed)
    train = full.take(train_rows)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    model = train_digits_model(x, y, recipe)
    dest = models_root / DEMO_MODEL
    export_to(model, x, dest)
    return dest


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unlearning-operator" / "demo"


def ensure_demo_model(workdir: Path) -> Path:
    """The cached demo model under ``workdir/volumes/models`` (trained when missing or stale)."""
    models_root = workdir / "volumes" / "models"
    model = models_root / DEMO_MODEL
    stamp = models_root / "digits" / "recipe.json"
    wanted = {**asdict(RECIPE), "hidden": list(RECIPE.hidden), "torch": torch.__version__}
    if model.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                return model
        except ValueError:
            pass
    prepare_demo(models_root)
    stamp.write_text(json.dumps(wanted, sort_keys=True))
    return model


def clear_previous_output(manifest: Manifest, volume_root: Path, workdir: Path) -> None:
    """Remove the demo's own version 1 (model and records), only when the output folder lies in its cache."""
    folder = resolve(manifest.spec.output.location, volume_root, "output.location").real()
    if not within(folder, workdir.resolve()) or not folder.is_dir():
        return
    for path in folder.glob(f"{manifest.spec.model.name}-v1.*"):
        path.unlink()
