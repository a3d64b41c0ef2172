"""The UnlearningRequest spec: the one source of truth for the API.

These pydantic models are contract 1 of the design. The CRD's OpenAPI schema
is generated from them (``python -m unlearning_operator.crdgen``), the
operator validates incoming objects with them, the job validates its input
with them again, and ``unlearn run`` reads the very manifest a user would
``kubectl apply``. Every field carries a description because those
descriptions become what ``kubectl explain unlearningrequest.spec`` prints.

Pydantic and PyYAML only, like the rest of the contracts package: the
operator image installs no torch, the job image no kopf.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from unlearning_contracts.api import API_GROUP_VERSION

# Job names are "<request>-<attempt hash>" and pod names add the Job
# controller's 6-character suffix; 63 characters is the label-value limit, so
# a request name this long still yields valid child names.
MAX_REQUEST_NAME_LENGTH = 48

PVC_SCHEME = "pvc://"
# Where the Job mounts each claim; ``unlearn run --volume-root`` maps it locally.
DEFAULT_VOLUME_ROOT = "/volumes"

# Kubernetes object names (RFC 1123 DNS label) for PVCs and models.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Method = Literal["gradient-ascent", "neggrad-plus", "scrub", "salun", "retrain"]
METHODS: tuple[str, ...] = ("gradient-ascent", "neggrad-plus", "scrub", "salun", "retrain")
ModelFormat = Literal["exported", "state-dict", "torchscript"]
DataSource = Literal["digits", "npz", "image-folder", "torchvision"]


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected (typos fail loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
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
        return self


class StageSpec(_Model):
    """One optimisation stage. Unset fields take the method's defaults."""

    lr: float | None = Field(default=None, gt=0.0, le=1.0, description="Adam learning rate.")
    epochs: int | None = Field(default=None, ge=0, le=1000, description="Passes over the stage's data.")
    batch_size: int | None = Field(default=None, ge=1, le=65536, description="Samples per step.")


class MethodSpec(_Model):
    """The unlearning method and its hyper-parameters."""

    name: Method = Field(
        default="scrub",
        description=(
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
    """Acceptance gates: every gate set here must hold for the verdict Passed."""

    max_forget_accuracy: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Highest forget-set accuracy (percent) after unlearning."
    )
    max_test_accuracy_drop: float | None = Field(
        default=2.0,
        ge=0.0,
        le=100.0,
        description="Largest fall in held-out accuracy (percentage points) from before unlearning.",
    )
    max_confidence_gap: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest |mean max-softmax on forget - on held-out|. Weak alone: see the pre-unlearning value.",
    )
    max_mia_auc: float | None = Field(
        default=0.6,
        ge=0.5,
        le=1.0,
        description="Largest loss-attack AUC, forget vs held-out (0.5 means indistinguishable).",
    )
    max_mia_classifier_accuracy: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Largest cross-validated accuracy of a classifier on confidence vectors (0.5 is chance).",
    )


class TuningSpec(_Model):
    """Automatic retries when a gate fails, each from the original weights."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="Attempts in all, the first included.")


class AuditSpec(_Model):
    """How much the audit evaluates: bounded so it never costs more than the unlearning."""

    max_samples: int = Field(
        default=5000, ge=100, le=1000000, description="Samples per set (forget, retain, held-out) evaluated."
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
        default=None, max_length=512, description="Job image; must be in the operator's allow-list."
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


class Manifest(_Model):
    """A whole UnlearningRequest object as written in a YAML file."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    api_version: str = Field(description="unlearn.dev/v1alpha1")
    kind: Literal["UnlearningRequest"] = Field(description="UnlearningRequest")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Object metadata.")
    spec: UnlearningRequestSpec

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        if value != API_GROUP_VERSION:
            raise ValueError(f"apiVersion must be {API_GROUP_VERSION}, got {value}")
        return value

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "local"))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "default"))

    @property
    def request_id(self) -> str:
        return self.spec.request_id or f"{self.namespace}/{self.name}"


class SpecError(ValueError):
    """An invalid request; the message names the field and what to change."""


def describe_validation_error(error: ValidationError, prefix: str = "spec") -> str:
    """One line per problem, each naming the field path the user must change."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"] if part != "__root__")
        where = f"{prefix}.{loc}" if loc else prefix
        message = re.sub(r"^Value error, ", "", item["msg"])
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


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


def load_manifest(path: Path) -> Manifest:
    """Read a manifest file; a missing or unreadable file is a SpecError naming it."""
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read the manifest ({error.strerror})") from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    if len(documents) != 1:
        raise SpecError(f"{path}: expected exactly one UnlearningRequest document, found {len(documents)}")
    return parse_manifest(documents[0])
