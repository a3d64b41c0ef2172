"""One unlearning request end to end: the thin edge that does the I/O.

A recipe in three phases, read top to bottom in ``Recipe.run``:

* ``prepare``: the preflight checks (preflight.py: allow-list, locations,
  version; the CLI ran them before importing torch), resolve the config
  (logged, and saved in the record), load data, forget set and model, check
  that they fit (fit.py; every problem is ``InvalidInputError``), put the
  sets on the device -> ``Inputs``;
* ``attempts``: audit the original once, then per attempt restore the
  original weights, unlearn, audit, check the gates; the tuner decides the
  next attempt -> ``Attempts`` (the last one is the one reported);
* ``publish``: on Passed, serialise the new model version in memory, build
  its record and the compact record from it (so a record that cannot be
  reported fails *before* anything is published), then publish model and
  record together without ever replacing a file (files.OutputFolder); on
  Failed, write only the record (``<name>-v<N>.failed.json``) so that
  nothing an operator could promote exists. A full output claim ends with a
  record that says so (exit 4: retrying cannot help until someone frees
  space, and each retry would redo the whole run). The CLI then writes the
  compact record to the termination-message path.

Deciding is done by pure modules (fit, audit, gates, tuning); this one only
wires them to files, devices and clocks.

Several ranks (``Ranks``, see distributed.py) run this same recipe. Rank 0
runs the preflight and hands its plan to the others; every rank prepares
(each holds the model and the data), and their errors are agreed on, so an
invalid input found on any rank ends every rank with the same message. Each
attempt's unlearning is split across the ranks by the engine; the audit's
logits are computed in shares and gathered, its numbers computed on rank 0
and handed to every rank, so the gates and the tuner take the same decision
everywhere. Only rank 0 writes: it alone publishes the model and the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from unlearn import audit, calibrated, fit, gates, preflight, scratch, tuning
from unlearn.bank import Bank, data_digest, use_bank
from unlearn.data import load_data, load_forget_indices
from unlearn.distributed import RankError, Ranks, device_for, joined
from unlearn.draft import RecordDraft, json_bytes, one_line
from unlearn.engine import Context, Monitor, TensorSet, predict, predict_all
from unlearn.engine import unlearn as run_method
from unlearn.errors import DivergedError, InvalidInputError
from unlearn.files import OutputSpaceError
from unlearn.model_io import LoadedModel, load_model, reinitialise, serialize
from unlearn.preflight import Plan, RunOptions, next_version
from unlearning_contracts.record import (
    EXIT_GATES_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_PASSED,
    Attempt,
    AuditMetrics,
    Evidence,
    InputModel,
    OutputModel,
    ResultRecord,
    compact,
    numbers,
    show,
)
from unlearning_contracts.spec import Manifest

log = logging.getLogger("unlearn")

EXIT_UNEXPECTED = 1
SMALL_MODEL_PARAMETERS = 2_000_000


__all__ = ["Outcome", "RunOptions", "forget_digest", "next_version", "run"]


@dataclass
class Outcome:
    record: ResultRecord
    model_path: Path | None = None
    record_path: Path | None = None
    # Logits of the audited forget and held-out samples, before and after (for --plot).
    logits: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    own_failure: bool = False
    """This rank failed on its own: not an outcome the ranks agreed on, nor another rank's error."""
    failed_at: float | None = None
    """``time.monotonic()`` when the run failed (one clock for every process on the host)."""

    @property
    def exit_code(self) -> int:
        return self.record.exit_code


def forget_digest(indices: npt.NDArray[np.int64]) -> str:
    """sha256 of the sorted indices written as comma-separated decimals: identifies the set, names no one."""
    return hashlib.sha256(",".join(str(int(i)) for i in np.sort(indices)).encode()).hexdigest()


def pick_device(requested: str, ranks: Ranks | None = None) -> torch.device:
    """The device of this rank (``device_for``), from what this process can see."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return device_for(requested, ranks or Ranks(), cuda_devices)


def cpu_threads(parameters: int, processes: int = 1) -> int:
    """Threads for CPU training: OMP_NUM_THREADS when set; one for small models; else the CPUs we may use,
    shared between the ``processes`` ranks of this pod.

    A step of a model under a few million parameters is too small to split: a
    second OpenMP thread made the digits MLP ~25x *slower* on a loaded two-core
    machine (threads spin waiting for each other), and never much faster on an idle one.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))) // max(1, processes))


