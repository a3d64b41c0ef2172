"""Calibrated unlearning on real data: the job's acceptance tests against models retrained without the forget set.

Three kinds of forget set, each through ``unlearn run`` with the default method (``auto``: calibrated, as
the request has its model's bank) and the default gates:

* the mislabelled digits model (conftest.py: 40 rows with a wrong label, memorised), its bank, all 40 rows;
* the demo model, its bank, a random 10% of the training rows (typical digits: retraining leaves most
  of them right, so unlearning must not push them away);
* the demo model, its bank, every training row of one class (the class is removed).

And the gates on the evidence, on the models themselves: the untouched model fails on memorised rows
and on class removal, a model retrained without the forget set passes, and doing nothing passes on rows
the model does not remember (retraining changes nothing there either).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from tests.job.conftest import CleanWorld, NoisyBank, RunCli, noisy_data, request
from unlearn import audit, calibrated, gates, tuning
from unlearn.bank import Bank, load_bank
from unlearn.engine import Context, TensorSet, gradient_ascent, predict
from unlearn.runner import bank_references
from unlearning_contracts.record import TERMINATION_MESSAGE_LIMIT, CompactRecord, Evidence, result_json_schema
from unlearning_contracts.spec import GatesSpec, MethodSpec

# The first test that uses a bank pays for it (ten reference trainings each), on a shared machine.
pytestmark = [pytest.mark.job, pytest.mark.timeout(1800)]

CPU = Context(device=torch.device("cpu"), num_classes=10, mixed_precision=False)


def bank_args(bank: Path, sha256: str) -> tuple[str, ...]:
    return ("--calibration-bank", str(bank), "--calibration-sha256", sha256, "--calibration-name", "team/digits")


def run_calibrated(
    run: RunCli,
    model: Path,
    output: Path,
    forget: list[int],
    bank: tuple[str, ...],
    *,
    classes: list[int] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"forget": {"indices": forget, "classes": classes} if classes else {"indices": forget}}
    body.update(spec)
    result = run(request(str(model), str(output), spec=body), *bank)
    assert result.record is not None, result.stderr
    assert result.code == 0, (result.record["reasons"], result.record.get("evidence"))
    jsonschema.validate(result.record, result_json_schema())
    assert result.termination is not None
    assert len(result.termination.encode()) <= TERMINATION_MESSAGE_LIMIT
    # The compact record (the status and the audit ConfigMap read it) carries the evidence, condensed.
    condensed = Evidence.model_validate(result.record["evidence"]).condensed()
    assert json.loads(result.termination)["evidence"] == condensed
    parsed = CompactRecord.model_validate_json(result.termination).evidence
    assert parsed is not None
    assert parsed.estimated_gap == condensed.get("estimatedGap")
    return dict(result.record)


def published(record: dict[str, Any]) -> torch.nn.Module:
    return torch.export.load(record["outputModel"]["uri"]).module()


def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(predict(module, torch.from_numpy(x), CPU).argmax(1) == y))


# -- the acceptance tests ----------------------------------------------------------------------------------


def test_mislabelled_rows_are_forgotten_as_far_as_retraining_would(
    noisy_bank: NoisyBank, run_cli: RunCli, tmp_path: Path
) -> None:
    world = noisy_bank.world
    assert noisy_bank.record.bank is not None
    record = run_calibrated(
        run_cli,
        world.model,
        tmp_path / "out",
        world.forget,
        bank_args(noisy_bank.folder / "bank.npz", noisy_bank.record.bank.sha256),
        data=noisy_data(world),
    )
    assert record["method"] == "calibrated"
    post, evidence = record["post"], record["evidence"]
    assert abs(post["forgetAccuracy"] - world.retrained_forget_accuracy) <= 10.0
    assert abs(post["testAccuracy"] - world.retrained_test_accuracy) <= 2.0
    assert evidence["calibrated"] is True
    assert evidence["targets"] == "bank"
    assert evidence["memberRows"] <= 6  # of 40; measured 5 (the retrained model: 0, the original: nearly all)
    assert evidence["estimatedGap"] <= 1.0
    assert evidence["chosenStep"] > 0


def test_a_random_tenth_of_typical_digits_is_left_where_retraining_leaves_it(
    clean_world: CleanWorld, run_cli: RunCli, tmp_path: Path
) -> None:
    record = run_calibrated(
        run_cli,
        clean_world.model,
        tmp_path / "out",
        clean_world.typical,
        bank_args(clean_world.bank, clean_world.bank_sha256),
    )
    assert record["method"] == "calibrated"
    # The default bank (K = 10) trains its references on 90% of the rows, as the retrain here is: measured
    # 96.3% against the retrain's 97.0 (doing nothing: 100%). With K = 4 (references on 75%) the targets gave
    # 94.8%, 2.2 points away (docs/calibration.md, "Default K = 10").
    forget_accuracy = record["post"]["forgetAccuracy"]
    assert abs(forget_accuracy - clean_world.retrained_typical_forget_accuracy) <= 2.0
    evidence = record["evidence"]
    assert evidence["targetLow"] <= forget_accuracy <= evidence["targetHigh"]
    assert abs(record["post"]["testAccuracy"] - clean_world.retrained_typical_test_accuracy) <= 2.0
    assert record["evidence"]["targets"] == "bank"


def test_a_class_is_removed_and_the_other_classes_keep_their_accuracy(
    clean_world: CleanWorld, run_cli: RunCli, tmp_path: Path
) -> None:
    record = run_calibrated(
        run_cli,
        clean_world.model,
        tmp_path / "out",
        clean_world.class_rows,
        bank_args(clean_world.bank, clean_world.bank_sha256),
        # The set covers the class already; forget.classes says so in words as well.
        classes=[clean_world.removed_class],
    )
    evidence = record["evidence"]
    assert evidence["targets"] == "class-removed"
    assert evidence["removedClasses"] == [clean_world.removed_class]
    assert abs(record["post"]["forgetAccuracy"] - clean_world.retrained_class_forget_accuracy) <= 2.0
    others = clean_world.test_labels != clean_world.removed_class
    kept = accuracy(published(record), clean_world.test_x[others], clean_world.test_labels[others])
    assert abs(kept - clean_world.retrained_class_other_test_accuracy) <= 2.0
    assert evidence["classReadability"] <= 0.99  # the untouched model: 1.0


# -- the gates on the evidence, on the untouched model and on retrained ones ------------------------------------


ONLY_EVIDENCE = GatesSpec(max_test_accuracy_drop=None, max_mia_classifier_accuracy=None)


def verdict_of(
    module: torch.nn.Module,
    bank: Bank,
    x: np.ndarray,
    labels: np.ndarray,
    forget: list[int],
    *,
    test: tuple[np.ndarray, np.ndarray],
    original: torch.nn.Module,
    removed: tuple[int, ...] = (),
    spec: GatesSpec = ONLY_EVIDENCE,
) -> gates.Verdict:
    """The gates of ``spec`` on ``module``, with targets made from ``original`` and the bank, and the bank's
    references as the Job passes them (``runner.bank_references``); by default the evidence gates alone."""
    rows = np.asarray(forget)
    keep = np.setdiff1d(np.arange(len(labels)), rows)
    test_x, test_y = test

    def logits(m: torch.nn.Module, data: np.ndarray) -> np.ndarray:
        return predict(m, torch.from_numpy(data), CPU)

    original_heldout = logits(original, test_x)
    the_plan = calibrated.plan(
        forget_labels=labels[rows],
        original_forget_logits=logits(original, x[rows]),
        audited=np.arange(len(rows)),
        original_retain_accuracy=audit.accuracy(logits(original, x[keep]), labels[keep]),
        original_heldout=(original_heldout, test_y),
        removed=removed,
        share=len(rows) / len(labels),
        out_logits=bank.out_log_probs(rows),
        out_phi=bank.out_phi(rows),
        reference_test_logits=bank.test.log_probs(),
        reference_test_phi=bank.test_phi,
    )
    forget_out = (logits(module, x[rows]), labels[rows])
    retain_out = (logits(module, x[keep]), labels[keep])
    heldout_out = (logits(module, test_x), test_y)
    found = calibrated.evidence(the_plan, forget_out, retain_out, heldout_out)
    pre = audit.audit_outputs(
        (logits(original, x[rows]), labels[rows]), (logits(original, x[keep]), labels[keep]), (original_heldout, test_y)
    )
    post = audit.audit_outputs(
        forget_out, retain_out, heldout_out, heldout_before=original_heldout, removed_classes=removed
    )
    return gates.evaluate(spec, pre, post, bank_references(the_plan), evidence=found)


def exported(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


def test_evidence_gates_fail_the_untouched_model_on_memorised_rows_and_pass_a_retrained_one(
    noisy_bank: NoisyBank,
) -> None:
    world = noisy_bank.world
    with np.load(world.root / "data" / "train.npz") as train, np.load(world.root / "data" / "test.npz") as test:
        x, test_data = train["x"], (test["x"], test["y"])
    original = exported(world.model)
    bank = load_bank(noisy_bank.folder / "bank.npz")
    untouched = verdict_of(original, bank, x, noisy_bank.labels, world.forget, test=test_data, original=original)
    assert set(untouched.failed_gates) == {"maxEstimatedGap", "minMembershipPValue"}
    retrained = verdict_of(
        exported(world.retrained), bank, x, noisy_bank.labels, world.forget, test=test_data, original=original
    )
    assert retrained.passed, retrained.reasons


def test_evidence_gates_on_class_removal_and_on_a_typical_set(clean_world: CleanWorld) -> None:
    bank = load_bank(clean_world.bank)
    original = exported(clean_world.model)
    x, labels = clean_world.train_x, clean_world.train_labels
    test = (clean_world.test_x, clean_world.test_labels)
    removed = (clean_world.removed_class,)
    untouched = verdict_of(
        original, bank, x, labels, clean_world.class_rows, test=test, original=original, removed=removed
    )
    assert {"maxEstimatedGap", "maxClassReadability"} <= set(untouched.failed_gates)
    retrained = verdict_of(
        clean_world.retrained["class"],
        bank,
        x,
        labels,
        clean_world.class_rows,
        test=test,
        original=original,
        removed=removed,
    )
    assert retrained.passed, retrained.reasons
    # Doing nothing passes where retraining changes nothing either: on the rows the references do not
    # remember (the conftest's `unremarkable`), a retrain without them still gets every one right.
    assert clean_world.retrained_unremarkable_forget_accuracy == 100.0
    rows = clean_world.unremarkable
    nothing = verdict_of(original, bank, x, labels, rows, test=test, original=original)
    assert nothing.passed, nothing.reasons
    assert verdict_of(clean_world.retrained["unremarkable"], bank, x, labels, rows, test=test, original=original).passed
    # A random 10% is not such a set: retraining moves its forget accuracy from 100% to 97%, and the K = 10
    # bank tells the original's rows from a retrain's (measured: 11 of 134 flagged, p = 1.3e-7); the retrain
    # passes.
    typical = clean_world.retrained["typical"]
    assert verdict_of(typical, bank, x, labels, clean_world.typical, test=test, original=original).passed
    untouched_typical = verdict_of(original, bank, x, labels, clean_world.typical, test=test, original=original)
    assert untouched_typical.failed_gates == ["minMembershipPValue"], untouched_typical.reasons


def utility(verdict: gates.Verdict) -> gates.GateOutcome:
    return next(o for o in verdict.outcomes if o.gate == "maxTestAccuracyDrop")


def test_with_its_bank_a_retrained_model_passes_the_default_gates_and_a_damaged_one_fails_on_utility(
    clean_world: CleanWorld, noisy_bank: NoisyBank
) -> None:
    """Rule 5 with a bank (unlearn/gates.py): the utility limit sits above what retraining itself shows."""
    bank = load_bank(clean_world.bank)
    original = exported(clean_world.model)
    x, labels = clean_world.train_x, clean_world.train_labels
    test = (clean_world.test_x, clean_world.test_labels)
    for name, rows, removed in (
        ("typical", clean_world.typical, ()),
        ("class", clean_world.class_rows, (clean_world.removed_class,)),
    ):
        retrained = verdict_of(
            clean_world.retrained[name],
            bank,
            x,
            labels,
            rows,
            test=test,
            original=original,
            removed=removed,
            spec=GatesSpec(),
        )
        assert retrained.passed, (name, retrained.reasons)
        drop = utility(retrained)
        # The limit applied: 2 above the upper end of the references' own drop, never below the bare 2. Measured:
        # typical 0.45 [-0.54, 0.88] against 3.13, class 0.50 [-0.34, 0.50] against 3.22.
        assert drop.reference is not None
        assert drop.reference.source == gates.RETRAINING_SOURCE
        assert drop.allowed[1] == pytest.approx(2.0 + max(0.0, drop.reference.high))
        print(f"{name}: retrained drop {drop.observed}, applied limit {drop.allowed[1]:.2f}")
    world = noisy_bank.world
    with np.load(world.root / "data" / "train.npz") as train, np.load(world.root / "data" / "test.npz") as data:
        noisy_x, noisy_test = train["x"], (data["x"], data["y"])
    noisy_original = exported(world.model)
    retrained = verdict_of(
        exported(world.retrained),
        load_bank(noisy_bank.folder / "bank.npz"),
        noisy_x,
        noisy_bank.labels,
        world.forget,
        test=noisy_test,
        original=noisy_original,
        spec=GatesSpec(),
    )
    assert retrained.passed, retrained.reasons

    # Gradient ascent on the typical 10% run far too long (no stopping rule): the model is damaged.
    damaged = exported(clean_world.model)
    hyper = replace(
        tuning.resolve(MethodSpec.model_validate({"name": "gradient-ascent"})), forget_epochs=20, retain_epochs=0
    )
    forget = TensorSet(torch.from_numpy(x[clean_world.typical]), torch.from_numpy(labels[clean_world.typical]))
    gradient_ascent(damaged, forget, forget, hyper, replace(CPU, gen=torch.Generator().manual_seed(0)))
    hurt = verdict_of(damaged, bank, x, labels, clean_world.typical, test=test, original=original, spec=GatesSpec())
    assert "maxTestAccuracyDrop" in hurt.failed_gates
    drop = utility(hurt)
    assert drop.observed is not None
    assert drop.observed.low > drop.allowed[1]  # measured 26.5 [24.5, 26.9] against 3.13
    assert drop.allowed[1] > 2.0  # the bank's reference was applied (the widened limit), and still fails it
    print(f"damaged: drop {drop.observed}, applied limit {drop.allowed[1]:.2f}")


def test_without_a_bank_calibrated_runs_on_the_fallback_and_says_so(
    demo_root: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    result = run_cli(request(str(model), str(tmp_path / "out"), spec={"method": {"name": "calibrated"}}))
    assert result.record is not None, result.stderr
    evidence = result.record["evidence"]
    assert evidence["calibrated"] is False
    assert evidence["targets"] == "fallback"
    assert evidence["summary"].startswith("UNCALIBRATED")
    assert "memberRows" not in evidence  # no bank: no membership test against it
    assert result.record["calibration"]["calibrated"] is False
    # Without a bank the default (auto) is scrub, as before banks existed.
    plain = run_cli(request(str(model), str(tmp_path / "plain"), spec={"tuning": {"maxAttempts": 1}}))
    assert plain.record is not None
    assert plain.record["method"] == "scrub"
    assert "evidence" not in plain.record
