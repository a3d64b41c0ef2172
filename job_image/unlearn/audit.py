"""The audit: pure functions on logits and labels (numpy, scipy and scikit-learn only).

What one model's outputs can tell, each number with its 95% interval and the
rows it rests on (``unlearn.stats`` says which interval and why):

* accuracy on the forget, retain and held-out sets (Clopper-Pearson), and
  after unlearning the fall in held-out accuracy on the same rows;
* the confidence gap: mean max-softmax on forget minus on held-out rows of the
  same classes. Weak on its own: a model that generalises well shows a small
  gap even before unlearning, which is why the record always carries the
  pre-unlearning numbers too;
* a loss attack: per-sample cross-entropy as a membership score (lower loss =
  "was trained on"), forget (members) against held-out rows of the same class
  (non-members): ROC AUC and the true-positive rate at 1% false positives.
  AUC 0.5 is indistinguishable. Below 0.5 the forget rows look *less* familiar
  than unseen rows of their class: over-forgetting, or rows that are atypical
  under their recorded label (mislabelled rows score far below 0.5 under a
  model retrained without them, because it predicts their true class);
* a classifier on confidence vectors (sorted log-softmax: it reads no label),
  cross-validated, every held-out row weighted to the forget set's class mix;
  balanced accuracy 0.5 is chance. On mislabelled rows it is the attack that
  tells a model that still remembers them (0.87 on digits) from one retrained
  without them (0.5), where the loss attack scores both far below 0.5;
* MIA-efficacy (Jia et al. 2023, Fan et al. 2024): an attack trained on retain
  (members) against held-out (non-members) outputs, applied to the forget set;
  the share it calls non-members. Its target is the value of a model retrained
  without the forget set, not 100 (the benchmarks in bench/ call this very
  function, so the record and the benchmark speak the same metric);
* the positive control: both attacks on retained training rows (members the
  model still knows) against held-out rows of the same classes. When the
  attack cannot tell those apart, it cannot tell a forget set the model still
  remembers either, and the gates say the membership numbers are uninformative.

Comparisons are class-matched (``unlearn.stats``); the unmatched values are
kept beside them where they differ. The audit's randomness (the classifier's
folds, MIA-efficacy's subsample) comes from its own seed (``spec.audit.seed``),
never from the method's, so the same model gets the same numbers whichever
method runs after it.

No statistic computed on one model tells how far a model retrained without the
forget set would have moved. Per-sample calibration against reference models
(LiRA, RMIA) is the fix; ``membership_scores`` takes an optional per-sample
``reference`` offset, and the gates take a reference per number
(``unlearn.gates.Reference``), so such calibration can plug in without touching the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from unlearn import stats
from unlearn.stats import Estimate
from unlearning_contracts.record import AuditMetrics, Interval

Array = npt.NDArray[np.floating]
Labels = npt.NDArray[np.integer]


def audited_rows(sizes: Mapping[str, int], limit: int, seed: int) -> dict[str, npt.NDArray[np.int64]]:
    """The rows the audit evaluates in each set: all of them, or a seeded random ``limit`` (sorted).

    One generator under the audit's seed, drawn in the order of ``sizes``: the same model and data get the
    same audit whatever method runs after it. The job and the benchmark both choose their rows here.
    """
    rng = np.random.default_rng(seed)
    rows = {}
    for name, n in sizes.items():
        if n <= limit:
            rows[name] = np.arange(n, dtype=np.int64)
        else:
            rows[name] = np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)
    return rows


def log_softmax(logits: Array) -> npt.NDArray[np.float64]:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    result: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return result


def accuracy(logits: Array, labels: Labels) -> float:
    """Percent of samples whose arg-max is the label."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == labels))


def per_sample_loss(logits: Array, labels: Labels) -> npt.NDArray[np.float64]:
    """Cross-entropy per sample."""
    return -log_softmax(logits)[np.arange(len(labels)), labels]


