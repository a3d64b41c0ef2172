"""Forgetting quality against retraining: the field's standard evaluation.

For each dataset x forget kind x seed: train the original (the job's own
training loop, to ~100% train accuracy), retrain a reference from scratch on the
retain set with the *same recipe* but an independent seed (its initial weights
and shuffles share nothing with the original's), retrain a second time from
another seed (the noise floor: how far two retrains differ), then run every
method on a copy of the original through the engine's Python API
(``unlearn.engine.unlearn``), so the clock measures the unlearning itself and not
file I/O or process start-up.

Metrics (all in percent; the papers' definitions):

* UA = 100 - accuracy on the forget set (under the training labels, so for the
  mislabelled group under the *wrong* labels), RA on the retain set, TA on the
  held-out set (for class forgetting: held-out rows of the remaining classes);
* MIA-efficacy: ``unlearn.audit.mia_efficacy``, the very function the job's
  record uses (SVC on true-label confidence, retain vs held-out, applied to the
  forget set);
* the job's audit, class-matched as in the record (``unlearn.audit.audit_outputs``
  on every held-out row): the loss attack's AUC and TPR at 1% FPR, and the
  classifier attack's balanced accuracy (the default gate's number);
* Avg. Gap = mean over UA, RA, TA and MIA-efficacy of |the method's mean over
  seeds - the reference retrain's mean| (SalUn's tables: a gap of means); the
  per-seed gap (mean and standard deviation of each seed's gap) beside it, and
  the same gap for the second retrain, the floor below which no method can be
  told from retraining. The goal per split is a gap of at most 1.0 or the
  floor, whichever is larger;
* wall time of the unlearning call (each method timed ``--repeats`` times), and
  speed-up = the mean of every retraining's time (reference and floor, all
  seeds) / the mean of the method's times: a ratio of repeated timings, not a
  mean of single ratios on a loaded machine.

Methods: ``gradient-ascent`` with the tutorial's defaults (the engine's
gradient-ascent defaults are those numbers), ``gradient-ascent`` as the job's
tuner leaves it (the attempt loop of ``unlearn.runner`` with the spec's default
gates and attempt budget, timed with the audits it needs between attempts),
each stronger method with the job's own defaults (``tuning.resolve``), extra
variants given with ``--variant``, and ``retrain``. An ``original`` row shows the
gap of doing nothing.

Structure: ``run`` loops datasets (``bench.datasets.DATASETS``) x forget kinds
(``FORGET_KINDS``) x seeds x variants; a new dataset is an entry in
``bench.datasets``, a new method a ``Variant``.

Trade-off: a seed changes the original's initialisation, the forget rows (and
for class forgetting the class: seed mod 10) and the methods' shuffling; the
standard deviation (ddof 1) therefore covers all three, as in the papers' tables.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bench.datasets import DATASETS, DEFAULT_DATASETS, FORGET_KINDS, Dataset, ForgetKind, ForgetSet, forget_set, load
from unlearn import audit, calibrated, gates, tuning
from unlearn.demo import mlp, train_digits_model
from unlearn.engine import Context, Monitor, TensorSet, predict
from unlearn.engine import unlearn as run_method
from unlearn.errors import DivergedError
from unlearning_contracts.calibration import DEFAULT_FOLDS
from unlearning_contracts.record import AuditMetrics
from unlearning_contracts.spec import AuditSpec, GatesSpec, MethodSpec, TuningSpec

TUTORIAL = "gradient-ascent (tutorial)"
TUNED = "gradient-ascent (tuned)"
ORIGINAL = "original"
RETRAIN = "retrain"
FLOOR = "retrain (2nd seed)"
STRONGER = ("neggrad-plus", "scrub", "salun")
CALIBRATED = "calibrated"
STOPPED = " + stopping rule"  # a method's label with the bank's stopping rule
BANK_FOLDS = DEFAULT_FOLDS  # the calibration's default K
BANK_SEED = 500  # the references' weights and shuffles: independent of the original's and the retrains'
VARIANTS: tuple[str, ...] = (TUTORIAL, TUNED, *STRONGER, "scrub" + STOPPED, CALIBRATED)
GAP_METRICS = ("ua", "ra", "ta", "mia")
METRICS = ("ua", "ra", "ta", "mia", "auc", "clf", "tpr", "gap", "est", "seconds")
# Retrains draw their initial weights and shuffles from these seeds (plus the split's seed), never from
# the original's: a reference that starts from the original's weights is not independent of it.
REFERENCE_SEED = 1000
FLOOR_SEED = 2000
AUDIT_SEED = AuditSpec().seed  # the job's default audit seed: the same audit whatever the method's seed
GOAL_GAP = 1.0
GOAL_SPEEDUP = 30.0
DOCS_BEGIN = "<!-- bench quality: begin (generated by python -m bench quality --docs) -->"
DOCS_END = "<!-- bench quality: end -->"


def default_method() -> str:
    """What a request without ``method.name`` runs here: ``auto`` with the model's bank is calibrated."""
    return tuning.method_for(str(MethodSpec().name), calibrated=True)


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method with the job's defaults, optionally with some fields replaced."""

    label: str
    method: str
    overrides: tuple[tuple[str, float], ...] = ()
    tuned: bool = False
    stop: bool = False
    """Run under the stopping rule with the split's bank (always for calibrated)."""

    @property
    def banked(self) -> bool:
        return self.stop or self.method == CALIBRATED

    def hyper(self, seed: int) -> tuning.Hyper:
        h = tuning.resolve(MethodSpec.model_validate({"name": self.method, "seed": seed}))
        changes: dict[str, Any] = {}
        for key, value in self.overrides:
            current = getattr(h, key)
            integral = isinstance(current, int) or (current is None and key == "retain_subset")
            changes[key] = int(value) if integral else value
        return replace(h, **changes)


