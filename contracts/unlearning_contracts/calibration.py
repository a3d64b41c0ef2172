"""The UnlearningCalibration spec and its records: the contracts of a model's reference bank.

No statistic computed on one model tells how far a model retrained without a
forget set would have moved: on memorised or mislabelled rows it moves far, on
typical rows hardly at all. A calibration answers that once per model. It
trains ``folds`` (K) reference models with the original's training recipe,
each from scratch on every training row outside one fold, so that every
training row has the prediction of a model that never saw it (OUT) and of
K - 1 models that did (IN). Requests for the model then use the bank as
targets, as a stopping rule and as per-row evidence.

How it runs (the operator and the job agree on exactly this):

* In a cluster, one Indexed Job with ``completions: K``: index ``k`` runs
  ``unlearn calibrate-fold MANIFEST --fold k`` and writes ``fold-<k>.npz`` and
  ``fold-<k>.json`` (a ``FoldRecord``) into the output folder, and its
  compact ``FoldRecord`` to the termination message. When every index has
  succeeded, one merge Job runs ``unlearn calibrate-merge MANIFEST``, which
  checks the folds, writes ``bank.npz`` and ``bank.json`` (a
  ``CalibrationRecord``) and its compact form to the termination message.
* Locally, ``unlearn calibrate MANIFEST`` runs the folds one after another,
  then the merge, and writes the same files.
* The output folder is ``spec.output.location``; every file is published
  under a temporary name and then linked into place, which never replaces
  (a fold's npz and record, and the bank and its record, appear together),
  and nothing in it is ever replaced but a failure record: a second
  calibration of a model writes to a new folder (the operator names it).

This module is pydantic only, like the rest of the contracts package; the
bank's array format is documented with its reader and writer in the job
(``unlearn.bank``) and in docs/calibration.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from unlearning_contracts.api import API_GROUP_VERSION, CALIBRATION
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT, InputModel, _Record, truncate_utf8
from unlearning_contracts.spec import (
    DataSpec,
    JobSpec,
    Manifest,
    ModelSpec,
    ObjectMeta,
    OutputSpec,
    SpecError,
    _Model,
    describe_validation_error,
    parse_manifest,
    read_manifest,
)

CALIBRATION_SCHEMA_VERSION = 1

# The folds Job is "<name>-<8 hex>" and the Job controller names each index's
# pod host "<job>-<index>" (a DNS label, at most 63 characters, index up to
# MAX_FOLDS - 1); the merge Job "<name>-<8 hex>-merge" is a label value too.
# 48 keeps both within 63, as for requests.
MAX_CALIBRATION_NAME_LENGTH = 48

# Reference models are only as good as their likeness to the original, and a
# bank needs at least two folds for every row to have an OUT model; past 32
# the cost (K - 1 retrains' worth of steps) buys little (docs/calibration.md).
# 10 by default: a reference then trains on 90% of the rows, as a retrain
# without a 10% request does; at K = 4 (75%) the OUT predictions err more than
# such a retrain on typical rows and unlearning to them over-forgets
# (docs/calibration.md, "Default K = 10").
MIN_FOLDS = 2
MAX_FOLDS = 32
DEFAULT_FOLDS = 10

Augmentation = Literal["random-crop", "horizontal-flip"]


class OptimizerSpec(_Model):
    """The optimiser the original was trained with."""

    name: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="adam, adamw or sgd.")
    lr: float = Field(gt=0.0, le=10.0, description="Learning rate (the peak rate under a schedule).")
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, description="sgd only: momentum.")
    nesterov: bool = Field(default=False, description="sgd only: Nesterov momentum.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="Weight decay (decoupled for adamw).")

    @model_validator(mode="after")
    def _sgd_only(self) -> OptimizerSpec:
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"recipe.optimizer.momentum and nesterov apply to sgd only, not {self.name}")
        if self.nesterov and not self.momentum:
            raise ValueError("recipe.optimizer.nesterov needs a momentum above 0")
        return self


class ScheduleSpec(_Model):
    """The learning-rate schedule over the training epochs."""

    name: Literal["constant", "cosine", "step"] = Field(
        default="constant",
        description="constant; cosine: decay to 0 over the epochs; step: multiply by gamma every stepEpochs.",
    )
    warmup_epochs: int = Field(default=0, ge=0, le=1000, description="Linear warm-up from 0 over these epochs.")
    step_epochs: int | None = Field(default=None, ge=1, le=10000, description="step only: epochs between steps.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step only: the factor at each step.")

    @model_validator(mode="after")
    def _step_needs_epochs(self) -> ScheduleSpec:
        if self.name == "step" and self.step_epochs is None:
            raise ValueError("recipe.schedule.stepEpochs is required for schedule step")
        return self


class RecipeSpec(_Model):
    """How the original was trained: the reference models repeat it, each without one fold."""

    epochs: int = Field(ge=1, le=10000, description="Passes over the training rows.")
    batch_size: int = Field(ge=1, le=65536, description="Samples per step.")
    optimizer: OptimizerSpec = Field(description="The optimiser and its arguments.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="The learning-rate schedule.")
    augmentations: list[Augmentation] = Field(
        default_factory=list,
        max_length=2,
        description="Image augmentations applied per batch (images of shape C x H x W only).",
    )
    crop_padding: int = Field(default=4, ge=0, le=64, description="random-crop: zero padding on each side.")

    @model_validator(mode="after")
    def _distinct(self) -> RecipeSpec:
        if len(set(self.augmentations)) != len(self.augmentations):
            raise ValueError("recipe.augmentations: list each augmentation once")
        return self


class UnlearningCalibrationSpec(_Model):
    """Train reference models for a model, once, so that its unlearning requests know how far to forget."""

    model: ModelSpec = Field(description="The model to calibrate, exactly as its requests name it.")
    data: DataSpec = Field(default_factory=DataSpec, description="The data the model was trained on.")
    recipe: RecipeSpec = Field(description="The training recipe of the original model.")
    folds: int = Field(
        default=DEFAULT_FOLDS,
        ge=MIN_FOLDS,
        le=MAX_FOLDS,
        description="Reference models (K): each trains on every training row outside one of K folds.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the fold assignment and of the references' weights.")
    output: OutputSpec = Field(description="Folder for the fold outputs and the bank (created when missing).")
    job: JobSpec = Field(default_factory=JobSpec, description="Job resources and placement (cluster only).")


class CalibrationManifest(_Model):
    """A whole UnlearningCalibration object as written in a YAML file (what ``unlearn calibrate`` reads).

    Read like a request's manifest (``spec.read_manifest``: bounded, strict, every key once) and
    validated as strictly: unknown fields are refused at every level, the metadata is bounded.
    """

    api_version: str = Field(description=API_GROUP_VERSION)
    kind: Literal["UnlearningCalibration"] = Field(description=CALIBRATION.kind)
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Object metadata.")
    spec: UnlearningCalibrationSpec
    status: dict[str, Any] | None = Field(default=None, description="Ignored: what the operator reported.")

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        if value != API_GROUP_VERSION:
            raise ValueError(f"apiVersion must be {API_GROUP_VERSION}, got {value}")
        return value

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def calibration_id(self) -> str:
        """``namespace/name``: how records and requests name the calibration."""
        return f"{self.namespace}/{self.name}"


def parse_calibration_manifest(raw: Any) -> CalibrationManifest:
    """Parse a whole calibration manifest or raise SpecError."""
    if not isinstance(raw, dict):
        raise SpecError("manifest: expected a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return CalibrationManifest.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, prefix="manifest")) from None


def parse_any_manifest(raw: Any) -> Manifest | CalibrationManifest:
    """A request or a calibration, by its ``kind`` (anything else is parsed, and refused, as a request)."""
    if isinstance(raw, dict) and raw.get("kind") == CALIBRATION.kind:
        return parse_calibration_manifest(raw)
    return parse_manifest(raw)


def load_any_manifest(
    path: Path, expected: str = "UnlearningRequest or UnlearningCalibration"
) -> Manifest | CalibrationManifest:
    """Read a manifest file of either kind; the caller says what it does with the other kind.

    ``expected``: the kind the caller wants, for the message about an empty file."""
    return parse_any_manifest(read_manifest(path, expected))


class ReferenceLikeness(_Record):
    """How alike one reference model is to the original (a bank is only as good as this)."""

    fold: int
    train_rows: int = Field(description="Training rows it was trained on (every row outside its fold).")
    held_out_rows: int = Field(description="Training rows of its fold, which it never saw.")
    test_accuracy: float = Field(description="Accuracy (percent) on the held-out test set.")
    fold_accuracy: float = Field(
        description="Accuracy (percent) on its own fold: should match testAccuracy within sampling noise."
    )
    agreement: float = Field(description="Percent of test rows where its prediction equals the original's.")
    duration_seconds: float = 0.0


class BankFile(_Record):
    """A file the calibration wrote, by location and digest."""

    uri: str
    sha256: str


class FoldRecord(_Record):
    """What one index of the Indexed Job did (``fold-<k>.json`` and its termination message)."""

    # As CalibrationRecord: a newer job may add fields an older operator has not heard of.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    schema_version: int = CALIBRATION_SCHEMA_VERSION
    calibration: str = Field(description="namespace/name of the UnlearningCalibration.")
    fold: int
    exit_code: int
    error: str | None = None
    reference: ReferenceLikeness | None = None
    outputs: BankFile | None = None
    started_at: str
    finished_at: str
    device: str = ""


class Likeness(_Record):
    """The references against the original, summarised over the K references (percent)."""

    test_accuracy_mean: float
    test_accuracy_min: float
    fold_accuracy_mean: float
    fold_accuracy_min: float
    agreement_mean: float
    agreement_min: float


class CalibrationRecord(_Record):
    """The bank's record (``bank.json``); its compact form is the merge Job's termination message."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    schema_version: int = CALIBRATION_SCHEMA_VERSION
    calibration: str = Field(description="namespace/name of the UnlearningCalibration.")
    model: str
    input_model: InputModel | None = Field(default=None, description="The original model the bank describes.")
    data_digest: str = Field(default="", description="sha256 over the training and test data the folds used.")
    folds: int
    seed: int
    exit_code: int
    error: str | None = None
    bank: BankFile | None = None
    original_test_accuracy: float | None = None
    likeness: Likeness | None = Field(default=None, description="The references' likeness, over all K.")
    references: list[ReferenceLikeness] = Field(default_factory=list)
    cost: dict[str, float] = Field(
        default_factory=dict,
        description="wallSeconds, deviceSeconds and retrainEquivalents (optimiser steps over one retrain's).",
    )
    recipe: dict[str, Any] = Field(default_factory=dict, description="The recipe as run.")
    started_at: str
    finished_at: str
    job_image: str = ""
    code_version: str = ""


