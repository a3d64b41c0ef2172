"""Job throughput on a GPU: ResNet-18 on CIFAR-shaped tensors, with and without bf16 autocast.

What it measures, on one device, in one process (so every number shares the card):

1. ``tutorial``: the tutorial's loop as the baseline: a ``DataLoader`` over a
   ``TensorDataset`` in host memory (batch 64, shuffled), each batch copied to
   the device, ``loss.item()`` every step; ascent over the forget set, then
   fine-tuning over the retain set (float32, as the tutorial runs).
2. ``engine``: the engine's own forget + retain loop (``gradient-ascent`` through
   ``unlearn.engine.unlearn``: data resident on the device, batches by
   indexing, one host sync per epoch) on the same samples and batch size, in
   float32 and under bfloat16 autocast, and with a larger batch.
3. ``unlearn``: the job's default method with its default hyper-parameters on
   a 10% forget set of the whole data, against ``retrain`` (from scratch on
   the retain set) for ``--retrain-epochs`` epochs: both measured. The table
   also states the retrain time extrapolated linearly to ``--recipe-epochs``
   (182, the ResNet-18 CIFAR-10 recipe of the SalUn paper); that line is
   marked as an extrapolation.

The inputs are random tensors of CIFAR-10's shape (50,000 x 3 x 32 x 32, ten
classes), created on the device: throughput does not depend on pixel values,
and nothing needs downloading. torchvision's ResNet-18 is built with
``num_classes=10`` and no weights (its ImageNet stem on 32x32 inputs; that is
the cost model of the SalUn comparison closely enough for a throughput figure).

Robustness: each measurement runs in its own try block (a failure is recorded
and the rest still run), ``--budget-s`` skips what would not fit, results are
written to ``--out`` as JSON after every measurement, and the table is printed
last. Dependencies: torch, torchvision, numpy and the ``unlearn`` package
(``PYTHONPATH=job_image`` from a checkout).

    PYTHONPATH=job_image python -m bench.gpu_throughput --out gpu.json
    python -m bench gpu-throughput --smoke --out /tmp/gpu.json   # CPU, seconds

On the lent GPU machines (their image has torch, torchvision, numpy, tqdm,
safetensors and pyyaml, but not pydantic, which ``unlearning_contracts.spec`` needs), carry
the pydantic wheels in ``.whl/`` (pydantic, pydantic-core for cp312,
annotated-types, typing-inspection) and run, from the repository root::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:job_image PYTHONUNBUFFERED=1 python3 -m bench gpu-throughput --out $OUT/gpu.json

About two minutes on an H100 (estimate: ~4,000 ResNet-18 steps per precision
for the default method); ``--budget-s`` (default 270) is the safety net.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unlearn import tuning
from unlearn.engine import Context, TensorSet, scrub_plan
from unlearn.engine import unlearn as run_method
from unlearning_contracts.spec import MethodSpec

SALUN_RETRAIN_EPOCHS = 182  # ResNet-18 / CIFAR-10 retraining recipe in the SalUn and l1-sparse papers


@dataclass(frozen=True)
class Config:
    samples: int = 50_000
    forget_share: float = 0.10
    batch: int = 64  # the tutorial's batch
    large_batch: int = 256
    loop_samples: int = 12_800  # retain samples per throughput measurement (the forget part is 10% of it)
    retrain_epochs: int = 3
    recipe_epochs: int = SALUN_RETRAIN_EPOCHS
    warmup_steps: int = 20
    method_epochs: int | None = None  # None: the default method's own epochs
    budget_s: float = 270.0
    device: str = "cuda"


SMOKE = Config(
    samples=80,
    batch=16,
    large_batch=16,
    loop_samples=32,
    retrain_epochs=1,
    recipe_epochs=2,
    warmup_steps=0,
    method_epochs=1,
    budget_s=60.0,
    device="cpu",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)  # type: ignore[no-any-return]


def tutorial_loop(
    model: nn.Module, forget: TensorDataset, retain: TensorDataset, batch: int, device: torch.device
) -> int:
    """One epoch of ascent on forget then one of fine-tuning on retain, the tutorial's way. Returns samples."""
    seen = 0
    for data, lr, sign in ((forget, 1e-4, -1.0), (retain, 5e-5, 1.0)):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        total = 0.0
        for host_images, host_labels in DataLoader(data, batch_size=batch, shuffle=True):
            images, labels = host_images.to(device), host_labels.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            (sign * loss).backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.item()  # a host sync every step, as in the tutorial
            seen += len(labels)
    return seen


