"""The UnlearningRequest spec: the one source of truth for the API.

These pydantic models are contract 1 of the design. The CRD's OpenAPI schema
is generated from them (``python -m unlearning_operator.crdgen``), the
operator validates incoming objects with them, the job validates its input
with them again, and ``unlearn run`` reads the very manifest a user would
``kubectl apply``. Every field carries a description because those
descriptions become what ``kubectl explain unlearningrequest.spec`` prints.

Every request is written by a tenant we do not trust, so validation is
strict: no type is coerced (``true`` is not the index 1, ``"17"`` is not 17),
unknown fields are refused at every level (a ``data:`` block written beside
``spec`` instead of under it is an error, not ignored), at least one gate is
set (a verdict with no gate would be Passed whatever the audit measured), and
every string that reaches the result record or a file system is bounded in
bytes, not characters (the compact record must fit the kubelet's 4 KiB; a
path component over 255 bytes fails with ENAMETOOLONG). Manifest files are
read by ``safe_yaml`` (bounded, no alias bombs, no duplicated keys).

Pydantic and PyYAML only, like the rest of the contracts package: the
operator image installs no torch, the job image no kopf.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from unlearning_contracts.api import API_GROUP_VERSION
from unlearning_contracts.safe_yaml import YamlInputError, load_document, read_text

# Job names are "<request>-<attempt hash>" and pod names add the Job
# controller's 6-character suffix; 63 characters is the label-value limit, so
# a request name this long still yields valid child names.
MAX_REQUEST_NAME_LENGTH = 48

PVC_SCHEME = "pvc://"
# Where the Job mounts each claim; ``unlearn run --volume-root`` maps it locally.
DEFAULT_VOLUME_ROOT = "/volumes"

# Kubernetes object names (RFC 1123 DNS label) for PVCs and models.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Object names in metadata.name (RFC 1123 DNS subdomain, at most 253 characters).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Bounds in UTF-8 bytes of the strings that reach a file system or the result
# record (the compact record must fit 4 KiB however a tenant fills them; see
# unlearning_contracts.record.compact and its worst-case test).
MAX_PATH_BYTES = 1024
MAX_PATH_COMPONENT_BYTES = 255  # NAME_MAX: a longer file or folder name fails with ENAMETOOLONG
MAX_REQUEST_ID_BYTES = 128
MAX_IMAGE_BYTES = 512


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text(value: str, max_bytes: int) -> str:
    """A string that reaches a record or a file system: no control characters, at most ``max_bytes`` in UTF-8."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"must not contain control characters (found U+{ord(char):04X})")
    size = utf8_length(value)
    if size > max_bytes:
        raise ValueError(f"is {size} bytes in UTF-8, over the limit of {max_bytes}: shorten it")
    return value


Method = Literal["auto", "calibrated", "gradient-ascent", "neggrad-plus", "scrub", "salun", "retrain"]
# The method label of the operator's metrics: the record names the method that ran (auto resolved), and
# "auto" stays only for a request that failed before the job chose.
METHODS: tuple[str, ...] = ("auto", "calibrated", "gradient-ascent", "neggrad-plus", "scrub", "salun", "retrain")
ModelFormat = Literal["exported", "state-dict", "torchscript"]
DataSource = Literal["digits", "npz", "image-folder", "torchvision"]


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        # No coercion: YAML `true` is not the index 1, "17" is not 17, 3.0 is not 3.
        # (A whole number is still a valid float: `lr: 1` means 1.0.)
        strict=True,
    )


