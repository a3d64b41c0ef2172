"""Estimates with 95% intervals, and class-matched comparisons (pure: numpy, scipy, scikit-learn).

Every number the audit reports is an ``Estimate``: the value, a 95% interval
and the counts it rests on. The audit compares the forget set (members) with
held-out data (non-members); this module does it **class-matched**: each
forget row is compared only with held-out rows of its own label, or the
held-out rows are weighted to the forget set's class mix. Unmatched, 20
held-out rows of one digit against all other held-out rows score a loss-attack
AUC anywhere from 0.27 to 0.69 depending on the digit, though none of them was
ever trained on; matched, 0.49 to 0.51.

Which interval, and why:

* **AUC: DeLong's variance, stratified by class**, the interval taken on the
  logit scale with Student's t (n - 1 degrees of freedom, n the forget rows
  compared), so it stays inside (0, 1) however small the set. It is
  deterministic (the same model gives the same record, no resampling seed to
  report), costs a sort, and splits cleanly into strata: the forget side's
  variance from the per-row placements, the held-out side's per class,
  weighted by the forget set's class shares. With 20 forget rows against 429
  held-out rows its coverage was measured by simulation (tests/job/test_stats.py,
  with ``coverage`` below; 1,000 draws each): 95.8%, 96.6% and 95.7% for true AUCs 0.5, 0.64
  and 0.80. Near 0 or 1 it narrows too much at small sizes (0.88 at 0.98),
  which only matters for rows far from the band a gate allows. A bootstrap
  would cover that edge better, at a thousand times the cost and with a seed in
  the record.
* **Proportions (accuracies, true-positive rates, MIA-efficacy):
  Clopper-Pearson**, exact and conservative: at 20 rows an accuracy of 100% has
  the interval [83.2, 100], not a normal interval's [100, 100].
* **A change in held-out accuracy** (the same rows before and after):
  exact conditional on the rows that changed (McNemar): among the d rows whose
  correctness changed, b became wrong; Clopper-Pearson on b/d, scaled by d/n.
  No row changed: [0, 0], exactly.
* **Differences of means** (the confidence gap): normal, the two sides'
  variances added (Welch), the held-out side per class.
* **The classifier attack's accuracy** (balanced, class-matched, out-of-fold):
  normal, from the two sides' binomial variances (members, and the held-out
  side's effective count). Cross-validation adds variance of its own; the
  simulation in ``coverage`` and tests/job/test_stats.py measured its coverage too.

All functions take plain arrays; ``classes`` arguments are the labels the
matching uses (for the forget set, the labels the model was trained with).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as scipy_stats
from sklearn.model_selection import StratifiedKFold

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

LEVEL = 0.95
Z = float(scipy_stats.norm.ppf(0.5 + LEVEL / 2))

# The classifier attack's out-of-fold accuracy varies more than a binomial count: under the null
# (held-out rows against held-out rows of the same classes, digits and MNIST-1D, 20 rows) its
# standard deviation was 0.065-0.086 where the binomial formula gives 0.055-0.059, and the binomial
# interval held 0.5 in only 82% of draws. With the variance doubled it held it in 92-97% of draws at
# 10 to 40 rows (tests/job/test_stats.py re-measures it).
CROSS_VALIDATION_VARIANCE = 2.0


@dataclass(frozen=True)
class Estimate:
    """A number with its 95% interval and the counts it rests on."""

    value: float
    low: float
    high: float
    n: int
    """Rows measured: the forget set's matched rows for a comparison, the set's rows otherwise."""
    against: int | None = None
    """Rows compared with (held-out, effective count under class weights), for comparisons."""

    @property
    def se(self) -> float:
        """The standard error the interval implies (half its width over z)."""
        return (self.high - self.low) / (2 * Z)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value) and math.isfinite(self.low) and math.isfinite(self.high)

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (fractions to percent)."""
        low, high = sorted((self.low * factor, self.high * factor))
        return Estimate(self.value * factor, low, high, self.n, self.against)


NAN = Estimate(math.nan, math.nan, math.nan, 0)


def _as_floats(values: npt.ArrayLike) -> Floats:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _as_ints(values: npt.ArrayLike | None, n: int) -> Ints:
    if values is None:
        return np.zeros(n, dtype=np.int64)
    return np.asarray(values, dtype=np.int64).reshape(-1)


