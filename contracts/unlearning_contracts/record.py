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

Every number comes with its uncertainty: ``intervals`` maps a number's name
(camelCase) to its 95% interval and the counts it rests on; how each interval
is computed is declared with the number (``Number.interval``). Numbers added
after the first release default to ``None`` (and ``intervals`` to empty), so a
record written by an older job still parses in a newer operator.
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
    interval: str | None = None
    """How its 95% interval is computed (docs/audit-record.md), or None when it has none."""


class Interval(_Record):
    """A number's 95% interval and the rows it rests on."""

    low: float = Field(description="Lower end of the 95% interval.")
    high: float = Field(description="Upper end of the 95% interval.")
    n: int = Field(description="Rows measured: the forget rows compared, or the rows of the set measured.")
    against: int | None = Field(
        default=None,
        description="Rows compared with (held-out rows of the forget set's classes; an effective count when "
        "they are weighted), for numbers that compare two sets.",
    )


# How each interval is computed (docs/audit-record.md shows these beside each number; unlearn.stats says why).
CLOPPER_PEARSON = "Clopper-Pearson (exact binomial)"
DELONG = "DeLong, stratified by class; logit scale, Student t with n-1 degrees of freedom"
DELONG_UNMATCHED = "DeLong; logit scale, Student t with n-1 degrees of freedom"
WELCH = "normal (Welch), held-out side per class; Student t with n-1 degrees of freedom"
WELCH_UNMATCHED = "normal (Welch); Student t with n-1 degrees of freedom"
BALANCED = "normal, each side's Agresti-Coull binomial variance, doubled for the cross-validation's own variance"


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
            interval=CLOPPER_PEARSON,
        ),
    ] = Field(description="Accuracy (percent) on the forgotten samples.")
    retain_accuracy: Annotated[
        float, Number("retain accuracy %", ".1f", "about as before", interval=CLOPPER_PEARSON)
    ] = Field(description="Accuracy (percent) on (a bounded sample of) the data the model keeps.")
    test_accuracy: Annotated[
        float,
        Number(
            "test accuracy %",
            ".1f",
            "about as before; the gate `maxTestAccuracyDrop` bounds the fall",
            column="Test Acc",
            interval=CLOPPER_PEARSON,
        ),
    ] = Field(description="Accuracy (percent) on held-out data the model never trained on.")
    confidence_gap: Annotated[
        float,
        Number(
            "confidence gap",
            "+.3f",
            "near 0. **Weak on its own**: compare with `pre` (a model that did not memorise has a small "
            "gap before anything is done)",
            interval=WELCH,
        ),
    ] = Field(
        description="Mean top-class confidence (max-softmax) on the forgotten samples minus on held-out samples "
        "of the same classes."
    )
    mia_auc: Annotated[
        float,
        Number(
            "MIA loss AUC",
            ".3f",
            "near what retraining shows: 0.5 for typical samples (the attacker cannot tell them from unseen "
            "samples of the same class); for mislabelled or atypical samples retraining itself gives far "
            "below 0.5. The gate `maxMiaAuc` bounds it on both sides",
            column="MIA AUC",
            interval=DELONG,
        ),
    ] = Field(
        description="Membership-inference attack on the per-sample loss: ROC AUC of forgotten samples "
        "(members) against held-out samples of the same classes (non-members); 0.5 means indistinguishable."
    )
    mia_classifier_accuracy: Annotated[
        float | None,
        Number(
            "MIA classifier acc",
            ".3f",
            "near 0.5 (chance). It reads no label, so a model retrained without mislabelled samples scores "
            "0.5 on them too. The gate `maxMiaClassifierAccuracy` (on by default) bounds it",
            column="MIA Clf",
            interval=BALANCED,
        ),
    ] = Field(
        default=None,
        description="Cross-validated balanced accuracy of a classifier telling the forgotten samples from every "
        "held-out sample (weighted to the forgotten samples' classes) by the model's sorted confidence "
        "vectors; 0.5 is chance.",
    )
    intervals: dict[str, Interval] = Field(
        default_factory=dict,
        description="95% interval and sample counts of each number above, by its name.",
    )

    def rounded(self) -> dict[str, Any]:
        """The numbers and their intervals at 4 decimals, camelCase: what the compact record and status keep."""
        kept: dict[str, Any] = {}
        for name, alias, _, _ in numbers(SummaryMetrics):
            value = getattr(self, name)
            if value is not None:
                kept[alias] = round(float(value), 4)
        intervals = {
            alias: {k: round(v, 4) if isinstance(v, float) else v for k, v in interval.dump().items()}
            for alias, interval in self.intervals.items()
            if alias in kept
        }
        if intervals:
            kept["intervals"] = intervals
        return kept

    def display(self) -> dict[str, str]:
        """The printer columns' text: each number at its own fixed precision (95.0, not 95)."""
        return {alias: show(getattr(self, name), number.fmt) for name, alias, number, _ in columns()}