def parse_variant(text: str) -> Variant:
    """``METHOD:field=value,field=value`` (fields of ``unlearn.tuning.Hyper``), e.g. ``scrub:retain_epochs=2``."""
    stop = text.endswith("+stop")
    method, _, rest = text.removesuffix("+stop").partition(":")
    if method not in tuning.DEFAULTS or method == RETRAIN:
        raise ValueError(f"--variant {text!r}: unknown method {method!r}: choose from {', '.join(STRONGER)}, ...")
    fields = {f for f in tuning.Hyper.__dataclass_fields__} - {"method", "seed", "mixed_precision"}
    overrides = []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"--variant {text!r}: {key!r} is not a hyper-parameter: use one of {sorted(fields)}")
        overrides.append((key, float(value)))
    label = (text.removesuffix("+stop") if overrides else method) + (STOPPED if stop else "")
    return Variant(label, method, tuple(overrides), stop=stop)


@dataclass
class Split:
    """One dataset x forget kind x seed: the tensors every method sees."""

    dataset: Dataset
    fs: ForgetSet
    seed: int
    forget: TensorSet
    retain: TensorSet
    heldout: TensorSet
    """Every held-out row: the audit's class-matched comparisons need the forget set's classes too."""
    ctx: Context

    def build(self) -> nn.Module:
        return mlp(self.dataset.train.x.shape[1], self.dataset.recipe.hidden, self.dataset.classes)


def make_split(dataset: Dataset, fs: ForgetSet, seed: int) -> Split:
    cpu = torch.device("cpu")
    keep = np.ones(len(dataset.train), dtype=bool)
    keep[fs.forget] = False
    x = dataset.train.x
    return Split(
        dataset=dataset,
        fs=fs,
        seed=seed,
        forget=TensorSet.from_numpy(x[fs.forget], fs.labels[fs.forget], cpu),
        retain=TensorSet.from_numpy(x[keep], fs.labels[keep], cpu),
        heldout=TensorSet.from_numpy(dataset.test.x, dataset.test.y, cpu),
        ctx=Context(device=cpu, num_classes=dataset.classes, mixed_precision=False),
    )


@dataclass(frozen=True)
class Measured:
    metrics: dict[str, float]
    """The table's numbers."""
    audit: AuditMetrics
    """The job's audit of the same model (what its gates read)."""
    heldout_logits: np.ndarray


def measure(module: nn.Module, split: Split, before: Measured | None = None) -> Measured:
    """UA, RA, TA, MIA-efficacy and the job's audit (class-matched), percent; AUC and accuracy as fractions.

    ``before``: the original's measurement, for the paired held-out accuracy drop the tuner's gate reads.
    """
    outputs = {}
    for name, part in (("forget", split.forget), ("retain", split.retain), ("heldout", split.heldout)):
        outputs[name] = (predict(module, part.x, split.ctx), part.y.numpy())
    result = audit.audit_outputs(
        outputs["forget"],
        outputs["retain"],
        outputs["heldout"],
        seed=AUDIT_SEED,
        heldout_before=before.heldout_logits if before is not None else None,
    )
    rows = split.fs.test_rows
    counted = (outputs["heldout"][0][rows], outputs["heldout"][1][rows])
    efficacy = audit.mia_efficacy(outputs["retain"], counted, outputs["forget"], seed=AUDIT_SEED)
    metrics = {
        "ua": 100.0 - result.forget_accuracy,
        "ra": result.retain_accuracy,
        "ta": audit.accuracy(*counted),
        "mia": efficacy.value,
        "auc": result.mia_auc,
        "clf": _or_nan(result.mia_classifier_accuracy),
        "tpr": 100.0 * _or_nan(result.mia_tpr_at_1fpr),
    }
    return Measured(metrics, result, outputs["heldout"][0])


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def avg_gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    return float(np.mean([abs(metrics[k] - reference[k]) for k in GAP_METRICS]))


