"""The unlearning methods and the training loops under them.

Speed: the forget, retain and held-out sets are whole tensors on the device;
each epoch draws one random permutation and slices it into batches, so a step
is one indexing operation instead of a per-sample DataLoader round trip (see
bench/throughput.py). Losses are accumulated on the device and checked once per
epoch, so the loop never waits for the GPU to report a number. On CUDA the
forward passes run under bfloat16 autocast when the card supports it (no loss
scaling needed); on CPU everything is float32 and a fixed seed gives the same
numbers run after run.

Methods (``method.name``):

* ``gradient-ascent``: the classic pipeline. Ascent on the forget set with the
  negated cross-entropy (its own Adam), then fine-tuning on the retain set (a
  fresh Adam). Cheap, but the published defaults barely move a model.
* ``neggrad-plus``: one joint loss, ``alpha * CE(retain) - (1 - alpha) * CE(forget)``,
  stepping through the retain set with forget batches cycled alongside
  (Kurmanji et al. 2023). The retain term holds accuracy while the ascent works.
* ``scrub``: teacher-student (Kurmanji et al., NeurIPS 2023). The student
  (the model) moves away from the frozen original on the forget set (max steps,
  maximising KL) while staying close to it and to the labels on the retain set
  (min steps, ``alpha * KL + CE``).
* ``salun``: saliency unlearning (Fan et al., ICLR 2024). Only the weights with
  the largest forget-loss gradients (``saliencySparsity`` of them) may change;
  the forget set is trained towards random wrong labels while the retain set
  keeps its own.
* ``retrain``: fresh weights of the same architecture trained on the retain
  set: the gold standard that the others are judged against, and the slowest.
* ``calibrated``: moves each forget row to its target (``unlearn.calibrated``:
  its OUT prediction from the reference bank, or the class-absent softmax)
  and no further: ``KL(target || model)`` on the forget rows plus
  ``alpha / (1 - alpha) * KL(original || model)`` on a fresh retain sample of
  ``max(256, 4 x forget rows in the step)`` rows per step, so a step costs what
  the forget set costs, not what the data does. Rows already within
  ``AT_TARGET_KL`` of their target get no gradient; rows whose target names
  another class than their label, while their own-label log-odds stay above
  the target's (what the membership test reads), are pushed down by a squared
  term (``MEMBER_WEIGHT``).

Data parallel: with several ranks (``ctx.ranks``, see distributed.py) every
batch is made once, in ``_batches``, and each rank takes its share of it;
losses are sums over the share divided by the whole batch's size (``Batch``),
and ``_update`` sums the gradients over the ranks before the step. A method
written with these helpers runs on one rank or N unchanged.

The stopping rule (``Monitor``, set on ``Context.monitor``) runs under any
method but ``retrain``: every ``check_every`` steps it estimates the gap to
retraining, keeps the best weights, stops when the estimate is small enough,
after ``patience`` checks without improvement or at the method's own end, and
rewinds to the best weights. Its estimate must be the same number on every
rank (the runner's comes from logits gathered from all ranks and is decided on
rank 0), so every rank stops at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm import tqdm

from unlearn.distributed import Ranks
from unlearn.errors import DivergedError
from unlearn.model_io import set_mode
from unlearn.tuning import Hyper

log = logging.getLogger("unlearn")

# A mean cross-entropy this large means logits in the thousands: the model is broken.
EXPLODED_LOSS = 1e4


@dataclass(frozen=True)
class TensorSet:
    """Samples and labels held on the device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: torch.Tensor) -> TensorSet:
        return TensorSet(*self.batch(index))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and labels at ``index`` (index_select: the same gather as x[index], cheaper per small batch)."""
        return self.x.index_select(0, index), self.y.index_select(0, index)

    @classmethod
    def from_numpy(cls, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], device: torch.device) -> TensorSet:
        return cls(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))


@dataclass
class Context:
    """Where and how the loops run."""

    device: torch.device
    num_classes: int
    mixed_precision: bool = True
    progress: bool = False
    reinitialise: Callable[[], None] | None = None  # for retrain: fresh weights in place
    targets: torch.Tensor | None = None  # calibrated: [forget rows, C] target probabilities
    monitor: Monitor | None = None  # the stopping rule (any method but retrain)
    gen: torch.Generator = field(default_factory=torch.Generator)  # shuffles, subsets, labels, noise (CPU)
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a data-parallel run (1 of 1 alone)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if self.mixed_precision and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def progress_enabled() -> bool:
    """Progress bars on a terminal, plain log lines elsewhere (a pod's log)."""
    return sys.stderr.isatty()


class Stopped(Exception):  # noqa: N818  (control flow, not an error)
    """Raised by ``Monitor.step`` inside a method's loop: the stopping rule ended the run."""


@dataclass
class Check:
    step: int
    estimate: float


@dataclass
class Monitor:
    """The stopping rule: estimate every ``check_every`` steps, keep the best weights, stop, rewind.

    ``estimate(module) -> float`` is the gap to retraining estimated from the
    targets (``unlearn.calibrated.estimate_gap``); lower is better. Checks
    run in evaluation mode and restore training mode after.
    """

    estimate: Callable[[nn.Module], float]
    check_every: int = 10
    stop_at: float = 0.5
    patience: int = 4
    module: nn.Module | None = None
    steps: int = 0
    checks: list[Check] = field(default_factory=list)
    best: Check | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stopped_by: str = "the method's own end"

    def start(self, module: nn.Module) -> None:
        self.module, self.steps, self.checks, self.best, self.best_state = module, 0, [], None, None
        self.stopped_by = "the method's own end"
        self._check()  # step 0: doing nothing is a candidate too (a typical set may need no change)
        self._maybe_stop()

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.check_every == 0:
            self._check()
            self._maybe_stop()

    def _check(self) -> None:
        assert self.module is not None
        training = self.module.training
        value = float(self.estimate(self.module))
        set_mode(self.module, training)
        check = Check(self.steps, value)
        self.checks.append(check)
        if math.isfinite(value) and (self.best is None or value < self.best.estimate):
            self.best = check
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def _maybe_stop(self) -> None:
        assert self.best is not None or self.checks
        if self.best is not None and self.best.estimate <= self.stop_at:
            self.stopped_by = f"the estimated gap {self.best.estimate:.2f} <= {self.stop_at:g}"
            raise Stopped
        since = sum(1 for c in self.checks if self.best is not None and c.step > self.best.step)
        if since >= self.patience:
            self.stopped_by = f"{since} checks without improvement"
            raise Stopped

    def finish(self) -> None:
        """A last check if steps ran since the previous one, then rewind to the best weights."""
        assert self.module is not None
        if not self.checks or self.checks[-1].step != self.steps:
            self._check()
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        log.info(
            "stopping rule: %d steps, %d checks, best estimated gap %.3f at step %d (stopped by %s)",
            self.steps,
            len(self.checks),
            self.best.estimate if self.best is not None else math.nan,
            self.best.step if self.best is not None else -1,
            self.stopped_by,
        )

    def summary(self) -> dict[str, Any]:
        """For the record: steps run, the chosen step and its estimate, and why it stopped."""
        return {
            "steps": self.steps,
            "checks": len(self.checks),
            "chosenStep": self.best.step if self.best is not None else None,
            "estimatedGap": round(self.best.estimate, 4) if self.best is not None else None,
            "stoppedBy": self.stopped_by,
        }


class _Stage:
    """Counts the steps of one stage, shows a bar or logs per epoch, and checks the loss."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int, ctx: Context) -> None:
        self.name = name
        self.epochs = epochs
        self.ranks = ctx.ranks
        self.monitor = ctx.monitor
        self.bar = None
        if ctx.progress and ctx.ranks.main and epochs * steps_per_epoch > 0:
            self.bar = tqdm(total=epochs * steps_per_epoch, desc=name, leave=False, file=sys.stderr)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.monitor is not None:
            self.monitor.step()

    def end_epoch(self, epoch: int, loss_sum: torch.Tensor, steps: int) -> None:
        """``loss_sum``: this rank's; summed over the ranks here, so every rank reaches the same verdict."""
        mean = float(self.ranks.sum_(loss_sum).item()) / max(1, steps)  # one sync per epoch
        if not np.isfinite(mean):
            raise DivergedError(f"the {self.name} loss became non-finite in epoch {epoch + 1}: lower method.forget.lr")
        if abs(mean) > EXPLODED_LOSS:
            raise DivergedError(
                f"the {self.name} loss exploded ({mean:.3g}) in epoch {epoch + 1}: lower method.forget.lr"
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean:.4f}")
        else:
            log.info("%s epoch %d/%d: mean loss %.4f", self.name, epoch + 1, self.epochs, mean)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Batch:
    """This rank's rows of one batch, and the size of the whole batch (all ranks together)."""

    index: torch.Tensor
    size: int
    start: int = 0
    """Where this rank's rows begin in the whole batch (to slice per-row draws made for all of it)."""

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _split(order: torch.Tensor, batch: int, ctx: Context) -> list[Batch]:
    """``order`` (on the device) cut into batches, each cut again into the ranks' shares: the one place
    batches are made. A share is a view: no copy, no kernel launch."""
    batches = []
    for whole in torch.split(order, batch):
        mine = ctx.ranks.share(len(whole))
        batches.append(Batch(whole[mine], len(whole), mine.start))
    return batches


def _batches(n: int, batch: int, ctx: Context) -> list[Batch]:
    """One epoch: a fresh permutation of ``n`` rows (the same on every rank: one generator, one seed)."""
    return _split(torch.randperm(n, generator=ctx.gen).to(ctx.device), batch, ctx)


def _cycle(n: int, batch: int, ctx: Context) -> Iterator[Batch]:
    """Endless batches over a (small) set, reshuffled on every pass."""
    while True:
        yield from _batches(n, batch, ctx)


def _mean(total: torch.Tensor, b: Batch) -> torch.Tensor:
    """A sum over this rank's rows as its part of the whole batch's mean (the ranks' parts add up to it)."""
    return total / b.size


def _ce(module: nn.Module, data: TensorSet, b: Batch) -> torch.Tensor:
    x, y = data.batch(b.index)
    return _mean(F.cross_entropy(module(x), y, reduction="sum"), b)


def _backward(loss: torch.Tensor) -> None:
    loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch's stubs


def _update(
    opt: torch.optim.Optimizer, loss: torch.Tensor, ctx: Context, adjust: Callable[[], None] | None = None
) -> None:
    """One optimiser step on ``loss``: clear the gradients, backpropagate, sum them over the ranks,
    ``adjust`` them if asked, step."""
    opt.zero_grad(set_to_none=True)
    _backward(loss)
    ctx.ranks.sum_gradients(p for group in opt.param_groups for p in group["params"])
    if adjust is not None:
        adjust()
    opt.step()


def _adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    params = [p for p in module.parameters() if p.requires_grad]
    # On CUDA the fused kernel updates every parameter in one launch: small models are launch-bound there.
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _run_epochs(
    name: str,
    epochs: int,
    n: int,
    batch: int,
    *,
    ctx: Context,
    step: Callable[[Batch], torch.Tensor],
    rows: Callable[[], torch.Tensor] | None = None,
) -> None:
    """The loop every single-pass stage shares: a fresh permutation of ``n`` rows per epoch,
    ``step(batch) -> loss`` per batch, one host sync per epoch (in ``end_epoch``). ``rows()``, if given,
    chooses each epoch's rows among the ``n`` (the same on every rank); none left ends the stage."""
    stage = _Stage(name, epochs, -(-n // batch), ctx)
    try:
        for epoch in range(epochs):
            if rows is None:
                batches = _batches(n, batch, ctx)
            else:
                chosen = rows()
                if not len(chosen):
                    log.info("%s: no rows left to train on after %d epochs", name, epoch)
                    break
                batches = _split(chosen[torch.randperm(len(chosen), generator=ctx.gen).to(ctx.device)], batch, ctx)
            total = torch.zeros((), device=ctx.device)
            for b in batches:
                total += step(b).detach().float()
                stage.step()
            stage.end_epoch(epoch, total, len(batches))
    finally:
        stage.close()


def fit(
    module: nn.Module,
    data: TensorSet,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch: int,
    ctx: Context,
    name: str,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Cross-entropy training with a given optimiser: the loop under ``descend`` and the reference bank's folds.

    ``schedule`` steps once per optimiser step; ``augment`` transforms each batch
    of samples on the device before the forward pass.
    """
    if epochs <= 0 or len(data) == 0:
        return
    set_mode(module, True)

    def step(b: Batch) -> torch.Tensor:
        x, y = data.batch(b.index)
        if augment is not None:
            x = augment(x)
        with ctx.autocast():
            loss = _mean(F.cross_entropy(module(x), y, reduction="sum"), b)
        _update(optimizer, loss, ctx)
        if schedule is not None:
            schedule.step()
        return loss

    _run_epochs(name, epochs, len(data), batch, ctx=ctx, step=step)


def descend(
    module: nn.Module,
    data: TensorSet,
    *,
    lr: float,
    epochs: int,
    batch: int,
    ctx: Context,
    name: str,
) -> None:
    """Plain cross-entropy training with Adam (retain fine-tuning, retraining, and training originals)."""
    if epochs <= 0 or len(data) == 0:
        return
    fit(module, data, optimizer=_adam(module, lr), epochs=epochs, batch=batch, ctx=ctx, name=name)


def _fine_tune(module: nn.Module, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    """The retain stage that follows a forgetting stage (a fresh Adam, the retain hyper-parameters)."""
    descend(
        module, retain, lr=h.retain_lr, epochs=h.retain_epochs, batch=h.retain_batch, ctx=ctx, name="retain (fine-tune)"
    )


def gradient_ascent(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    opt = _adam(module, h.forget_lr)
    set_mode(module, True)

    def step(b: Batch) -> torch.Tensor:
        with ctx.autocast():
            loss = _ce(module, forget, b)
        _update(opt, -loss, ctx)  # ascent: the negated loss, so Adam's moments see the true direction
        return loss

    _run_epochs("forget (ascent)", h.forget_epochs, len(forget), h.forget_batch, ctx=ctx, step=step)
    _fine_tune(module, retain, h, ctx)


def neggrad_plus(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    opt = _adam(module, h.forget_lr)
    set_mode(module, True)
    forget_batches = _cycle(len(forget), min(h.forget_batch, len(forget)), ctx)

    def step(b: Batch) -> torch.Tensor:
        fb = next(forget_batches)
        with ctx.autocast():
            retain_loss = _ce(module, retain, b)
            forget_loss = _ce(module, forget, fb)
            loss = h.alpha * retain_loss - (1 - h.alpha) * forget_loss
        _update(opt, loss, ctx)
        return loss

    _run_epochs("neggrad+", h.forget_epochs, len(retain), h.retain_batch, ctx=ctx, step=step)
    _fine_tune(module, retain, h, ctx)


SCRUB_TEMPERATURE = 4.0


def _kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    b: Batch | None = None,
    temperature: float = SCRUB_TEMPERATURE,
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened outputs, times T^2, as SCRUB's distillation term:
    the batch mean, or this rank's part of batch ``b``'s mean.

    The T^2 factor (Hinton et al.; SCRUB's ``DistillKL``) keeps the term's
    gradients at the scale of the cross-entropy's whatever the temperature.
    """
    total = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="sum",
        log_target=True,
    )
    mean = _mean(total, b) if b is not None else total / student_logits.shape[0]
    return mean * temperature**2


def scrub_plan(forget_rows: int, retain_rows: int, h: Hyper) -> list[tuple[int, int]]:
    """SCRUB's schedule: per epoch, (max steps, min steps), max steps first.

    * exactly ``retain.epochs`` passes of min steps over the retain set, in the
      *last* epochs, so the schedule always ends on min steps when it has any;
    * ``forget.epochs`` phases of max steps in the first epochs, each at least
      ``forget_steps_floor`` steps (cycling the forget set): counted in steps,
      a 20-row forget set is not one step an epoch;
    * epochs beyond the max phases are the min-only tail that repairs what the
      max steps broke.
    """
    phase = max(-(-forget_rows // h.forget_batch), h.forget_steps_floor) if forget_rows > 0 else 0
    min_pass = -(-retain_rows // h.retain_batch) if retain_rows > 0 else 0
    epochs = max(h.forget_epochs, h.retain_epochs)
    first_min = epochs - h.retain_epochs
    return [(phase if e < h.forget_epochs else 0, min_pass if e >= first_min else 0) for e in range(epochs)]


def scrub(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    """Max steps (maximise KL to the frozen teacher on forget rows) and min steps (alpha * KL + CE on retain rows).

    Two Adam optimisers where the paper shares one SGD: the max steps' ascent
    direction then never enters the moment estimates the min steps use, and each
    stage keeps its own learning rate (forget.lr, retain.lr).
    """
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    set_mode(teacher, False)
    max_opt = _adam(module, h.forget_lr)
    min_opt = _adam(module, h.retain_lr)
    set_mode(module, True)
    plan = scrub_plan(len(forget), len(retain), h)
    forget_batches = _cycle(len(forget), min(h.forget_batch, max(1, len(forget))), ctx)
    stage = _Stage("scrub", len(plan), max((a + b for a, b in plan), default=0), ctx)
    try:
        for epoch, (max_steps, min_steps) in enumerate(plan):
            total = torch.zeros((), device=ctx.device)
            count = 0
            for _ in range(max_steps):
                fb = next(forget_batches)
                xb, _ = forget.batch(fb.index)
                with ctx.autocast():
                    student = module(xb)
                    with torch.no_grad():
                        target = teacher(xb)
                loss = -_kl(student, target, fb)
                _update(max_opt, loss, ctx)
                total += loss.detach()
                count += 1
                stage.step()
            if min_steps:
                for b in _batches(len(retain), h.retain_batch, ctx):
                    xb, yb = retain.batch(b.index)
                    with ctx.autocast():
                        student = module(xb)
                        with torch.no_grad():
                            target = teacher(xb)
                    ce = _mean(F.cross_entropy(student.float(), yb, reduction="sum"), b)
                    loss = h.alpha * _kl(student, target, b) + ce
                    _update(min_opt, loss, ctx)
                    total += loss.detach()
                    count += 1
                    stage.step()
            stage.end_epoch(epoch, total, count)
    finally:
        stage.close()


def saliency_mask(
    module: nn.Module, forget: TensorSet, batch: int, sparsity: float, ctx: Context
) -> dict[str, torch.Tensor]:
    """1 for the ``sparsity`` share of weights with the largest |d CE(forget) / d w|, 0 elsewhere (global threshold).

    Each rank sums the gradient over its share of the forget set; the sum over the ranks is the
    whole set's, so every rank computes the same mask."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    for b in _split(torch.arange(len(forget), device=ctx.device), batch, ctx):
        xb, yb = forget.batch(b.index)
        with ctx.autocast():
            loss = F.cross_entropy(module(xb), yb, reduction="sum")
        _backward(loss)
    ctx.ranks.sum_gradients(params.values())
    grads = {n: (p.grad.abs() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    module.zero_grad(set_to_none=True)
    flat = torch.cat([g.flatten().float() for g in grads.values()])
    keep = max(1, round(sparsity * flat.numel()))
    threshold = torch.topk(flat, keep, sorted=False).values.min()
    return {n: (g.float() >= threshold).to(params[n].dtype) for n, g in grads.items()}


def salun(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    mask = saliency_mask(module, forget, h.forget_batch, h.saliency_sparsity, ctx)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    opt = _adam(module, h.forget_lr)
    set_mode(module, True)
    forget_batches = _cycle(len(forget), min(h.forget_batch, len(forget)), ctx)

    def masked() -> None:
        for name, p in params.items():
            if p.grad is not None:
                p.grad.mul_(mask[name])

    def step(b: Batch) -> torch.Tensor:
        fb = next(forget_batches)
        # A random *wrong* label for each forget sample: shift the label by 1..C-1. Drawn for the
        # whole batch on every rank (the generator stays in step), then cut to this rank's rows.
        shift = torch.randint(1, ctx.num_classes, (fb.size,), generator=ctx.gen)[fb.start : fb.start + len(fb)]
        xf, yf = forget.batch(fb.index)
        wrong = (yf + shift.to(ctx.device)) % ctx.num_classes
        with ctx.autocast():
            loss = _mean(F.cross_entropy(module(xf), wrong, reduction="sum"), fb) + _ce(module, retain, b)
        _update(opt, loss, ctx, adjust=masked)  # only the salient weights move
        return loss

    _run_epochs("salun", h.forget_epochs, len(retain), h.retain_batch, ctx=ctx, step=step)
    _fine_tune(module, retain, h, ctx)


def retrain(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    if ctx.reinitialise is None:
        raise RuntimeError("retrain needs a way to re-initialise the model")
    ctx.reinitialise()
    ctx.ranks.broadcast_module(module)  # one set of fresh weights, whatever each rank drew
    descend(module, retain, lr=h.retain_lr, epochs=h.retain_epochs, batch=h.retain_batch, ctx=ctx, name="retrain")


# Below this KL(target || model), in nats, a forget row is at its target and gets no gradient.
AT_TARGET_KL = 0.01
# The membership term: a forget row whose own-label log-odds (phi = log p_y - log(1 - p_y)) stays more than
# MEMBER_MARGIN above its target's is pushed down by MEMBER_WEIGHT x the excess squared. The KL alone reads a
# row as done once its probabilities are within 0.01 nats, while phi, which the membership test reads, can
# still be several units above the OUT reference's on a mislabelled row (p_y 1e-3 against 1e-6: no KL to speak
# of). Only rows whose target's argmax is not their label (see the loop). The margin is about the 95th
# percentile of the membership test's null on the digits banks (2.9-3.1; the test flags above the 99th,
# 4.6-5.1): rows a retrain could also score that high are left alone. Measured on the mislabelled digits with a
# K = 10 bank: without it 7-19 of 40 rows still looked like members after every attempt; with it 0.
MEMBER_WEIGHT = 0.1
MEMBER_MARGIN = 3.0
RETAIN_SAMPLE_FLOOR = 256
RETAIN_SAMPLE_FACTOR = 4
# The retain samples are drawn from a pool of this many samples' rows, whose original outputs are kept once
# computed (the teacher's forward was a fifth of a step). The pool is bounded in memory (rows x classes
# floats) and not in the data's size, as the per-step cost is.
RETAIN_POOL_SAMPLES = 16
RETAIN_POOL_FLOATS = 1 << 26


class _TeacherCache:
    """The frozen original's logits on a pool of retained rows, computed the first time a row is drawn."""

    def __init__(self, original: nn.Module, retain: TensorSet, pool: torch.Tensor, ctx: Context) -> None:
        self.original, self.retain, self.pool, self.ctx = original, retain, pool.to(ctx.device), ctx
        self.logits = torch.zeros(len(pool), ctx.num_classes, device=ctx.device)
        self.known = torch.zeros(len(pool), dtype=torch.bool, device=ctx.device)

    def __call__(self, slots: torch.Tensor) -> torch.Tensor:
        """The original's logits (float32) at these pool slots."""
        todo = torch.unique(slots[~self.known[slots]])
        if len(todo):
            x, _ = self.retain.batch(self.pool[todo])
            with torch.no_grad(), self.ctx.autocast():
                self.logits[todo] = self.original(x).float()
            self.known[todo] = True
        return self.logits[slots]


def _log_odds(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """phi per row, ``log p_y - logsumexp_{j != y} log p_j`` (exact where p_y rounds to 1)."""
    rows = torch.arange(len(labels), device=log_probs.device)
    own = log_probs[rows, labels]
    others = log_probs.index_put((rows, labels), log_probs.new_tensor(-math.inf))
    return own - torch.logsumexp(others, dim=1)


def _calibrated_per_row(logq: torch.Tensor, p: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The calibrated loss of each forget row: KL(target || model) plus the membership term."""
    per_row = (p * (logp - logq)).sum(dim=1)
    # Only on rows whose target names another class (a retrain would not give the row its label: a
    # mislabelled or atypical row, whose own-label log-odds the membership test reads far into the tail).
    # Typical rows are left to the KL: pushing their log-odds too made them less familiar than unseen rows
    # (the maxMiaAuc gate's over-forgetting) where the bank's references are weaker than the original. Not
    # on a removed class's rows either: their target gives the label exactly 0 (log-odds at the floor).
    own = p.gather(1, labels[:, None]).squeeze(1)
    atypical = (own > 0) & (p.argmax(dim=1) != labels)
    excess = F.relu(_log_odds(logq, labels) - _log_odds(logp, labels) - MEMBER_MARGIN) * atypical.float()
    return per_row + MEMBER_WEIGHT * excess.square()


def calibrated(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    """KL(target || model) on forget rows + alpha / (1 - alpha) * KL(original || model) on a retain sample,
    plus the membership term on forget rows whose target names another class and whose own-label log-odds
    stay above the target's (``MEMBER_WEIGHT``).

    Only the rows away from their target take part: each pass begins by finding them (one forward pass over
    the forget set, without gradients), and its batches of up to ``forget.batchSize`` hold only those; the
    forget term is their mean, and the retain sample scales with them (``RETAIN_SAMPLE_FACTOR``). A random
    set of mostly typical rows, which a retrain would still get right, so costs what its few atypical rows
    cost (real MNIST, a random 10%: 10 steps instead of 40, 1.8 s instead of 4.4). ``forget.epochs`` passes
    at most; the method ends early once every row is at its target. The original is a frozen copy, as
    SCRUB's teacher; its outputs are kept for a bounded pool of retained rows the samples are drawn from
    (``RETAIN_POOL_SAMPLES``: a cache of every row would cost memory in the size of the data). ``alpha``
    near 1 keeps the retained rows' confidence where retraining leaves it (0.5, weight 1, let it drift:
    MIA-efficacy's attack threshold moved with it).
    """
    if ctx.targets is None:
        raise RuntimeError("the calibrated method needs targets (unlearn.calibrated.make_targets)")
    if not (len(forget) and len(retain)):
        return
    targets = ctx.targets.to(ctx.device).float()
    log_targets = torch.log(targets.clamp_min(1e-12))
    original = copy.deepcopy(module)
    for p in original.parameters():
        p.requires_grad_(False)
    set_mode(original, False)
    opt = _adam(module, h.forget_lr)
    weight = h.alpha / max(1e-6, 1.0 - h.alpha)
    batch = max(1, min(h.forget_batch, len(forget)))

    def sample_for(rows: int) -> int:
        return min(len(retain), max(RETAIN_SAMPLE_FLOOR, RETAIN_SAMPLE_FACTOR * rows))

    largest = sample_for(batch)
    pool_rows = max(largest, min(len(retain), RETAIN_POOL_SAMPLES * largest, RETAIN_POOL_FLOATS // ctx.num_classes))
    teacher_at = _TeacherCache(original, retain, torch.randperm(len(retain), generator=ctx.gen)[:pool_rows], ctx)
    every = torch.arange(len(forget), device=ctx.device)

    def per_row(logits: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(logits, dim=1)
        return _calibrated_per_row(logq, targets.index_select(0, index), log_targets.index_select(0, index), labels)

    def away() -> torch.Tensor:
        """The forget rows not at their target, in evaluation mode, the same on every rank (each scores its
        share, all receive every score), at most as many rows per forward pass as a training step takes (a
        large forget set in one pass would not fit in a GPU's memory)."""
        mine = every[ctx.ranks.share(len(every))]
        set_mode(module, False)
        with torch.no_grad(), ctx.autocast():
            scores = torch.cat(
                [
                    per_row(module(forget.x.index_select(0, part)).float(), part, forget.y.index_select(0, part))
                    for part in torch.split(mine, batch + largest)
                ]
            )
        set_mode(module, True)
        return every[ctx.ranks.gather_rows(scores, len(every)) > AT_TARGET_KL]

    def step(b: Batch) -> torch.Tensor:
        xf, yf = forget.batch(b.index)
        sample = sample_for(b.size)
        # The retain sample is drawn whole on every rank (the generator stays in step); each takes its share.
        drawn = torch.randint(0, pool_rows, (sample,), generator=ctx.gen)
        slots = drawn[ctx.ranks.share(sample)].to(ctx.device)
        r = Batch(teacher_at.pool[slots], sample)
        xr, _ = retain.batch(r.index)
        teacher = teacher_at(slots)
        with ctx.autocast():
            out_f = module(xf).float()
            out_r = module(xr).float()
        rows = per_row(out_f, b.index, yf)
        # A row may reach its target within a pass (several batches): from then on it takes no gradient.
        pushed = (rows.detach() > AT_TARGET_KL).float()
        forget_loss = _mean((rows * pushed).sum(), b)
        retain_loss = _mean(
            F.kl_div(F.log_softmax(out_r, dim=1), F.log_softmax(teacher, dim=1), reduction="sum", log_target=True), r
        )
        loss = forget_loss + weight * retain_loss
        # No row of the whole batch away from its target: no step at all, on any rank (the count is summed
        # over the ranks, so all take the same branch). Adam would turn the retain term's rounding noise
        # (about 1e-9 while the model still equals the original) into steps of the full learning rate.
        if bool(ctx.ranks.sum_(pushed.sum()).item() > 0):
            _update(opt, loss, ctx)
        return loss

    set_mode(module, True)
    _run_epochs("calibrated", h.forget_epochs, len(forget), batch, ctx=ctx, step=step, rows=away)


Method = Callable[[nn.Module, TensorSet, TensorSet, Hyper, Context], None]
METHODS: dict[str, Method] = {
    "gradient-ascent": gradient_ascent,
    "neggrad-plus": neggrad_plus,
    "scrub": scrub,
    "salun": salun,
    "retrain": retrain,
    "calibrated": calibrated,
}


def unlearn(module: nn.Module, forget: TensorSet, retain: TensorSet, h: Hyper, ctx: Context) -> None:
    """Run method ``h.method`` on ``module`` in place, reproducibly under ``h.seed``."""
    torch.manual_seed(h.seed)
    ctx.gen = torch.Generator().manual_seed(h.seed)
    if h.retain_subset is not None and h.retain_subset < len(retain):
        retain = retain.take(torch.randperm(len(retain), generator=ctx.gen)[: h.retain_subset].to(ctx.device))
    monitor = ctx.monitor if h.method != "retrain" else None
    if monitor is not None:
        monitor.module = module
    try:
        if monitor is not None:
            monitor.start(module)
        METHODS[h.method](module, forget, retain, h, ctx)
    except Stopped:
        pass
    finally:
        if monitor is not None and monitor.module is module and monitor.checks:
            monitor.finish()
    if h.weight_noise > 0:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=ctx.gen).to(p.device, p.dtype) * h.weight_noise)
    # The ranks' weights are equal already (the same summed gradients); their buffers (batch-norm
    # statistics) are not. Rank 0's are the model that is audited and saved.
    ctx.ranks.broadcast_module(module)
    for p in module.parameters():
        if not torch.isfinite(p).all():
            raise DivergedError("the weights became non-finite: lower method.forget.lr")


def predict_all(module: nn.Module, x: torch.Tensor, ctx: Context, batch: int = 2048) -> npt.NDArray[np.float32]:
    """Logits for ``x``: each rank evaluates its share of the rows; every rank receives them all."""
    if not ctx.ranks.parallel:
        return predict(module, x, ctx, batch)
    mine = ctx.ranks.share(x.shape[0])
    part = torch.from_numpy(predict(module, x[mine], ctx, batch)).to(ctx.device)
    return ctx.ranks.gather_rows(part, x.shape[0]).cpu().numpy()


@torch.no_grad()
def predict(module: nn.Module, x: torch.Tensor, ctx: Context, batch: int = 2048) -> npt.NDArray[np.float32]:
    """Logits for ``x`` in float32 numpy, evaluated in batches."""
    set_mode(module, False)
    outputs = []
    for start in range(0, x.shape[0], batch):
        with ctx.autocast():
            outputs.append(module(x[start : start + batch]).float())
    if not outputs:
        return np.zeros((0, ctx.num_classes), dtype=np.float32)
    return torch.cat(outputs).cpu().numpy()
