"""Acceptance gates: the verdict from the audit numbers and the spec's limits (pure).

Each gate set in ``spec.gates`` is checked; the verdict is Passed only when all
hold. A failed gate reports a human reason ("miaAuc 0.71 > maxMiaAuc 0.60") and
a kind: ``forgetting`` (the model still remembers: forget more) or ``utility``
(the model lost held-out accuracy: forget less). The tuner reads the kinds.
A NaN metric never passes a gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from unlearning_contracts.record import AuditMetrics
from unlearning_contracts.spec import GatesSpec

GateKind = Literal["forgetting", "utility"]


@dataclass(frozen=True)
class GateOutcome:
    gate: str
    value: float
    limit: float
    passed: bool
    kind: GateKind
    reason: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    outcomes: tuple[GateOutcome, ...]

    @property
    def name(self) -> Literal["Passed", "Failed"]:
        return "Passed" if self.passed else "Failed"

    @property
    def reasons(self) -> list[str]:
        return [o.reason for o in self.outcomes if not o.passed]

    @property
    def failed_gates(self) -> list[str]:
        """The spec.gates fields that failed (the record carries them; metrics label by them)."""
        return [o.gate for o in self.outcomes if not o.passed]

    def failed_kinds(self) -> set[GateKind]:
        return {o.kind for o in self.outcomes if not o.passed}


def _outcome(gate: str, metric: str, value: float, limit: float, kind: GateKind, *, fmt: str = ".3f") -> GateOutcome:
    passed = not math.isnan(value) and value <= limit
    relation = "<=" if passed else ">"
    reason = f"{metric} {value:{fmt}} {relation} {gate} {limit:{fmt}}"
    return GateOutcome(gate, value, limit, passed, kind, reason)


def evaluate(gates: GatesSpec, pre: AuditMetrics, post: AuditMetrics) -> Verdict:
    """Check every gate set in the spec against the post-unlearning audit (and the pre one for drops)."""
    outcomes: list[GateOutcome] = []
    if gates.max_forget_accuracy is not None:
        outcomes.append(
            _outcome(
                "maxForgetAccuracy",
                "forgetAccuracy",
                post.forget_accuracy,
                gates.max_forget_accuracy,
                "forgetting",
                fmt=".1f",
            )
        )
    if gates.max_test_accuracy_drop is not None:
        drop = pre.test_accuracy - post.test_accuracy
        outcomes.append(
            _outcome(
                "maxTestAccuracyDrop", "testAccuracyDrop", drop, gates.max_test_accuracy_drop, "utility", fmt=".2f"
            )
        )
    if gates.max_confidence_gap is not None:
        outcomes.append(
            _outcome(
                "maxConfidenceGap", "|confidenceGap|", abs(post.confidence_gap), gates.max_confidence_gap, "forgetting"
            )
        )
    if gates.max_mia_auc is not None:
        outcomes.append(_outcome("maxMiaAuc", "miaAuc", post.mia_auc, gates.max_mia_auc, "forgetting"))
    if gates.max_mia_classifier_accuracy is not None:
        outcomes.append(
            _outcome(
                "maxMiaClassifierAccuracy",
                "miaClassifierAccuracy",
                post.mia_classifier_accuracy,
                gates.max_mia_classifier_accuracy,
                "forgetting",
            )
        )
    return Verdict(all(o.passed for o in outcomes), tuple(outcomes))
