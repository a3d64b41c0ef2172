"""The gates' rules (unlearn.gates), one table row per rule and direction, on numbers with intervals."""

from __future__ import annotations

import math
from typing import Any

import pytest

from unlearn import gates, tuning
from unlearn.gates import Reference
from unlearning_contracts.record import AuditMetrics, Interval, numbers
from unlearning_contracts.spec import GatesSpec, MethodSpec

pytestmark = pytest.mark.unit

NO_GATES = {"maxTestAccuracyDrop": None, "maxMiaClassifierAccuracy": None}


def audit(**values: Any) -> AuditMetrics:
    """AuditMetrics for a gate: ``name=value`` or ``name=(value, low, high)``; a strong positive control by default.

    Every number the record declares gets a value (0.0 unless set), so a new number needs no edit here.
    """
    base: dict[str, Any] = {name: 0.0 for name, _, _, _ in numbers()}
    base |= {
        "forget_accuracy": 50.0,
        "retain_accuracy": 100.0,
        "test_accuracy": 97.0,
        "mia_auc": 0.5,
        "mia_classifier_accuracy": 0.5,
        "control_mia_auc": (0.9, 0.88, 0.92),
        "control_mia_classifier_accuracy": (0.9, 0.88, 0.92),
        "samples": {"forget": 40, "retain": 1000, "heldout": 400},
    }
    base |= values
    intervals = {}
    for name, value in list(base.items()):
        if isinstance(value, tuple):
            base[name] = value[0]
            alias = AuditMetrics.model_fields[name].alias or name
            intervals[alias] = Interval(low=value[1], high=value[2], n=40, against=400)
    return AuditMetrics(**base, intervals=intervals)


def spec(**values: float | None) -> GatesSpec:
    return GatesSpec.model_validate(NO_GATES | values)


@pytest.mark.parametrize(
    ("gate", "limit", "post", "expected", "words"),
    [
        # Rule 2: a forgetting gate fails only when the whole interval lies beyond what it allows.
        ("maxMiaAuc", 0.6, {"mia_auc": (0.65, 0.55, 0.75)}, ("passed", "forgetting"), "reaches into 0.400..0.600"),
        ("maxMiaAuc", 0.6, {"mia_auc": (0.70, 0.62, 0.78)}, ("failed", "forgetting"), "lies above 0.600"),
        # Rule 3: two-sided around the reference: far below it is over-forgetting.
        ("maxMiaAuc", 0.6, {"mia_auc": (0.25, 0.15, 0.35)}, ("failed", "overforgetting"), "lies below 0.400"),
        ("maxConfidenceGap", 0.05, {"confidence_gap": (-0.2, -0.25, -0.15)}, ("failed", "overforgetting"), "below"),
        ("maxConfidenceGap", 0.05, {"confidence_gap": (0.04, -0.01, 0.09)}, ("passed", "forgetting"), "-0.050..0.050"),
        # The classifier is one-sided; the original's value says which way it failed (see below).
        ("maxMiaClassifierAccuracy", 0.6, {"mia_classifier_accuracy": (0.3, 0.2, 0.4)}, ("passed", "forgetting"), ""),
        (
            "maxMiaClassifierAccuracy",
            0.6,
            {"mia_classifier_accuracy": (0.85, 0.78, 0.92)},
            ("failed", "overforgetting"),  # the original (0.5) did not tell them apart: the method did
            "pushed away",
        ),
        # Rule 4: no power on this model (the positive control sits at chance): inconclusive, not passed.
        (
            "maxMiaAuc",
            0.6,
            {"mia_auc": (0.5, 0.37, 0.63), "control_mia_auc": (0.51, 0.48, 0.54)},
            ("inconclusive", "forgetting"),
            "no number of rows would",
        ),
        (
            "maxMiaClassifierAccuracy",
            0.6,
            {"mia_classifier_accuracy": (0.5, 0.35, 0.65), "control_mia_classifier_accuracy": (0.74, 0.72, 0.76)},
            ("inconclusive", "forgetting"),
            "(about ",
        ),
        # Not measurable (a forget set under 5 rows for the classifier): inconclusive, with why.
        (
            "maxMiaClassifierAccuracy",
            0.6,
            {"mia_classifier_accuracy": None},
            ("inconclusive", "forgetting"),
            "at least 5",
        ),
        # Forget accuracy: fails on evidence (the lower end above the limit).
        ("maxForgetAccuracy", 50.0, {"forget_accuracy": (60.0, 45.0, 75.0)}, ("passed", "forgetting"), "reaches"),
        ("maxForgetAccuracy", 50.0, {"forget_accuracy": (80.0, 60.0, 95.0)}, ("failed", "forgetting"), "above"),
        # Rule 5: the utility gate passes only when the whole interval of the drop lies within the limit.
        ("maxTestAccuracyDrop", 2.0, {"test_accuracy_drop": (0.5, -0.4, 1.4)}, ("passed", "utility"), "within"),
        ("maxTestAccuracyDrop", 2.0, {"test_accuracy_drop": (1.5, 0.6, 2.4)}, ("failed", "utility"), "upper end"),
    ],
)
def test_gate_rules(gate: str, limit: float, post: dict[str, Any], expected: tuple[str, str], words: str) -> None:
    status, kind = expected
    verdict = gates.evaluate(spec(**{gate: limit}), audit(), audit(**post))
    (outcome,) = verdict.outcomes
    assert (outcome.gate, outcome.status, outcome.kind) == (gate, status, kind)
    assert words in outcome.reason
    assert "95% interval" in outcome.reason or status == "inconclusive"
    assert verdict.passed is (status != "failed")
    assert verdict.reasons == ([outcome.reason] if status == "failed" else [])
    assert verdict.inconclusive == ([outcome.reason] if status == "inconclusive" else [])
    record = outcome.result()
    assert (record.gate, record.status) == (gate, status)


