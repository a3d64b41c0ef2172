"""The audit's statistics (unlearn.stats): estimates, class matching, and whether the intervals hold.

The coverage checks draw many samples at the audit's own sizes (20 forget rows
against ~430 held-out rows, as on the digits demo) and count how often the 95%
interval holds the truth; the numbers they assert are the ones the module's
docstring and docs/audit-record.md quote.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from unlearn import stats

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(0)


# -- proportions and paired changes --------------------------------------------------------------


def test_clopper_pearson_known_values() -> None:
    assert stats.clopper_pearson(20, 20) == pytest.approx((0.8316, 1.0), abs=1e-4)  # 100% of 20 is not certain
    assert stats.clopper_pearson(0, 20) == pytest.approx((0.0, 0.1684), abs=1e-4)
    low, high = stats.clopper_pearson(10, 20)
    assert (low, high) == pytest.approx((0.2720, 0.7280), abs=1e-4)
    estimate = stats.proportion([True] * 19 + [False])
    assert (estimate.value, estimate.n) == (0.95, 20)
    assert estimate.scaled(100).low == pytest.approx(100 * estimate.low)


def test_paired_change_counts_only_rows_that_changed() -> None:
    before = np.array([True] * 90 + [False] * 10)
    assert stats.paired_change(before, before) == stats.Estimate(0.0, 0.0, 0.0, 100)
    after = before.copy()
    after[:6] = False  # six rows lost
    after[95] = True  # one gained
    drop = stats.paired_change(before, after)
    assert drop.value == pytest.approx(0.05)
    # Clopper-Pearson on 6 of 7 changed rows, mapped to (2p - 1) * 7 / 100.
    p_low, p_high = stats.clopper_pearson(6, 7)
    assert (drop.low, drop.high) == pytest.approx(((2 * p_low - 1) * 0.07, (2 * p_high - 1) * 0.07))
    assert drop.low < drop.value < drop.high


# -- class matching --------------------------------------------------------------------------------


def test_matched_weights_give_each_class_the_members_share() -> None:
    members = np.array([5, 5, 5, 1])
    others = np.array([1, 1, 5, 7, 7, 7])
    weights = stats.matched_weights(members, others)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[others == 5].sum() == pytest.approx(0.75)
    assert weights[others == 1].sum() == pytest.approx(0.25)
    assert weights[others == 7].sum() == 0.0
    assert stats.unmatched_members(np.array([5, 3]), others) == 1
    assert stats.effective_count(np.full(10, 0.1)) == pytest.approx(10.0)


def test_auc_without_classes_is_the_roc_auc_with_ties_half() -> None:
    members, others = RNG.normal(0.5, 1, 40).round(1), RNG.normal(0, 1, 300).round(1)  # rounding makes ties
    truth = np.r_[np.ones(40), np.zeros(300)]
    estimate = stats.auc(members, others)
    assert estimate.value == pytest.approx(roc_auc_score(truth, np.r_[members, others]))
    assert (estimate.n, estimate.against) == (40, 300)
    assert estimate.low < estimate.value < estimate.high


def test_class_matching_removes_what_the_class_mix_adds() -> None:
    """Never-trained rows of one easy class look like members against all classes, not against their own."""
    classes = RNG.integers(0, 10, 2000)
    scores = RNG.normal(0, 1, 2000) + classes * 0.3  # some classes are easier: higher score, as for a real loss
    pick = np.flatnonzero(classes == 9)[:20]
    rest = np.setdiff1d(np.arange(2000), pick)
    unmatched = stats.auc(scores[pick], scores[rest])
    matched = stats.auc(scores[pick], scores[rest], classes[pick], classes[rest])
    assert unmatched.low > 0.6  # the class, not membership
    assert matched.low < 0.5 < matched.high
    gap = stats.mean_difference(scores[pick], scores[rest], classes[pick], classes[rest])
    assert gap.low < 0.0 < gap.high
    assert stats.mean_difference(scores[pick], scores[rest]).low > 0.5


def test_members_of_a_class_without_held_out_rows_are_left_out() -> None:
    estimate = stats.auc(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.5]), np.array([0, 0, 4]), np.array([0, 0]))
    assert estimate.n == 2
    assert estimate.value == pytest.approx(0.5)  # 1.0 and 2.0 against 0.0 and 2.5
    assert not stats.auc(np.array([1.0]), np.array([0.0]), np.array([3]), np.array([4])).finite


def test_tpr_at_fpr_counts_strictly_above_the_threshold() -> None:
    # 100 non-members 0..99: at 1% FPR one non-member (99) may lie above the threshold, so it is 98.
    estimate = stats.tpr_at_fpr(np.array([98.5, 99.5, 200.0, 0.0, 98.0]), np.arange(100.0), 0.01)
    assert estimate.value == pytest.approx(0.6)
    assert (estimate.low, estimate.high) == pytest.approx(stats.clopper_pearson(3, 5))


def test_tpr_at_fpr_is_not_reported_below_one_over_fpr_held_out_rows() -> None:
    """With 99 rows "1% FPR" could only be 0% FPR: the number is NaN rather than silently something else."""
    assert math.isnan(stats.tpr_at_fpr(np.ones(20), np.arange(99.0), 0.01).value)
    assert not math.isnan(stats.tpr_at_fpr(np.ones(20), np.arange(100.0), 0.01).value)


# -- the classifier attack ---------------------------------------------------------------------------


def test_logistic_fit_matches_scikit_learn() -> None:
    x = RNG.normal(size=(300, 6))
    y = (x[:, 0] - x[:, 2] + RNG.normal(size=300) > 0).astype(float)
    w = RNG.uniform(0.2, 2.0, 300)
    coef = stats.fit_logistic(x, y, w)
    reference = LogisticRegression(C=1.0, max_iter=10000, tol=1e-10).fit(x, y, sample_weight=w)
    assert coef[:-1] == pytest.approx(reference.coef_[0], abs=1e-6)
    assert coef[-1] == pytest.approx(reference.intercept_[0], abs=1e-6)


def test_classifier_attack_near_chance_on_alike_and_high_on_separated() -> None:
    alike = stats.classifier_attack(RNG.normal(size=(200, 10)), RNG.normal(size=(400, 10)), seed=1)
    assert alike.low < 0.5 < alike.high
    separated = stats.classifier_attack(RNG.normal(2.0, 1, (40, 10)), RNG.normal(size=(400, 10)), seed=1)
    assert separated.value > 0.95
    assert separated.low > 0.8


def test_classifier_attack_uses_every_held_out_row_and_balances_the_classes() -> None:
    # 20 members against 2000 non-members drawn alike: "always non-member" would score 0.99 unbalanced.
    estimate = stats.classifier_attack(RNG.normal(size=(20, 10)), RNG.normal(size=(2000, 10)))
    assert estimate.against == 2000
    assert estimate.low < 0.5 < estimate.high
    assert not stats.classifier_attack(RNG.normal(size=(4, 10)), RNG.normal(size=(100, 10))).finite  # < 5 folds


# -- MIA-efficacy's attack ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        "trained",  # members near 1, non-members spread below: one crossing, as on real models
        "middle",  # members in the middle, non-members at both ends: two crossings
    ],
)
def test_svc_attack_says_what_libsvm_says_row_for_row(shape: str) -> None:
    rng = np.random.default_rng(5)
    if shape == "trained":
        members, others = 1 - rng.beta(0.3, 30, 1500), 1 - rng.beta(0.5, 6, 1500)
    else:
        members = rng.beta(8, 8, 1500)
        others = np.concatenate([rng.beta(1, 8, 750), rng.beta(8, 1, 750)])
    attack = stats.fit_svc_attack(members, others, seed=2)
    assert attack.series is not None
    grid = np.linspace(0, 1, 20001)
    libsvm = attack.model.decision_function(grid.reshape(-1, 1))
    assert np.max(np.abs(attack.series(grid) - libsvm)) < attack.series.bound < 1e-5
    crossings = int(np.sum(np.diff(np.sign(libsvm)) != 0))
    assert crossings == (1 if shape == "trained" else 2)
    # The rows at the boundary itself (found by bisection) go to libsvm; every verdict matches.
    edges = [
        _bisect(lambda v: float(attack.model.decision_function([[v]])[0]), grid[i], grid[i + 1])
        for i in np.flatnonzero(np.diff(np.sign(libsvm)) != 0)
    ]
    rows = np.concatenate([rng.uniform(0, 1, 5000), members, others, edges, [0.0, 1.0, -0.1, 1.1]])
    assert np.array_equal(attack.members(rows), attack.model.predict(rows.reshape(-1, 1)) == 1)
    efficacy = attack.efficacy(others)
    assert efficacy.value == pytest.approx(np.mean(attack.model.predict(others.reshape(-1, 1)) == 0))
    assert 0.3 < efficacy.value < 1.0  # a real attack: it tells most non-members apart


def _bisect(f: Callable[[float], float], low: float, high: float) -> float:
    for _ in range(60):
        mid = (low + high) / 2
        if (f(mid) > 0) == (f(low) > 0):
            low = mid
        else:
            high = mid
    return (low + high) / 2


def test_the_same_outputs_are_fitted_once() -> None:
    """The audit and the evidence fit the same attack on the same outputs: the second asks for the first's."""
    rng = np.random.default_rng(6)
    members, others = 1 - rng.beta(0.3, 30, 400), 1 - rng.beta(0.5, 6, 400)
    first = stats.fit_svc_attack(members, others, seed=0)
    assert stats.fit_svc_attack(members.copy(), list(others), seed=0) is first
    moved = members.copy()
    moved[0] = 0.5
    assert stats.fit_svc_attack(moved, others, seed=0) is not first
    assert stats.fit_svc_attack(members, others, seed=1) is not first
    # Where the retained rows end and the held-out rows begin is part of what was fitted.
    both = np.concatenate([members, others])
    assert stats.fit_svc_attack(both[:399], both[399:], seed=0) is not first