class Location(_Model):
    """A file or folder: a path inside a PersistentVolumeClaim, or a plain path locally."""

    claim_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description=(
            "PersistentVolumeClaim that holds the path. The Job mounts it (read-only for "
            "inputs, read-write for outputs) at /volumes/<claimName>. Leave empty for a "
            "plain path (local runs with `unlearn run`)."
        ),
    )
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="Path inside the claim (relative), or a plain path when no claim is named.",
    )

    @field_validator("path")
    @classmethod
    def _no_parent_escape(cls, value: str) -> str:
        if ".." in Path(value).parts:
            raise ValueError("path must not contain '..' (it could escape the volume)")
        check_text(value, MAX_PATH_BYTES)
        for part in Path(value).parts:
            if utf8_length(part) > MAX_PATH_COMPONENT_BYTES:
                raise ValueError(
                    f"path has a file or folder name of {utf8_length(part)} bytes, over the file-system limit of "
                    f"{MAX_PATH_COMPONENT_BYTES}: shorten it"
                )
        return value

    @property
    def uri(self) -> str:
        """``pvc://<claim>/<path>`` for claimed locations, the plain path otherwise."""
        if self.claim_name is None:
            return self.path
        return f"{PVC_SCHEME}{self.claim_name}/{self.path.lstrip('/')}"

    @classmethod
    def from_uri(cls, uri: str) -> Location:
        """Inverse of ``uri``: how the operator reads a record's output location."""
        if uri.startswith(PVC_SCHEME):
            claim, _, path = uri[len(PVC_SCHEME) :].partition("/")
            return cls(claim_name=claim, path=path)
        return cls(path=uri)

    def resolve(self, volume_root: Path) -> Path:
        """The filesystem path: claims are mounted at ``<volume_root>/<claimName>``."""
        if self.claim_name is None:
            return Path(self.path)
        return volume_root / self.claim_name / self.path.lstrip("/")


class Architecture(_Model):
    """How to build the network that a state dict is loaded into."""

    torchvision: str | None = Field(
        default=None,
        max_length=128,
        description="A torchvision.models builder by name, for example resnet18.",
    )
    factory: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description=(
            "An importable `package.module:function` that returns the network, for custom "
            "architectures baked into a derived job image."
        ),
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the builder, for example {num_classes: 10}.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Architecture:
        if (self.torchvision is None) == (self.factory is None):
            raise ValueError("set exactly one of architecture.torchvision or architecture.factory")
        return self


class ModelSpec(_Model):
    """The model to unlearn from."""

    name: str = Field(
        max_length=63,
        pattern=DNS_LABEL,
        description=(
            "Logical model name. Requests naming the same model run one at a time, each "
            "starting from the newest unlearned version of it."
        ),
    )
    format: ModelFormat = Field(
        default="exported",
        description=(
            "exported: a torch.export program (.pt2); state-dict: safetensors or torch.save "
            "weights plus `architecture`; torchscript: a TorchScript file (deprecated upstream)."
        ),
    )
    source: Location = Field(description="Where the original model version is stored.")
    architecture: Architecture | None = Field(
        default=None,
        description="The network to load a state dict into (required for format state-dict).",
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=100000,
        description="Number of output classes; read from the data when omitted.",
    )

    @model_validator(mode="after")
    def _architecture_for_state_dict(self) -> ModelSpec:
        if self.format == "state-dict" and self.architecture is None:
            raise ValueError("model.format state-dict needs model.architecture (torchvision or factory)")
        if self.format != "state-dict" and self.architecture is not None:
            raise ValueError(f"model.architecture is only used with format state-dict, not {self.format}")
        return self


class DataSpec(_Model):
    """The training data the model saw, and held-out data for the audit."""

    source: DataSource = Field(
        default="digits",
        description=(
            "digits: scikit-learn's bundled handwritten digits (nothing to mount); npz: files "
            "with x (float32) and y (int64); image-folder: one sub-folder per class; "
            "torchvision: a torchvision dataset folder (never downloaded at run time)."
        ),
    )
    train: Location | None = Field(
        default=None,
        description="Training data the model was trained on (forget indices refer to it).",
    )
    test: Location | None = Field(
        default=None,
        description="Held-out data for the audit. When omitted, a split of `train` is declared by testFraction.",
    )
    torchvision_dataset: str | None = Field(
        default=None,
        max_length=64,
        description="Dataset class name for source torchvision, for example CIFAR10.",
    )
    test_fraction: float = Field(
        default=0.25,
        gt=0.0,
        lt=0.9,
        description=(
            "Share of the data declared held-out when no `test` location is given. The split "
            "is deterministic (splitSeed) and must match the split used to train the model."
        ),
    )
    split_seed: int = Field(default=0, ge=0, description="Seed of the declared train/test split.")

    @model_validator(mode="after")
    def _locations(self) -> DataSpec:
        if self.source == "digits":
            if self.train is not None or self.test is not None:
                raise ValueError("data.source digits is embedded: remove data.train and data.test")
        elif self.train is None:
            raise ValueError(f"data.source {self.source} needs data.train")
        if self.source == "torchvision" and not self.torchvision_dataset:
            raise ValueError("data.source torchvision needs data.torchvisionDataset, for example CIFAR10")
        return self