@dataclass
class Inputs:
    """What ``prepare`` loaded: the model on its device, the three sets, and where the output goes."""

    loaded: LoadedModel
    module: nn.Module
    model_where: str
    """``model.source <uri>``, for messages."""
    hyper: tuning.Hyper
    ctx: Context
    forget: TensorSet
    retain: TensorSet
    audited: dict[str, TensorSet]
    """The bounded samples the audit evaluates: forget, retain, heldout."""
    labels: dict[str, npt.NDArray[np.int64]]
    """Their labels on the host (the audit is numpy)."""
    bank: Bank | None = None
    """The model's reference bank, loaded and verified (None: the run is uncalibrated; the record says why)."""
    plan: calibrated.Plan | None = None
    """Targets and references of calibrated unlearning (the calibrated method, or any method with a bank)."""


@dataclass
class Attempts:
    """What ``attempts`` ran: every attempt, and the audit and verdict of the last one."""

    pre: AuditMetrics
    tried: list[Attempt]
    post: AuditMetrics | None
    """The last attempt's audit (None when it diverged)."""
    verdict: gates.Verdict | None

    @property
    def passed(self) -> bool:
        return self.verdict is not None and self.verdict.passed


class Recipe:
    """The state of one run; ``run`` fills the record phase by phase."""

    def __init__(
        self,
        manifest: Manifest,
        options: RunOptions,
        plan: Plan | None = None,
        draft: RecordDraft | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.manifest = manifest
        self.options = options
        self.spec = manifest.spec
        self.plan = plan
        self.ranks = ranks or Ranks()
        self.draft = draft if draft is not None else RecordDraft(manifest, options)
        self.fields = self.draft.fields
        self.fields["world_size"] = self.ranks.world_size
        self.outcome = Outcome(record=self.draft.record("Failed", EXIT_UNEXPECTED))
        self.evidence: Evidence | None = None
        """Calibrated unlearning's evidence on the model last audited (None when the run has no plan)."""

    def run(self) -> Outcome:
        # Checked once: rank 0 runs the preflight and every rank takes its plan (or its refusal).
        plan = self.plan = (
            self.plan
            if self.plan is not None
            else self.ranks.decide(lambda: preflight.check(self.manifest, self.options))
        )
        if plan.published is not None:
            return self.reported_again(plan, plan.published)
        inputs = self.ranks.agree(self.prepare)
        done = self.attempts(inputs)
        return self.publish(inputs, done)

    # -- prepare ------------------------------------------------------------------------------------
    def prepare(self) -> Inputs:
        spec, options, ranks = self.spec, self.options, self.ranks
        plan = self.plan
        assert plan is not None  # run() settled it
        hyper = plan.hyper
        device = pick_device(options.device, ranks)
        self.draft.set_device(str(device) if device.type != "cuda" else torch.cuda.get_device_name(device))
        self.fields["model_version"] = plan.version
        self.fields["config"] = config = {
            "request": self.manifest.request_id,
            "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
            "data": spec.data.model_dump(mode="json", by_alias=True, exclude_none=True),
            "forget": {"maxShare": spec.forget.max_share, "source": "inline" if spec.forget.indices else "file"},
            "hyperparameters": hyper.as_dict(),
            "gates": spec.gates.model_dump(mode="json", by_alias=True, exclude_none=True),
            "tuning": spec.tuning.model_dump(mode="json", by_alias=True),
            "audit": spec.audit.model_dump(mode="json", by_alias=True),
            "output": spec.output.location.uri,
            "calibration": {"policy": spec.calibration.policy, "bank": options.calibration.uri}
            if options.calibration is not None
            else {"policy": spec.calibration.policy},
            "volumeRoot": str(options.volume_root),
            "device": str(device),
            "modelVersion": plan.version,
            "worldSize": ranks.world_size,
        }
        if options.run_id is not None:
            config["runId"] = options.run_id  # how a retry of this run recognises what it published (preflight)
        if ranks.parallel:
            log.info("%s on %s", ranks, device)
        log.info("config %s", json.dumps(config, sort_keys=True))

        t = time.perf_counter()
        data = load_data(spec.data, options.volume_root)
        forget_idx = load_forget_indices(spec.forget, len(data.train), options.volume_root)
        self.fields["forget_samples"] = len(forget_idx)
        self.fields["forget_digest"] = forget_digest(forget_idx)
        loaded = load_model(spec.model, plan.model, options.allowed_factories)
        self.fields["input_model"] = InputModel(uri=spec.model.source.uri, sha256=loaded.sha256)
        module = loaded.module.to(device)
        if device.type == "cpu":
            parameters = sum(p.numel() for p in module.parameters())
            torch.set_num_threads(cpu_threads(parameters, ranks.local_world_size))
        samples = tuple(data.train.x.shape[1:])
        fit.check_sample_shape(loaded.sample_shape, samples)
        ctx = Context(
            device=device, num_classes=2, mixed_precision=hyper.mixed_precision, progress=options.progress, ranks=ranks
        )
        try:
            probe = predict(module, torch.from_numpy(data.train.x[:2]).to(device), ctx)
        except Exception as error:  # any forward failure here is a mismatch between data and model
            raise fit.forward_failed(samples, error) from None
        outputs = fit.check_outputs(tuple(probe.shape), spec.model.num_classes)
        for name, part in (("data.train", data.train), ("data.test", data.test)):
            fit.check_labels(name, int(part.y.max()), outputs)
        ctx.num_classes = outputs
        bank, self.fields["calibration"], problem = use_bank(
            spec.calibration.policy,
            options.calibration,
            volume_root=options.volume_root,
            digest=lambda: data_digest((data.train.x, data.train.y), (data.test.x, data.test.y)),
            train_rows=len(data.train),
            test_rows=len(data.test),
            classes=outputs,
            input_sha256=self.fields["input_model"].sha256,
            require_claims=options.require_claims,
        )
        if problem is not None:
            raise InvalidInputError(problem)
        log.info("calibration: %s", self.fields["calibration"].note)
        if loaded.format != "state-dict" or loaded.build is not None:
            ctx.reinitialise = lambda: reinitialise(loaded)
        retain_mask = np.ones(len(data.train), dtype=bool)
        retain_mask[forget_idx] = False
        forget = TensorSet.from_numpy(data.train.x[forget_idx], data.train.y[forget_idx], device)
        retain = TensorSet.from_numpy(data.train.x[retain_mask], data.train.y[retain_mask], device)
        test = TensorSet.from_numpy(data.test.x, data.test.y, device)
        self.draft.timed("load", t)
        log.info(
            "data %s: %d train (%d forget, %d retain), %d held-out, %d classes",
            data.description,
            len(data.train),
            len(forget),
            len(retain),
            len(test),
            outputs,
        )
        # The audit's own seed, never the method's: the same model gets the same audit whatever runs after it.
        sizes = {"forget": len(forget), "retain": len(retain), "heldout": len(test)}
        rows = audit.audited_rows(sizes, spec.audit.max_samples, spec.audit.seed)
        parts = {"forget": forget, "retain": retain, "heldout": test}
        audited = {k: parts[k].take(torch.from_numpy(v).to(device)) for k, v in rows.items()}
        labels = {k: v.y.cpu().numpy() for k, v in audited.items()}
        inputs = Inputs(loaded, module, plan.model.where, hyper, ctx, forget, retain, audited, labels, bank)
        removed = calibrated.removed_classes(data.train.y[forget_idx], data.train.y, spec.forget.classes or (), outputs)
        if spec.method.name == "auto":
            inputs.hyper = hyper = replace(
                tuning.resolve(spec.method, calibrated=bank is not None or bool(removed)), seed=hyper.seed
            )
            idle = tuning.idle_reason(hyper)
            if idle is not None:
                raise InvalidInputError(idle)
            config["hyperparameters"] = hyper.as_dict()
            self.fields["method"] = hyper.method
        log.info("method %s (method.name %s)", hyper.method, spec.method.name)
        if hyper.method == "calibrated" or bank is not None:
            inputs.plan = self.calibration_plan(inputs, forget_idx, rows, removed, len(data.train))
            ctx.targets = torch.from_numpy(inputs.plan.targets.probs).float().to(device)
        return inputs

    def calibration_plan(
        self,
        inputs: Inputs,
        forget_idx: npt.NDArray[np.int64],
        rows: dict[str, npt.NDArray[np.int64]],
        removed: tuple[int, ...],
        train_rows: int,
    ) -> calibrated.Plan:
        """Targets and references from the original's outputs and the bank (``unlearn.calibrated.plan``)."""
        full = replace(inputs.ctx, mixed_precision=False)
        original_forget = predict(inputs.module, inputs.forget.x, full)
        retain_logits = predict(inputs.module, inputs.audited["retain"].x, full)
        heldout_logits = predict(inputs.module, inputs.audited["heldout"].x, full)
        bank = inputs.bank
        banked: dict[str, Any] = {}
        if bank is not None:
            audited_rows = forget_idx[rows["forget"]]
            banked = {
                "out_logits": bank.out_log_probs(forget_idx),
                "out_phi": bank.out_phi(audited_rows),
                "reference_test_logits": bank.test.take((slice(None), rows["heldout"])).log_probs(),
                "reference_test_phi": bank.test_phi[:, rows["heldout"]],
            }
        return calibrated.plan(
            forget_labels=inputs.forget.y.cpu().numpy(),
            original_forget_logits=original_forget,
            audited=rows["forget"],
            original_retain_accuracy=audit.accuracy(retain_logits, inputs.labels["retain"]),
            original_heldout=(heldout_logits, inputs.labels["heldout"]),
            removed=removed,
            share=len(forget_idx) / max(1, train_rows),
            **banked,
        )

    def monitor(self, inputs: Inputs) -> Monitor | None:
        """The stopping rule (``calibrated.objective``) on the audited rows, ``calibrated.check_rows`` retained."""
        the_plan = inputs.plan
        if the_plan is None:
            return None
        full = replace(inputs.ctx, mixed_precision=False)
        retain = inputs.audited["retain"]
        keep = calibrated.check_rows(len(retain), self.spec.audit.seed)
        retain_x, retain_y = retain.x[torch.from_numpy(keep).to(retain.x.device)], inputs.labels["retain"][keep]
        objective = calibrated.Objective(the_plan, self.spec.audit.seed)

        def estimate(module: nn.Module) -> float:
            # Each rank evaluates its share of the rows and all receive all the logits (the ranks' batch-norm
            # statistics may differ); rank 0 computes the estimate and every rank takes its number, so all
            # keep, stop and rewind at the same step.
            forget = predict_all(module, inputs.audited["forget"].x, full)
            kept = predict_all(module, retain_x, full)
            heldout = predict_all(module, inputs.audited["heldout"].x, full)
            return self.ranks.decide(
                lambda: objective(
                    (forget, inputs.labels["forget"]), (kept, retain_y), (heldout, inputs.labels["heldout"])
                )
            )

        return Monitor(estimate)

    # -- attempts -----------------------------------------------------------------------------------
    def audit(self, inputs: Inputs, tag: str) -> AuditMetrics:
        """Audit the module as it is now; keeps the forget and held-out logits for ``--plot``.

        In float32 whatever ``mixedPrecision`` says: bfloat16 logits round the
        losses of memorised rows (1e-6 and 1e-4 alike) and the audit ranks them.
        The logits are computed in shares across the ranks; the numbers on rank 0, for all of them.
        """
        full_precision = replace(inputs.ctx, mixed_precision=False)
        logits = {k: predict_all(inputs.module, v.x, full_precision) for k, v in inputs.audited.items()}

        plan = inputs.plan
        monitor = inputs.ctx.monitor if tag == "post" else None

        def numbers() -> tuple[AuditMetrics, Evidence | None]:
            if not all(np.isfinite(v).all() for v in logits.values()):
                if tag == "pre":
                    raise InvalidInputError(f"{inputs.model_where}: the model gives non-finite outputs")
                raise DivergedError("the unlearned model gives non-finite outputs: lower method.forget.lr")
            labels = inputs.labels
            evidence = None
            if plan is not None:
                evidence = calibrated.evidence(
                    plan,
                    (logits["forget"], labels["forget"]),
                    (logits["retain"], labels["retain"]),
                    (logits["heldout"], labels["heldout"]),
                    steps=monitor.steps if monitor is not None else None,
                    chosen_step=monitor.best.step if monitor is not None and monitor.best is not None else None,
                    seed=self.spec.audit.seed,
                )
                log.info("%s evidence: %s", tag, evidence.summary)
            metrics = audit.audit_outputs(
                (logits["forget"], labels["forget"]),
                (logits["retain"], labels["retain"]),
                (logits["heldout"], labels["heldout"]),
                seed=self.spec.audit.seed,
                heldout_before=self.outcome.logits.get("pre_heldout") if tag == "post" else None,
                removed_classes=plan.targets.removed if plan is not None else (),
            )
            return metrics, evidence

        # The evidence feeds the gates, which every rank evaluates: it is decided on rank 0 with the audit.
        result, self.evidence = self.ranks.decide(numbers)
        for k in ("forget", "heldout"):
            self.outcome.logits[f"{tag}_{k}"] = logits[k]
        return result

    def attempts(self, inputs: Inputs) -> Attempts:
        """Audit the original once, then attempt until the gates pass or the tuner stops (each from the original)."""
        spec, module = self.spec, inputs.module
        t = time.perf_counter()
        pre = self.audit(inputs, "pre")
        self.draft.timed("preAudit", t)
        self.fields["pre"] = pre
        log.info("pre-audit %s", _summary(pre))

        original = {k: v.detach().clone() for k, v in module.state_dict().items()}
        done = Attempts(pre=pre, tried=[], post=None, verdict=None)
        verdicts: list[gates.Verdict | None] = []
        current: tuning.Hyper | None = inputs.hyper
        while current is not None and len(done.tried) < spec.tuning.max_attempts:
            if done.tried:
                module.load_state_dict(original)
            number = len(done.tried) + 1
            log.info("attempt %d: %s", number, json.dumps(current.as_dict(), sort_keys=True))
            t = time.perf_counter()
            diverged: str | None = None
            inputs.ctx.monitor = self.monitor(inputs) if current.method != "retrain" else None
            self.evidence = None
            try:
                run_method(module, inputs.forget, inputs.retain, current, inputs.ctx)
            except DivergedError as error:
                diverged = str(error)
            self.draft.timed("unlearn", t)
            attempt_seconds = time.perf_counter() - t
            post: AuditMetrics | None = None
            if diverged is None:
                t = time.perf_counter()
                try:
                    post = self.audit(inputs, "post")
                except DivergedError as error:
                    diverged = str(error)
                self.draft.timed("postAudit", t)
            verdict: gates.Verdict | None = None
            if post is not None:
                verdict = gates.evaluate(spec.gates, pre, post, bank_references(inputs.plan), evidence=self.evidence)
                # A retry does not pass a gate an earlier attempt failed on a change within the noise.
                verdict = gates.confirm(verdict, [v for v in verdicts if v is not None])
                reasons = verdict.reasons
                log.info("attempt %d post-audit %s -> %s %s", number, _summary(post), verdict.name, reasons)
            else:
                reasons = [f"diverged: {diverged}"]
                log.warning("attempt %d %s", number, reasons[0])
            done.post, done.verdict = post, verdict
            verdicts.append(verdict)
            done.tried.append(
                Attempt(
                    number=number,
                    hyperparameters=current.as_dict(),
                    post=post,
                    verdict=verdict.name if verdict is not None else "Failed",
                    reasons=reasons,
                    failed_gates=verdict.failed_gates if verdict is not None else [],
                    gates=verdict.results() if verdict is not None else [],
                    duration_seconds=round(attempt_seconds, 3),
                )
            )
            if done.passed:
                break
            kinds: set[str] = set(verdict.failed_kinds()) if verdict is not None else set()
            current = tuning.next_attempt(current, kinds, diverged=verdict is None)
        last = done.tried[-1]
        self.fields["attempts"] = done.tried
        if done.post is not None:
            self.fields["post"] = done.post
        self.fields["reasons"] = last.reasons
        self.fields["failed_gates"] = last.failed_gates
        self.fields["notes"] = gates.notes(done.verdict, done.post)
        self.fields["evidence"] = self.evidence if done.post is not None else None
        if last.post is not None:
            self.fields["config"]["chosenAttempt"] = last.number
        return done

    # -- publish ------------------------------------------------------------------------------------
    def publish(self, inputs: Inputs, done: Attempts) -> Outcome:
        """Passed: the new model version and its record, together. Failed: only the record.

        Rank 0 writes; the other ranks return the record unwritten."""
        plan = self.plan
        assert plan is not None  # prepare settled it
        if not self.ranks.main:
            passed = done.passed
            self.outcome.record = self.draft.record(
                "Passed" if passed else "Failed", EXIT_PASSED if passed else EXIT_GATES_FAILED
            )
            return self.outcome
        if not done.passed:
            record = self.draft.record("Failed", EXIT_GATES_FAILED)
            compact(record)  # reportable, or fail here
            try:
                plan.output.publish([(plan.failed_file, json_bytes(record.dump()))], replace=True)
                self.outcome.record_path = plan.output.place.path / plan.failed_file
            except OutputSpaceError as error:
                # The verdict stands (exit 3); the record still reaches the termination message and --result.
                log.warning("the failed record was not written beside the model: %s", error)
            self.outcome.record = record
            return self.outcome
        t = time.perf_counter()
        inputs.loaded.module = inputs.module.to("cpu")
        data = serialize(inputs.loaded)
        output_model = OutputModel(
            uri=_join_uri(self.spec.output.location.uri, plan.model_file),
            sha256=hashlib.sha256(data).hexdigest(),
            format=inputs.loaded.format,
        )
        self.draft.timed("save", t)
        record = self.draft.record("Passed", EXIT_PASSED, output_model=output_model)
        compact(record)  # built before anything is published: reporting cannot fail after publishing
        plan.output.publish([(plan.model_file, data), (plan.record_file, json_bytes(record.dump()))])
        self.fields["output_model"] = output_model
        self.outcome.record = record
        self.outcome.model_path = plan.output.place.path / plan.model_file
        self.outcome.record_path = plan.output.place.path / plan.record_file
        return self.outcome

    def reported_again(self, plan: Plan, record: ResultRecord) -> Outcome:
        """An earlier attempt of this run published version N and ended before reporting it: report its record."""
        log.info(
            "version %d (%s/%s) was published by an earlier attempt of this run: reporting its record again",
            plan.version,
            plan.output.place.uri,
            plan.model_file,
        )
        self.outcome.record = record
        self.outcome.model_path = plan.output.place.path / plan.model_file
        self.outcome.record_path = plan.output.place.path / plan.record_file
        return self.outcome

    def fail(self, exit_code: int, error: BaseException | str) -> Outcome:
        self.outcome.record = self.draft.failed(exit_code, error)
        self.outcome.model_path = None
        return self.outcome


def _join_uri(folder_uri: str, name: str) -> str:
    return f"{folder_uri.rstrip('/')}/{name}"


def bank_references(the_plan: calibrated.Plan | None) -> Mapping[str, gates.Reference]:
    """What the gates read against retraining from a verified bank: the utility gate's reference (rule 5)."""
    drop = the_plan.retrain_drop if the_plan is not None and the_plan.banked else None
    if drop is None:
        return gates.NULL_REFERENCES
    return {**gates.NULL_REFERENCES, "test_accuracy_drop": gates.retraining_drop(drop.value, drop.low, drop.high)}


def _summary(result: AuditMetrics) -> str:
    return ", ".join(f"{shown.label} {show(getattr(result, name), shown.fmt)}" for name, _, shown, _ in numbers())


def run(
    manifest: Manifest,
    options: RunOptions,
    *,
    plan: Plan | None = None,
    draft: RecordDraft | None = None,
    ranks: Ranks | None = None,
) -> Outcome:
    """Run one request; never raises for bad input or divergence (see the record's exitCode).

    ``plan`` and ``draft``: what the CLI's checks before torch settled (made here when not given).
    ``ranks``: this process's place among the ranks of a data-parallel run (alone when not given).

    An error is recorded before this rank leaves the process group: leaving is what makes the
    other ranks fail, and the launcher tells the cause from the consequences by when each failed.
    """
    recipe = Recipe(manifest, options, plan, draft, ranks)
    try:
        with joined(recipe.ranks, pick_device(options.device, recipe.ranks)), scratch.guard():
            try:
                return recipe.run()
            except (Exception, scratch.StorageLimitError) as error:
                return _failed(recipe, error)
    except (Exception, scratch.StorageLimitError) as error:  # before the group was joined: no device, no peers
        return _failed(recipe, error)


def _failed(recipe: Recipe, error: Exception | scratch.StorageLimitError) -> Outcome:
    if isinstance(error, InvalidInputError | scratch.StorageLimitError):
        log.debug("invalid input", exc_info=True)  # the ranks agreed on it; the CLI of rank 0 says it
        outcome = recipe.fail(EXIT_INVALID_INPUT, error)
        # Input is checked where the ranks agree on it; a full /tmp is found by one rank on its own.
        outcome.own_failure = isinstance(error, scratch.StorageLimitError)
    elif isinstance(error, RankError):
        if recipe.ranks.main:
            log.error("stopped: %s failed", str(error).split(":")[0])
        outcome = recipe.fail(EXIT_UNEXPECTED, f"unexpected error: {one_line(error)}")
    else:  # the retryable class: crash, OOM, a bug; the record says which
        log.error("unexpected error:\n%s", traceback.format_exc())
        outcome = recipe.fail(EXIT_UNEXPECTED, f"unexpected error: {type(error).__name__}: {one_line(error)}")
        outcome.own_failure = True
    outcome.failed_at = time.monotonic()
    return outcome