def test_svc_attack_without_enough_rows_has_no_efficacy() -> None:
    assert stats.fit_svc_attack([0.9], [0.2, 0.3]).model is None
    assert not stats.fit_svc_attack([0.9], [0.2, 0.3]).efficacy([0.5]).finite


# -- do the intervals hold what they claim? -----------------------------------------------------------


@pytest.mark.parametrize(("shift", "at_least"), [(0.0, 0.94), (0.5, 0.94), (1.2, 0.93)])
def test_auc_interval_coverage_at_20_against_429(shift: float, at_least: float) -> None:
    """DeLong on the logit scale with Student t: 95% intervals that hold 95.7-96.6% of the time at the audit's sizes.

    True AUCs 0.5, 0.64 and 0.80 (two normals ``shift`` apart); 1,000 draws each.
    Coverage falls near AUC 1 (0.88 at 0.98), far from any range a gate allows.
    """
    truth = float(norm.cdf(shift / math.sqrt(2)))

    def draw(rng: np.random.Generator) -> tuple[stats.Estimate, float]:
        classes_m, classes_n = rng.integers(0, 10, 20), rng.integers(0, 10, 429)
        offset = np.linspace(-1.5, 1.5, 10)  # classes differ; matching must not mind
        members = rng.normal(shift, 1, 20) + offset[classes_m]
        others = rng.normal(0, 1, 429) + offset[classes_n]
        return stats.auc(members, others, classes_m, classes_n), truth

    coverage, used = stats.coverage(draw, 1000, seed=3)
    assert used == 1000
    assert at_least <= coverage <= 0.99


def test_classifier_interval_holds_chance_under_the_null() -> None:
    """Members and non-members alike: the doubled binomial variance keeps 0.5 inside in >= 90% of draws."""

    def draw(rng: np.random.Generator) -> tuple[stats.Estimate, float]:
        features = -np.sort(-rng.dirichlet(np.full(10, 0.3), 449), axis=1)  # confidence-like vectors
        classes = rng.integers(0, 10, 449)
        return stats.classifier_attack(features[:20], features[20:], classes[:20], classes[20:], seed=0), 0.5

    coverage, used = stats.coverage(draw, 300, seed=4)
    assert used == 300
    assert coverage >= 0.90