def show(value: float | None, fmt: str) -> str:
    """A number as the tables print it; "-" for one that was not measured."""
    return "-" if value is None else format(value, fmt)


class AuditMetrics(SummaryMetrics):
    """Everything the audit measured on one model version (the full record)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    mia_tpr_at_1fpr: Annotated[float | None, Number("MIA TPR@1%FPR", ".3f", "near 0.01", interval=CLOPPER_PEARSON)] = (
        Field(
            default=None,
            description="The loss attack's true-positive rate when it may wrongly flag only 1% of unseen samples "
            "(of the forgotten samples' classes). Absent when fewer than 100 such held-out samples exist: the "
            "lowest false-positive rate one could then set is 0%, not 1%.",
        )
    )
    mia_efficacy: Annotated[
        float | None,
        Number(
            "MIA-efficacy %",
            ".1f",
            "near what retraining gives (the benchmarks compare the two), not 100",
            interval=CLOPPER_PEARSON,
        ),
    ] = Field(
        default=None,
        description="Percent of the forgotten samples that an attack trained on retained (members) against "
        "held-out samples (non-members; of the other classes when whole classes are removed) calls non-members: "
        "the papers' MIA-efficacy (SVC on the true-label confidence, as in SalUn's SVC_MIA).",
    )
    forget_loss: Annotated[float, Number("forget loss", ".3f", "up from `pre`, toward the loss on unseen data")] = (
        Field(description="Mean cross-entropy on the forgotten samples.")
    )
    test_accuracy_drop: Annotated[
        float | None,
        Number(
            "test accuracy drop",
            "+.2f",
            "small; the gate `maxTestAccuracyDrop` bounds its interval's upper end",
            interval="exact conditional (McNemar): Clopper-Pearson on the held-out rows that changed",
        ),
    ] = Field(
        default=None,
        description="Fall in held-out accuracy (percentage points) from before unlearning, on the same rows "
        "(after unlearning only).",
    )
    control_mia_auc: Annotated[
        float | None,
        Number(
            "control: loss AUC",
            ".3f",
            "well above 0.5 for the loss attack to be informative: the positive control",
            interval=DELONG,
        ),
    ] = Field(
        default=None,
        description="Positive control: the loss attack on retained training samples (members the model "
        "still knows) against held-out samples of the same classes. Near 0.5 means the attack cannot tell "
        "members on this model at all, so `miaAuc` says nothing about the forgotten samples.",
    )
    control_mia_classifier_accuracy: Annotated[
        float | None,
        Number(
            "control: classifier acc",
            ".3f",
            "well above 0.5 for the classifier attack to be informative: the positive control",
            interval=BALANCED,
        ),
    ] = Field(
        default=None,
        description="Positive control: the classifier attack on retained training samples against held-out "
        "samples of the same classes.",
    )
    mia_auc_unmatched: Annotated[
        float | None, Number("unmatched: loss AUC", ".3f", "(for comparison only)", interval=DELONG_UNMATCHED)
    ] = Field(
        default=None,
        description="`miaAuc` against all held-out samples, not class-matched (present when it differs).",
    )
    mia_classifier_accuracy_unmatched: Annotated[
        float | None, Number("unmatched: classifier acc", ".3f", "(for comparison only)", interval=BALANCED)
    ] = Field(
        default=None,
        description="`miaClassifierAccuracy` against all held-out samples equally weighted (present when it differs).",
    )
    confidence_gap_unmatched: Annotated[
        float | None, Number("unmatched: confidence gap", "+.3f", "(for comparison only)", interval=WELCH_UNMATCHED)
    ] = Field(
        default=None,
        description="`confidenceGap` against all held-out samples (present when it differs).",
    )
    samples: dict[str, int] = Field(default_factory=dict, description="How many samples of each set were evaluated.")

    def summary(self) -> SummaryMetrics:
        keep = set(SummaryMetrics.model_fields)
        values = {name: getattr(self, name) for name in keep}
        values["intervals"] = {k: v for k, v in self.intervals.items() if k in SUMMARY_KEYS}
        return SummaryMetrics.model_validate(values)

    def interval(self, name: str) -> Interval | None:
        """The interval of the number with field name ``name`` (None when it has none)."""
        return self.intervals.get(AuditMetrics.model_fields[name].alias or name)


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


GateStatus = Literal["passed", "failed", "inconclusive"]


class GateResult(_Record):
    """How one gate of ``spec.gates`` decided, and on what."""

    gate: str = Field(description="The spec.gates field (camelCase).")
    status: GateStatus = Field(
        description="passed; failed; or inconclusive: a membership gate whose attack cannot tell, on this model "
        "and at this forget-set size, a set the model still remembers (it neither passes nor fails the verdict)."
    )
    value: float | None = Field(default=None, description="The number the gate judged.")
    low: float | None = Field(default=None, description="Its 95% interval's lower end.")
    high: float | None = Field(default=None, description="Its 95% interval's upper end.")
    allowed_low: float | None = Field(default=None, description="The lowest value the gate allows (two-sided gates).")
    allowed_high: float | None = Field(default=None, description="The highest value the gate allows.")
    reference: str | None = Field(
        default=None, description="What the allowed range is centred on (what retraining would show), and its source."
    )
    reason: str = Field(description="One line: the value, its interval, the limit and which end decided.")


class Attempt(_Record):
    """One unlearning attempt with its hyper-parameters and outcome."""

    number: int
    hyperparameters: dict[str, Any]
    post: AuditMetrics | None = Field(default=None, description="Audit after this attempt; absent when it diverged.")
    verdict: Verdict
    reasons: list[str]
    failed_gates: list[str] = Field(default_factory=list, description="The spec.gates fields that failed.")
    gates: list[GateResult] = Field(default_factory=list, description="Every gate checked, with its evidence.")
    duration_seconds: float


class OutputModel(_Record):
    uri: str = Field(description="Where the new model version was written.")
    sha256: str = Field(description="sha256 of the model file.")
    format: str = Field(description="exported, state-dict or torchscript.")


class InputModel(_Record):
    uri: str
    sha256: str


MAX_CALIBRATION_NOTE_BYTES = 500
"""The job bounds ``calibration.note`` to this many bytes of UTF-8 (the name, uri and sha256 are bounded by
what ``unlearn run`` accepts for ``--calibration-*``)."""


class CalibrationUsed(_Record):
    """The reference bank a run used, or why it used none (the compact record keeps it; the note and the uri
    are the last things shortened when every other string is at its bound)."""

    name: str = Field(default="", description="namespace/name of the UnlearningCalibration, when one was given.")
    uri: str = Field(default="", description="Where the bank file was read (bank.npz).")
    sha256: str = Field(default="", description="sha256 of the bank file, verified before use.")
    calibrated: bool = Field(default=False, description="True when the run loaded and verified the bank.")
    note: str = Field(default="", max_length=500, description="Why the run is (un)calibrated, in words.")


class Evidence(_Record):
    """What calibrated unlearning shows per request: targets against what was achieved, the gap to retraining
    estimated from the reference bank, the per-row membership test and, for a class request, whether the
    class can be read back. Percent unless said otherwise; kept whole in the compact record."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    calibrated: bool = Field(
        description="True when every target comes from the reference bank or is exact (class removal); false: "
        "the fallback target, which cannot tell a mislabelled row, and these numbers are not against retraining."
    )
    targets: str = Field(
        max_length=40, description="Where the targets came from: bank, class-removed, fallback, or a mix (a+b)."
    )
    removed_classes: list[int] = Field(default_factory=list, max_length=20, description="Classes removed whole.")
    forget_accuracy: float = Field(description="Achieved accuracy on the forget rows (audited sample).")
    target_forget_accuracy: float = Field(
        description="What retraining gives there, per the targets (the references' accuracy on rows they never saw)."
    )
    target_low: float = Field(description="Lower end of the target's 95% interval (Clopper-Pearson).")
    target_high: float = Field(description="Upper end of the target's 95% interval.")
    estimated_gap: float | None = Field(
        default=None, description="Mean |difference| over UA, RA, TA and MIA-efficacy against the bank's references."
    )
    gap_parts: dict[str, float] = Field(
        default_factory=dict, description="Each |difference| of the estimated gap: ua, ra, ta, mia (points)."
    )
    member_rows: int | None = Field(
        default=None, description="Forget rows that still look like members at 1% false positives against the bank."
    )
    audited_rows: int = Field(default=0, description="Forget rows the membership test scored.")
    member_p_value: float | None = Field(
        default=None, description="Binomial p-value of that count against the 1% expected after retraining."
    )
    class_readability: float | None = Field(
        default=None, description="AUC of the removed class's own logit on held-out rows (0.5: cannot be read)."
    )
    steps: int | None = Field(default=None, description="Optimiser steps the stopping rule let run.")
    chosen_step: int | None = Field(default=None, description="The step whose weights were kept (0: unchanged).")
    summary: str = Field(
        default="",
        max_length=300,
        pattern=r"^[ -~]*$",
        description="One plain sentence for a compliance reader (ASCII).",
    )

    def condensed(self) -> dict[str, Any]:
        """The compact record's form: the verdict-relevant numbers at 3 significant decimals, without the
        gap's parts, the step count and the removed classes beyond the first (the full record has them)."""
        kept = self.dump()
        for key in ("gapParts", "steps"):
            kept.pop(key, None)
        kept["removedClasses"] = kept.get("removedClasses", [])[:3]
        if not kept["removedClasses"]:
            kept.pop("removedClasses")
        return {k: round(v, 2) if isinstance(v, float) and k != "memberPValue" else v for k, v in kept.items()}


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
    notes: list[str] = Field(
        default_factory=list,
        description="What the numbers cannot show on this run, one line each (for example: the membership "
        "numbers are uninformative because the attack cannot tell the model's own training rows from "
        "held-out rows).",
    )
    exit_code: int
    error: str | None = Field(default=None, description="Set when the run ended on invalid input or an error.")
    forget_samples: int = 0
    forget_digest: str = Field(default="", description="sha256 of the sorted forget indices (names no person).")
    duration_seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per phase.")
    input_model: InputModel | None = None
    output_model: OutputModel | None = None
    evidence: Evidence | None = Field(
        default=None, description="Calibrated unlearning's evidence (after unlearning; absent when the run failed)."
    )
    calibration: CalibrationUsed = Field(
        default_factory=lambda: CalibrationUsed(note="no calibration bank was given"),
        description="The reference bank the run used, or why it used none.",
    )
    started_at: str
    finished_at: str
    device: str = ""
    world_size: int = Field(
        default=1,
        ge=1,
        description="Processes that ran the job: one per GPU of the pod, data-parallel when more than one.",
    )
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
    ("evidence", "summary"),  # a sentence made of the numbers beside it
    ("error",),
    ("calibration", "note"),
    ("inputModel", "uri"),
    ("calibration", "uri"),
    ("calibration", "name"),
    ("jobImage",),
    ("device",),
    ("requestName",),
    ("requestId",),
)