def test_a_classifier_failure_points_to_remembering_when_the_original_was_as_distinguishable() -> None:
    """Memorised mislabelled rows: the original already tells them apart; left so, forget more."""
    original = audit(mia_classifier_accuracy=(0.87, 0.78, 0.95))
    still = audit(mia_classifier_accuracy=(0.8, 0.7, 0.9))
    assert gates.evaluate(GatesSpec(), original, original).failed_kinds() == {"forgetting"}
    assert gates.evaluate(GatesSpec(), original, still).failed_kinds() == {"forgetting"}
    pushed = audit(mia_classifier_accuracy=(0.99, 0.97, 1.0))  # beyond anything the original showed
    assert gates.evaluate(GatesSpec(), original, pushed).failed_kinds() == {"overforgetting"}


def test_a_reference_replaces_the_null_without_changing_the_rule() -> None:
    """What the bank will do: a reference with its own interval moves the allowed range, not the logic."""
    post = audit(mia_auc=(0.12, 0.05, 0.2))  # mislabelled rows under a model retrained without them score this low
    under_null = gates.evaluate(spec(maxMiaAuc=0.6), post, post)
    assert under_null.failed_kinds() == {"overforgetting"}
    bank = Reference(0.1, 0.06, 0.15, "reference bank")
    (outcome,) = gates.evaluate(spec(maxMiaAuc=0.6), post, post, {"mia_auc": bank}).outcomes
    assert outcome.status == "passed"
    assert outcome.allowed == pytest.approx((-0.04, 0.25))
    assert "reference bank" in outcome.reason