class ForgetSpec(_Model):
    """The samples to forget: indices into the training data."""

    indices: list[int] | None = Field(
        default=None,
        max_length=100000,
        description="Inline indices into the training data (for small requests).",
    )
    indices_file: Location | None = Field(
        default=None,
        description="A file of indices: .npy, .json (a list) or text with one index per line.",
    )
    classes: list[int] | None = Field(
        default=None,
        max_length=1000,
        description="Classes the request removes whole (their rows among the forget indices get the class-absent "
        "target: the model's probabilities with these classes removed). A forget set that holds every training "
        "row of a class removes it without being told.",
    )
    max_share: float = Field(
        default=0.2,
        gt=0.0,
        le=0.5,
        description=(
            "Largest share of the training data a request may forget. Forgetting more is "
            "retraining; ask for method retrain instead."
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ForgetSpec:
        if (self.indices is None) == (self.indices_file is None):
            raise ValueError("set exactly one of forget.indices or forget.indicesFile")
        if self.indices is not None:
            if not self.indices:
                raise ValueError("forget.indices is empty: name at least one sample to forget")
            if min(self.indices) < 0:
                raise ValueError("forget.indices must be non-negative")
            if len(set(self.indices)) != len(self.indices):
                raise ValueError("forget.indices has duplicates: list each sample once")
        if self.classes is not None and (
            min(self.classes, default=0) < 0 or len(set(self.classes)) != len(self.classes)
        ):
            raise ValueError("forget.classes must be distinct non-negative class indices")
        return self


class StageSpec(_Model):
    """One optimisation stage. Unset fields take the method's defaults."""

    lr: float | None = Field(default=None, gt=0.0, le=1.0, description="Adam learning rate.")
    epochs: int | None = Field(default=None, ge=0, le=1000, description="Passes over the stage's data.")
    batch_size: int | None = Field(default=None, ge=1, le=65536, description="Samples per step.")


class MethodSpec(_Model):
    """The unlearning method and its hyper-parameters."""

    name: Method = Field(
        default="auto",
        description=(
            "auto (default): calibrated when the request has its model's reference bank or removes whole "
            "classes, scrub otherwise; calibrated: moves each forget row to what a model retrained without it "
            "predicts (its reference bank's OUT prediction; the class-absent softmax for a removed class) and "
            "stops when the gap to retraining estimated from the bank is smallest; "
            "gradient-ascent: ascent on the forget set, then fine-tuning on the retain set; "
            "neggrad-plus: ascent and descent in one joint loss; scrub: teacher-student "
            "max-min distillation; salun: saliency-masked random-label unlearning; retrain: "
            "train from scratch on the retain set (the gold standard, slowest)."
        ),
    )
    forget: StageSpec = Field(default_factory=StageSpec, description="The forgetting stage.")
    retain: StageSpec = Field(default_factory=StageSpec, description="The retain fine-tuning stage.")
    alpha: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Weight of the retain loss in neggrad-plus and scrub (method default when unset).",
    )
    saliency_sparsity: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="salun: share of the weights (by forget-gradient magnitude) that may change.",
    )
    retain_subset: int | None = Field(
        default=None,
        ge=1,
        description="Fine-tune on a random subset of this many retain samples (the retain stage dominates the cost).",
    )
    weight_noise: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Standard deviation of Gaussian noise added to every weight after unlearning.",
    )
    mixed_precision: bool = Field(default=True, description="Use bfloat16/float16 autocast on CUDA (ignored on CPU).")
    seed: int = Field(default=0, ge=0, description="Seed for shuffling, subsets and noise (runs are reproducible).")