# What the compact records may shorten, in order, when every string is at its bound: what the operator
# knows without the record (it wrote the manifest and chose the image), never a digest, the bank's or a
# fold file's uri (where the operator finds them), the exit code or the numbers.
_SHORTENED: tuple[tuple[str, ...], ...] = (
    ("error",),
    ("jobImage",),
    ("inputModel", "uri"),
    ("device",),
    ("calibration",),
    ("model",),
)


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _fit(payload: dict[str, Any], limit: int, droppable: tuple[str, ...]) -> str:
    """Compact JSON (UTF-8) of ``payload`` within ``limit`` bytes: drop ``droppable`` keys (marking
    ``<key>Truncated``), then shorten the strings of ``_SHORTENED`` (named in ``truncated``), as
    ``record.compact`` does for a request."""

    def size() -> int:
        return len(_dumps(payload).encode())

    for key in droppable:
        if size() <= limit:
            break
        if payload.pop(key, None) is not None:
            payload[f"{key}Truncated"] = True
    truncated: list[str] = []
    for path in _SHORTENED:
        if size() <= limit:
            break
        *parents, leaf = path
        holder = payload
        for part in parents:
            holder = holder.get(part) or {}
        value = holder.get(leaf)
        if not isinstance(value, str) or not value:
            continue
        truncated.append(".".join(path))
        payload["truncated"] = truncated
        keep = len(value.encode())
        while keep > 0 and size() > limit:
            keep = max(0, keep - (size() - limit))
            holder[leaf] = truncate_utf8(value, keep)
    text = _dumps(payload)
    if len(text.encode()) > limit:
        raise ValueError(f"compact calibration record is {len(text.encode())} bytes, over {limit}")
    return text


def compact_fold(record: FoldRecord, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """A fold's termination message: the whole record, its strings shortened (``_SHORTENED``) when needed."""
    return _fit(record.dump(), limit, ())


def compact_calibration(record: CalibrationRecord, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The merge's termination message: the record without its recipe; the per-reference list goes
    when it does not fit (up to 32 references), the ``likeness`` summary always stays."""
    payload = record.dump()
    payload.pop("recipe", None)
    return _fit(payload, limit, ("references",))


def parse_calibration_spec(raw: dict[str, Any]) -> UnlearningCalibrationSpec:
    """Parse a calibration's spec dict (as stored in the API server) or raise SpecError naming the field."""
    try:
        return UnlearningCalibrationSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error)) from None
