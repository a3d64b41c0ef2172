"""One unlearning request end to end: the thin edge that does the I/O.

A recipe in three phases, read top to bottom in ``Recipe.run``:

* ``prepare``: resolve the config (logged, and saved in the record), load
  data, forget set and model, check that they fit (fit.py; every problem is
  ``InvalidInputError``), put the sets on the device -> ``Inputs``;
* ``attempts``: audit the original once, then per attempt restore the
  original weights, unlearn, audit, check the gates; the tuner decides the
  next attempt -> ``Attempts`` (the last one is the one reported);
* ``publish``: on Passed, write the new model version atomically and the
  record beside it; on Failed, write only the record
  (``<name>-v<N>.failed.json``) so that nothing an operator could promote
  exists. The CLI then writes the compact record to the termination-message path.

Deciding is done by pure modules (fit, audit, gates, tuning); this one only
wires them to files, devices and clocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

import unlearn
from unlearn import audit, fit, gates, tuning
from unlearn.data import load_data, load_forget_indices
from unlearn.engine import Context, TensorSet, predict
from unlearn.engine import unlearn as run_method
from unlearn.errors import DivergedError, InvalidInputError
from unlearn.model_io import LoadedModel, atomic_write, load_model, reinitialise, save_model, sha256_file
from unlearning_contracts.record import (
    EXIT_GATES_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_PASSED,
    Attempt,
    AuditMetrics,
    InputModel,
    OutputModel,
    ResultRecord,
    compact,
    numbers,
)
from unlearning_contracts.spec import Manifest

log = logging.getLogger("unlearn")

EXIT_UNEXPECTED = 1
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")
SMALL_MODEL_PARAMETERS = 2_000_000


@dataclass(frozen=True)
class RunOptions:
    volume_root: Path = Path("/volumes")
    device: str = "auto"
    model_version: int | None = None
    progress: bool = False
    job_image: str = field(default_factory=lambda: os.environ.get("UNLEARN_JOB_IMAGE", ""))


@dataclass
class Outcome:
    record: ResultRecord
    model_path: Path | None = None
    record_path: Path | None = None
    # Logits of the audited forget and held-out samples, before and after (for --plot).
    logits: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return self.record.exit_code


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def forget_digest(indices: npt.NDArray[np.int64]) -> str:
    """sha256 of the sorted indices written as comma-separated decimals: identifies the set, names no one."""
    return hashlib.sha256(",".join(str(int(i)) for i in np.sort(indices)).encode()).hexdigest()


_VERSION_FILE = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)\.(pt2|pt|pth|safetensors|ts|json)$")


def next_version(folder: Path, name: str) -> int:
    """One more than the highest published version in ``folder`` (v0 is the original)."""
    highest = 0
    if folder.is_dir():
        for path in folder.iterdir():
            match = _VERSION_FILE.match(path.name)
            if match and match["name"] == name:
                highest = max(highest, int(match["version"]))
    return highest + 1


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA device is visible: use --device cpu or request a GPU")
    return torch.device(requested)


def cpu_threads(parameters: int) -> int:
    """Threads for CPU training: OMP_NUM_THREADS when set; one for small models; else the CPUs we may use.

    A step of a model under a few million parameters is too small to split: a
    second OpenMP thread made the digits MLP ~25x *slower* on a loaded two-core
    machine (threads spin waiting for each other), and never much faster on an idle one.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))))