def max_softmax(logits: Array) -> npt.NDArray[np.float64]:
    return np.asarray(np.exp(log_softmax(logits).max(axis=1)))


def confidence_gap(forget_logits: Array, heldout_logits: Array) -> float:
    """Mean max-softmax on forget minus on held-out (positive: forget looks more familiar)."""
    return float(max_softmax(forget_logits).mean() - max_softmax(heldout_logits).mean())


def membership_scores(
    logits: Array, labels: Labels, reference: npt.NDArray[np.float64] | None = None
) -> npt.NDArray[np.float64]:
    """Higher = more likely a training member. Negative loss, optionally minus a per-sample reference.

    ``reference`` is where calibrated attacks plug in: e.g. the mean negative loss
    of each sample under reference models that did not train on it (LiRA/RMIA-style).
    """
    score = -per_sample_loss(logits, labels)
    if reference is not None:
        score = score - reference
    return score


def confidence_features(logits: Array) -> npt.NDArray[np.float64]:
    """Sorted log-softmax vectors (log scale separates 0.999 from 0.99999, raw softmax does not)."""
    return np.asarray(-np.sort(-np.maximum(log_softmax(logits), -50.0), axis=1))


def true_label_confidence(logits: Array, labels: Labels) -> npt.NDArray[np.float64]:
    """Softmax probability of each sample's own label (the papers' "confidence" feature)."""
    return np.asarray(np.exp(-per_sample_loss(logits, labels)))


def mia_efficacy(
    retain: tuple[Array, Labels],
    heldout: tuple[Array, Labels],
    forget: tuple[Array, Labels],
    *,
    seed: int = 0,
) -> Estimate:
    """Percent of forget samples that a membership attack calls non-members (the papers' MIA-efficacy).

    As in the l1-sparse and SalUn code: an RBF SVC (C=3, gamma "auto") on the
    true-label confidence, fitted on retain outputs (members, subsampled to the
    held-out size so the classes balance) against held-out outputs (non-members),
    then applied to the forget set. Higher means the forget set looks unseen.
    """
    return stats.svc_efficacy(
        true_label_confidence(*retain), true_label_confidence(*heldout), true_label_confidence(*forget), seed=seed
    ).scaled(100.0)


def _correct(logits: Array, labels: Labels) -> npt.NDArray[np.bool_]:
    return np.asarray(np.argmax(logits, axis=1) == labels)


def _differs(matched: Estimate, unmatched: Estimate) -> bool:
    """Whether the unmatched value would print differently (the record keeps it only then)."""
    return unmatched.finite and (not matched.finite or abs(matched.value - unmatched.value) >= 5e-4)


