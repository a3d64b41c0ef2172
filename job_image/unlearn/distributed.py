"""Data parallelism inside one pod: the ranks of a run and the few collectives the job needs.

One code path for one process and for N (the nanoGPT way). ``Ranks`` is made
once at start-up from the environment torchrun defines (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; ``unlearn run --nproc-per-node N`` sets the same, see
launch.py) or, without it, as rank 0 of 1, for which every collective below is
a no-op and nothing is initialised.

How a run is split, and why N ranks compute what one process computes:

* Every rank holds the whole data and the same model and draws the same
  permutations from the same seed, so all ranks walk the same *global*
  batches; ``share`` gives each rank a contiguous part of each batch (parts
  differ by at most one row).
* A rank's loss is its part's *sum* divided by the global batch size, so the
  summed (all-reduced) gradient is the gradient of the global batch's mean,
  the same quantity one process computes. What differs is the order in which
  float32 sums are taken (two halves added after the backward pass instead of
  one sum inside it): that, compounded by Adam over the steps of a run, is
  the whole 1-rank vs N-rank difference (measured in docs/benchmarks.md).
* Every rank steps its own optimiser on the identical summed gradient, so the
  weights stay identical without a broadcast per step; ``broadcast_module``
  re-synchronises parameters and buffers from rank 0 once per attempt (buffers
  such as batch-norm statistics are computed per rank, as under DDP).
* Decisions are taken once. ``decide`` runs a function on rank 0 (the audit,
  whose numbers feed the gates and the tuner) and hands its value, or its
  exception, to every rank; ``agree`` runs a function on every rank (loading
  and checking the inputs) and raises the lowest rank's error on all of them.
  So every rank takes the same path, and no rank waits at a collective that
  another left because of an error.

Why not ``DistributedDataParallel``: its wrapper renames every state-dict key
(``module.`` prefix) and drives the reduction from autograd hooks registered on
the wrapped module. The job trains ``torch.export`` graph modules and
TorchScript as well as eager modules, deep-copies the model as SCRUB's
teacher, masks SalUn's gradients between the backward pass and the step, and
some methods leave parameters without a gradient in a step. One explicit
all-reduce of the gradients in the engine's single update helper behaves the
same for every format and method. What it gives up is DDP's overlap of the
reduction with the backward pass, which matters for large models across GPUs,
not for the launch-bound small ones (docs/benchmarks.md says what is measured).

Hangs: every collective has a timeout (``UNLEARN_COLLECTIVE_TIMEOUT_S``,
default 600 s: it must cover rank 0's audit, during which the others wait),
and the launcher ends the pod as soon as a rank dies, without waiting for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from unlearn.errors import DivergedError, InvalidInputError
from unlearn.launch import env_int, worker_place

log = logging.getLogger("unlearn")

T = TypeVar("T")

ENV_TIMEOUT = "UNLEARN_COLLECTIVE_TIMEOUT_S"
ENV_BACKEND = "UNLEARN_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 600
BACKENDS = ("nccl", "gloo")
# GPU gradients are summed in flat buckets of this many bytes: one collective (one kernel launch) per
# bucket rather than per tensor, without a second copy of a large model's gradients at once.
BUCKET_BYTES = 32 << 20


class RankError(RuntimeError):
    """An unexpected error raised on another rank (its rank reports the original)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run (rank 0 of 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    _buckets: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    """Flat buffers the gradients are summed in, kept from step to step: allocating (and page-faulting)
    a fresh one per step cost a CPU rank more than the all-reduce itself."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes outputs, the record and the termination message, and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- splitting work --------------------------------------------------------------------------
    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` rows; the first ``n % world_size`` ranks take one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    # -- collectives (no-ops for one rank) ---------------------------------------------------------
    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace every gradient by its sum over the ranks.

        On a GPU the gradients are flattened into a few buckets; on the CPU each is summed in place,
        all at once: there the copies into and out of a bucket cost as much as gloo's reduction
        (docs/benchmarks.md, "Data-parallel runs")."""
        if not self.parallel:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if all(g.device.type == "cpu" for g in grads):
            for work in [dist.all_reduce(g, async_op=True) for g in grads]:
                work.wait()
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads:
            if bucket and (grad.dtype != bucket[0].dtype or grad.device != bucket[0].device):
                self._sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= BUCKET_BYTES:
                self._sum_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads: list[torch.Tensor]) -> None:
        numel = sum(g.numel() for g in grads)
        key = (grads[0].dtype, grads[0].device, numel)
        flat = self._buckets.get(key)
        if flat is None:
            flat = self._buckets[key] = torch.empty(numel, dtype=grads[0].dtype, device=grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        dist.all_reduce(flat)
        for grad, part in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (the epoch's loss total)."""
        if self.parallel:
            dist.all_reduce(tensor)
        return tensor

    def gather_rows(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's ``share(total)`` rows of a result, concatenated in rank order, on every rank."""
        if not self.parallel:
            return part
        longest = -(-total // self.world_size)
        padded = part.new_zeros((longest, *part.shape[1:]))
        padded[: part.shape[0]] = part
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        sizes = [Ranks(r, self.world_size).share(total) for r in range(self.world_size)]
        return torch.cat([piece[: s.stop - s.start] for piece, s in zip(pieces, sizes, strict=True)])

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank."""
        if not self.parallel:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def decide(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; every rank returns its value or raises its exception."""
        if not self.parallel:
            return fn()
        box: list[object] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box[0] = (None, fn())
            except Exception as caught:
                error = caught
                box[0] = (_portable(caught, self.rank), None)
        dist.broadcast_object_list(box, src=0)
        report, value = cast(tuple[_Portable | None, T], box[0])
        if report is not None:
            raise error if error is not None else _rebuilt(report)
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it raised anywhere, every rank raises the lowest rank's error."""
        if not self.parallel:
            return fn()
        value: T | None = None
        error: BaseException | None = None
        try:
            value = fn()
        except Exception as caught:
            error = caught
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, None if error is None else _portable(error, self.rank))
        first = next((cast(_Portable, r) for r in gathered if r is not None), None)
        if first is None:
            return cast(T, value)
        if error is not None and first[2] == self.rank:
            raise error
        if error is not None:
            log.error("%s also failed: %s", self, error)
        raise _rebuilt(first)


_Portable = tuple[str, str, int]
"""(kind, message, rank): an exception as another rank can rebuild it (exception objects may not pickle)."""


def _portable(error: BaseException, rank: int) -> _Portable:
    if isinstance(error, InvalidInputError):
        return ("invalid-input", str(error), rank)
    if isinstance(error, DivergedError):
        return ("diverged", str(error), rank)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return ("error", f"{type(error).__name__}: {first}", rank)


def _rebuilt(report: _Portable) -> Exception:
    kind, message, rank = report
    if kind == "invalid-input":
        return InvalidInputError(message)
    if kind == "diverged":
        return DivergedError(message)
    return RankError(f"rank {rank}: {message}")


# -- start-up ----------------------------------------------------------------------------------------


def ranks_from_env(environ: Mapping[str, str]) -> Ranks:
    """The ranks torchrun's variables describe; rank 0 of 1 without them (parsed in launch.py, torch-free)."""
    place = worker_place(environ)
    return Ranks(place.rank, place.world_size, place.local_rank, place.local_world_size)


def device_for(requested: str, ranks: Ranks, cuda_devices: int) -> torch.device:
    """The device of this rank: GPU ``local_rank`` (wrapping round when ranks outnumber GPUs), or the CPU.

    Several ranks on one GPU is for trying the path on a one-GPU machine; it needs the gloo backend.
    """
    if requested == "cpu" or (requested == "auto" and cuda_devices == 0):
        return torch.device("cpu")
    if cuda_devices == 0:
        raise InvalidInputError("--device cuda: no CUDA device is visible: use --device cpu or request a GPU")
    if not ranks.parallel:
        return torch.device("cuda")  # the current device, as a single process has always used
    return torch.device("cuda", ranks.local_rank % cuda_devices)


def backend_for(device: torch.device, ranks: Ranks, cuda_devices: int, requested: str | None = None) -> str:
    """NCCL when every local rank has a GPU of its own; gloo on the CPU or when ranks share a GPU (NCCL refuses)."""
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={requested!r}: expected one of {', '.join(BACKENDS)}")
        if requested == "nccl" and device.type != "cuda":
            raise ValueError(f"{ENV_BACKEND}=nccl needs CUDA devices; this rank runs on {device}")
        return requested
    if device.type == "cuda" and ranks.local_world_size <= cuda_devices:
        return "nccl"
    return "gloo"


def collective_timeout(environ: Mapping[str, str]) -> timedelta:
    seconds = env_int(environ, ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise ValueError(f"{ENV_TIMEOUT}={seconds}: must be at least 1 second")
    return timedelta(seconds=seconds)


def start(ranks: Ranks, device: torch.device, environ: Mapping[str, str] = os.environ) -> str | None:
    """Join the process group (several ranks only); the backend used, or None for one process."""
    if not ranks.parallel:
        return None
    cuda_devices = torch.cuda.device_count() if device.type == "cuda" else 0
    backend = backend_for(device, ranks, cuda_devices, environ.get(ENV_BACKEND) or None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = collective_timeout(environ)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    log.info("%s joined: backend %s on %s, collective timeout %ds", ranks, backend, device, timeout.total_seconds())
    return backend


def stop() -> None:
    """Leave the process group, if this process joined one.

    Never raises: the run's outcome is decided (and a model perhaps written) by then, and a peer
    that already left can make the teardown fail."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as error:
            log.warning("leaving the process group: %s", error)


@contextlib.contextmanager
def joined(ranks: Ranks, device: torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[str | None]:
    """The process group for the duration of a run (nothing for one process)."""
    backend = start(ranks, device, environ)
    try:
        yield backend
    finally:
        stop()
