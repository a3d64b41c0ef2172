"""Run the engine's methods as several ranks in one test (torch.multiprocessing, gloo on the CPU).

``on_ranks`` starts ``world`` processes that each join a gloo group through
the job's own start-up (``unlearn.distributed.start``), run every method on the
same digits MLP, data and seed in float64 and in float32 (the calibrated one
also under the stopping rule, with an estimate made as the runner makes it),
try the ranks' error sharing (``agree``, ``decide``), and leave what they ended with in a
folder, one file per rank. The test compares that with one process;
``python -m tests.job.ranks`` prints the differences (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from unlearn import calibrated, tuning
from unlearn.data import declared_split, load_digits_arrays
from unlearn.demo import RECIPE, mlp, train_digits_model
from unlearn.distributed import Ranks, start, stop
from unlearn.engine import Context, Monitor, TensorSet, predict_all, unlearn
from unlearn.errors import InvalidInputError
from unlearning_contracts.spec import MethodSpec

# Small enough for seconds per method on one core, large enough that every batch size divides
# unevenly between two ranks (the last batch of each epoch has an odd number of rows).
TRAIN_ROWS = 301
FORGET = (3, 17, 42, 58, 91, 104, 133, 178, 202, 251, 260)
METHODS = ("gradient-ascent", "neggrad-plus", "scrub", "salun", "retrain", "calibrated")
MONITORED = "calibrated"
"""Run a second time under the stopping rule (``RUNS`` names that run ``calibrated+stopping``)."""
RUNS = (*METHODS, f"{MONITORED}+stopping")
DTYPES = (torch.float64, torch.float32)


def hyper(method: str) -> tuning.Hyper:
    """The method's defaults, shortened so that a test runs every method in seconds."""
    h = tuning.resolve(MethodSpec(name=method))  # type: ignore[call-arg]
    return replace(h, forget_epochs=min(h.forget_epochs, 3), retain_epochs=min(h.retain_epochs, 3), forget_batch=8)


def problem(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], TensorSet, TensorSet]:
    """The original model's weights and the forget and retain sets, identical in every process."""
    full = load_digits_arrays()
    train_rows, _ = declared_split(len(full), RECIPE.test_fraction, RECIPE.split_seed)
    train = full.take(train_rows[:TRAIN_ROWS])
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    model = train_digits_model(x, y, replace(RECIPE, epochs=20, hidden=(64, 32)))
    keep = np.setdiff1d(np.arange(TRAIN_ROWS), FORGET)
    forget = TensorSet(x[list(FORGET)].to(dtype), y[list(FORGET)])
    retain = TensorSet(x[keep].to(dtype), y[keep])
    return {k: v.to(dtype) for k, v in model.state_dict().items()}, forget, retain


def forgotten_label_targets(module: torch.nn.Module, forget: TensorSet) -> torch.Tensor:
    """The original's probabilities on the forget rows with each row's own label taken out: targets that
    every process computes identically (the calibrated method's are the bank's; the engine only reads them)."""
    with torch.no_grad():
        probs = torch.softmax(module(forget.x), dim=1).double().numpy()
    out = np.stack([calibrated.class_absent(row[None, :], [int(y)])[0] for row, y in zip(probs, forget.y, strict=True)])
    return torch.from_numpy(out).to(forget.x.dtype)


def stopping_rule(forget: TensorSet, targets: torch.Tensor, ctx: Context) -> Monitor:
    """The runner's recipe for an estimate (``Recipe.monitor``): logits gathered from every rank's share,
    the number decided on rank 0. The estimate is the forget rows' mean KL to their targets."""

    def estimate(module: torch.nn.Module) -> float:
        logits = torch.from_numpy(predict_all(module, forget.x, ctx)).double()
        logq = torch.log_softmax(logits, dim=1)
        p = targets.double()
        return ctx.ranks.decide(lambda: float((p * (p.clamp_min(1e-12).log() - logq)).sum(1).mean()))

    # A bound no check reaches: the rule runs to the method's end or to its patience, then rewinds.
    return Monitor(estimate, check_every=2, stop_at=1e-6, patience=3)