# -- proportions ---------------------------------------------------------------------------------


def clopper_pearson(successes: int, n: int) -> tuple[float, float]:
    """Exact binomial interval for successes / n."""
    if n <= 0:
        return math.nan, math.nan
    alpha = 1 - LEVEL
    low = 0.0 if successes <= 0 else float(scipy_stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes >= n else float(scipy_stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def proportion(hits: npt.ArrayLike) -> Estimate:
    """Share of true values in ``hits``, with its Clopper-Pearson interval."""
    flags = np.asarray(hits, dtype=bool).reshape(-1)
    n = int(flags.size)
    if n == 0:
        return NAN
    k = int(flags.sum())
    low, high = clopper_pearson(k, n)
    return Estimate(k / n, low, high, n)


def paired_change(before: npt.ArrayLike, after: npt.ArrayLike) -> Estimate:
    """Fall in the share of true values from ``before`` to ``after`` on the same rows (positive: fewer now).

    Exact conditional interval: of the d rows that changed, b went from true to
    false; Clopper-Pearson on b / d, mapped to (2p - 1) * d / n.
    """
    b0 = np.asarray(before, dtype=bool).reshape(-1)
    b1 = np.asarray(after, dtype=bool).reshape(-1)
    n = int(b0.size)
    if n == 0 or b1.size != n:
        return NAN
    lost = int(np.sum(b0 & ~b1))
    gained = int(np.sum(~b0 & b1))
    changed = lost + gained
    value = (lost - gained) / n
    if changed == 0:
        return Estimate(0.0, 0.0, 0.0, n)
    p_low, p_high = clopper_pearson(lost, changed)
    return Estimate(value, (2 * p_low - 1) * changed / n, (2 * p_high - 1) * changed / n, n)


# -- class matching ------------------------------------------------------------------------------


def matched_weights(member_classes: npt.ArrayLike, nonmember_classes: npt.ArrayLike) -> Floats:
    """A weight per non-member so that each class weighs what it weighs among the members (sum 1).

    Held-out rows of classes no member has weigh 0. Members of classes with no
    held-out row cannot be matched (``unmatched_members`` counts them).
    """
    members = _as_ints(member_classes, 0)
    others = _as_ints(nonmember_classes, 0)
    weights = np.zeros(len(others), dtype=np.float64)
    labels, counts = np.unique(members, return_counts=True)
    matched = 0
    for label, count in zip(labels, counts, strict=True):
        rows = others == label
        if rows.any():
            weights[rows] = count / rows.sum()
            matched += int(count)
    return weights / matched if matched else weights


def unmatched_members(member_classes: npt.ArrayLike, nonmember_classes: npt.ArrayLike) -> int:
    """Members whose class has no non-member to be compared with."""
    return int(np.sum(~np.isin(_as_ints(member_classes, 0), _as_ints(nonmember_classes, 0))))


def effective_count(weights: npt.ArrayLike) -> float:
    """Kish's effective sample size of weighted rows: (sum w)^2 / sum w^2."""
    w = _as_floats(weights)
    total = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / total if total > 0 else 0.0


# -- comparisons -------------------------------------------------------------------------------


def _placements(members: Floats, nonmembers: Floats) -> tuple[Floats, Floats]:
    """DeLong's structural components: per member, the share of non-members below it (ties half);
    per non-member, the share of members above it."""
    xs, ys = np.sort(members), np.sort(nonmembers)
    below = (np.searchsorted(ys, members, "left") + np.searchsorted(ys, members, "right")) / (2 * len(ys))
    above = (2 * len(xs) - np.searchsorted(xs, nonmembers, "left") - np.searchsorted(xs, nonmembers, "right")) / (
        2 * len(xs)
    )
    return below, above


def _var(values: Floats) -> float:
    return float(np.var(values, ddof=1)) if len(values) > 1 else 0.0


def auc(
    member_scores: npt.ArrayLike,
    nonmember_scores: npt.ArrayLike,
    member_classes: npt.ArrayLike | None = None,
    nonmember_classes: npt.ArrayLike | None = None,
) -> Estimate:
    """P(member score > non-member score of the same class), ties half, with DeLong's interval.

    Without classes it is the plain ROC AUC. With classes, each member is
    compared with the non-members of its class only; members of a class no
    non-member has are left out (``Estimate.n`` counts the ones compared).
    """
    m_scores, n_scores = _as_floats(member_scores), _as_floats(nonmember_scores)
    m_classes = _as_ints(member_classes, len(m_scores))
    n_classes = _as_ints(nonmember_classes, len(n_scores))
    below_parts: list[Floats] = []
    strata: list[tuple[int, Floats]] = []
    for label in np.unique(m_classes):
        mine, theirs = m_scores[m_classes == label], n_scores[n_classes == label]
        if len(theirs) == 0:
            continue
        below, above = _placements(mine, theirs)
        below_parts.append(below)
        strata.append((len(mine), above))
    if not below_parts:
        return NAN
    below_all = np.concatenate(below_parts)
    m = len(below_all)
    value = float(below_all.mean())
    pooled = _pooled_var([a for _, a in strata])
    var = _var(below_all) / m
    for m_c, above in strata:
        var += (m_c / m) ** 2 * (_var(above) if len(above) > 1 else pooled) / len(above)
    low, high = _logit_interval(value, math.sqrt(var), _t(m))
    return Estimate(value, low, high, m, sum(len(a) for _, a in strata))


def _t(rows: int) -> float:
    """The two-sided 95% quantile of Student's t with rows - 1 degrees of freedom (z for large sets)."""
    return float(scipy_stats.t.ppf(0.5 + LEVEL / 2, rows - 1)) if rows > 1 else math.inf


def _logit_interval(value: float, se: float, quantile: float) -> tuple[float, float]:
    """value +- quantile * se on the logit scale (inside (0, 1) however small the set), mapped back."""
    if not math.isfinite(quantile):
        return 0.0, 1.0
    edge = 1e-6
    p = min(max(value, edge), 1 - edge)
    centre, spread = math.log(p / (1 - p)), quantile * se / (p * (1 - p))
    return 1 / (1 + math.exp(-(centre - spread))), 1 / (1 + math.exp(-(centre + spread)))


def _pooled_var(groups: list[Floats]) -> float:
    sizes = [len(g) for g in groups if len(g) > 1]
    if not sizes:
        return 0.0
    return float(sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups if len(g) > 1) / (sum(sizes) - len(sizes)))


def mean_difference(
    member_values: npt.ArrayLike,
    nonmember_values: npt.ArrayLike,
    member_classes: npt.ArrayLike | None = None,
    nonmember_classes: npt.ArrayLike | None = None,
) -> Estimate:
    """Mean over members of (value - the mean of the non-members of its class), with a normal interval."""
    m_values, n_values = _as_floats(member_values), _as_floats(nonmember_values)
    m_classes = _as_ints(member_classes, len(m_values))
    n_classes = _as_ints(nonmember_classes, len(n_values))
    residuals: list[Floats] = []
    strata: list[tuple[int, Floats]] = []
    for label in np.unique(m_classes):
        mine, theirs = m_values[m_classes == label], n_values[n_classes == label]
        if len(theirs) == 0:
            continue
        residuals.append(mine - theirs.mean())
        strata.append((len(mine), theirs))
    if not residuals:
        return NAN
    diffs = np.concatenate(residuals)
    m = len(diffs)
    value = float(diffs.mean())
    pooled = _pooled_var([t for _, t in strata])
    var = _var(diffs) / m
    for m_c, theirs in strata:
        var += (m_c / m) ** 2 * (_var(theirs) if len(theirs) > 1 else pooled) / len(theirs)
    half = _t(m) * math.sqrt(var)
    return Estimate(value, value - half, value + half, m, sum(len(t) for _, t in strata))


def tpr_at_fpr(
    member_scores: npt.ArrayLike,
    nonmember_scores: npt.ArrayLike,
    fpr: float = 0.01,
    member_classes: npt.ArrayLike | None = None,
    nonmember_classes: npt.ArrayLike | None = None,
) -> Estimate:
    """Share of members above the threshold that flags at most ``fpr`` of the (class-weighted) non-members.

    NaN when the non-members' effective count is under 1 / ``fpr``: with fewer
    rows the lowest false-positive rate one can set is 0, not ``fpr``, and the
    number would silently be the true-positive rate at 0% false positives.
    """
    m_scores, n_scores = _as_floats(member_scores), _as_floats(nonmember_scores)
    if len(m_scores) == 0 or len(n_scores) == 0:
        return NAN
    if member_classes is None:
        weights = np.full(len(n_scores), 1.0 / len(n_scores))
    else:
        weights = matched_weights(member_classes, _as_ints(nonmember_classes, len(n_scores)))
    against = effective_count(weights)
    if against * fpr < 1 - 1e-9:
        return Estimate(math.nan, math.nan, math.nan, len(m_scores), round(against))
    order = np.argsort(-n_scores, kind="stable")
    cumulative = np.cumsum(weights[order])
    # The highest-scoring non-member whose inclusion would push the flagged share over fpr.
    k = int(np.searchsorted(cumulative, fpr * cumulative[-1] * (1 + 1e-9), side="right"))
    threshold = n_scores[order][min(k, len(order) - 1)]
    hits = m_scores > threshold
    if member_classes is not None:
        hits = hits[np.isin(_as_ints(member_classes, 0), _as_ints(nonmember_classes, 0))]
    found = proportion(hits)
    return Estimate(found.value, found.low, found.high, found.n, round(against))


def classifier_attack(
    member_features: npt.ArrayLike,
    nonmember_features: npt.ArrayLike,
    member_classes: npt.ArrayLike | None = None,
    nonmember_classes: npt.ArrayLike | None = None,
    *,
    seed: int = 0,
    folds: int = 5,
) -> Estimate:
    """Out-of-fold balanced accuracy of logistic regression telling members from non-members.

    Every non-member is used, weighted to the members' class mix (or equally
    without classes); members and non-members weigh half each, so chance is
    exactly 0.5. The folds are stratified by side and seeded (``seed``), the
    scaler is fitted on each training fold only.
    """
    members = np.asarray(member_features, dtype=np.float64)
    others = np.asarray(nonmember_features, dtype=np.float64)
    if member_classes is None:
        n_weights = np.full(len(others), 1.0 / max(1, len(others)))
    else:
        n_weights = matched_weights(member_classes, _as_ints(nonmember_classes, len(others)))
        keep = n_weights > 0
        others, n_weights = others[keep], n_weights[keep]
        matched = np.isin(_as_ints(member_classes, 0), _as_ints(nonmember_classes, 0))
        members = members[matched]
    m, n = len(members), len(others)
    if m < folds or n < folds:
        return NAN
    features = np.concatenate([members, others])
    target = np.concatenate([np.ones(m), np.zeros(n)])
    weights = np.concatenate([np.full(m, 0.5 / m), 0.5 * n_weights / n_weights.sum()])
    correct = np.zeros(len(target), dtype=bool)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(features, target):
        centre, scale = features[train].mean(axis=0), features[train].std(axis=0)
        scale[scale == 0] = 1.0  # the scaler is fitted on the training fold only
        # Rescaled so a fold's weights average 1: the penalty then means what it means unweighted.
        fold_weights = weights[train] * len(train) / weights[train].sum()
        coef = fit_logistic((features[train] - centre) / scale, target[train], fold_weights)
        correct[test] = (_design((features[test] - centre) / scale) @ coef > 0) == (target[test] == 1)
    tpr = float(correct[:m].mean())
    tnr = float(np.sum(correct[m:] * n_weights) / n_weights.sum())
    against = effective_count(n_weights)
    value = 0.5 * (tpr + tnr)
    # Agresti-Coull's adjusted rates (two hits and two misses added): a side that is all right
    # or all wrong at 20 rows still has a variance, so a perfect split gets an honest interval.
    # Cross-validation adds variance of its own (which rows trained which fold's classifier):
    # CROSS_VALIDATION_VARIANCE doubles the binomial variance, see its comment.
    var = CROSS_VALIDATION_VARIANCE * 0.25 * (_adjusted_var(tpr, m) + _adjusted_var(tnr, against))
    half = Z * math.sqrt(var)
    return Estimate(value, max(0.0, value - half), min(1.0, value + half), m, round(against))


def _design(features: Floats) -> Floats:
    return np.hstack([features, np.ones((len(features), 1))])


def fit_logistic(features: Floats, target: Floats, weights: Floats, *, l2: float = 1.0, steps: int = 50) -> Floats:
    """Weighted L2-penalised logistic regression by Newton's method; coefficients with the intercept last.

    The objective of scikit-learn's ``LogisticRegression(C=1/l2)``: the weighted
    log-loss plus l2/2 times the squared coefficients, intercept unpenalised.
    A few exact Newton steps on a handful of features: about a millisecond,
    where a general solver took 50-250 ms a fit on a loaded two-core machine
    (the classifier fits five times per audit and thousands of times in the tests).
    """
    x = _design(features)
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    coef = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ coef, -35, 35)))
        gradient = x.T @ (weights * (p - target)) + penalty * coef
        hessian = (x * (weights * p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        coef -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return coef


def _adjusted_var(rate: float, n: float) -> float:
    adjusted = (rate * n + 2) / (n + 4)
    return adjusted * (1 - adjusted) / (n + 4)


def svc_efficacy(
    retain_confidence: npt.ArrayLike,
    heldout_confidence: npt.ArrayLike,
    forget_confidence: npt.ArrayLike,
    *,
    seed: int = 0,
) -> Estimate:
    """Share of forget rows an attack trained on retain (members) vs held-out calls non-members.

    The papers' MIA-efficacy (l1-sparse and SalUn's ``SVC_MIA``): an RBF SVC
    (C=3, gamma "auto") on the true-label confidence, fitted on retain outputs
    subsampled to the held-out count (seeded) against the held-out outputs.
    Clopper-Pearson interval over the forget rows.
    """
    return svc_efficacies(retain_confidence, heldout_confidence, [forget_confidence], seed=seed)[0]


def svc_efficacies(
    retain_confidence: npt.ArrayLike,
    heldout_confidence: npt.ArrayLike,
    forget_confidences: Sequence[npt.ArrayLike],
    *,
    seed: int = 0,
) -> list[Estimate]:
    """``svc_efficacy`` of several forget sets under one fitted attack (the fit is the costly part)."""
    attack = fit_svc_attack(retain_confidence, heldout_confidence, seed=seed)
    return [attack.efficacy(f) for f in forget_confidences]


# The attack's kernel width: the papers' gamma "auto", 1 / n_features, with the one feature they use.
SVC_GAMMA = 1.0


@dataclass(frozen=True)
class RbfSeries:
    """A one-feature RBF SVC's decision function on [0, 1], exp(-g x^2) * sum_k coef[k] x^k + intercept,
    within ``bound`` of libsvm's value (``_rbf_series``)."""

    coef: npt.NDArray[np.float64]
    intercept: float
    bound: float

    def __call__(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(np.exp(-SVC_GAMMA * x * x) * np.polynomial.polynomial.polyval(x, self.coef) + self.intercept)


@dataclass(frozen=True)
class SvcAttack:
    """MIA-efficacy's fitted attack (``fit_svc_attack``); None where there were too few rows to fit one.

    ``series`` is the decision function as a power series for features in [0, 1], the confidences it is
    fitted on: libsvm sums a kernel term per support vector for every row it predicts (real MNIST: 6,000
    forget rows against 1,944 support vectors, 0.35 s, most of the stopping rule's check); the series
    costs a few dozen multiplications per row.
    """

    model: Any
    series: RbfSeries | None = None

    def members(self, features: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Whether the attack calls each row a member: what ``SVC.predict`` says, row for row.

        Rows whose series value lies within its error bound of the boundary, or outside [0, 1], are left
        to libsvm, so no row's verdict depends on the shortcut.
        """
        x = _as_floats(features)
        if self.model is None:
            raise ValueError("no attack was fitted (fewer than 2 retain or held-out rows)")
        out = np.zeros(len(x), dtype=bool)
        left = np.ones(len(x), dtype=bool)
        if self.series is not None:
            inside = np.flatnonzero((x >= 0.0) & (x <= 1.0))
            value = self.series(x[inside])
            clear = np.abs(value) > self.series.bound
            out[inside[clear]] = value[clear] > 0
            left[inside[clear]] = False
        if left.any():
            out[left] = self.model.predict(x[left].reshape(-1, 1)) == 1
        return out

    def efficacy(self, forget_confidence: npt.ArrayLike) -> Estimate:
        """Share of these forget rows the attack calls non-members, with its Clopper-Pearson interval."""
        forget = _as_floats(forget_confidence)
        if self.model is None or not len(forget):
            return NAN
        return proportion(~self.members(forget))


def _rbf_series(model: Any) -> RbfSeries | None:
    """The fitted SVC's decision function as an ``RbfSeries``; None where a support vector leaves [0, 1].

    sum_i a_i exp(-g (x - s_i)^2) + b = exp(-g x^2) sum_i a_i exp(-g s_i^2) exp(2 g s_i x), the last
    factor as its Taylor series, cut where the remainder is below 1e-16 of the summed weights. The bound
    (1e-9 of the summed weights) leaves a wide margin over that and over float rounding.
    """
    s = np.asarray(model.support_vectors_, dtype=np.float64)[:, 0]
    a = np.asarray(model.dual_coef_, dtype=np.float64)[0]
    if not len(s) or s.min() < 0.0 or s.max() > 1.0:
        return None
    g = SVC_GAMMA
    weights = a * np.exp(-g * s * s)
    intercept = float(model.intercept_[0])
    # After K terms the remainder is at most sum|w| * (2g)^K / K! * e^(2g) (|2 g s_i x| <= 2g on [0, 1]).
    count = next(k for k in range(1, 200) if (2 * g) ** k / math.factorial(k) * math.exp(2 * g) < 1e-16)
    coef = np.array([(2 * g) ** k / math.factorial(k) * float(np.dot(weights, s**k)) for k in range(count)])
    return RbfSeries(coef, intercept, 1e-9 * (float(np.abs(weights).sum()) + abs(intercept) + 1.0))


def fit_svc_attack(retain_confidence: npt.ArrayLike, heldout_confidence: npt.ArrayLike, *, seed: int = 0) -> SvcAttack:
    """The attack of ``svc_efficacy``, fitted once: retain outputs (members), subsampled to the held-out
    count under ``seed``, against the held-out outputs (non-members).

    The last few fits are kept by their inputs' digest: the job's audit and its evidence fit the same attack
    on the same outputs (every request but a class removal), and libsvm's fit is deterministic and, on
    near-inseparable rows where almost every row is a support vector, the audit's costliest part (real
    MNIST, 5,000 rows a side: 2.5 s of a 2.6 s audit).
    """
    retain, heldout = _as_floats(retain_confidence), _as_floats(heldout_confidence)
    key = hashlib.sha256(b"%d:%d:" % (seed, len(retain)) + retain.tobytes() + heldout.tobytes()).digest()
    if key not in _SVC_FITS:
        while len(_SVC_FITS) >= _SVC_FITS_KEPT:
            del _SVC_FITS[next(iter(_SVC_FITS))]
        _SVC_FITS[key] = _fit_svc_attack(retain, heldout, seed)
    return _SVC_FITS[key]


_SVC_FITS: dict[bytes, SvcAttack] = {}
_SVC_FITS_KEPT = 4


def _fit_svc_attack(retain: npt.NDArray[np.float64], heldout: npt.NDArray[np.float64], seed: int) -> SvcAttack:
    from sklearn.svm import SVC  # noqa: PLC0415  (loaded only when the efficacy is asked for)

    n = min(len(retain), len(heldout))
    if n < 2:
        return SvcAttack(None)
    pick = np.random.default_rng(seed).permutation(len(retain))[:n]
    features = np.concatenate([retain[pick], heldout[:n]]).reshape(-1, 1)
    target = np.concatenate([np.ones(n), np.zeros(n)])
    model = SVC(C=3, gamma=SVC_GAMMA, kernel="rbf").fit(features, target)
    return SvcAttack(model, _rbf_series(model))


# -- what the intervals are worth ----------------------------------------------------------------


def null_auc_se(members: int, nonmembers: float) -> float:
    """Standard error of an AUC between two samples of one distribution (no ties): sqrt((1/m + 1/n) / 12)."""
    if members <= 0 or nonmembers <= 0:
        return math.inf
    return math.sqrt((1 / members + 1 / nonmembers) / 12)


def coverage(
    make: Callable[[np.random.Generator], tuple[Estimate, float]], draws: int, seed: int = 0
) -> tuple[float, int]:
    """Share of ``draws`` whose interval holds the truth; ``make(rng)`` returns (estimate, truth).

    Returns (coverage, draws with a finite estimate). The tests and the
    benchmark use it to check each interval at the audit's sample sizes.
    """
    rng = np.random.default_rng(seed)
    held = used = 0
    for _ in range(draws):
        estimate, truth = make(rng)
        if not estimate.finite:
            continue
        used += 1
        held += estimate.low <= truth <= estimate.high
    return (held / used if used else math.nan), used