class GatesSpec(_Model):
    """Acceptance gates: every gate set here must hold for the verdict Passed. At least one must be set.

    Each gate judges a number's 95% interval, not its point value. A forgetting
    gate (forget accuracy, confidence gap, the membership attacks) fails only
    when the whole interval lies outside what it allows, and a membership gate
    whose attack cannot tell the model's own training rows from held-out rows
    (its positive control) is inconclusive rather than passed. The test-accuracy
    gate passes only when the whole interval of the drop lies within its limit.
    docs/audit-record.md explains each rule.
    """

    max_forget_accuracy: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Highest forget-set accuracy (percent) after unlearning: fails when its whole 95% interval "
        "lies above.",
    )
    max_test_accuracy_drop: float | None = Field(
        default=2.0,
        ge=0.0,
        le=100.0,
        description="Largest fall in held-out accuracy (percentage points) from before unlearning: the whole 95% "
        "interval of the fall (the same rows before and after) must lie within it.",
    )
    max_confidence_gap: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest |mean max-softmax on forget - on held-out rows of the same classes|: fails when the "
        "whole 95% interval lies beyond +-this. Weak alone: see the pre-unlearning value.",
    )
    max_mia_auc: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Loss-attack AUC, forget vs held-out rows of the same classes, two-sided around what "
        "retraining would show (0.5 until a reference bank gives it): 0.6 allows 0.4 to 0.6. Fails when the "
        "whole 95% interval lies outside. For typical rows only: a model retrained without mislabelled or "
        "atypical rows scores them far below 0.5 (use maxMiaClassifierAccuracy there).",
    )
    max_mia_classifier_accuracy: float | None = Field(
        default=0.6,
        ge=0.5,
        le=1.0,
        description="Cross-validated balanced accuracy of a classifier telling forget rows from held-out rows of "
        "the same classes by their confidence vectors (0.5 is chance; it reads no label, so it suits "
        "mislabelled rows too): fails when the whole 95% interval lies above.",
    )

    max_estimated_gap: float | None = Field(
        default=5.0,
        ge=0.0,
        le=100.0,
        description="Calibrated runs (with a reference bank) only: the largest gap to retraining estimated from "
        "the bank (mean |difference| over forget, retain and test accuracy and MIA-efficacy against what the "
        "bank says retraining gives, in points). The untouched model fails it on memorised rows and on class "
        "removal; a typical set that retraining would leave as it is passes without change.",
    )
    min_membership_p_value: float | None = Field(
        default=1e-6,
        ge=0.0,
        le=1.0,
        description="Calibrated runs only: fails when the per-row membership test against the bank finds more "
        "forget rows that still look like members (at 1% false positives) than the about 1% expected after "
        "retraining, with a binomial p-value below this. The default fails only overwhelming evidence: on "
        "digits the untouched model on memorised rows scores far below it, while doing nothing to a typical "
        "random 10% scores about 1e-4 (a model remembers typical rows a little too).",
    )
    max_class_readability: float | None = Field(
        default=0.99,
        ge=0.5,
        le=1.0,
        description="Class requests only: the largest AUC with which a removed class's own logit still singles "
        "out held-out rows of that class. 1.0 on the untouched model and after masking the class's output; a "
        "model retrained without the class scores below it too (0.94 on digits: rows of a class never learned "
        "still stand out), so this catches masking, not every trace.",
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> GatesSpec:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "every gate is null, so the verdict would be Passed whatever the audit measured: "
                "set at least one (for example maxMiaClassifierAccuracy: 0.6)"
            )
        return self


