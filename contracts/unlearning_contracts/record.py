"""The result / audit record: contract 2 of the design.

The job writes it in full (JSON, camelCase) beside the new model version and a
compact copy (at most 4 KiB) to the termination-message path; the operator
reads the compact copy into the request's status and the audit ConfigMap.
Pure pydantic: the operator imports this module without torch.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

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


class AuditMetrics(_Record):
    """What the audit measured on one model version."""

    forget_accuracy: float = Field(description="Accuracy (percent) on the forget set.")
    retain_accuracy: float = Field(description="Accuracy (percent) on (a bounded sample of) the retain set.")
    test_accuracy: float = Field(description="Accuracy (percent) on the held-out set.")
    confidence_gap: float = Field(description="Mean max-softmax on forget minus on held-out.")
    mia_auc: float = Field(description="Loss-attack AUC, forget (members) vs held-out (non-members).")
    mia_tpr_at_1fpr: float = Field(description="Loss-attack true-positive rate at 1% false-positive rate.")
    mia_classifier_accuracy: float = Field(
        description="Cross-validated accuracy of a classifier on confidence vectors (0.5 is chance)."
    )
    forget_loss: float = Field(description="Mean cross-entropy on the forget set.")
    samples: dict[str, int] = Field(default_factory=dict, description="Samples evaluated per set.")


class Attempt(_Record):
    """One unlearning attempt with its hyper-parameters and outcome."""

    number: int
    hyperparameters: dict[str, Any]
    post: AuditMetrics | None = Field(default=None, description="Audit after this attempt; absent when it diverged.")
    verdict: Verdict
    reasons: list[str]
    duration_seconds: float


class OutputModel(_Record):
    uri: str = Field(description="Where the new model version was written.")
    sha256: str = Field(description="sha256 of the model file.")
    format: str = Field(description="exported, state-dict or torchscript.")


class InputModel(_Record):
    uri: str
    sha256: str


class ResultRecord(_Record):
    """Everything a regulator or operator needs to know about one run."""

    schema_version: int = RECORD_SCHEMA_VERSION
    request_id: str
    request_name: str
    namespace: str
    model: str
    model_version: int | None = Field(default=None, description="Version number of the output model.")
    method: str
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    exit_code: int
    error: str | None = Field(default=None, description="Set when the run ended on invalid input or an error.")
    forget_samples: int = 0
    forget_digest: str = Field(default="", description="sha256 of the sorted forget indices (names no person).")
    pre: AuditMetrics | None = None
    post: AuditMetrics | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    duration_seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per phase.")
    input_model: InputModel | None = None
    output_model: OutputModel | None = None
    started_at: str
    finished_at: str
    device: str = ""
    job_image: str = ""
    code_version: str = ""
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved configuration of the run.")


_COMPACT_METRICS = ("forgetAccuracy", "retainAccuracy", "testAccuracy", "confidenceGap", "miaAuc")


def compact(record: ResultRecord, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The termination-message form: the record without bulky parts, <= limit bytes.

    Drops the resolved config and per-attempt details first, then trims the
    reasons, so that what the operator needs for status always fits.
    """
    full = record.dump()
    full.pop("config", None)
    attempts = full.pop("attempts", [])
    full["attemptCount"] = len(attempts)
    for key in ("pre", "post"):
        if key in full:
            full[key] = {k: round(v, 4) for k, v in full[key].items() if k in _COMPACT_METRICS}
    text = json.dumps(full, separators=(",", ":"))
    while len(text.encode()) > limit and full.get("reasons"):
        full["reasons"] = full["reasons"][:-1]
        full["reasonsTruncated"] = True
        text = json.dumps(full, separators=(",", ":"))
    if len(text.encode()) > limit and full.get("error"):
        full["error"] = str(full["error"])[:200]
        text = json.dumps(full, separators=(",", ":"))
    if len(text.encode()) > limit:
        raise ValueError(f"compact record is {len(text.encode())} bytes, over {limit}")
    return text


class CompactRecord(_Record):
    """The compact record as the operator reads it from a termination message."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    schema_version: int
    request_id: str
    model: str
    model_version: int | None = None
    method: str
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    exit_code: int
    error: str | None = None
    forget_samples: int = 0
    forget_digest: str = ""
    pre: dict[str, float] | None = None
    post: dict[str, float] | None = None
    attempt_count: int = 0
    duration_seconds: dict[str, float] = Field(default_factory=dict)
    input_model: InputModel | None = None
    output_model: OutputModel | None = None
    started_at: str
    finished_at: str
    device: str = ""
    job_image: str = ""
    code_version: str = ""


def result_json_schema() -> dict[str, Any]:
    """JSON schema of the full record (published under docs/ and checked by tests)."""
    return ResultRecord.model_json_schema(by_alias=True)
