"""Calibrating a model: train its reference models and merge them into a bank (the thin edge that does I/O).

What a fold does (``unlearn calibrate-fold MANIFEST --fold k``, one index of
the operator's Indexed Job):

1. load the data, the original model and the manifest's recipe, and check that
   they fit (every problem is ``InvalidInputError``: exit 4, never retried);
2. evaluate the original on the fold's rows and on the test rows;
3. re-initialise the model's architecture from scratch under the fold's seed
   and train it with the recipe on every training row outside fold ``k``
   (``unlearn.engine.fit``: the job's own training loop);
4. evaluate the reference on every training row and every test row, and publish
   ``fold-<k>.npz`` and ``fold-<k>.json`` (a ``FoldRecord`` naming the npz's
   sha256) together.

The merge (``unlearn calibrate-merge``) reads only the output folder: it checks
every fold file against its record and against the others and writes
``bank.npz`` and then ``bank.json`` (a ``CalibrationRecord``). ``unlearn
calibrate`` runs the folds one after another in one process and then the
merge. A fold whose files are already there and valid is not trained again,
so a retried index or an interrupted local run resumes; files of another
calibration (other data, model, recipe, K or seed) and an existing bank are
never replaced: that is invalid input, and a new output folder is the fix.

Files, as for a request (``unlearn.files``, ``unlearn.preflight``): the
allow-list, the claims, the inputs and the output folder are checked before
torch is imported (``preflight.check_calibration``); the model and the data
are read by the request's own loaders; every file of the output folder is
read as a regular file inside its claim (never through a link out of it),
bounded in bytes (records ``MAX_RECORD_BYTES``, npz files by the memory the
job may use, with each array's header checked before it is read); and every
file is published with ``OutputFolder.publish`` (a temporary name, then
``link(2)``, which never replaces: a fold's npz and record, and the bank and
its record, appear together or not at all). Only failure records
(``*.failed.json``) are replaced, as a request's are.

Re-initialisation, per model format (``unlearn.model_io.reinitialise``):

* ``state-dict`` with an architecture: the architecture is built anew, so every
  layer gets its own initialiser (the exact distribution the original started
  from when it was built the same way);
* ``exported`` (.pt2): the graph keeps no layer objects, so each parameter is
  drawn the way torch's Linear and Conv layers draw theirs (Kaiming-uniform
  weights, uniform(±1/sqrt(fan_in)) biases, norm scales at one). For networks
  built from default-initialised torch layers (the demo MLP) that is the
  original's own distribution; a network with a custom initialiser gets torch's
  default instead, which the likeness numbers then show;
* ``torchscript``: as exported (its parameters are re-drawn the same way); the
  batch-norm running statistics of both graph formats (buffers named
  ``running_mean``, ``running_var``, ``num_batches_tracked``) are reset too, so
  no statistic of the original's training carries over. Other buffers
  (constants such as positional tables) are kept.

A reference that diverges under the recipe (a non-finite loss) is invalid
input: on the same recipe and seed it would diverge again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import unlearn
from unlearn import bank as bank_format
from unlearn import fit as checks
from unlearn import scratch
from unlearn.bank import BankError, FoldOutputs, LogitTable
from unlearn.data import LoadedData, load_data
from unlearn.draft import failed_calibration, failed_fold, json_bytes, now, one_line
from unlearn.engine import Context, TensorSet, fit, predict
from unlearn.errors import DivergedError, InvalidInputError
from unlearn.files import OutputFolder, Place, memory_budget, resolve
from unlearn.model_io import LoadedModel, load_model, reinitialise
from unlearn.preflight import check_calibration
from unlearn.runner import cpu_threads, pick_device
from unlearning_contracts.calibration import (
    BankFile,
    CalibrationManifest,
    CalibrationRecord,
    FoldRecord,
    OptimizerSpec,
    RecipeSpec,
    ReferenceLikeness,
    ScheduleSpec,
)
from unlearning_contracts.record import EXIT_INVALID_INPUT, EXIT_PASSED, InputModel

log = logging.getLogger("unlearn")
RecordT = TypeVar("RecordT", FoldRecord, CalibrationRecord)

EXIT_UNEXPECTED = 1
BANK_NPZ = "bank.npz"
BANK_JSON = "bank.json"
BANK_FAILED = "bank.failed.json"
MAX_RECORD_BYTES = 1 << 20
"""A fold's or the bank's record (JSON) is read only up to this many bytes (they hold a few KiB)."""
STATISTIC_BUFFERS = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0.0}


@dataclass(frozen=True)
class CalibrateOptions:
    volume_root: Path = Path("/volumes")
    device: str = "auto"
    progress: bool = False
    job_image: str = field(default_factory=lambda: os.environ.get("UNLEARN_JOB_IMAGE", ""))
    allowed_factories: tuple[str, ...] = ()
    """Module prefixes an architecture factory may come from (``unlearning_contracts.factories``)."""
    require_claims: bool = False
    """Every location must name a claim (``--require-claims``, as the operator's Jobs pass it)."""


# -- pure parts: the recipe -------------------------------------------------------------------------------


def lr_factor(schedule: ScheduleSpec, epochs: int, steps_per_epoch: int, step: int) -> float:
    """The multiple of the recipe's learning rate at optimiser step ``step`` (0-based).

    Warm-up rises linearly over the first ``warmupEpochs`` to the full rate
    (the first step already moves, at 1/warm-up-steps of it); then constant
    stays there, cosine decays to 0 at the end of the last epoch, and step
    multiplies by gamma every ``stepEpochs`` epochs counted from the start.
    """
    epoch = step / steps_per_epoch
    warmup = schedule.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if schedule.name == "cosine":
        span = epochs - warmup
        progress = (epoch - warmup) / span if span > 0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule.name == "step":
        assert schedule.step_epochs is not None  # the spec enforces it
        return float(schedule.gamma ** math.floor(epoch / schedule.step_epochs))
    return 1.0


def check_recipe(recipe: RecipeSpec, sample_shape: tuple[int, ...]) -> None:
    """Image augmentations need images (C x H x W); a crop's padding must leave a crop."""
    if recipe.augmentations and len(sample_shape) != 3:
        raise InvalidInputError(
            f"recipe.augmentations: {', '.join(recipe.augmentations)} need images of shape C x H x W, "
            f"the samples have shape {sample_shape}: remove the augmentations"
        )
    if "horizontal-flip" in recipe.augmentations and sample_shape[-1] < 2:
        raise InvalidInputError("recipe.augmentations: horizontal-flip needs images at least 2 pixels wide")


def check_folds(folds: int, rows: int) -> None:
    if folds > rows:
        raise InvalidInputError(f"folds: {folds} folds of {rows} training rows would leave folds empty: lower folds")


def make_optimizer(module: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    # As the engine's Adam: on CUDA one fused kernel for all parameters (small models are launch-bound there).
    fused = (bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)) or None
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    return torch.optim.SGD(
        params,
        lr=spec.lr,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        weight_decay=spec.weight_decay,
        fused=fused,
    )


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of a [B, C, H, W] batch cropped back to H x W at a random offset of its zero-padded copy."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def horizontal_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of a [B, C, H, W] batch mirrored left-right with probability one half."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augmenter(recipe: RecipeSpec, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The recipe's augmentations as one function of a batch, or None."""
    if not recipe.augmentations:
        return None

    def augment(x: torch.Tensor) -> torch.Tensor:
        if "random-crop" in recipe.augmentations:
            x = random_crop(x, recipe.crop_padding, gen)
        if "horizontal-flip" in recipe.augmentations:
            x = horizontal_flip(x, gen)
        return x

    return augment


def reset_statistics(module: nn.Module) -> None:
    """Batch-norm running statistics back to their initial values (see the module docstring)."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            start = STATISTIC_BUFFERS.get(name.rpartition(".")[2])
            if start is not None:
                buffer.fill_(start)


# -- prepare: what every fold and the local run load ------------------------------------------------------


@dataclass
class Prepared:
    manifest: CalibrationManifest
    output: OutputFolder
    data: LoadedData
    loaded: LoadedModel
    original_state: dict[str, torch.Tensor]
    folds: np.ndarray[Any, np.dtype[np.int16]]
    ctx: Context
    train: TensorSet
    test: TensorSet
    meta: dict[str, Any]
    """The meta every fold file and the bank share (``bank.SHARED_META`` and the calibration's names)."""


def output_folder(manifest: CalibrationManifest, options: CalibrateOptions) -> OutputFolder:
    """The output folder, checked as a request's (inside its claim, a folder the job may write or create)."""
    location = manifest.spec.output.location
    if options.require_claims and location.claim_name is None:
        raise InvalidInputError(
            f"output.location: {location.uri} names no claim: in a cluster every location is a path inside a "
            "PersistentVolumeClaim: set claimName"
        )
    output = OutputFolder(resolve(location, options.volume_root, "output.location"))
    output.check()
    return output


def output_file(output: OutputFolder, name: str) -> Place:
    """A file of the output folder, read like an input: inside the folder's claim, never through a link out."""
    folder = output.place
    return Place(
        field="output.location",
        uri=_join_uri(folder.uri, name),
        path=folder.path / name,
        claim=folder.claim,
        root=folder.root,
    )


def _sha256_of(place: Place) -> str:
    digest = hashlib.sha256()
    with place.open() as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(place: Place, model: type[RecordT]) -> RecordT:
    """A fold's or the bank's record, bounded in bytes; a file that is not one is invalid input."""
    data = place.read_bytes(MAX_RECORD_BYTES)
    try:
        return model.model_validate_json(data)
    except ValueError as error:
        first = str(error).splitlines()[0][:200]
        raise InvalidInputError(f"{place.where}: not a {model.__name__} ({first})") from None


def prepare(manifest: CalibrationManifest, options: CalibrateOptions) -> Prepared:
    spec = manifest.spec
    plan = check_calibration(manifest, options.allowed_factories, options.require_claims, options.volume_root)
    device = pick_device(options.device)
    data = load_data(spec.data, options.volume_root)
    check_folds(spec.folds, len(data.train))
    assert plan.model is not None  # checked with its inputs
    loaded = load_model(spec.model, plan.model, options.allowed_factories)
    if loaded.format == "state-dict" and loaded.build is None:
        raise InvalidInputError("model.architecture: a state dict needs its architecture to be trained from scratch")
    module = loaded.module.to(device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(sum(p.numel() for p in module.parameters())))
    samples = tuple(data.train.x.shape[1:])
    checks.check_sample_shape(loaded.sample_shape, samples)
    check_recipe(spec.recipe, samples)
    ctx = Context(device=device, num_classes=2, progress=options.progress)
    try:
        probe = predict(module, torch.from_numpy(data.train.x[:2]).to(device), ctx)
    except Exception as error:  # any forward failure here is a mismatch between data and model
        raise checks.forward_failed(samples, error) from None
    classes = checks.check_outputs(tuple(probe.shape), spec.model.num_classes)
    for name, part in (("data.train", data.train), ("data.test", data.test)):
        checks.check_labels(name, int(part.y.max()), classes)
    ctx.num_classes = classes
    digest = bank_format.data_digest((data.train.x, data.train.y), (data.test.x, data.test.y))
    meta = {
        "formatVersion": bank_format.FORMAT_VERSION,
        "calibration": manifest.calibration_id,
        "model": spec.model.name,
        "folds": spec.folds,
        "seed": spec.seed,
        "dataDigest": digest,
        "inputModel": {"uri": spec.model.source.uri, "sha256": loaded.sha256},
        "recipe": spec.recipe.model_dump(mode="json", by_alias=True),
        "classes": classes,
        "trainRows": len(data.train),
        "testRows": len(data.test),
    }
    log.info(
        "calibration %s: %s, %d train, %d test, %d classes, %d folds, recipe %s",
        manifest.calibration_id,
        data.description,
        len(data.train),
        len(data.test),
        classes,
        spec.folds,
        json.dumps(meta["recipe"], sort_keys=True),
    )
    return Prepared(
        manifest=manifest,
        output=plan.output,
        data=data,
        loaded=loaded,
        original_state={k: v.detach().clone() for k, v in module.state_dict().items()},
        folds=bank_format.assign_folds(len(data.train), spec.folds, spec.seed),
        ctx=ctx,
        train=TensorSet.from_numpy(data.train.x, data.train.y, device),
        test=TensorSet.from_numpy(data.test.x, data.test.y, device),
        meta=meta,
    )


# -- one fold --------------------------------------------------------------------------------------------


def fold_names(fold: int) -> tuple[str, str, str]:
    return f"fold-{fold}.npz", f"fold-{fold}.json", f"fold-{fold}.failed.json"


def _join_uri(folder_uri: str, name: str) -> str:
    return f"{folder_uri.rstrip('/')}/{name}"


def train_fold(p: Prepared, fold: int) -> FoldOutputs:
    """Evaluate the original, train reference ``fold`` from scratch, evaluate it (no file I/O)."""
    spec = p.manifest.spec
    recipe = spec.recipe
    started = time.perf_counter()
    module = p.loaded.module
    module.load_state_dict(p.original_state)
    rows = np.flatnonzero(p.folds == fold).astype(np.int64)
    keep = np.flatnonzero(p.folds != fold).astype(np.int64)
    device = p.ctx.device
    rows_t = torch.from_numpy(rows).to(device)
    train_y = p.data.train.y
    test_y = p.data.test.y
    original_held_out = predict(module, p.train.x.index_select(0, rows_t), p.ctx)
    original_test = predict(module, p.test.x, p.ctx)

    seed = bank_format.fold_seed(spec.seed, fold)
    torch.manual_seed(seed)
    p.ctx.gen = torch.Generator().manual_seed(seed)
    reinitialise(p.loaded)
    reset_statistics(module)
    optimizer = make_optimizer(module, recipe.optimizer)
    part = p.train.take(torch.from_numpy(keep).to(device))
    steps_per_epoch = -(-len(part) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(recipe.schedule, recipe.epochs, steps_per_epoch, step)
    )
    name = f"fold {fold + 1}/{spec.folds}"
    try:
        fit(
            module,
            part,
            optimizer=optimizer,
            epochs=recipe.epochs,
            batch=recipe.batch_size,
            ctx=p.ctx,
            name=name,
            schedule=schedule,
            augment=augmenter(recipe, p.ctx.gen),
        )
    except DivergedError as error:
        raise InvalidInputError(f"recipe: reference {fold} diverged ({error}): give the original's recipe") from None
    train_seconds = time.perf_counter() - started

    train_logits = predict(module, p.train.x, p.ctx)
    test_logits = predict(module, p.test.x, p.ctx)
    if not (np.isfinite(train_logits).all() and np.isfinite(test_logits).all()):
        raise InvalidInputError(f"recipe: reference {fold} gives non-finite outputs: give the original's recipe")
    reference_test = test_logits.argmax(1)
    likeness = ReferenceLikeness(
        fold=fold,
        train_rows=len(keep),
        held_out_rows=len(rows),
        test_accuracy=round(bank_format.accuracy(reference_test, test_y), 3),
        fold_accuracy=round(bank_format.accuracy(train_logits[rows].argmax(1), train_y[rows]), 3),
        agreement=round(bank_format.agreement(reference_test, original_test.argmax(1)), 3),
        duration_seconds=round(time.perf_counter() - started, 3),
    )
    n, m, c = len(train_y), len(test_y), p.ctx.num_classes
    train_storage = bank_format.storage_for(n * c)
    test_storage = bank_format.storage_for(spec.folds * m * c)
    meta = {
        **p.meta,
        "fold": fold,
        "steps": bank_format.steps_per_training(len(keep), recipe.epochs, recipe.batch_size),
        "trainSeconds": round(train_seconds, 3),
        "reference": likeness.dump(),
        "originalTestAccuracy": round(bank_format.accuracy(original_test.argmax(1), test_y), 3),
        "device": _device_name(device),
    }
    log.info(
        "%s: test accuracy %.2f%%, fold accuracy %.2f%%, agreement with the original %.2f%% (%.1f s)",
        name,
        likeness.test_accuracy,
        likeness.fold_accuracy,
        likeness.agreement,
        likeness.duration_seconds,
    )
    return FoldOutputs(
        meta=meta,
        rows=rows,
        held_out=LogitTable.from_logits(train_logits[rows], train_storage),
        original_held_out=LogitTable.from_logits(original_held_out, train_storage),
        original_held_out_phi=bank_format.phi(original_held_out, train_y[rows]),
        phi=bank_format.phi(train_logits, train_y),
        test=LogitTable.from_logits(test_logits, test_storage),
        test_phi=bank_format.phi(test_logits, test_y),
        original_test=LogitTable.from_logits(original_test, test_storage),
        original_test_phi=bank_format.phi(original_test, test_y),
    )


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def existing_fold(output: OutputFolder, fold: int, meta: dict[str, Any]) -> FoldRecord | None:
    """The record of a fold already written for this calibration, or None when it must be trained.

    Files are never replaced, so anything else already there is invalid input:
    another calibration's fold, or a fold file that does not match its record.
    A fold npz without its record (a fold killed between the two links of its
    publish) is this calibration's when its meta says so: its record is
    finished from it, as the merge does for the bank.
    """
    npz_name, json_name, _ = fold_names(fold)
    has_npz, has_record = output.exists(npz_name), output.exists(json_name)
    if not has_npz and not has_record:
        return None
    npz = output_file(output, npz_name)
    if not has_npz:
        raise InvalidInputError(
            f"{output_file(output, json_name).where}: a fold record without its {npz_name}: a fold file is never "
            f"replaced: delete {json_name} and run fold {fold} again"
        )
    data = npz.read_bytes(memory_budget())
    outputs = FoldOutputs.from_bytes(data, npz.where)
    _check_same_calibration(outputs.meta, meta, npz)
    if outputs.fold != fold:
        raise InvalidInputError(f"{npz.where}: holds fold {outputs.fold}, not {fold}")
    sha = bank_format.sha256_bytes(data)
    if has_record:
        record = _read_record(output_file(output, json_name), FoldRecord)
        if record.exit_code != EXIT_PASSED or record.outputs is None or record.outputs.sha256 != sha:
            raise InvalidInputError(
                f"{npz.where}: does not match the sha256 its record names: the file changed after fold {fold} "
                f"wrote it: a fold file is never replaced: delete {npz_name} and {json_name} and run it again"
            )
        return record
    record = _fold_record(outputs, output.place.uri, sha, now())
    output.publish([(json_name, json_bytes(record.dump()))])
    log.info("fold %d: its record finished from %s", fold, npz.where)
    return record


def _check_same_calibration(found: dict[str, Any], meta: dict[str, Any], place: Place) -> None:
    for key in bank_format.SHARED_META:
        if found.get(key) != meta.get(key):
            raise InvalidInputError(
                f"{place.where}: was made for another calibration (its {key} differs): "
                "a calibration never replaces another's files: choose a new output folder"
            )


def _fold_record(outputs: FoldOutputs, folder_uri: str, sha: str, started_at: str) -> FoldRecord:
    return FoldRecord(
        calibration=str(outputs.meta["calibration"]),
        fold=outputs.fold,
        exit_code=EXIT_PASSED,
        reference=ReferenceLikeness.model_validate(outputs.meta["reference"]),
        outputs=BankFile(uri=_join_uri(folder_uri, fold_names(outputs.fold)[0]), sha256=sha),
        started_at=started_at,
        finished_at=now(),
        device=str(outputs.meta["device"]),
    )


def write_fold(p: Prepared, outputs: FoldOutputs, started_at: str) -> FoldRecord:
    """Publish the fold's npz and its record together (never over an existing file)."""
    npz_name, json_name, _ = fold_names(outputs.fold)
    data = outputs.to_bytes()
    record = _fold_record(outputs, p.manifest.spec.output.location.uri, bank_format.sha256_bytes(data), started_at)
    try:
        p.output.publish([(npz_name, data), (json_name, json_bytes(record.dump()))])
    except InvalidInputError:
        # Another pod of the same index published first (a replacement started while the first was still
        # terminating): its files are as good as ours when they are this calibration's.
        done = existing_fold(p.output, outputs.fold, p.meta)
        if done is None:
            raise
        log.info("fold %d: published meanwhile by another pod; kept", outputs.fold)
        return done
    return record


def do_fold(p: Prepared, fold: int, started_at: str) -> FoldRecord:
    """Fold ``fold`` of a prepared calibration: reused when already written, else trained and written."""
    if not 0 <= fold < p.manifest.spec.folds:
        raise InvalidInputError(f"--fold {fold}: the calibration has folds 0..{p.manifest.spec.folds - 1}")
    done = existing_fold(p.output, fold, p.meta)
    if done is not None:
        log.info("fold %d: already written (%s), not trained again", fold, done.outputs.uri if done.outputs else "")
        return done
    return write_fold(p, train_fold(p, fold), started_at)


def _write_failure(output: OutputFolder | None, name: str, payload: dict[str, Any]) -> None:
    """Best effort: a failure record beside the outputs, replacing an older one (the folder itself may be
    what failed; nothing else in it is ever replaced)."""
    if output is None:
        return
    try:
        output.publish([(name, json_bytes(payload))], replace=True)
    except (InvalidInputError, OSError) as error:
        log.warning("cannot write %s in %s: %s", name, output.place.uri, error)


def _output_or_none(manifest: CalibrationManifest, options: CalibrateOptions) -> OutputFolder | None:
    """The output folder for a failure record, when it can be used at all."""
    try:
        return output_folder(manifest, options)
    except InvalidInputError:
        return None


def run_fold(manifest: CalibrationManifest, options: CalibrateOptions, fold: int) -> FoldRecord:
    """One index of the Indexed Job; never raises (the record's exitCode says what happened)."""
    started_at = now()
    try:
        with scratch.guard():  # as unlearn run: stop before the kubelet evicts the pod for its /tmp
            return do_fold(prepare(manifest, options), fold, started_at)
    except (InvalidInputError, scratch.StorageLimitError) as error:
        record = failed_fold(manifest, fold, EXIT_INVALID_INPUT, one_line(error), started_at)
    except Exception as error:  # the retryable class: crash, OOM, a bug
        log.error("unexpected error:\n%s", traceback.format_exc())
        message = f"unexpected error: {type(error).__name__}: {one_line(error)}"
        record = failed_fold(manifest, fold, EXIT_UNEXPECTED, one_line(message), started_at)
    log.error("fold %d failed: %s", fold, record.error)
    _write_failure(_output_or_none(manifest, options), fold_names(fold)[2], record.dump())
    return record


# -- the merge -------------------------------------------------------------------------------------------


def _fold_outputs(output: OutputFolder, fold: int) -> tuple[FoldRecord, FoldOutputs]:
    npz_name, json_name, _ = fold_names(fold)
    record_file, npz = output_file(output, json_name), output_file(output, npz_name)
    if not output.exists(json_name):
        raise InvalidInputError(
            f"output.location: {json_name} is missing in {output.place.uri}: run `unlearn calibrate-fold --fold {fold}`"
        )
    record = _read_record(record_file, FoldRecord)
    if record.exit_code != EXIT_PASSED or record.outputs is None:
        raise InvalidInputError(f"{record_file.where}: fold {fold} did not succeed ({record.error}): run it again")
    if not output.exists(npz_name):
        raise InvalidInputError(
            f"output.location: {npz_name} is missing in {output.place.uri}: delete {json_name} and run fold {fold} "
            "again"
        )
    data = npz.read_bytes(memory_budget())
    sha = bank_format.sha256_bytes(data)
    if sha != record.outputs.sha256:
        raise InvalidInputError(
            f"{npz.where}: sha256 {sha[:16]}... is not the {record.outputs.sha256[:16]}... its record names: "
            f"the file changed after fold {fold} wrote it: delete both and run fold {fold} again"
        )
    outputs = FoldOutputs.from_bytes(data, npz.where)
    if outputs.fold != fold:
        raise InvalidInputError(f"{npz.where}: holds fold {outputs.fold}, not {fold}")
    return record, outputs


def _existing_bank(output: OutputFolder, calibration: str) -> CalibrationRecord | None:
    """The record of this calibration's bank when it is written; None when there is no bank yet, or when
    a merge of this calibration was interrupted between the bank and its record (the merge then finishes
    the record and keeps the bank). Anyone else's bank is invalid input: a bank is never replaced."""
    npz = output_file(output, BANK_NPZ)
    if not output.exists(BANK_NPZ):
        return None
    record: CalibrationRecord | None = None
    if output.exists(BANK_JSON):
        try:
            record = _read_record(output_file(output, BANK_JSON), CalibrationRecord)
        except InvalidInputError:
            record = None
    if record is not None and record.exit_code == EXIT_PASSED and record.bank is not None:
        if record.calibration == calibration and record.bank.sha256 == _sha256_of(npz):
            return record
        raise _foreign_bank(npz)
    try:
        _, meta = bank_format.read_npz(npz)
    except BankError:
        raise _foreign_bank(npz) from None
    if meta.get("calibration") != calibration or output.exists(BANK_JSON):
        raise _foreign_bank(npz)
    return None


def _foreign_bank(npz: Place) -> InvalidInputError:
    return InvalidInputError(
        f"{npz.where}: exists and is not this calibration's bank: a bank is never replaced: choose a new output folder"
    )


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _merge(manifest: CalibrationManifest, options: CalibrateOptions, started_at: str | None) -> CalibrationRecord:
    """Check the fold files and merge them into ``bank.npz`` + ``bank.json`` (or return the bank's record
    when it is already written)."""
    spec = manifest.spec
    output = output_folder(manifest, options)
    existing = _existing_bank(output, manifest.calibration_id)
    if existing is not None:
        log.info("bank already written: %s", existing.bank.uri if existing.bank else "")
        return existing
    records, outputs = [], []
    for fold in range(spec.folds):
        fold_record, fold_outputs = _fold_outputs(output, fold)
        records.append(fold_record)
        outputs.append(fold_outputs)
    first = outputs[0].meta
    meta: dict[str, Any] = {key: first.get(key) for key in bank_format.SHARED_META}
    wanted = {"folds": spec.folds, "seed": spec.seed, "recipe": spec.recipe.model_dump(mode="json", by_alias=True)}
    for key, value in wanted.items():
        if meta[key] != value:
            raise InvalidInputError(
                f"spec.{key}: the fold files in {output.place.uri} were made with another {key}: "
                "choose a new output folder for a calibration that differs"
            )
    references = [ReferenceLikeness.model_validate(o.meta["reference"]) for o in outputs]
    steps = [int(o.meta["steps"]) for o in outputs]
    full_steps = bank_format.steps_per_training(int(meta["trainRows"]), spec.recipe.epochs, spec.recipe.batch_size)
    original_accuracy = float(first.get("originalTestAccuracy", float("nan")))
    tables = (outputs[0].held_out, outputs[0].test, outputs[0].original_held_out, outputs[0].original_test)
    meta.update(
        calibration=manifest.calibration_id,
        model=spec.model.name,
        storage={name: table.storage for name, table in zip(bank_format.BANK_TABLES, tables, strict=True)},
        topK=bank_format.TOP_K,
        originalTestAccuracy=original_accuracy,
        createdAt=now(),
        codeVersion=unlearn.__version__,
    )
    try:
        bank = bank_format.merge_folds(outputs, meta)
    except BankError as error:
        raise InvalidInputError(str(error)) from None
    npz = output_file(output, BANK_NPZ)
    kept = output.exists(BANK_NPZ)
    if kept:  # written by an interrupted merge of these very folds (_existing_bank checked whose)
        data = npz.read_bytes(memory_budget())
        _, found = bank_format.parse_npz(data, npz.where)
        if any(found.get(key) != meta.get(key) for key in bank_format.SHARED_META):
            raise _foreign_bank(npz)
        log.info("bank %s: kept as the interrupted merge wrote it", npz.uri)
    else:
        data = bank.to_bytes()
    sha = bank_format.sha256_bytes(data)
    finished = now()
    starts = [t for t in (_parse_time(r.started_at) for r in records) if t is not None]
    begun = _parse_time(started_at) if started_at else (min(starts) if starts else None)
    end = _parse_time(finished)
    device_seconds = sum(r.duration_seconds for r in references)
    record = CalibrationRecord(
        calibration=manifest.calibration_id,
        model=spec.model.name,
        input_model=InputModel.model_validate(meta["inputModel"]),
        data_digest=str(meta["dataDigest"]),
        folds=spec.folds,
        seed=spec.seed,
        exit_code=EXIT_PASSED,
        bank=BankFile(uri=_join_uri(spec.output.location.uri, BANK_NPZ), sha256=sha),
        original_test_accuracy=original_accuracy,
        likeness=bank_format.summarise_likeness(references),
        references=references,
        cost={
            "wallSeconds": round((end - begun).total_seconds(), 3) if begun and end else round(device_seconds, 3),
            "deviceSeconds": round(device_seconds, 3),
            "trainSeconds": round(sum(float(o.meta["trainSeconds"]) for o in outputs), 3),
            "steps": float(sum(steps)),
            "retrainEquivalents": round(bank_format.retrain_equivalents(steps, full_steps), 4),
            "bankBytes": float(len(data)),
        },
        recipe=dict(meta["recipe"]),
        started_at=started_at or (min(r.started_at for r in records)),
        finished_at=finished,
        job_image=options.job_image,
        code_version=unlearn.__version__,
    )
    files = [(BANK_JSON, json_bytes(record.dump()))]
    try:
        output.publish(files if kept else [(BANK_NPZ, data), *files])  # together; never over an existing file
    except InvalidInputError:
        done = _existing_bank(output, manifest.calibration_id)  # another merge pod finished first
        if done is None:
            raise
        return done
    log.info("bank %s: sha256 %s, %d bytes", npz.uri, sha, len(data))
    return record


def _guarded(manifest: CalibrationManifest, options: CalibrateOptions, started_at: str, body: Any) -> CalibrationRecord:
    """Run ``body()`` -> record; invalid input and crashes become a failed record (and bank.failed.json)."""
    try:
        with scratch.guard():
            done: CalibrationRecord = body()
        return done
    except (InvalidInputError, scratch.StorageLimitError) as error:
        failed = failed_calibration(manifest, EXIT_INVALID_INPUT, one_line(error), started_at, options.job_image)
    except Exception as error:  # the retryable class
        log.error("unexpected error:\n%s", traceback.format_exc())
        message = one_line(f"unexpected error: {type(error).__name__}: {one_line(error)}")
        failed = failed_calibration(manifest, EXIT_UNEXPECTED, message, started_at, options.job_image)
    log.error("calibration failed: %s", failed.error)
    _write_failure(_output_or_none(manifest, options), BANK_FAILED, failed.dump())
    return failed


def run_merge(manifest: CalibrationManifest, options: CalibrateOptions) -> CalibrationRecord:
    """The merge Job: never raises (the record's exitCode says what happened)."""
    return _guarded(manifest, options, now(), lambda: _merge(manifest, options, None))


def run_calibration(manifest: CalibrationManifest, options: CalibrateOptions) -> CalibrationRecord:
    """Locally: every fold, one after another, then the merge; never raises."""
    started_at = now()

    def body() -> CalibrationRecord:
        if output_folder(manifest, options).exists(BANK_NPZ):
            return _merge(manifest, options, started_at)  # already done (or refused: never replaced)
        prepared = prepare(manifest, options)
        for fold in range(manifest.spec.folds):
            do_fold(prepared, fold, now())
        return _merge(manifest, options, started_at)

    return _guarded(manifest, options, started_at, body)