class TuningSpec(_Model):
    """Automatic retries when a gate fails, each from the original weights."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="Attempts in all, the first included.")


class AuditSpec(_Model):
    """How much the audit evaluates: bounded so it never costs more than the unlearning."""

    max_samples: int = Field(
        default=5000, ge=100, le=1000000, description="Samples per set (forget, retain, held-out) evaluated."
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the audit's own randomness (which rows are sampled when a set is larger than "
        "maxSamples, the classifier attack's folds, MIA-efficacy's subsample). Independent of method.seed, so one "
        "model's audit is the same whichever method runs after it.",
    )


class OutputSpec(_Model):
    """Where the new model version and its result record are written."""

    location: Location = Field(description="Folder for new model versions (created when missing).")


class Toleration(_Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long to stay bound.")


class JobSpec(_Model):
    """How the GPU Job runs. Unset fields take the operator's defaults."""

    image: str | None = Field(
        default=None, max_length=MAX_IMAGE_BYTES, description="Job image; must be in the operator's allow-list."
    )
    gpus: int | None = Field(default=None, ge=0, le=64, description="nvidia.com/gpu per pod.")
    cpu: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?m?$", description="CPU request and limit.")
    memory: str | None = Field(
        default=None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", description="Memory request and limit."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description="Kueue LocalQueue: the Job is created suspended and Kueue admits it.",
    )
    priority_class_name: str | None = Field(default=None, max_length=253, description="Pod priority class.")
    node_selector: dict[str, str] | None = Field(default=None, description="Pod node selector.")
    tolerations: list[Toleration] | None = Field(default=None, description="Pod tolerations.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, le=7 * 24 * 3600, description="Wall-clock limit of the Job."
    )

    @field_validator("image")
    @classmethod
    def _image_bytes(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, MAX_IMAGE_BYTES)


CalibrationPolicy = Literal["IfAvailable", "Required", "Disabled"]


class CalibrationUse(_Model):
    """Whether the request uses a reference bank of its model (an UnlearningCalibration)."""

    policy: CalibrationPolicy = Field(
        default="IfAvailable",
        description=(
            "IfAvailable: use the newest Ready calibration of the model whose data equal this request's, and "
            "run uncalibrated (the record says why) when there is none or it does not match; Required: wait "
            "for one, and fail as invalid input when the bank does not match the model's data; Disabled: "
            "never use one."
        ),
    )
    name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description="A specific UnlearningCalibration in the request's namespace (default: the newest Ready one).",
    )


class UnlearningRequestSpec(_Model):
    """Forget a set of training samples from a model, audit it, and write a new version."""

    request_id: str | None = Field(
        default=None,
        max_length=128,
        description="Your ticket id for the erasure request (for example GDPR-2026-0042); defaults to namespace/name.",
    )
    model: ModelSpec = Field(description="The model to unlearn from.")
    data: DataSpec = Field(default_factory=DataSpec, description="The data the model was trained on.")
    forget: ForgetSpec = Field(description="The samples to forget.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="The unlearning method.")
    gates: GatesSpec = Field(default_factory=GatesSpec, description="Acceptance gates for the verdict.")
    tuning: TuningSpec = Field(default_factory=TuningSpec, description="Retries when a gate fails.")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="Audit sample bounds.")
    output: OutputSpec = Field(description="Where the new model version goes.")
    job: JobSpec = Field(default_factory=JobSpec, description="Job resources and placement (cluster only).")
    calibration: CalibrationUse = Field(
        default_factory=CalibrationUse, description="Whether the request uses its model's reference bank."
    )

    @field_validator("request_id")
    @classmethod
    def _request_id_bytes(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, MAX_REQUEST_ID_BYTES)