def _bounded(n: int, limit: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """All of 0..n-1, or a seeded random ``limit`` of them (sorted)."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)


@dataclass
class Inputs:
    """What ``prepare`` loaded: the model on its device, the three sets, and where the output goes."""

    loaded: LoadedModel
    module: nn.Module
    model_path: Path
    hyper: tuning.Hyper
    ctx: Context
    forget: TensorSet
    retain: TensorSet
    audited: dict[str, TensorSet]
    """The bounded samples the audit evaluates: forget, retain, heldout."""
    labels: dict[str, npt.NDArray[np.int64]]
    """Their labels on the host (the audit is numpy)."""
    output_dir: Path
    model_dest: Path


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

    def __init__(self, manifest: Manifest, options: RunOptions) -> None:
        self.manifest = manifest
        self.options = options
        self.spec = manifest.spec
        self.started = time.perf_counter()
        self.fields: dict[str, Any] = {
            "request_id": manifest.request_id,
            "request_name": manifest.name,
            "namespace": manifest.namespace,
            "model": self.spec.model.name,
            "method": self.spec.method.name,
            "started_at": now(),
            "job_image": options.job_image,
            "code_version": unlearn.__version__,
        }
        self.durations: dict[str, float] = {}
        self.outcome = Outcome(record=self._record("Failed", EXIT_UNEXPECTED))

    def _record(self, verdict: Literal["Passed", "Failed"], exit_code: int, **extra: Any) -> ResultRecord:
        durations = dict(self.durations)
        durations["total"] = round(time.perf_counter() - self.started, 3)
        return ResultRecord(
            verdict=verdict,
            exit_code=exit_code,
            finished_at=now(),
            duration_seconds=durations,
            **self.fields,
            **extra,
        )

    def _timed(self, phase: str, start: float) -> None:
        self.durations[phase] = round(self.durations.get(phase, 0.0) + time.perf_counter() - start, 3)

    def run(self) -> Outcome:
        inputs = self.prepare()
        done = self.attempts(inputs)
        return self.publish(inputs, done)

    # -- prepare ------------------------------------------------------------------------------------
    def prepare(self) -> Inputs:
        spec, options = self.spec, self.options
        hyper = tuning.resolve(spec.method)
        device = pick_device(options.device)
        self.fields["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
        output_dir = spec.output.location.resolve(options.volume_root)
        version = (
            options.model_version if options.model_version is not None else next_version(output_dir, spec.model.name)
        )
        self.fields["model_version"] = version
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
            "volumeRoot": str(options.volume_root),
            "device": str(device),
            "modelVersion": version,
        }
        log.info("config %s", json.dumps(config, sort_keys=True))

        t = time.perf_counter()
        data = load_data(spec.data, options.volume_root)
        forget_idx = load_forget_indices(spec.forget, len(data.train), options.volume_root)
        self.fields["forget_samples"] = len(forget_idx)
        self.fields["forget_digest"] = forget_digest(forget_idx)
        model_path = spec.model.source.resolve(options.volume_root)
        loaded = load_model(spec.model, model_path)
        self.fields["input_model"] = InputModel(uri=spec.model.source.uri, sha256=sha256_file(model_path))
        model_dest = output_dir / f"{spec.model.name}-v{version}{loaded.suffix}"
        fit.check_output(model_dest, model_path)
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidInputError(f"output.location: cannot create {output_dir} ({error.strerror})") from None
        if not os.access(output_dir, os.W_OK):
            raise InvalidInputError(f"output.location: {output_dir} is not writable by the job (mount it read-write)")
        module = loaded.module.to(device)
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(sum(p.numel() for p in module.parameters())))
        samples = tuple(data.train.x.shape[1:])
        fit.check_sample_shape(loaded.sample_shape, samples)
        ctx = Context(device=device, num_classes=2, mixed_precision=hyper.mixed_precision, progress=options.progress)
        try:
            probe = predict(module, torch.from_numpy(data.train.x[:2]).to(device), ctx)
        except Exception as error:  # any forward failure here is a mismatch between data and model
            raise fit.forward_failed(samples, error) from None
        outputs = fit.check_outputs(tuple(probe.shape), spec.model.num_classes)
        for name, part in (("data.train", data.train), ("data.test", data.test)):
            fit.check_labels(name, int(part.y.max()), outputs)
        ctx.num_classes = outputs
        if loaded.format != "state-dict" or loaded.build is not None:
            ctx.reinitialise = lambda: reinitialise(loaded)
        retain_mask = np.ones(len(data.train), dtype=bool)
        retain_mask[forget_idx] = False
        forget = TensorSet.from_numpy(data.train.x[forget_idx], data.train.y[forget_idx], device)
        retain = TensorSet.from_numpy(data.train.x[retain_mask], data.train.y[retain_mask], device)
        test = TensorSet.from_numpy(data.test.x, data.test.y, device)
        self._timed("load", t)
        log.info(
            "data %s: %d train (%d forget, %d retain), %d held-out, %d classes",
            data.description,
            len(data.train),
            len(forget),
            len(retain),
            len(test),
            outputs,
        )
        rng = np.random.default_rng(hyper.seed)
        limit = spec.audit.max_samples
        audited = {
            "forget": forget.take(torch.from_numpy(_bounded(len(forget), limit, rng)).to(device)),
            "retain": retain.take(torch.from_numpy(_bounded(len(retain), limit, rng)).to(device)),
            "heldout": test.take(torch.from_numpy(_bounded(len(test), limit, rng)).to(device)),
        }
        labels = {k: v.y.cpu().numpy() for k, v in audited.items()}
        return Inputs(loaded, module, model_path, hyper, ctx, forget, retain, audited, labels, output_dir, model_dest)

    # -- attempts -----------------------------------------------------------------------------------
    def audit(self, inputs: Inputs, tag: str) -> AuditMetrics:
        """Audit the module as it is now; keeps the forget and held-out logits for ``--plot``."""
        logits = {k: predict(inputs.module, v.x, inputs.ctx) for k, v in inputs.audited.items()}
        if not all(np.isfinite(v).all() for v in logits.values()):
            if tag == "pre":
                raise InvalidInputError(f"model.source {inputs.model_path}: the model gives non-finite outputs")
            raise DivergedError("the unlearned model gives non-finite outputs: lower method.forget.lr")
        for k in ("forget", "heldout"):
            self.outcome.logits[f"{tag}_{k}"] = logits[k]
        labels = inputs.labels
        return audit.audit_outputs(
            (logits["forget"], labels["forget"]),
            (logits["retain"], labels["retain"]),
            (logits["heldout"], labels["heldout"]),
            seed=inputs.hyper.seed,
        )

    def attempts(self, inputs: Inputs) -> Attempts:
        """Audit the original once, then attempt until the gates pass or the tuner stops (each from the original)."""
        spec, module = self.spec, inputs.module
        t = time.perf_counter()
        pre = self.audit(inputs, "pre")
        self._timed("preAudit", t)
        self.fields["pre"] = pre
        log.info("pre-audit %s", _summary(pre))

        original = {k: v.detach().clone() for k, v in module.state_dict().items()}
        done = Attempts(pre=pre, tried=[], post=None, verdict=None)
        current: tuning.Hyper | None = inputs.hyper
        while current is not None and len(done.tried) < spec.tuning.max_attempts:
            if done.tried:
                module.load_state_dict(original)
            number = len(done.tried) + 1
            log.info("attempt %d: %s", number, json.dumps(current.as_dict(), sort_keys=True))
            t = time.perf_counter()
            diverged: str | None = None
            try:
                run_method(module, inputs.forget, inputs.retain, current, inputs.ctx)
            except DivergedError as error:
                diverged = str(error)
            self._timed("unlearn", t)
            attempt_seconds = time.perf_counter() - t
            post: AuditMetrics | None = None
            if diverged is None:
                t = time.perf_counter()
                try:
                    post = self.audit(inputs, "post")
                except DivergedError as error:
                    diverged = str(error)
                self._timed("postAudit", t)
            verdict: gates.Verdict | None = None
            if post is not None:
                verdict = gates.evaluate(spec.gates, pre, post)
                reasons = verdict.reasons
                log.info("attempt %d post-audit %s -> %s %s", number, _summary(post), verdict.name, reasons)
            else:
                reasons = [f"diverged: {diverged}"]
                log.warning("attempt %d %s", number, reasons[0])
            done.post, done.verdict = post, verdict
            done.tried.append(
                Attempt(
                    number=number,
                    hyperparameters=current.as_dict(),
                    post=post,
                    verdict=verdict.name if verdict is not None else "Failed",
                    reasons=reasons,
                    failed_gates=verdict.failed_gates if verdict is not None else [],
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
        if last.post is not None:
            self.fields["config"]["chosenAttempt"] = last.number
        return done

    # -- publish ------------------------------------------------------------------------------------
    def publish(self, inputs: Inputs, done: Attempts) -> Outcome:
        """Passed: the new model version, then its record beside it. Failed: only the record."""
        spec = self.spec
        if done.passed:
            t = time.perf_counter()
            inputs.loaded.module = inputs.module.to("cpu")
            save_model(inputs.loaded, inputs.model_dest)
            self.fields["output_model"] = OutputModel(
                uri=_join_uri(spec.output.location.uri, inputs.model_dest.name),
                sha256=sha256_file(inputs.model_dest),
                format=inputs.loaded.format,
            )
            self.outcome.model_path = inputs.model_dest
            self._timed("save", t)
        record = self._record("Passed" if done.passed else "Failed", EXIT_PASSED if done.passed else EXIT_GATES_FAILED)
        suffix = ".json" if done.passed else ".failed.json"
        record_path = inputs.output_dir / f"{spec.model.name}-v{self.fields['model_version']}{suffix}"
        write_json(record_path, record.dump())
        self.outcome.record = record
        self.outcome.record_path = record_path
        return self.outcome

    def fail(self, exit_code: int, error: str) -> Outcome:
        extra: dict[str, Any] = {"error": error, "reasons": [error]}
        self.fields.pop("reasons", None)
        self.outcome.record = self._record("Failed", exit_code, **extra)
        self.outcome.model_path = None
        return self.outcome


def _join_uri(folder_uri: str, name: str) -> str:
    return f"{folder_uri.rstrip('/')}/{name}"


def _summary(result: AuditMetrics) -> str:
    return ", ".join(f"{shown.label} {getattr(result, name):{shown.fmt}}" for name, _, shown, _ in numbers())


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    atomic_write(path, write)


def run(manifest: Manifest, options: RunOptions) -> Outcome:
    """Run one request; never raises for bad input or divergence (see the record's exitCode)."""
    recipe = Recipe(manifest, options)
    try:
        return recipe.run()
    except InvalidInputError as error:
        message = str(error).splitlines()[0]
        log.error("invalid input: %s", message)
        return recipe.fail(EXIT_INVALID_INPUT, message)
    except Exception as error:  # the retryable class: crash, OOM, a bug; the record says which
        log.error("unexpected error:\n%s", traceback.format_exc())
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return recipe.fail(EXIT_UNEXPECTED, f"unexpected error: {type(error).__name__}: {first}")


def write_termination_message(path: Path, record: ResultRecord) -> None:
    """The compact record (<= 4 KiB) where the kubelet reads the termination message."""
    path.write_text(compact(record))


def default_termination_log() -> Path | None:
    """``/dev/termination-log`` in a pod (it exists and is writable there), else nothing."""
    path = DEFAULT_TERMINATION_LOG
    return path if path.exists() and os.access(path, os.W_OK) else None