def test_with_a_bank_the_utility_limit_sits_above_what_retraining_itself_shows() -> None:
    """Rule 5 with a bank: MNIST-1D's numbers (a retrain's drop ~1.5 +- 3 on 1,000 rows); damage still fails."""
    pre = audit()
    retrained_like = audit(test_accuracy_drop=(1.5, -1.4, 4.4))
    bare = gates.evaluate(spec(maxTestAccuracyDrop=2.0), pre, retrained_like)
    assert bare.failed_gates == ["maxTestAccuracyDrop"]  # the bare rule cannot pass a retrain here
    retraining = gates.retraining_drop(0.6, -2.5, 3.7)
    (outcome,) = gates.evaluate(
        spec(maxTestAccuracyDrop=2.0), pre, retrained_like, {"test_accuracy_drop": retraining}
    ).outcomes
    assert outcome.status == "passed"
    assert outcome.allowed[1] == pytest.approx(5.7)  # 2 above 3.7, the upper end of retraining's own drop
    record = outcome.result()
    assert record.allowed_high == pytest.approx(5.7)
    assert record.reference is not None
    assert "retraining" in record.reference
    assert "above 3.70" in outcome.reason
    damaged = audit(test_accuracy_drop=(30.0, 26.0, 34.0))
    (hurt,) = gates.evaluate(spec(maxTestAccuracyDrop=2.0), pre, damaged, {"test_accuracy_drop": retraining}).outcomes
    assert (hurt.status, hurt.kind) == ("failed", "utility")
    # A retrain that gains accuracy does not tighten the limit below the bare one.
    (gain,) = gates.evaluate(
        spec(maxTestAccuracyDrop=2.0),
        pre,
        audit(test_accuracy_drop=(0.5, -0.4, 1.9)),
        {"test_accuracy_drop": gates.retraining_drop(-3.0, -4.0, -2.0)},
    ).outcomes
    assert gain.status == "passed"
    assert gain.allowed[1] == pytest.approx(2.0)


def test_the_default_gates_are_the_drop_and_the_label_free_classifier() -> None:
    default = gates.evaluate(GatesSpec(), audit(), audit())
    assert [o.gate for o in default.outcomes] == ["maxTestAccuracyDrop", "maxMiaClassifierAccuracy"]
    assert default.passed


def test_pre_against_itself_drops_nothing() -> None:
    pre = audit(test_accuracy=(70.0, 60.0, 80.0), test_accuracy_drop=None)  # wide: a small held-out set
    (drop,) = gates.evaluate(spec(maxTestAccuracyDrop=2.0), pre, pre).outcomes
    assert drop.status == "passed"
    assert (drop.value, drop.observed.low, drop.observed.high) == (0.0, 0.0, 0.0)  # type: ignore[union-attr]
    unpaired = gates.accuracy_drop(pre, audit(test_accuracy=(69.0, 59.0, 79.0), test_accuracy_drop=None))
    assert unpaired.value == pytest.approx(1.0)
    assert unpaired.high == pytest.approx(1.0 + math.hypot(10, 10))  # without the paired drop: wider, stricter


def test_a_retry_does_not_pass_on_a_change_within_the_noise() -> None:
    """Rule 6, as in the strict example: 0.627 -> 0.600, a third of a standard error, must not pass."""
    strict = spec(maxMiaAuc=0.55)
    first = gates.evaluate(strict, audit(), audit(mia_auc=(0.627, 0.56, 0.69)))
    assert first.failed_gates == ["maxMiaAuc"]
    within = gates.evaluate(strict, audit(), audit(mia_auc=(0.60, 0.53, 0.67)))
    assert within.passed  # on its own it would pass...
    confirmed = gates.confirm(within, [first])
    assert confirmed.failed_gates == ["maxMiaAuc"]  # ...but it moved less than the noise
    assert "still inside that attempt's 95% interval" in confirmed.reasons[0]
    assert confirmed.failed_kinds() == {"forgetting"}
    moved = gates.evaluate(strict, audit(), audit(mia_auc=(0.5, 0.43, 0.57)))
    assert gates.confirm(moved, [first]).passed  # left the failing interval: a real change


def test_the_tuner_forgets_less_after_over_forgetting() -> None:
    h = tuning.resolve(MethodSpec(name="scrub"))
    over = tuning.next_attempt(h, {"overforgetting"})
    assert over is not None
    assert over.forget_lr == h.forget_lr / 2
    more = tuning.next_attempt(h, {"forgetting"})
    assert more is not None
    assert more.forget_lr == 2 * h.forget_lr


def test_notes_say_what_the_numbers_cannot_show() -> None:
    post = audit(mia_tpr_at_1fpr=None, control_mia_classifier_accuracy=(0.52, 0.5, 0.54))
    verdict = gates.evaluate(GatesSpec(), post, post)
    notes = gates.notes(verdict, post)
    assert any("uninformative" in line and "maxMiaClassifierAccuracy" in line for line in notes)
    assert any("miaTprAt1Fpr not reported" in line for line in notes)
