"""The result / audit record: contract 2 of the design.

The job writes it in full (JSON, camelCase) beside the new model version and a
compact copy (at most 4 KiB) to the termination-message path; the operator
reads the compact copy into the request's status and the audit ConfigMap.

Each audit number is declared once, as a field of ``SummaryMetrics`` (the
numbers a person checks first: the compact record, ``status.pre``/``post``)
or of ``AuditMetrics`` (the rest, in the full record only), with a ``Number``
saying how it is shown. Everything else is derived from those declarations:
the compact record's numbers, the CRD's status schema and printer columns,
the table ``unlearn run`` prints and the table in docs/audit-record.md. A new
number is one field here and its computation in the job's ``audit.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

RECORD_SCHEMA_VERSION = 1

# The kubelet truncates termination messages at 4096 bytes.
TERMINATION_MESSAGE_LIMIT = 4096

Verdict = Literal["Passed", "Failed"]

# Exit codes a Job can act on. The operator's podFailurePolicy fails the Job at
# once on the non-retryable ones; anything else (a crash, an OOM kill) may be
# retried within the Job's backoffLimit.
EXIT_PASSED = 0
EXIT_GATES_FAILED = 3
EXIT_INVALID_INPUT = 4
NON_RETRYABLE_EXIT_CODES = (EXIT_GATES_FAILED, EXIT_INVALID_INPUT)
EXIT_CODE_MEANINGS = {
    EXIT_PASSED: "verdict Passed: the model forgot and passed every gate",
    EXIT_GATES_FAILED: "verdict Failed: the unlearned model did not pass its acceptance gates",
    EXIT_INVALID_INPUT: "invalid input: the request, model or data cannot be used as given",
}


class _Record(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Number:
    """How one audit number is shown (attached to its field with ``Annotated``)."""

    label: str
    """Its row in the table ``unlearn run`` prints, and its name in the job's log."""
    fmt: str
    """Format spec there and in the printer column (a fixed precision per number)."""
    after: str
    """What a good unlearning gives (docs/audit-record.md)."""
    column: str | None = None
    """Printer column title of its post-unlearning value in ``kubectl get``, if shown there."""


class SummaryMetrics(_Record):
    """The audit numbers a person checks first: kept in the compact record and the request's status."""

    # Ignore what it does not know: a newer job may report a number an older operator has not heard of.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    forget_accuracy: Annotated[
        float,
        Number(
            "forget accuracy %",
            ".1f",
            "close to the accuracy on unseen data, not necessarily 0: a model that never saw a sample "
            "still often classifies it correctly",
            column="Forget Acc",
        ),
    ] = Field(description="Accuracy (percent) on the forgotten samples.")
    retain_accuracy: Annotated[float, Number("retain accuracy %", ".1f", "about as before")] = Field(
        description="Accuracy (percent) on (a bounded sample of) the data the model keeps."
    )
    test_accuracy: Annotated[
        float,
        Number(
            "test accuracy %",
            ".1f",
            "about as before; the gate `maxTestAccuracyDrop` bounds the fall",
            column="Test Acc",
        ),
    ] = Field(description="Accuracy (percent) on held-out data the model never trained on.")
    confidence_gap: Annotated[
        float,
        Number(
            "confidence gap",
            "+.3f",
            "near 0. **Weak on its own**: compare with `pre` (a model that did not memorise has a small "
            "gap before anything is done)",
        ),
    ] = Field(description="Mean top-class confidence (max-softmax) on the forgotten samples minus on held-out data.")
    mia_auc: Annotated[
        float,
        Number(
            "MIA loss AUC",
            ".3f",
            "near 0.5, i.e. the attacker cannot tell the forgotten samples from data the model never saw. "
            "The gate `maxMiaAuc` bounds it",
            column="MIA AUC",
        ),
    ] = Field(
        description="Membership-inference attack on the per-sample loss: ROC AUC of forgotten samples "
        "(members) against held-out data (non-members); 0.5 means indistinguishable."
    )

    def display(self) -> dict[str, str]:
        """The printer columns' text: each number at its own fixed precision (95.0, not 95)."""
        return {alias: format(getattr(self, name), number.fmt) for name, alias, number, _ in columns()}


