"""Data-parallel throughput: the engine's training loop on 1 and N ranks, on the CPU or on GPUs.

``python -m bench data-parallel [--device cpu|cuda] [--world 1 2] [--model NAME] [--threads T]``

What it measures: ``unlearn.engine.descend`` (the loop under retraining and
every retain stage) over the same random tensors, the same global batch and
the same number of epochs, run by ``W`` ranks for each ``W`` in ``--world``.
Every configuration runs in fresh processes (``torch.multiprocessing``, one
per rank, joined through the job's own ``unlearn.distributed.start``: gloo on
the CPU; on CUDA, NCCL when each rank has a GPU and gloo when ranks share
one), warms up for one epoch, then times ``--epochs`` epochs on rank 0 between
two barriers. The figure is global samples per second; the speed-up is
against ``W = 1``.

Models (``--model``):

* ``digits-mlp``: the demo's 64-512-256-10 MLP (0.17 M parameters), batch 64:
  a step is tiny, so it shows what the per-step all-reduce costs;
* ``mlp``: 784-2048-2048-10 (5.8 M parameters), batch 256: enough arithmetic
  per step for a CPU core to be the limit, so it shows what splitting buys;
* ``resnet18``: torchvision's ResNet-18 on CIFAR-shaped tensors (11 M
  parameters), batch 256: the GPU case (slow on a CPU).

``--compile`` wraps the model in ``torch.compile`` (``reduce-overhead`` uses
CUDA graphs on a GPU) to see what that gives a launch-bound small model; the
job itself does not compile.

Threads: ``--threads`` per rank (default 1). On a CPU, compare ``W`` ranks of
``T`` threads with one rank of ``W x T`` threads as well: both use the same
cores. Results go to ``--out`` as JSON, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unlearn.distributed import Ranks, start, stop
from unlearn.engine import Context, TensorSet, descend


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    model: str = "mlp"
    samples: int = 4096
    batch: int = 256
    epochs: int = 2
    threads: int = 1
    compile: str = "none"
    mixed_precision: bool = True


def build(model: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The network and the shape of one sample."""
    if model == "digits-mlp":
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)), (64,)
    if model == "mlp":
        layers = [nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)]
        return nn.Sequential(*layers), (784,)
    if model == "resnet18":
        import torchvision  # noqa: PLC0415  # only this model needs it

        return torchvision.models.resnet18(weights=None, num_classes=10), (3, 32, 32)
    raise SystemExit(f"--model {model}: expected digits-mlp, mlp or resnet18")


def _rank(rank: int, world: int, port: int, config: Config, folder: str) -> None:
    torch.set_num_threads(config.threads)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    ranks = Ranks(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    gpus = torch.cuda.device_count() if config.device == "cuda" else 0
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    backend = start(ranks, device)
    torch.manual_seed(0)
    module, shape = build(config.model)
    module = module.to(device)
    if config.compile != "none":
        module = torch.compile(module, mode=config.compile, dynamic=False)  # type: ignore[assignment]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.rand((config.samples, *shape), generator=gen, device=device)
    y = torch.randint(0, 10, (config.samples,), generator=gen, device=device)
    ctx = Context(
        device=device,
        num_classes=10,
        mixed_precision=config.mixed_precision,
        gen=torch.Generator().manual_seed(0),
        ranks=ranks,
    )
    data = TensorSet(x, y)

    def train(epochs: int) -> None:
        descend(module, data, lr=1e-3, epochs=epochs, batch=config.batch, ctx=ctx, name="bench")

    try:
        train(1)  # warm-up: allocator, kernels, the process group's connections, compilation
        _barrier(ranks, device)
        started = time.perf_counter()
        train(config.epochs)
        _barrier(ranks, device)
        seconds = time.perf_counter() - started
    finally:
        stop()
    if ranks.main:
        result = {
            "world": world,
            "backend": backend or "-",
            "seconds": round(seconds, 3),
            "samples_per_s": round(config.epochs * config.samples / seconds, 1),
            "steps_per_s": round(config.epochs * -(-config.samples // config.batch) / seconds, 2),
        }
        Path(folder, "result.json").write_text(json.dumps(result))


def _barrier(ranks: Ranks, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if ranks.parallel:
        dist.barrier()


def measure(world: int, config: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.spawn(_rank, args=(world, port, config, folder), nprocs=world, join=True)
        return dict(json.loads(Path(folder, "result.json").read_text()))


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench data-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="rank counts to measure")
    parser.add_argument("--model", choices=("digits-mlp", "mlp", "resnet18"), default="mlp")
    parser.add_argument("--samples", type=int, default=None, help="rows per epoch (default: per model)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: 64 digits-mlp, else 256)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--compile", choices=("none", "default", "reduce-overhead"), default="none")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--out", type=Path, default=None, help="append the results to this JSON file")
    args = parser.parse_args(argv)
    default_samples = {"digits-mlp": 20_000, "mlp": 4096, "resnet18": 8192}[args.model]
    config = Config(
        device=args.device,
        model=args.model,
        samples=args.samples or default_samples,
        batch=args.batch or (64 if args.model == "digits-mlp" else 256),
        epochs=args.epochs,
        threads=args.threads,
        compile=args.compile,
        mixed_precision=not args.fp32,
    )
    print(f"{machine(config.device)}, torch {torch.__version__}; {config}", flush=True)
    rows = []
    for world in args.world:
        row = measure(world, config)
        rows.append(row)
        print(f"  {world} rank(s): {row['samples_per_s']:,.0f} samples/s ({row['seconds']} s)", flush=True)
    base = next((r for r in rows if r["world"] == 1), rows[0])
    print(f"\n{'ranks':>5} {'backend':>7} {'samples/s':>11} {'steps/s':>8} {'speed-up':>8}")
    for row in rows:
        row["speed_up"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
        print(
            f"{row['world']:>5} {row['backend']:>7} {row['samples_per_s']:>11,.0f} "
            f"{row['steps_per_s']:>8.1f} {row['speed_up']:>7.2f}x"
        )
    if args.out is not None:
        entry = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(config.device),
            "torch": torch.__version__,
            "config": asdict(config),
            "results": rows,
        }
        previous = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*previous, entry], indent=2) + "\n")
    return 0