def engine_hyper(batch: int, mixed_precision: bool) -> tuning.Hyper:
    """The engine's gradient-ascent pipeline, one epoch per stage, at ``batch``."""
    h = tuning.resolve(MethodSpec(name="gradient-ascent", mixed_precision=mixed_precision))
    return replace(h, forget_epochs=1, retain_epochs=1, forget_batch=batch, retain_batch=batch)


def samples_trained(h: tuning.Hyper, n_forget: int, n_retain: int) -> int:
    """Samples that go through a training step (forward and backward) in ``unlearn.engine``'s method ``h.method``.

    Mirrors the loops of unlearn/engine.py (teacher forwards and the saliency
    pass are not counted: they are extra cost per sample, which lowers the rate).
    """
    forget_pass, retain_pass = h.forget_epochs * n_forget, h.retain_epochs * n_retain
    if h.method in ("neggrad-plus", "salun"):
        steps = -(-n_retain // h.retain_batch)  # each retain step carries one forget batch
        return h.forget_epochs * (n_retain + steps * min(h.forget_batch, n_forget)) + retain_pass
    if h.method == "scrub":  # its own schedule: max steps with a floor, exactly retain.epochs min passes
        plan = scrub_plan(n_forget, n_retain, h)
        return sum(m for m, _ in plan) * min(h.forget_batch, n_forget) + h.retain_epochs * n_retain
    if h.method == "retrain":
        return retain_pass
    return forget_pass + retain_pass  # gradient-ascent


@dataclass
class Measurement:
    name: str
    precision: str
    batch: int
    seconds: float = math.nan
    samples: int = 0
    note: str = ""
    error: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 and self.samples else math.nan


class Bench:
    def __init__(self, config: Config, out: Path | None) -> None:
        self.config = config
        self.out = out
        self.device = torch.device(config.device)
        self.started = time.perf_counter()
        self.results: list[Measurement] = []
        gen = torch.Generator(device="cpu").manual_seed(0)
        n = config.samples
        # CIFAR-shaped random data, made on the host once (reproducible) and moved to the device once.
        x = torch.randn(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        n_forget = max(1, round(config.forget_share * n))
        self.host_x, self.host_y = x, y
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.forget = TensorSet(self.x[:n_forget], self.y[:n_forget])
        self.retain = TensorSet(self.x[n_forget:], self.y[n_forget:])
        self.n_forget = n_forget

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def ctx(self, mixed_precision: bool) -> Context:
        return Context(device=self.device, num_classes=10, mixed_precision=mixed_precision)

    def precisions(self) -> tuple[bool, ...]:
        """Mixed precision on and off; on the CPU autocast is off in the engine, so only float32 runs."""
        return (False, True) if self.device.type == "cuda" else (False,)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return resnet18().to(self.device)

    def measure(self, m: Measurement, fn: Callable[[], int]) -> None:
        """Run ``fn`` (returns samples processed) under the clock; record any failure and go on."""
        if self.elapsed() > self.config.budget_s:
            m.error = f"skipped: over --budget-s {self.config.budget_s:.0f}"
        else:
            try:
                sync(self.device)
                start = time.perf_counter()
                m.samples = fn()
                sync(self.device)
                m.seconds = time.perf_counter() - start
            except Exception as error:  # one failed measurement must not cost the others
                m.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
        self.results.append(m)
        status = m.error or f"{m.seconds:.2f} s, {m.samples_per_s:,.0f} samples/s"
        print(f"[{self.elapsed():6.1f}s] {m.name} {m.precision} batch {m.batch}: {status}", flush=True)
        self.write()

    def warm(self, model: nn.Module, mixed_precision: bool, batch: int) -> None:
        """cuDNN autotuning and allocator warm-up, outside the clock."""
        ctx = self.ctx(mixed_precision)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        model.train()
        for _ in range(self.config.warmup_steps):
            idx = torch.randint(0, len(self.retain), (batch,), device=self.device)
            with ctx.autocast():
                loss = F.cross_entropy(model(self.retain.x[idx]), self.retain.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        sync(self.device)

    # -- the measurements ------------------------------------------------------------------------------
    def loops(self) -> None:
        c = self.config
        n_retain = min(c.loop_samples, len(self.retain))
        n_forget = min(max(1, n_retain // 10), self.n_forget)
        forget_host = TensorDataset(self.host_x[:n_forget], self.host_y[:n_forget])
        retain_host = TensorDataset(
            self.host_x[self.n_forget : self.n_forget + n_retain], self.host_y[self.n_forget : self.n_forget + n_retain]
        )
        forget = TensorSet(self.forget.x[:n_forget], self.forget.y[:n_forget])
        retain = TensorSet(self.retain.x[:n_retain], self.retain.y[:n_retain])
        model = self.model()
        self.warm(model, False, c.batch)
        self.measure(
            Measurement("tutorial loop (DataLoader)", "fp32", c.batch, note="forget+retain, one epoch each"),
            lambda: tutorial_loop(model, forget_host, retain_host, c.batch, self.device),
        )
        for batch in dict.fromkeys((c.batch, c.large_batch)):
            for amp in self.precisions():
                model = self.model()
                self.warm(model, amp, batch)
                ctx = self.ctx(amp)
                hyper = engine_hyper(batch, amp)
                precision = "bf16" if ctx.amp_dtype is not None else "fp32"

                def engine_run(model: nn.Module = model, hyper: tuning.Hyper = hyper, ctx: Context = ctx) -> int:
                    run_method(model, forget, retain, hyper, ctx)
                    return len(forget) + len(retain)

                self.measure(
                    Measurement("engine loop (gradient-ascent)", precision, batch, note="forget+retain, one epoch"),
                    engine_run,
                )

    def unlearn_vs_retrain(self, amp: bool) -> None:
        """Retrain from scratch for a few epochs, then unlearn from that trained model with the job's default.

        Starting the unlearning from a trained model (not a random one) keeps its
        losses in the range the method sees in practice; the time per step does
        not depend on the weights.
        """
        c = self.config
        ctx = self.ctx(amp)
        precision = "bf16" if ctx.amp_dtype is not None else "fp32"
        retrain_hyper = replace(
            tuning.resolve(MethodSpec.model_validate({"name": "retrain", "mixed_precision": amp})),
            retain_epochs=c.retrain_epochs,
        )
        model = self.model()
        self.warm(model, amp, retrain_hyper.retain_batch)

        def fresh() -> None:
            model.load_state_dict(resnet18().to(self.device).state_dict())

        ctx.reinitialise = fresh

        def retrain_run() -> int:
            run_method(model, self.forget, self.retain, retrain_hyper, ctx)
            return c.retrain_epochs * len(self.retain)

        self.measure(
            Measurement(
                f"retrain ({c.retrain_epochs} epochs, measured)",
                precision,
                retrain_hyper.retain_batch,
                note=f"lr {retrain_hyper.retain_lr}, batch {retrain_hyper.retain_batch}",
            ),
            retrain_run,
        )
        ctx.reinitialise = None
        default = str(MethodSpec().name)
        hyper = tuning.resolve(MethodSpec.model_validate({"name": default, "mixed_precision": amp}))
        if c.method_epochs is not None:
            hyper = replace(
                hyper,
                forget_epochs=min(hyper.forget_epochs, c.method_epochs),
                retain_epochs=min(hyper.retain_epochs, c.method_epochs),
            )

        def unlearn_run() -> int:
            run_method(model, self.forget, self.retain, hyper, ctx)
            return samples_trained(hyper, len(self.forget), len(self.retain))

        self.measure(
            Measurement(
                f"unlearn: {default} (job defaults)",
                precision,
                hyper.retain_batch,
                note=f"forget {len(self.forget)}, retain {len(self.retain)}; hyper {json.dumps(hyper.as_dict())}",
            ),
            unlearn_run,
        )

    def run(self) -> list[Measurement]:
        self.loops()
        for amp in sorted(self.precisions(), reverse=True):  # bf16 first: the job's default on CUDA
            self.unlearn_vs_retrain(amp)
        return self.results

    # -- output ---------------------------------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        device = self.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        return {
            "benchmark": "gpu-throughput",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": name,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "bf16Supported": bool(device.type == "cuda" and torch.cuda.is_bf16_supported()),
            "config": asdict(self.config),
            "defaultMethod": str(MethodSpec().name),
            "wallSeconds": round(self.elapsed(), 2),
            "measurements": [
                {**asdict(m), "samplesPerSecond": None if math.isnan(m.samples_per_s) else m.samples_per_s}
                for m in self.results
            ],
            "speedups": self.speedups(),
        }

    def write(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.document(), indent=1, default=str) + "\n")

    def speedups(self) -> list[dict[str, Any]]:
        """Unlearning against retraining per precision: measured, and extrapolated to the recipe's epochs."""
        out = []
        for precision in ("bf16", "fp32"):
            unl = [m for m in self.results if m.name.startswith("unlearn") and m.precision == precision and not m.error]
            ret = [m for m in self.results if m.name.startswith("retrain") and m.precision == precision and not m.error]
            if not unl or not ret:
                continue
            u, r = unl[0].seconds, ret[0].seconds
            per_epoch = r / self.config.retrain_epochs
            out.append(
                {
                    "precision": precision,
                    "unlearnSeconds": u,
                    "retrainSeconds": r,
                    "retrainEpochs": self.config.retrain_epochs,
                    "speedupMeasured": r / u,
                    "retrainSecondsExtrapolated": per_epoch * self.config.recipe_epochs,
                    "recipeEpochs": self.config.recipe_epochs,
                    "speedupExtrapolated": per_epoch * self.config.recipe_epochs / u,
                }
            )
        return out


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['device']}, torch {doc['torch']}, {doc['date']}",
        f"{'measurement':<42} {'prec':<5} {'batch':>5} {'seconds':>9} {'samples/s':>11}",
    ]
    for m in doc["measurements"]:
        if m["error"]:
            lines.append(f"{m['name']:<42} {m['precision']:<5} {m['batch']:>5}  {m['error']}")
        else:
            lines.append(
                f"{m['name']:<42} {m['precision']:<5} {m['batch']:>5} {m['seconds']:>9.2f} "
                f"{m['samplesPerSecond']:>11,.0f}"
            )
    base = next((m for m in doc["measurements"] if m["name"].startswith("tutorial") and not m["error"]), None)
    if base is not None:
        for m in doc["measurements"]:
            if m["name"].startswith("engine") and not m["error"]:
                ratio = m["samplesPerSecond"] / base["samplesPerSecond"]
                lines.append(f"engine / tutorial, {m['precision']} batch {m['batch']}: {ratio:.1f}x")
    for s in doc["speedups"]:
        lines.append(
            f"{doc['defaultMethod']} vs retrain ({s['precision']}): {s['unlearnSeconds']:.1f} s vs "
            f"{s['retrainSeconds']:.1f} s for {s['retrainEpochs']} epochs = {s['speedupMeasured']:.1f}x measured; "
            f"EXTRAPOLATED to {s['recipeEpochs']} epochs: {s['retrainSecondsExtrapolated']:.0f} s = "
            f"{s['speedupExtrapolated']:.0f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu-throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-throughput.json"), help="JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests: seconds)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu")
    parser.add_argument("--samples", type=int, default=None, help="CIFAR-shaped samples (default 50,000)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="measured retraining epochs (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads when the device is the CPU")
    parser.add_argument("--budget-s", type=float, default=None, help="skip measurements after this many seconds")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else Config()
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.samples is not None:
        overrides["samples"] = args.samples
    if args.retrain_epochs is not None:
        overrides["retrain_epochs"] = args.retrain_epochs
    if args.budget_s is not None:
        overrides["budget_s"] = args.budget_s
    config = replace(config, **overrides)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        print("python -m bench gpu-throughput: no CUDA device: use --smoke or --device cpu", file=sys.stderr)
        return 2
    if torch.device(config.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # On a shared CPU a second OpenMP thread spins at barriers and makes each step slower.
        torch.set_num_threads(args.threads)
    bench = Bench(config, args.out)
    bench.run()
    bench.write()
    print()
    print(table(bench.document()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