def run_plain(original: nn.Module, split: Split, hyper: tuning.Hyper) -> tuple[nn.Module, float, dict[str, Any]]:
    module = copy.deepcopy(original)
    if hyper.method == RETRAIN:

        def fresh() -> None:
            module.load_state_dict(split.build().state_dict())  # drawn under hyper.seed (run_method seeds torch)

        split.ctx.reinitialise = fresh
    info: dict[str, Any] = {"hyper": hyper.as_dict()}
    start = time.perf_counter()
    try:
        run_method(module, split.forget, split.retain, hyper, split.ctx)
    except DivergedError as error:  # the job would answer Failed and write no model: so does the table
        info["diverged"] = str(error)
    finally:
        split.ctx.reinitialise = None
    return module, time.perf_counter() - start, info


def run_tuned(original: nn.Module, split: Split, hyper: tuning.Hyper) -> tuple[nn.Module, float, dict[str, Any]]:
    """The job's attempt loop (``unlearn.runner``) on the pure modules: unlearn, audit, gates, next attempt.

    Timed from the first attempt to the verdict: the post-audits belong to the
    cost, since the tuner cannot decide without them. The pre-audit is not
    timed (the job computes it once, before any method).
    """
    spec_gates, budget = GatesSpec(), TuningSpec().max_attempts
    pre = measure(original, split)
    attempts: list[dict[str, Any]] = []
    verdicts: list[gates.Verdict] = []
    best: nn.Module | None = None
    current: tuning.Hyper | None = hyper
    start = time.perf_counter()
    while current is not None and len(attempts) < budget:
        module = copy.deepcopy(original)
        try:
            run_method(module, split.forget, split.retain, current, split.ctx)
        except DivergedError as error:
            attempts.append({"hyper": current.as_dict(), "verdict": "Failed", "reasons": [str(error)]})
            current = tuning.next_attempt(current, set(), diverged=True)
            continue
        post = measure(module, split, before=pre).audit
        verdict = gates.confirm(gates.evaluate(spec_gates, pre.audit, post), verdicts)
        verdicts.append(verdict)
        attempts.append(
            {
                "hyper": current.as_dict(),
                "verdict": verdict.name,
                "reasons": verdict.reasons,
                "notes": verdict.inconclusive,
            }
        )
        best = module
        if verdict.passed:
            break
        current = tuning.next_attempt(current, set(verdict.failed_kinds()))
    seconds = time.perf_counter() - start
    return (best if best is not None else copy.deepcopy(original)), seconds, {"attempts": attempts}


def train_original(split: Split) -> nn.Module:
    recipe = replace(split.dataset.recipe, seed=split.seed)
    x = torch.from_numpy(split.dataset.train.x)
    return train_digits_model(x, torch.from_numpy(split.fs.labels), recipe, split.dataset.classes)


def retrain_variant(dataset: Dataset) -> Variant:
    """``retrain`` with the original's recipe (lr, epochs, batch), so the speed-up compares like with like."""
    r = dataset.recipe
    return Variant(RETRAIN, RETRAIN, (("retain_lr", r.lr), ("retain_epochs", r.epochs), ("retain_batch", r.batch)))


@dataclass
class SplitBank:
    """The split's reference bank, made as ``unlearn calibrate`` makes it (K folds, the original's recipe)."""

    folds: np.ndarray
    out_logits: np.ndarray
    phi: np.ndarray  # [K, N]
    test_logits: np.ndarray  # [K, M, C]
    test_phi: np.ndarray  # [K, M]
    seconds: float
    steps: int