def run_methods(ranks: Ranks, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Every method from the same original weights on this rank; the weights each one ends with (and, under
    ``RUNS``' stopping-rule run, the rule's summary under the key ``monitor``, as a one-element tensor dict)."""
    weights, forget, retain = problem(dtype)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for run in RUNS:
        method, _, stopping = run.partition("+")
        module = mlp(64, (64, 32), 10).to(dtype)
        module.load_state_dict(weights)

        def reinitialise(module: torch.nn.Module = module) -> None:
            fresh = mlp(64, (64, 32), 10).to(dtype)
            module.load_state_dict(fresh.state_dict())

        ctx = Context(
            device=torch.device("cpu"), num_classes=10, mixed_precision=False, reinitialise=reinitialise, ranks=ranks
        )
        if method == "calibrated":
            ctx.targets = forgotten_label_targets(module, forget)
        if stopping:
            assert ctx.targets is not None
            ctx.monitor = stopping_rule(forget, ctx.targets, ctx)
        unlearn(module, forget, retain, hyper(method), ctx)
        out[run] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if ctx.monitor is not None:
            summary = ctx.monitor.summary()
            out[f"{run} monitor"] = {
                "steps": torch.tensor(summary["steps"]),
                "checks": torch.tensor(summary["checks"]),
                "chosen": torch.tensor(summary["chosenStep"]),
                "estimate": torch.tensor(summary["estimatedGap"], dtype=torch.float64),
            }
    return out


def _raised(fn: Callable[[], object]) -> tuple[str, str]:
    """(exception type, message) that ``fn`` raised on this rank, or ("returned", its value)."""
    try:
        return ("returned", repr(fn()))
    except Exception as error:
        return (type(error).__name__, str(error))


def _only_on(rank: int, ranks: Ranks, error: Exception) -> Callable[[], str]:
    def fn() -> str:
        if ranks.rank == rank:
            raise error
        return f"rank {ranks.rank} is fine"

    return fn


def share_errors(ranks: Ranks) -> dict[str, tuple[str, str]]:
    """What each way of sharing an outcome gives on this rank."""
    return {
        "agree, invalid input on rank 1": _raised(
            lambda: ranks.agree(_only_on(1, ranks, InvalidInputError("data.train: x")))
        ),
        "agree, nothing raised": _raised(lambda: ranks.agree(lambda: ranks.rank * 10)),
        "decide, rank 0 returns": _raised(lambda: ranks.decide(lambda: f"rank {ranks.rank} decided")),
        "decide, rank 0 raises": _raised(lambda: ranks.decide(_only_on(0, ranks, ValueError("bad numbers")))),
    }


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    ranks = Ranks(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    start(ranks, torch.device("cpu"))
    try:
        result = {"weights": {str(dtype): run_methods(ranks, dtype) for dtype in DTYPES}, "errors": share_errors(ranks)}
    finally:
        stop()
    torch.save(result, Path(folder) / f"rank-{rank}.pt")


def on_ranks(world: int, folder: Path) -> list[dict[str, Any]]:
    """What every rank ended with (``_rank_main``), ``world`` ranks in ``world`` processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, str(folder)), nprocs=world, join=True)
    return [torch.load(folder / f"rank-{rank}.pt") for rank in range(world)]


def main() -> None:
    """``python -m tests.job.ranks``: how far two ranks end from one process, per method and precision."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        ranks = on_ranks(2, Path(folder))
    for dtype in DTYPES:
        one = run_methods(Ranks(), dtype)
        for method in RUNS:
            two = [r["weights"][str(dtype)][method] for r in ranks]
            difference = max(float((one[method][k] - two[0][k]).abs().max()) for k in one[method])
            same = all(torch.equal(two[0][k], two[1][k]) for k in two[0])
            print(f"{dtype!s:14} {method:16} max |w1 - w2| {difference:.2e}  ranks bit-identical: {same}")


if __name__ == "__main__":
    main()