def audit_outputs(
    forget: tuple[Array, Labels],
    retain: tuple[Array, Labels],
    heldout: tuple[Array, Labels],
    *,
    seed: int = 0,
    heldout_before: Array | None = None,
    forget_reference: npt.NDArray[np.float64] | None = None,
    heldout_reference: npt.NDArray[np.float64] | None = None,
    removed_classes: tuple[int, ...] = (),
) -> AuditMetrics:
    """Every audit number of the record (``AuditMetrics``), with intervals, from (logits, labels) of the three sets.

    ``heldout_before``: the held-out logits of the model before unlearning (the
    same rows), for the paired fall in held-out accuracy. ``removed_classes``:
    classes the request removes whole; that fall and MIA-efficacy's non-members
    are then the held-out rows of the other classes (falling to 0 on a removed
    class is the point).
    """
    f_logits, f_labels = forget
    r_logits, r_labels = retain
    h_logits, h_labels = heldout
    found: dict[str, Estimate] = {}

    def keep(name: str, estimate: Estimate) -> float:
        found[name] = estimate
        return estimate.value

    def keep_if_differs(name: str, unmatched: Estimate, matched: Estimate) -> float | None:
        return keep(name, unmatched) if _differs(matched, unmatched) else None

    members = membership_scores(f_logits, f_labels, forget_reference)
    nonmembers = membership_scores(h_logits, h_labels, heldout_reference)
    f_features, h_features = confidence_features(f_logits), confidence_features(h_logits)
    f_conf, h_conf = max_softmax(f_logits), max_softmax(h_logits)
    loss_auc = stats.auc(members, nonmembers, f_labels, h_labels)
    classifier = stats.classifier_attack(f_features, h_features, f_labels, h_labels, seed=seed)
    gap = stats.mean_difference(f_conf, h_conf, f_labels, h_labels)
    # A class removed whole: held-out rows of the other classes stand for unseen data (falling to 0 on the
    # removed class is the point), in the held-out accuracy's fall and in MIA-efficacy, as the benchmark
    # and the evidence measure them.
    others = ~np.isin(h_labels, list(removed_classes))
    drop = None
    if heldout_before is not None:
        change = stats.paired_change(
            _correct(heldout_before[others], h_labels[others]), _correct(h_logits[others], h_labels[others])
        )
        drop = keep("test_accuracy_drop", change.scaled(100.0))
    values: dict[str, Any] = {
        "forget_accuracy": keep("forget_accuracy", stats.proportion(_correct(f_logits, f_labels)).scaled(100.0)),
        "retain_accuracy": keep("retain_accuracy", stats.proportion(_correct(r_logits, r_labels)).scaled(100.0)),
        "test_accuracy": keep("test_accuracy", stats.proportion(_correct(h_logits, h_labels)).scaled(100.0)),
        "confidence_gap": keep("confidence_gap", gap),
        "mia_auc": keep("mia_auc", loss_auc),
        "mia_classifier_accuracy": keep("mia_classifier_accuracy", classifier),
        "mia_tpr_at_1fpr": keep("mia_tpr_at_1fpr", stats.tpr_at_fpr(members, nonmembers, 0.01, f_labels, h_labels)),
        "mia_efficacy": keep(
            "mia_efficacy", mia_efficacy(retain, (h_logits[others], h_labels[others]), forget, seed=seed)
        ),
        "forget_loss": float(per_sample_loss(f_logits, f_labels).mean()) if len(f_labels) else float("nan"),
        "test_accuracy_drop": drop,
        "control_mia_auc": keep(
            "control_mia_auc", stats.auc(membership_scores(r_logits, r_labels), nonmembers, r_labels, h_labels)
        ),
        "control_mia_classifier_accuracy": keep(
            "control_mia_classifier_accuracy",
            stats.classifier_attack(confidence_features(r_logits), h_features, r_labels, h_labels, seed=seed),
        ),
        "mia_auc_unmatched": keep_if_differs("mia_auc_unmatched", stats.auc(members, nonmembers), loss_auc),
        "mia_classifier_accuracy_unmatched": keep_if_differs(
            "mia_classifier_accuracy_unmatched", stats.classifier_attack(f_features, h_features, seed=seed), classifier
        ),
        "confidence_gap_unmatched": keep_if_differs(
            "confidence_gap_unmatched", stats.mean_difference(f_conf, h_conf), gap
        ),
        "samples": {"forget": len(f_labels), "retain": len(r_labels), "heldout": len(h_labels)},
    }
    values = {
        k: (None if isinstance(v, float) and math.isnan(v) and k not in _ALWAYS else v) for k, v in values.items()
    }
    intervals = {
        AuditMetrics.model_fields[name].alias or name: Interval(low=e.low, high=e.high, n=e.n, against=e.against)
        for name, e in found.items()
        if e.finite and values.get(name) is not None
    }
    return AuditMetrics(**values, intervals=intervals)


# Numbers every record has (NaN when a set is empty); the rest are absent when not measurable.
_ALWAYS = frozenset(("forget_accuracy", "retain_accuracy", "test_accuracy", "confidence_gap", "mia_auc", "forget_loss"))