def make_bank(split: Split, k_folds: int = BANK_FOLDS) -> SplitBank:
    """K references, reference k trained from fresh weights on every row outside fold k."""
    dataset, labels = split.dataset, split.fs.labels
    n = len(dataset.train)
    folds = np.random.default_rng(BANK_SEED + split.seed).permutation(n) % k_folds
    x, y = torch.from_numpy(dataset.train.x), torch.from_numpy(labels)
    out = np.zeros((n, dataset.classes), np.float32)
    phi, test_logits, test_phi = [], [], []
    steps = 0
    start = time.perf_counter()
    for k in range(k_folds):
        keep = folds != k
        recipe = replace(dataset.recipe, seed=BANK_SEED + 10 * split.seed + k)
        reference = train_digits_model(x[keep], y[keep], recipe, dataset.classes)
        steps += recipe.epochs * -(-int(keep.sum()) // recipe.batch)
        logits = predict(reference, x, split.ctx)
        out[~keep] = logits[~keep]
        phi.append(calibrated.phi(logits, labels))
        held = predict(reference, split.heldout.x, split.ctx)
        test_logits.append(held)
        test_phi.append(calibrated.phi(held, dataset.test.y))
    return SplitBank(
        folds, out, np.stack(phi), np.stack(test_logits), np.stack(test_phi), time.perf_counter() - start, steps
    )


def audited(split: Split) -> dict[str, npt.NDArray[np.int64]]:
    """The rows of each set the job's audit and stopping rule evaluate, under the job's defaults."""
    sizes = {"forget": len(split.forget), "retain": len(split.retain), "heldout": len(split.heldout)}
    return audit.audited_rows(sizes, AuditSpec().max_samples, AUDIT_SEED)


def calibration_plan(original: nn.Module, split: Split, bank: SplitBank) -> calibrated.Plan:
    """The job's plan (``unlearn.calibrated.plan``): targets for every forget row, the evidence's references
    on the rows the job's audit evaluates (``audited``)."""
    rows = audited(split)
    forget_rows = split.fs.forget[rows["forget"]]
    labels = split.forget.y.numpy()
    removed = calibrated.removed_classes(labels, split.fs.labels, (), split.dataset.classes)
    retain, heldout = split.retain.take(_index(rows["retain"])), split.heldout.take(_index(rows["heldout"]))
    return calibrated.plan(
        forget_labels=labels,
        original_forget_logits=predict(original, split.forget.x, split.ctx),
        audited=rows["forget"],
        original_retain_accuracy=audit.accuracy(predict(original, retain.x, split.ctx), retain.y.numpy()),
        original_heldout=(predict(original, heldout.x, split.ctx), heldout.y.numpy()),
        removed=removed,
        share=len(split.fs.forget) / len(split.dataset.train),
        out_logits=bank.out_logits[split.fs.forget],
        out_phi=bank.phi[bank.folds[forget_rows], forget_rows],
        reference_test_logits=bank.test_logits[:, rows["heldout"]],
        reference_test_phi=bank.test_phi[:, rows["heldout"]],
    )


def _index(rows: npt.NDArray[np.int64]) -> torch.Tensor:
    return torch.from_numpy(rows)


def run_banked(
    original: nn.Module, split: Split, hyper: tuning.Hyper, the_plan: calibrated.Plan
) -> tuple[nn.Module, float, dict[str, Any]]:
    """A method under the stopping rule with the job's estimate, on the rows the job's checks evaluate."""
    rows = audited(split)
    forget, retain, heldout = (getattr(split, k).take(_index(rows[k])) for k in ("forget", "retain", "heldout"))
    checked = retain.take(_index(calibrated.check_rows(len(retain), AUDIT_SEED)))

    def outputs(module: nn.Module, *parts: TensorSet) -> list[tuple[Any, Any]]:
        return [(predict(module, part.x, split.ctx), part.y.numpy()) for part in parts]

    objective = calibrated.Objective(the_plan, AUDIT_SEED)

    def estimate(module: nn.Module) -> float:
        return objective(*outputs(module, forget, checked, heldout))

    monitor = Monitor(estimate)
    split.ctx.targets = torch.from_numpy(the_plan.targets.probs).float()
    split.ctx.monitor = monitor
    try:
        module, seconds, info = run_plain(original, split, hyper)
    finally:
        split.ctx.targets, split.ctx.monitor = None, None
    info["stopping"] = monitor.summary()
    # The gap the job's evidence reports for the returned model (the stopping rule's objective adds membership).
    found = calibrated.evidence(the_plan, *outputs(module, forget, retain, heldout), seed=AUDIT_SEED)
    info["est"] = found.estimated_gap if found.estimated_gap is not None else math.nan
    info["memberRows"] = found.member_rows
    return module, seconds, info


def run_split(
    dataset: Dataset,
    kind: ForgetKind,
    seed: int,
    variants: Sequence[Variant],
    originals: dict[bytes, nn.Module],
    *,
    repeats: int = 1,
    banks: dict[bytes, SplitBank] | None = None,
    bank_folds: int = BANK_FOLDS,
) -> list[dict[str, Any]]:
    """Every variant on one split; returns one row per variant (plus retrain, its second seed and original).

    Each method is timed ``repeats`` times (the first run's model is the one measured: on CPU a
    seed gives the same model every run); ``seconds`` keeps every timing.
    """
    banks = banks if banks is not None else {}
    fs = forget_set(dataset, kind, seed)
    split = make_split(dataset, fs, seed)
    key = fs.labels.tobytes()
    if key not in originals:  # random and class forgetting share the clean original
        originals[key] = train_original(split)
    original = originals[key]
    base = {"dataset": dataset.name, "kind": kind, "seed": seed, "forget": len(fs.forget), "note": fs.note}
    retrain = retrain_variant(dataset)
    reference_module, reference_seconds, info = run_plain(original, split, retrain.hyper(REFERENCE_SEED + seed))
    reference = measure(reference_module, split).metrics
    rows = [{**base, "method": RETRAIN, **reference, "gap": 0.0, "seconds": [reference_seconds], **info}]
    floor_module, floor_seconds, info = run_plain(original, split, retrain.hyper(FLOOR_SEED + seed))
    floor = measure(floor_module, split).metrics
    rows.append(
        {**base, "method": FLOOR, **floor, "gap": avg_gap(floor, reference), "seconds": [floor_seconds], **info}
    )
    before = measure(original, split).metrics
    rows.append({**base, "method": ORIGINAL, **before, "gap": avg_gap(before, reference)})
    the_plan: calibrated.Plan | None = None
    if any(v.banked for v in variants):
        if key not in banks:
            banks[key] = make_bank(split, bank_folds)
        bank = banks[key]
        the_plan = calibration_plan(original, split, bank)
        r = dataset.recipe
        full = r.epochs * -(-len(dataset.train) // r.batch)  # one training on every row
        base = {
            **base,
            "bankFolds": bank_folds,
            "bankSeconds": bank.seconds,
            "bankSteps": bank.steps,
            "fullSteps": full,
        }
    for variant in variants:
        hyper = variant.hyper(seed)
        runner: Callable[[nn.Module, Split, tuning.Hyper], tuple[nn.Module, float, dict[str, Any]]]
        if variant.banked:
            assert the_plan is not None
            runner = functools.partial(run_banked, the_plan=the_plan)
        else:
            runner = run_tuned if variant.tuned else run_plain
        module, seconds, info = runner(original, split, hyper)
        timings = [seconds] + [runner(original, split, hyper)[1] for _ in range(repeats - 1)]
        if "diverged" in info:
            metrics = dict.fromkeys(("ua", "ra", "ta", "mia", "auc", "clf", "tpr"), math.nan)
        else:
            metrics = measure(module, split).metrics
        rows.append(
            {**base, "method": variant.label, **metrics, "gap": avg_gap(metrics, reference), "seconds": timings, **info}
        )
    return rows


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset x kind x method (in first-seen order): mean and std over seeds, the gap of means, the speed-up."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["kind"], row["method"]), []).append(row)
    out = []
    for (dataset, kind, method), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "kind": kind, "method": method, "seeds": len(members)}
        entry["diverged"] = sum("diverged" in m for m in members)
        for metric in METRICS:
            if metric == "seconds":
                values = [float(np.mean(m["seconds"])) for m in members if m.get("seconds")]
            else:
                values = [float(m[metric]) for m in members if metric in m and math.isfinite(float(m[metric]))]
            if values:
                entry[metric] = _spread(values)
        out.append(entry)
    for entry in out:
        split_rows = [r for r in rows if (r["dataset"], r["kind"]) == (entry["dataset"], entry["kind"])]
        reference = next(
            e for e in out if (e["dataset"], e["kind"], e["method"]) == (entry["dataset"], entry["kind"], RETRAIN)
        )
        if all(k in entry for k in GAP_METRICS):
            entry["avgGap"] = float(np.mean([abs(entry[k]["mean"] - reference[k]["mean"]) for k in GAP_METRICS]))
        own = [t for r in split_rows if r["method"] == entry["method"] for t in r.get("seconds", [])]
        retrains = [t for r in split_rows if r["method"] in (RETRAIN, FLOOR) for t in r.get("seconds", [])]
        if own and retrains:
            entry["speedup"] = float(np.mean(retrains) / np.mean(own))
    return out


def goal(summary: Sequence[dict[str, Any]], dataset: str, kind: str) -> tuple[float, float | None]:
    """(the split's gap goal, its noise floor): an Avg. Gap of at most 1.0 or the floor, whichever is larger."""
    floor = next(
        (e.get("avgGap") for e in summary if (e["dataset"], e["kind"], e["method"]) == (dataset, kind, FLOOR)), None
    )
    return max(GOAL_GAP, floor or 0.0), floor


def _cell(entry: dict[str, Any], metric: str, digits: int = 2) -> str:
    value = entry.get(metric)
    if value is None:
        return "-"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _number(entry: dict[str, Any], key: str, fmt: str) -> str:
    value = entry.get(key)
    return "-" if value is None else format(value, fmt)


def markdown_tables(summary: Sequence[dict[str, Any]], default: str) -> str:
    """One table per dataset x forget kind; the default method's row is marked."""
    header = (
        "| method | UA | RA | TA | MIA-eff. | loss AUC | clf acc | TPR@1%FPR | **Avg. Gap** | per-seed gap "
        "| estimated gap (bank) | time (s) | speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    blocks: dict[tuple[str, str], list[str]] = {}
    for e in summary:
        label = f"**{e['method']}** (default)" if e["method"] == default else e["method"]
        if e["method"] == RETRAIN:
            label += " (reference)"
        if e["method"] == FLOOR:
            label += ": noise floor"
        if e.get("diverged"):
            label += f" ({e['diverged']} of {e['seeds']} diverged: left out)"
        speed = "1.0×" if e["method"] == RETRAIN else (f"{e['speedup']:.1f}×" if "speedup" in e else "-")
        line = (
            f"| {label} | {_cell(e, 'ua', 1)} | {_cell(e, 'ra', 1)} | {_cell(e, 'ta', 1)} | {_cell(e, 'mia', 1)} "
            f"| {_cell(e, 'auc', 3)} | {_cell(e, 'clf', 3)} | {_cell(e, 'tpr', 1)} | **{_number(e, 'avgGap', '.2f')}** "
            f"| {_cell(e, 'gap', 2)} | {_cell(e, 'est', 2)} | {_cell(e, 'seconds', 2)} | {speed} |"
        )
        blocks.setdefault((e["dataset"], e["kind"]), []).append(line)
    parts = []
    for (dataset, kind), lines in blocks.items():
        parts.append(f"#### {dataset}, {kind} forgetting\n\n{header}" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def goal_lines(summary: Sequence[dict[str, Any]], default: str) -> str:
    """The default method against the goal per dataset x kind: Avg. Gap <= max(1.0, the noise floor) at >= 30x."""
    lines = [
        f"| dataset | forget kind | noise floor (retrain vs retrain) | gap goal | {default} Avg. Gap | gap "
        f"| speed-up | speed goal (≥ {GOAL_SPEEDUP:.0f}×) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        if e["method"] != default or "avgGap" not in e or "speedup" not in e:
            continue
        target, floor = goal(summary, e["dataset"], e["kind"])
        gap, speed = e["avgGap"], e["speedup"]
        gap_note = "met" if gap <= target else f"missed by {gap - target:.2f}"
        speed_note = "met" if speed >= GOAL_SPEEDUP else f"missed ({GOAL_SPEEDUP / speed:.1f}× short)"
        floor_text = "-" if floor is None else f"{floor:.2f}"
        lines.append(
            f"| {e['dataset']} | {e['kind']} | {floor_text} | ≤ {target:.2f} | {gap:.2f} | {gap_note} "
            f"| {speed:.1f}× | {speed_note} |"
        )
    return "\n".join(lines) + "\n"


def bank_lines(runs: Sequence[dict[str, Any]], default: str) -> str:
    """Per dataset: the bank's cost in retrain-equivalents, the estimate's error, and when the bank pays off.

    A request saves (retrain time - the default's time); the bank costs its own wall time once per model,
    so it pays for itself after bank / saving requests. Steps: the references' optimiser steps over one
    retrain's on every row (K - 1 = 3 with K = 4).
    """
    lines = [
        "| dataset | bank (s) | retrain (s) | retrain-equivalents (wall) | (steps) | saving per request (s) "
        f"| pays for itself after | {default}: mean abs. error of the estimated gap | estimate - measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        rows = [r for r in runs if r["dataset"] == dataset]
        banked = {(r["kind"], r["seed"]): r for r in rows if "bankSeconds" in r}
        retrains = [t for r in rows if r["method"] in (RETRAIN, FLOOR) for t in r.get("seconds", [])]
        own = [r for r in rows if r["method"] == default]
        if not banked or not retrains or not own:
            continue
        bank_seconds = float(np.mean([r["bankSeconds"] for r in banked.values()]))
        retrain = float(np.mean(retrains))
        mine = float(np.mean([t for r in own for t in r["seconds"]]))
        steps = float(np.mean([r["bankSteps"] / r["fullSteps"] for r in banked.values()]))
        errors = [r["est"] - r["gap"] for r in own if math.isfinite(r.get("est", math.nan))]
        saving = retrain - mine
        pays = f"{math.ceil(bank_seconds / saving)} requests" if saving > 0 else "never"
        lines.append(
            f"| {dataset} | {bank_seconds:.0f} | {retrain:.1f} | {bank_seconds / retrain:.1f} "
            f"| {steps:.1f} | {saving:.1f} | {pays} "
            f"| {np.mean(np.abs(errors)):.2f} | {np.mean(errors):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], path: Path, default: str) -> None:
    """Avg. Gap against speed-up, one panel per forget kind, one colour per method, one marker per dataset."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # noqa: PLC0415  (plotting only when asked)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    kinds = list(dict.fromkeys(e["kind"] for e in summary))
    methods = [m for m in dict.fromkeys(e["method"] for e in summary) if m not in (RETRAIN, FLOOR, ORIGINAL)]
    datasets = list(dict.fromkeys(e["dataset"] for e in summary))
    colours = plt.get_cmap("tab10")
    markers = ["o", "s", "^", "D"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.4), squeeze=False, sharey=True)
    top_speed = max([e["speedup"] for e in summary if "speedup" in e] + [GOAL_SPEEDUP])
    for ax, kind in zip(axes[0], kinds, strict=True):
        # The goal: Avg. Gap at most 1 point at 30x or more (the shaded corner).
        ax.fill_between([GOAL_SPEEDUP, top_speed * 1.5], 0.05, GOAL_GAP, color="#d9f2d9", zorder=0)
        ax.axvline(GOAL_SPEEDUP, color="0.6", linestyle="--", linewidth=1)
        ax.axhline(GOAL_GAP, color="0.6", linestyle="--", linewidth=1)
        for dataset in datasets:
            _, floor = goal(summary, dataset, kind)
            if floor is not None and floor > GOAL_GAP:  # this split's goal is the floor, above 1.0
                ax.axhline(floor, color="0.4", linestyle=":", linewidth=1)
                ax.annotate(f"{dataset} floor", (GOAL_SPEEDUP * 1.05, floor), fontsize=7, va="bottom")
        for e in summary:
            if e["kind"] != kind or e["method"] not in methods or "avgGap" not in e or "speedup" not in e:
                continue
            i = methods.index(e["method"])
            ax.errorbar(
                e["speedup"],
                max(e["avgGap"], 0.051),
                yerr=e["gap"]["std"] if "gap" in e else None,
                fmt=markers[datasets.index(e["dataset"]) % len(markers)],
                color=colours(i % 10),
                markersize=8 if e["method"] == default else 6,
                markeredgecolor="black" if e["method"] == default else colours(i % 10),
                capsize=2,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.05, 100)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("speed-up over retraining (×, log scale)")
        ax.set_title(f"{kind} forgetting")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Avg. Gap to retrain (points, log scale; lower is better)")
    handles = [
        Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=m + (" (default)" * (m == default)))
        for i, m in enumerate(methods)
    ] + [
        Line2D([], [], color="black", marker=markers[j % len(markers)], linestyle="", label=d)
        for j, d in enumerate(datasets)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), frameon=False)
    fig.suptitle(
        f"Avg. Gap to retraining (of the means over seeds; bars: per-seed std) vs speed-up (goal, shaded: gap ≤ "
        f"{GOAL_GAP:g}, or the dotted noise floor where higher, at ≥ {GOAL_SPEEDUP:.0f}×)"
    )
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(path: Path, generated: str) -> None:
    """Replace only the text between the generated-section markers (other sections belong to others)."""
    text = path.read_text() if path.exists() else ""
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"--docs {path}: markers not found: add {DOCS_BEGIN!r} and {DOCS_END!r} to the file first")
    head, _, rest = text.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    path.write_text(f"{head}{DOCS_BEGIN}\n{generated}\n{DOCS_END}{tail}")


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadAverageAtStart": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Settings:
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    kinds: list[ForgetKind] = field(default_factory=lambda: list(FORGET_KINDS))
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (sweeps on other seeds)
    epochs: int | None = None  # override the original's (and retrain's) epochs: smoke runs
    samples: int | None = None  # truncate the training data: smoke runs
    variants: list[Variant] = field(default_factory=list)
    repeats: int = 3  # timings per method and split (the speed-up is a ratio of their means)
    bank_folds: int = BANK_FOLDS  # K of every split's reference bank


def default_variants(extra: Sequence[Variant] = ()) -> list[Variant]:
    return [
        Variant(TUTORIAL, "gradient-ascent"),
        Variant(TUNED, "gradient-ascent", tuned=True),
        *(Variant(m, m) for m in STRONGER),
        Variant("scrub" + STOPPED, "scrub", stop=True),
        Variant(CALIBRATED, CALIBRATED),
        *extra,
    ]


def run(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (settings, machine, date, runs, summary)."""
    variants = settings.variants or default_variants()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for name in settings.datasets:
        dataset = load(name, epochs=settings.epochs, samples=settings.samples)
        for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
            originals: dict[bytes, nn.Module] = {}
            banks: dict[bytes, SplitBank] = {}  # one bank per original, as one calibration per model
            for kind in settings.kinds:
                t = time.perf_counter()
                split_rows = run_split(
                    dataset,
                    kind,
                    seed,
                    variants,
                    originals,
                    repeats=settings.repeats,
                    banks=banks,
                    bank_folds=settings.bank_folds,
                )
                rows += split_rows
                gaps = ", ".join(f"{r['method']} {r['gap']:.2f}" for r in split_rows)
                log(f"{name} {kind} seed {seed} ({time.perf_counter() - t:.0f}s): Avg. Gap {gaps}")
    summary = summarise(rows)
    return {
        "benchmark": "quality",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") else "",
        "settings": {
            "datasets": settings.datasets,
            "kinds": list(settings.kinds),
            "seeds": settings.seeds,
            "firstSeed": settings.first_seed,
            "epochs": settings.epochs,
            "samples": settings.samples,
            "repeats": settings.repeats,
            "bankFolds": settings.bank_folds,
            "variants": [v.label for v in variants],
            "gates": GatesSpec().model_dump(by_alias=True),
            "maxAttempts": TuningSpec().max_attempts,
            "defaultMethod": default_method(),
        },
        "machine": {**machine(), "loadAverageAtStart": load_start, "loadAverageAtEnd": os.getloadavg()[0]},
        "wallSeconds": time.perf_counter() - started,
        "runs": rows,
        "summary": summary,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=DATASETS)
    parser.add_argument("--kinds", nargs="+", default=list(FORGET_KINDS), choices=FORGET_KINDS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (at least 3 for the tables)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here (sweeps on other seeds)")
    parser.add_argument("--epochs", type=int, default=None, help="override the original's epochs (smoke runs)")
    parser.add_argument("--samples", type=int, default=None, help="truncate the training data (smoke runs)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra row METHOD:field=value,... (unlearn.tuning.Hyper fields), e.g. scrub:retain_subset=300",
    )
    parser.add_argument("--only-variants", action="store_true", help="run only the --variant rows (and retrain)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per method and split (speed-up: a ratio of means)"
    )
    parser.add_argument("--bank-folds", type=int, default=BANK_FOLDS, help="K of the reference banks (at least 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"), help="raw results (JSON)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here too")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of Avg. Gap against speed-up")
    parser.add_argument("--docs", type=Path, default=None, help="replace the generated part of this Markdown file")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        nargs="+",
        default=None,
        help="re-render tables and plot from a results JSON (no run); several: merged into one (written to --out)",
    )


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results as one document: runs concatenated (in order), the summary recomputed, the seeds
    counted per dataset, every command kept. For runs split by dataset, kind or seed on a shared machine."""
    runs = [row for result in results for row in result["runs"]]
    datasets = list(dict.fromkeys(row["dataset"] for row in runs))
    seeds = {d: len({row["seed"] for row in runs if row["dataset"] == d}) for d in datasets}
    first = results[0]
    variants = list(dict.fromkeys(v for result in results for v in result["settings"]["variants"]))
    machines = [result["machine"] for result in results]
    return {
        **first,
        "date": max(result["date"] for result in results),
        "command": "; ".join(result.get("command") or "python -m bench quality" for result in results),
        "settings": {
            **first["settings"],
            "datasets": datasets,
            "kinds": list(dict.fromkeys(row["kind"] for row in runs)),
            "seeds": " and ".join(f"{n} ({d})" for d, n in seeds.items()),
            "variants": variants,
        },
        "machine": {
            **machines[0],
            "loadAverageAtStart": max(m["loadAverageAtStart"] for m in machines),
            "loadAverageAtEnd": max(m.get("loadAverageAtEnd", 0.0) for m in machines),
        },
        "wallSeconds": sum(result["wallSeconds"] for result in results),
        "runs": runs,
        "summary": summarise(runs),
    }


def render(result: dict[str, Any]) -> str:
    """The generated Markdown (header, the default against the goal, one table per split) from a results document."""
    default = result["settings"]["defaultMethod"]
    machine_info = result["machine"]
    banked = ""
    if any("bankSeconds" in r for r in result["runs"]):  # results from before banks have no such section
        # Results from before --bank-folds used K = 4 throughout.
        ks = sorted({int(r.get("bankFolds", 4)) for r in result["runs"] if "bankSeconds" in r})
        banked = (
            f"The reference bank (one per original model, K = {' / '.join(map(str, ks))}), what it costs and how "
            f"well the gap it estimates predicts the measured one:\n\n{bank_lines(result['runs'], default)}\n"
        )
    return (
        f"Generated {result['date']} on {machine_info['cpu']} ({machine_info['cores']} cores, "
        f"{machine_info['threads']} torch thread(s), torch {machine_info['torch']}, load average "
        f"{machine_info['loadAverageAtStart']:.1f} at start) in {result['wallSeconds'] / 60:.1f} minutes; "
        f"{result['settings']['seeds']} seeds, mean ± std (ddof 1); Avg. Gap of the means over seeds; each method "
        f"timed {result['settings'].get('repeats', 1)} times per seed. Default method: `{default}`.\n\n"
        f"Command: `{result.get('command') or 'python -m bench quality'}`\n\n"
        f"{goal_lines(result['summary'], default)}\n{banked}{markdown_tables(result['summary'], default)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: at least 1 (3 or more for the published tables)")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if args.bank_folds < 2:
        parser.error("--bank-folds: at least 2 (one fold left out per reference)")
    torch.set_num_threads(args.threads)
    try:
        extra = [parse_variant(v) for v in args.variant]
    except ValueError as error:
        parser.error(str(error))
    variants = extra if args.only_variants else default_variants(extra)
    settings = Settings(
        args.datasets,
        args.kinds,
        args.seeds,
        args.first_seed,
        args.epochs,
        args.samples,
        variants,
        args.repeats,
        args.bank_folds,
    )
    if args.source is not None and len(args.source) == 1:
        result = json.loads(args.source[0].read_text())
    elif args.source is not None:
        result = merge([json.loads(path.read_text()) for path in args.source])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    else:
        result = run(settings, log=lambda line: print(line, flush=True))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    default = result["settings"]["defaultMethod"]
    generated = render(result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(generated)
    if args.plot is not None:
        plot(result["summary"], args.plot, default)
    if args.docs is not None:
        update_docs(args.docs, generated)
    print(generated)
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
