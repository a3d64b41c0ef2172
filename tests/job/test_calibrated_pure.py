"""Unit tests of calibrated unlearning's pure part (unlearn.calibrated): targets, the gap estimate, the
per-row membership test and the class-removal check, on small hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearn import audit
from unlearn import calibrated as cal

pytestmark = pytest.mark.unit


def logits_of(probs: list[list[float]]) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-30))


@pytest.mark.parametrize(
    ("forget", "train", "requested", "expected"),
    [
        ([0, 1], [0, 0, 1, 1, 2], (), ()),  # a random set covers no class
        ([0, 0, 1], [0, 0, 1, 1, 2], (), (0,)),  # every row of class 0
        ([2], [0, 0, 1, 1, 2], (), (2,)),  # a class with one row, forgotten
        ([0], [0, 0, 1, 1, 2], (1,), (1,)),  # named by forget.classes, partly covered
        ([0, 0, 1, 1, 2], [0, 0, 1, 1, 2], (), (0, 1, 2)),
    ],
)
def test_removed_classes_are_named_or_covered(
    forget: list[int], train: list[int], requested: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    assert cal.removed_classes(np.array(forget), np.array(train), requested, 3) == expected


def test_class_absent_zeroes_the_class_and_renormalises() -> None:
    p = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    out = cal.class_absent(p, (0,))
    np.testing.assert_allclose(out[0], [0.0, 0.6, 0.4])
    np.testing.assert_allclose(out[1], [0.0, 0.5, 0.5])  # nothing left: uniform over the rest
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_own_label_scaled_keeps_the_ratio_of_the_others() -> None:
    p = np.array([[0.9, 0.08, 0.02], [1.0, 0.0, 0.0]])
    out = cal.own_label_scaled(p, np.array([0, 0]), np.array([0.6, 0.7]))
    np.testing.assert_allclose(out[0], [0.6, 0.32, 0.08])
    np.testing.assert_allclose(out[1], [0.7, 0.15, 0.15])


def test_targets_by_kind() -> None:
    labels = np.array([0, 1, 2])
    original = logits_of([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]])
    out = logits_of([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    banked = cal.make_targets(labels, original, out_logits=out)
    np.testing.assert_allclose(banked.probs, np.exp(out), atol=1e-9)
    assert banked.kinds == ("bank", "bank", "bank")
    assert banked.calibrated
    assert banked.accuracy(labels).value == pytest.approx(200 / 3)  # row 1's OUT prediction is class 0

    removed = cal.make_targets(labels, original, removed=(2,), out_logits=out)
    assert removed.kinds == ("bank", "bank", "class-removed")
    np.testing.assert_allclose(removed.probs[2], [0.5, 0.5, 0.0])  # the original's, class 2 removed
    assert (removed.probs[:, 2] == 0).all()  # no row may be sent to a removed class
    assert removed.accuracy(labels).value == pytest.approx(100 / 3)

    fallback = cal.make_targets(labels, original, class_confidence=np.array([0.8, 0.9, 0.95]))
    assert not fallback.calibrated
    assert fallback.kind == "fallback"
    np.testing.assert_allclose(fallback.probs[np.arange(3), labels], [0.8, 0.9, 0.95])
    with pytest.raises(ValueError, match="fallback"):
        cal.make_targets(labels, original)


def test_heldout_confidence_per_class() -> None:
    held = logits_of([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    np.testing.assert_allclose(cal.heldout_confidence(held, np.array([0, 0, 1]), 3), [0.8, 0.8, 0.8])


def test_kl_to_target_is_zero_at_the_target() -> None:
    labels = np.array([0, 1])
    target = cal.make_targets(
        labels, logits_of([[0.9, 0.1], [0.2, 0.8]]), out_logits=logits_of([[0.6, 0.4], [0.5, 0.5]])
    )
    kl = cal.kl_to_target(logits_of([[0.6, 0.4], [0.9, 0.1]]), target)
    assert kl[0] == pytest.approx(0.0, abs=1e-9)
    assert kl[1] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def test_phi_is_stable_where_the_label_probability_rounds_to_one() -> None:
    z = np.array([[40.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cal.phi(z, np.array([0, 0])), [40.0 - math.log(2), -math.log(2)])


def test_expected_test_accuracy_interpolates_by_the_forget_share() -> None:
    labels = np.array([0, 1, 0, 1])
    original = logits_of([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])  # 100%
    references = np.stack([logits_of([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])] * 2)  # 75% each
    expected, spread = cal.expected_test_accuracy(original, references, labels, share=0.25)  # half-way to 1/K
    assert expected == pytest.approx(87.5)
    assert spread == 0.0
    assert cal.expected_test_accuracy(original, references, labels, share=0.9)[0] == pytest.approx(75.0)
    kept, _ = cal.expected_test_accuracy(original, references, labels, share=0.0, removed=(1,))
    assert kept == pytest.approx(100.0)


def test_estimate_gap_is_zero_for_a_model_at_every_reference() -> None:
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 3, n)
    sure = np.full((n, 3), -6.0)
    sure[np.arange(n), labels] = 6.0
    targets = cal.make_targets(labels[:50], sure[:50], out_logits=sure[:50])
    reference = cal.GapReference(targets.accuracy(labels[:50]), 100.0, 100.0, 0.0)
    at = cal.estimate_gap((sure[:50], labels[:50]), (sure[50:], labels[50:]), (sure, labels), targets, reference)
    assert at.gap == pytest.approx(0.0, abs=1e-9)
    wrong = sure[:50][:, [1, 2, 0]]  # every forget row misclassified: UA 100 against a target of 0
    off = cal.estimate_gap((wrong, labels[:50]), (sure[50:], labels[50:]), (sure, labels), targets, reference)
    assert off.parts["ua"] == pytest.approx(100.0)
    assert off.gap >= 25.0


def test_the_objective_fits_its_attack_once_and_keeps_it() -> None:
    """The stopping rule's objective fits MIA-efficacy's attack at its first call and keeps it: with the retain
    and held-out outputs unchanged it equals the refitted objective; once they move, it still reads the
    first attack (the record's evidence refits on the returned model)."""
    rng = np.random.default_rng(3)
    n, c = 600, 3
    labels = rng.integers(0, c, n)
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), labels] += rng.uniform(0.0, 6.0, n)  # confidences spread over (1/3, 1)
    forget, retain, heldout = slice(0, 60), slice(60, 360), slice(360, n)
    the_plan = cal.plan(
        forget_labels=labels[forget],
        original_forget_logits=logits[forget],
        audited=np.arange(60),
        original_retain_accuracy=100.0,
        original_heldout=(logits[heldout], labels[heldout]),
        removed=(),
        share=0.1,
        out_logits=logits[forget][:, [1, 2, 0]],
    )

    def parts(f: np.ndarray, r: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        return (f, labels[forget]), (r, labels[retain]), (logits[heldout], labels[heldout])

    kept = cal.Objective(the_plan)
    assert kept(*parts(logits[forget], logits[retain])) == cal.objective(
        the_plan, *parts(logits[forget], logits[retain])
    )
    assert kept.attack is not None
    first = kept.attack
    moved_forget = logits[forget] - 3.0 * np.eye(c)[labels[forget]]  # forget rows lose confidence
    assert kept(*parts(moved_forget, logits[retain])) == cal.objective(the_plan, *parts(moved_forget, logits[retain]))
    sharper = logits[retain] + 20.0 * np.eye(c)[labels[retain]]  # retained rows all at confidence ~1
    kept(*parts(moved_forget, sharper))
    assert kept.attack is first
    refit = cal.estimate_gap(*parts(moved_forget, sharper), the_plan.audited_targets, the_plan.reference)
    frozen = cal.estimate_gap(*parts(moved_forget, sharper), the_plan.audited_targets, the_plan.reference, attack=first)
    assert refit.mia != frozen.mia  # the refitted attack reads the moved retain rows; the kept one does not


def test_the_checks_retained_rows_are_spread_over_the_audited_rows() -> None:
    """The audit takes every row of a small set and a seeded sorted sample of a large one; the stopping rule's
    checks take a seeded sample of those, spread over the whole set: the first 1,000 of data sorted by class
    would hold two of its ten classes."""
    rows = audit.audited_rows({"forget": 300, "retain": 20_000, "heldout": 4_000}, 5000, seed=0)
    assert np.array_equal(rows["forget"], np.arange(300))
    assert len(rows["retain"]) == 5000
    assert len(np.unique(rows["retain"])) == 5000
    assert np.all(np.diff(rows["retain"]) > 0)
    assert rows["retain"].max() < 20_000
    assert np.array_equal(rows["heldout"], np.arange(4000))
    assert np.array_equal(audit.audited_rows({"retain": 20_000}, 5000, seed=0)["retain"], rows["retain"])
    assert not np.array_equal(audit.audited_rows({"retain": 20_000}, 5000, seed=1)["retain"], rows["retain"])
    sorted_labels = np.repeat(np.arange(10), 500)  # the 5,000 audited retained rows, sorted by class
    checked = cal.check_rows(5000, seed=0)
    assert len(checked) == cal.CHECK_RETAIN_ROWS == 1000
    assert np.bincount(sorted_labels[checked], minlength=10).min() >= 70  # every class, ~100 each
    assert np.array_equal(cal.check_rows(600, seed=0), np.arange(600))


def test_a_class_removals_mia_efficacy_counts_the_other_classes_held_out_rows() -> None:
    """The record's MIA-efficacy on a class removal fits its attack against held-out rows of the other classes,
    as the benchmark and the evidence do: the removed class's held-out rows are not unseen data of the kind
    the forget rows are compared with (here, as before unlearning, the model still knows the class)."""
    rng = np.random.default_rng(8)
    c = 3

    def outputs(labels: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(0.0, 0.3, (len(labels), c))
        logits[np.arange(len(labels)), labels] += own
        return logits, labels

    retain = outputs(rng.integers(1, c, 600), rng.uniform(3.0, 5.0, 600))
    # The forget rows (class 0) and the class's held-out rows alike, between the retained and the others.
    forget = outputs(np.zeros(80, dtype=np.int64), rng.uniform(1.0, 2.0, 80))
    h_labels = rng.integers(0, c, 900)
    heldout = outputs(h_labels, np.where(h_labels == 0, rng.uniform(1.0, 2.0, 900), rng.uniform(-2.0, 0.0, 900)))
    kept = h_labels != 0
    metrics = audit.audit_outputs(forget, retain, heldout, removed_classes=(0,))
    others = audit.mia_efficacy(retain, (heldout[0][kept], heldout[1][kept]), forget).value
    every = audit.mia_efficacy(retain, heldout, forget).value
    assert metrics.mia_efficacy == pytest.approx(others)
    assert abs(others - every) > 1.0  # the choice of rows matters here
    assert audit.audit_outputs(forget, retain, heldout).mia_efficacy == pytest.approx(every)


def test_membership_test_counts_rows_above_the_null_at_one_percent() -> None:
    rng = np.random.default_rng(1)
    test_phi = rng.normal(5.0, 1.0, 2000)
    references = rng.normal(5.0, 1.0, (4, 2000))
    out_phi = rng.normal(5.0, 1.0, 200)
    unseen = cal.membership_test(rng.normal(5.0, 1.0, 200), out_phi, test_phi, references)
    assert unseen.flagged <= 6
    assert unseen.p_value > 0.01
    remembered = cal.membership_test(out_phi + 8.0, out_phi, test_phi, references)
    assert remembered.flagged == 200
    assert remembered.p_value < 1e-100
    assert remembered.share.low > 95.0
    assert unseen.expected == pytest.approx(2.0)


def test_class_readability_reads_a_masked_class_but_not_an_absent_one() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 100)
    z = rng.normal(0.0, 1.0, (300, 3))
    z[np.arange(300), labels] += 5.0
    masked = z.copy()
    masked[:, 0] -= 20.0  # an output-bias mask: class 0 never wins, but its rows still rank first
    assert cal.class_readability(masked, labels, (0,)).value > 0.99
    absent = z.copy()
    absent[:, 0] = rng.normal(-10.0, 1.0, 300)  # a logit that carries nothing about class 0
    assert 0.35 < cal.class_readability(absent, labels, (0,)).value < 0.65
    assert math.isnan(cal.class_readability(z, labels, ()).value)