_EVIDENCE_KEPT = ("calibrated", "estimatedGap", "memberRows", "memberPValue", "classReadability")


def compact(record: ResultRecord, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The termination-message form: the record without bulky parts, at most ``limit`` bytes of UTF-8.

        Drops the resolved config and per-attempt details, then the notes from the
        last (``notesTruncated``), then the reasons from the last
        (``reasonsTruncated``), then shortens the fields listed in
        ``_SHORTENED``, then drops the intervals of ``pre`` and of ``post`` (each
        named in ``truncated``), and last keeps of the evidence only what its
    gates read, then drops it. The spec bounds every string that
        reaches the record in bytes, so that this always fits: a test fills every
        field to its bound with the costliest characters. It raises only if that
        promise is broken, and the job builds it before publishing anything.
    """
    full = record.dump()
    full.pop("config", None)
    attempts = full.pop("attempts", [])
    full["attemptCount"] = len(attempts)
    for key, metrics in (("pre", record.pre), ("post", record.post)):
        if metrics is not None:
            full[key] = metrics.summary().rounded()
    if record.evidence is not None:
        full["evidence"] = record.evidence.condensed()
    while _size(full) > limit and full.get("notes"):
        full["notes"] = full["notes"][:-1]
        full["notesTruncated"] = True
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
    # Last, the intervals: before's first. Only a request that fills every string to its bound with
    # characters JSON escapes gets here; the numbers themselves always stay.
    for key in ("pre", "post"):
        if _size(full) > limit and full.get(key, {}).pop("intervals", None) is not None:
            truncated.append(f"{key}.intervals")
            full["truncated"] = truncated
    # Very last, the evidence keeps only what its gates read, then goes (the full record keeps all of it;
    # failedGates still names the evidence gates that failed).
    for kept in (_EVIDENCE_KEPT, ()):
        if _size(full) > limit and "evidence" in full:
            full["evidence"] = {k: v for k, v in full["evidence"].items() if k in kept}
            if not kept:
                full.pop("evidence")
            if "evidence" not in truncated:
                truncated.append("evidence")
            full["truncated"] = truncated
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
    notes_truncated: bool = False
    truncated: list[str] = Field(
        default_factory=list, description="Fields shortened to fit the termination message (dotted camelCase)."
    )


def result_json_schema() -> dict[str, Any]:
    """JSON schema of the full record (published under docs/ and checked by tests)."""
    return ResultRecord.model_json_schema(by_alias=True)