class ObjectMeta(BaseModel):
    """The part of an object's metadata the job reads; the rest (labels, annotations, ...) is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    name: str = Field(
        default="local", min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="The request's name."
    )
    namespace: str = Field(
        default="default", min_length=1, max_length=63, pattern=DNS_LABEL, description="The request's namespace."
    )
    uid: str | None = Field(
        default=None, max_length=64, pattern=r"^[0-9A-Za-z-]+$", description="The request's uid (set by the operator)."
    )


class Manifest(_Model):
    """A whole UnlearningRequest object as written in a YAML file (or read back with ``kubectl get -o yaml``)."""

    api_version: str = Field(description="unlearn.dev/v1alpha1")
    kind: Literal["UnlearningRequest"] = Field(description="UnlearningRequest")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Object metadata.")
    spec: UnlearningRequestSpec
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
    def request_id(self) -> str:
        return self.spec.request_id or f"{self.namespace}/{self.name}"


class SpecError(ValueError):
    """An invalid request; the message names the field and what to change."""


MAX_ERROR_BYTES = 1000
"""A SpecError's message is one line of at most this many bytes (it ends up in the termination message)."""


def _problem(item: Any, prefix: str) -> str:
    loc = ".".join(str(part) for part in item["loc"] if part != "__root__")
    where = f"{prefix}.{loc}" if loc else prefix
    if len(where) > 160:  # a tenant's unknown key can be any length
        where = where[:160] + "..."
    if item["type"] == "extra_forbidden":
        if prefix == "manifest" and len(item["loc"]) == 1:
            return (
                f"{where}: unknown top-level field: the request's fields go under spec "
                "(top level: apiVersion, kind, metadata, spec)"
            )
        return (
            f"{where}: unknown field: check its spelling and indentation "
            "(kubectl explain unlearningrequest.spec lists the fields)"
        )
    message = re.sub(r"^Value error, ", "", item["msg"])
    got = item.get("input")
    shows_input = item["type"].endswith("_type") or item["type"] in ("literal_error", "enum")
    if shows_input and (got is None or isinstance(got, (bool, int, float, str))):
        shown = json.dumps(got, ensure_ascii=False)
        message += f" (got {shown if len(shown) <= 40 else shown[:40] + '...'})"
    return f"{where}: {message}"


def describe_validation_error(error: ValidationError, prefix: str = "spec") -> str:
    """One line naming each problem's field path and what to change, at most MAX_ERROR_BYTES long."""
    problems = [_problem(item, prefix) for item in error.errors()]
    text = "; ".join(problems)
    if len(text.encode()) <= MAX_ERROR_BYTES:
        return text
    shown: list[str] = []
    for problem in problems:
        candidate = "; ".join([*shown, problem])
        if len(candidate.encode()) > MAX_ERROR_BYTES - 40:
            break
        shown.append(problem)
    if not shown:
        return problems[0].encode()[: MAX_ERROR_BYTES - 3].decode(errors="ignore") + "..."
    return "; ".join(shown) + f"; and {len(problems) - len(shown)} more problem(s)"


def parse_spec(raw: dict[str, Any]) -> UnlearningRequestSpec:
    """Parse a spec dict (as stored in the API server) or raise SpecError."""
    try:
        return UnlearningRequestSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error)) from None


def parse_manifest(raw: Any) -> Manifest:
    """Parse a whole manifest or raise SpecError."""
    if not isinstance(raw, dict):
        raise SpecError("manifest: expected a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, prefix="manifest")) from None


def read_manifest(path: Path, kind: str = "UnlearningRequest") -> Any:
    """The one YAML document in a manifest file (not yet parsed), read by safe_yaml (bounded, one
    document, every key once); a SpecError names the file on failure.

    Shared by every kind of the group: ``load_manifest`` parses a request,
    ``unlearning_contracts.calibration`` a calibration or either kind (``kind`` only names what an
    empty file should have held).
    """
    try:
        document = load_document(read_text(path), str(path))
    except YamlInputError as error:
        raise SpecError(str(error)) from None
    if document is None:
        raise SpecError(f"{path}: empty: expected one {kind} document")
    return document


def load_manifest(path: Path) -> Manifest:
    """Read a manifest file (see safe_yaml: bounded, one document, every key once) or raise SpecError."""
    return parse_manifest(read_manifest(path))