class AuditMetrics(SummaryMetrics):
    """Everything the audit measured on one model version (the full record)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    mia_tpr_at_1fpr: Annotated[float, Number("MIA TPR@1%FPR", ".3f", "near 0.01")] = Field(
        description="The loss attack's true-positive rate when it may wrongly flag only 1% of unseen samples."
    )
    mia_classifier_accuracy: Annotated[float, Number("MIA classifier acc", ".3f", "near 0.5 (chance)")] = Field(
        description="Cross-validated accuracy of a classifier telling the forgotten samples from held-out data "
        "by the model's confidence vectors (0.5 is chance)."
    )
    forget_loss: Annotated[float, Number("forget loss", ".3f", "up from `pre`, toward the loss on unseen data")] = (
        Field(description="Mean cross-entropy on the forgotten samples.")
    )
    samples: dict[str, int] = Field(default_factory=dict, description="How many samples of each set were evaluated.")

    def summary(self) -> SummaryMetrics:
        return SummaryMetrics.model_validate({name: getattr(self, name) for name in SummaryMetrics.model_fields})


NumberField = tuple[str, str, Number, FieldInfo]


def numbers(model: type[SummaryMetrics] = AuditMetrics) -> list[NumberField]:
    """(field name, camelCase alias, how it is shown, pydantic field) of every audit number, in order."""
    found = []
    for name, info in model.model_fields.items():
        shown = next((m for m in info.metadata if isinstance(m, Number)), None)
        if shown is not None:
            found.append((name, info.alias or name, shown, info))
    return found


def columns() -> list[NumberField]:
    """The summary numbers with a printer column (``kubectl get`` shows their post value)."""
    return [field for field in numbers(SummaryMetrics) if field[2].column is not None]


SUMMARY_KEYS = tuple(alias for _, alias, _, _ in numbers(SummaryMetrics))


class Attempt(_Record):
    """One unlearning attempt with its hyper-parameters and outcome."""

    number: int
    hyperparameters: dict[str, Any]
    post: AuditMetrics | None = Field(default=None, description="Audit after this attempt; absent when it diverged.")
    verdict: Verdict
    reasons: list[str]
    failed_gates: list[str] = Field(default_factory=list, description="The spec.gates fields that failed.")
    duration_seconds: float


class OutputModel(_Record):
    uri: str = Field(description="Where the new model version was written.")
    sha256: str = Field(description="sha256 of the model file.")
    format: str = Field(description="exported, state-dict or torchscript.")


class InputModel(_Record):
    uri: str
    sha256: str


class _Common(_Record):
    """The fields of the full record that its compact form keeps as they are."""

    schema_version: int = RECORD_SCHEMA_VERSION
    request_id: str
    model: str
    model_version: int | None = Field(default=None, description="Version number of the output model.")
    method: str
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    failed_gates: list[str] = Field(
        default_factory=list, description="The spec.gates fields that failed (camelCase, as in the spec)."
    )
    exit_code: int
    error: str | None = Field(default=None, description="Set when the run ended on invalid input or an error.")
    forget_samples: int = 0
    forget_digest: str = Field(default="", description="sha256 of the sorted forget indices (names no person).")
    duration_seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per phase.")
    input_model: InputModel | None = None
    output_model: OutputModel | None = None
    started_at: str
    finished_at: str
    device: str = ""
    job_image: str = ""
    code_version: str = ""


class ResultRecord(_Common):
    """Everything a regulator or operator needs to know about one run."""

    request_name: str
    namespace: str
    pre: AuditMetrics | None = None
    post: AuditMetrics | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved configuration of the run.")


def truncate_utf8(text: str, max_bytes: int) -> str:
    """At most ``max_bytes`` of ``text`` in UTF-8, cut on a character boundary."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore")


def _size(payload: dict[str, Any]) -> int:
    return len(_dumps(payload).encode())


def _dumps(payload: dict[str, Any]) -> str:
    # UTF-8, not \uXXXX escapes: an escaped astral character takes 12 bytes of the 4 KiB instead of 4.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


# What compact() may shorten when the record is too large, in order: what the
# operator knows without the record (it chose the input and the image, and
# owns the request's name), never the output model's uri and digest, the
# verdict or the numbers. A string is cut to what is left of the budget.
_SHORTENED: tuple[tuple[str, ...], ...] = (
    ("error",),
    ("inputModel", "uri"),
    ("jobImage",),
    ("device",),
    ("requestName",),
    ("requestId",),
)


def compact(record: ResultRecord, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The termination-message form: the record without bulky parts, at most ``limit`` bytes of UTF-8.

    Drops the resolved config and per-attempt details, then the reasons from
    the last (``reasonsTruncated``), then shortens the fields listed in
    ``_SHORTENED`` (named in ``truncated``). The spec bounds every string that
    reaches the record in bytes, so that this always fits: a test fills every
    field to its bound with the costliest characters. It raises only if that
    promise is broken, and the job builds it before publishing anything.
    """
    full = record.dump()
    full.pop("config", None)
    attempts = full.pop("attempts", [])
    full["attemptCount"] = len(attempts)
    for key in ("pre", "post"):
        if key in full:
            full[key] = {k: round(v, 4) for k, v in full[key].items() if k in SUMMARY_KEYS}
    while _size(full) > limit and full.get("reasons"):
        full["reasons"] = full["reasons"][:-1]
        full["reasonsTruncated"] = True
    truncated: list[str] = []
    for path in _SHORTENED:
        if _size(full) <= limit:
            break
        *parents, leaf = path
        holder = full
        for part in parents:
            holder = holder.get(part) or {}
        value = holder.get(leaf)
        if not isinstance(value, str) or not value:
            continue
        truncated.append(".".join(path))
        full["truncated"] = truncated
        # Cut by the overshoot, then again while it does not fit: an escaped character takes more room
        # than its UTF-8 bytes (a quote takes two).
        keep = len(value.encode())
        while keep > 0 and _size(full) > limit:
            keep = max(0, keep - (_size(full) - limit))
            holder[leaf] = truncate_utf8(value, keep)
    text = _dumps(full)
    if len(text.encode()) > limit:
        raise ValueError(f"compact record is {len(text.encode())} bytes, over {limit}")
    return text


class CompactRecord(_Common):
    """The compact record as the operator reads it from a termination message."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    pre: SummaryMetrics | None = None
    post: SummaryMetrics | None = None
    attempt_count: int = 0
    reasons_truncated: bool = False
    truncated: list[str] = Field(
        default_factory=list, description="Fields shortened to fit the termination message (dotted camelCase)."
    )


def result_json_schema() -> dict[str, Any]:
    """JSON schema of the full record (published under docs/ and checked by tests)."""
    return ResultRecord.model_json_schema(by_alias=True)
