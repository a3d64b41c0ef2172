"""The audit: pure functions on logits and labels (numpy and scikit-learn only).

What one model's outputs can tell:

* accuracy on the forget, retain and held-out sets;
* the confidence gap: mean max-softmax on forget minus on held-out. Weak on its
  own: a model that generalises well shows a small gap even before unlearning,
  which is why the record always carries the pre-unlearning numbers too;
* a loss attack: per-sample cross-entropy as a membership score (lower loss =
  "was trained on"), forget (members) against held-out (non-members): ROC AUC and
  the true-positive rate at 1% false positives. AUC 0.5 is indistinguishable.
  An AUC well *below* 0.5 means the forget set now looks less familiar than
  unseen data (over-forgetting, itself a signal an attacker could use);
* a classifier on confidence vectors (sorted log-softmax), trained and
  cross-validated on balanced classes; accuracy 0.5 is chance;
* MIA-efficacy (Jia et al. 2023, Fan et al. 2024): an attack trained on retain
  (members) against held-out (non-members) outputs, applied to the forget set;
  the share it calls non-members. Its target is the value of a model retrained
  without the forget set, not 100 (the benchmarks in bench/ compare the two).

No statistic computed on one model tells how far a model retrained without the
forget set would have moved. Per-sample calibration against reference models
(LiRA, RMIA) is the fix; ``membership_scores`` takes an optional per-sample
``reference`` offset so such calibration can plug in without touching the rest.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from unlearning_contracts.record import AuditMetrics

Array = npt.NDArray[np.floating]
Labels = npt.NDArray[np.integer]


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


def roc_auc(member_scores: Array, nonmember_scores: Array) -> float:
    """P(score of a random member > score of a random non-member), ties counting half."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        return float("nan")
    truth = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    return float(roc_auc_score(truth, np.concatenate([m, n])))


def tpr_at_fpr(member_scores: Array, nonmember_scores: Array, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold that flags at most ``fpr`` of the non-members."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.sort(np.asarray(nonmember_scores, dtype=np.float64))
    if len(m) == 0 or len(n) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(n)))
    # Threshold strictly above the (allowed+1)-th highest non-member score.
    threshold = n[len(n) - allowed - 1]
    return float(np.mean(m > threshold))


def confidence_features(logits: Array) -> npt.NDArray[np.float64]:
    """Sorted log-softmax vectors (log scale separates 0.999 from 0.99999, raw softmax does not)."""
    return np.asarray(-np.sort(-np.maximum(log_softmax(logits), -50.0), axis=1))


def classifier_attack_accuracy(member_logits: Array, nonmember_logits: Array, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated accuracy of logistic regression telling members from non-members.

    The larger side is subsampled to the smaller so that chance is exactly 0.5.
    """
    rng = np.random.default_rng(seed)
    n = min(len(member_logits), len(nonmember_logits))
    if n < 2:
        return float("nan")
    members = confidence_features(member_logits)[rng.permutation(len(member_logits))[:n]]
    others = confidence_features(nonmember_logits)[rng.permutation(len(nonmember_logits))[:n]]
    features = np.concatenate([members, others])
    target = np.concatenate([np.ones(n), np.zeros(n)])
    splitter = StratifiedKFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(np.mean(cross_val_score(model, features, target, cv=splitter)))


def true_label_confidence(logits: Array, labels: Labels) -> npt.NDArray[np.float64]:
    """Softmax probability of each sample's own label (the papers' "confidence" feature)."""
    return np.asarray(np.exp(-per_sample_loss(logits, labels)))


def mia_efficacy(
    retain: tuple[Array, Labels],
    heldout: tuple[Array, Labels],
    forget: tuple[Array, Labels],
    *,
    seed: int = 0,
) -> float:
    """Percent of forget samples that a membership attack calls non-members (the papers' MIA-efficacy).

    As in the l1-sparse and SalUn code: an RBF SVC (C=3, gamma "auto") on the
    true-label confidence, fitted on retain outputs (members, subsampled to the
    held-out size so the classes balance) against held-out outputs (non-members),
    then applied to the forget set. Higher means the forget set looks unseen.
    """
    r_logits, r_labels = retain
    h_logits, h_labels = heldout
    f_logits, f_labels = forget
    n = min(len(r_labels), len(h_labels))
    if n < 2 or len(f_labels) == 0:
        return float("nan")
    pick = np.random.default_rng(seed).permutation(len(r_labels))[:n]
    members = true_label_confidence(r_logits[pick], r_labels[pick])
    others = true_label_confidence(h_logits, h_labels)[:n]
    features = np.concatenate([members, others]).reshape(-1, 1)
    target = np.concatenate([np.ones(n), np.zeros(len(others))])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, target)
    predicted = attack.predict(true_label_confidence(f_logits, f_labels).reshape(-1, 1))
    return float(100.0 * np.mean(predicted == 0))


def audit_outputs(
    forget: tuple[Array, Labels],
    retain: tuple[Array, Labels],
    heldout: tuple[Array, Labels],
    *,
    seed: int = 0,
    forget_reference: npt.NDArray[np.float64] | None = None,
    heldout_reference: npt.NDArray[np.float64] | None = None,
) -> AuditMetrics:
    """Every audit number of the record (``AuditMetrics``) from (logits, labels) of the three sets."""
    f_logits, f_labels = forget
    r_logits, r_labels = retain
    h_logits, h_labels = heldout
    members = membership_scores(f_logits, f_labels, forget_reference)
    nonmembers = membership_scores(h_logits, h_labels, heldout_reference)
    return AuditMetrics(
        forget_accuracy=accuracy(f_logits, f_labels),
        retain_accuracy=accuracy(r_logits, r_labels),
        test_accuracy=accuracy(h_logits, h_labels),
        confidence_gap=confidence_gap(f_logits, h_logits),
        mia_auc=roc_auc(members, nonmembers),
        mia_tpr_at_1fpr=tpr_at_fpr(members, nonmembers, 0.01),
        mia_classifier_accuracy=classifier_attack_accuracy(f_logits, h_logits, seed=seed),
        forget_loss=float(per_sample_loss(f_logits, f_labels).mean()),
        samples={"forget": len(f_labels), "retain": len(r_labels), "heldout": len(h_labels)},
    )
