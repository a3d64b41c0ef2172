"""``unlearn run --nproc-per-node N``: N worker processes in this pod, reported as one job.

The workers get torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the
job runs the same under ``torchrun --standalone --nproc-per-node N -m unlearn.cli
run ...``. This launcher exists for two things torchrun does not keep:

* **The exit code.** The job's exit code is a contract (0 Passed, 3 gates
  failed, 4 invalid input, anything else retryable) that the Job's
  podFailurePolicy acts on. torchrun reports any worker's non-zero exit as its
  own exit code 1, which would retry a gates-failed run until backoffLimit.
  Here the pod exits with rank 0's code, and rank 0's record stands whenever
  it reached a decided outcome (the ranks agree on every decision before it).
* **One clear failure.** When a rank dies (killed, out of memory, an error of
  its own), the others may wait in a collective until its timeout: NCCL does
  not notice a dead peer. The launcher sees the death at once, gives the
  survivors ``GRACE_SECONDS`` to end on their own, stops them, prints one line
  naming the rank and its error, writes the compact failure record to the
  termination message, and exits with 1 (retryable).

Each worker leaves its compact record in a private file
(``UNLEARN_RANK_RECORD``), with the moment its run failed, which is how the
launcher learns a failed rank's error and tells the cause from its
consequences (``conclude``). The launcher imports no torch (it starts at once and holds no GPU
memory) and waits only on its own workers (their process group), so it can
run as PID 1 of a container or inside another program.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from unlearn.draft import RecordDraft
from unlearning_contracts.record import EXIT_GATES_FAILED, EXIT_INVALID_INPUT, EXIT_PASSED, ResultRecord, compact

ENV_RANK_RECORD = "UNLEARN_RANK_RECORD"
EXIT_UNEXPECTED = 1
DECIDED_EXIT_CODES = (EXIT_PASSED, EXIT_GATES_FAILED, EXIT_INVALID_INPUT)
"""Outcomes every rank agreed on: the record rank 0 wrote for them stands."""
GRACE_SECONDS = 15.0
"""After a rank fails, how long the others may take to notice and end on their own (gloo notices at once)."""
STOP_SECONDS = 5.0
"""After SIGTERM, how long a rank may take before SIGKILL."""


def worker_env(base: Mapping[str, str], rank: int, world: int, port: int, record: Path) -> dict[str, str]:
    """The environment of worker ``rank``: torchrun's variables for one node, and where it leaves its record."""
    env = dict(base)
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            ENV_RANK_RECORD: str(record),
        }
    )
    return env


def in_worker(environ: Mapping[str, str]) -> bool:
    """Started by torchrun or by this launcher (as opposed to by a person or the Job)."""
    return "RANK" in environ and "WORLD_SIZE" in environ


@dataclass(frozen=True)
class WorkerPlace:
    """Where torchrun's variables put this process (rank 0 of 1 without them); no torch needed to read it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer (it is set by torchrun or unlearn's launcher)") from None


def worker_place(environ: Mapping[str, str]) -> WorkerPlace:
    """The place torchrun's variables describe; rank 0 of 1 without them. ValueError when they disagree."""
    world = env_int(environ, "WORLD_SIZE", 1)
    rank = env_int(environ, "RANK", 0)
    local_rank = env_int(environ, "LOCAL_RANK", rank)
    local_world = env_int(environ, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world <= world:
        raise ValueError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}, WORLD_SIZE={world}: "
            "inconsistent (start the job with torchrun or unlearn run --nproc-per-node)"
        )
    return WorkerPlace(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


@dataclass(frozen=True)
class RankExit:
    """How one worker ended."""

    rank: int
    code: int
    """Its exit status; negative: killed by that signal (as ``subprocess`` reports it)."""
    record: dict[str, Any] | None = None
    """The compact record it left, if it got that far."""
    failed_at: float = 0.0
    """``time.monotonic()`` when its run failed: its own word, or when the launcher saw it die."""
    killed: bool = False
    """Killed by a signal that the launcher did not send (the out-of-memory killer, a person)."""


def write_rank_record(path: Path, record: ResultRecord, failed_at: float | None) -> None:
    """A worker's report to the launcher: its compact record and when its run failed (None: it did not)."""
    path.write_text(json.dumps({"failedAt": failed_at, "record": json.loads(compact(record))}))


def read_rank_record(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """(the compact record, when the run failed) a worker left; (None, None) if it left none."""
    try:
        report = json.loads(path.read_text())
        record, failed_at = report["record"], report["failedAt"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if not isinstance(record, dict) or not isinstance(failed_at, int | float | None):
        return None, None
    return record, failed_at


@dataclass(frozen=True)
class Conclusion:
    exit_code: int
    failure: str | None = None
    """None: rank 0's record stands. Else the one line of the record the launcher writes."""
    failed: RankExit | None = None


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with code {code} without a result record"


def _decided(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("exitCode") in DECIDED_EXIT_CODES


def failed(e: RankExit) -> bool:
    """Rank 0 without a decided record, or another rank that exited non-zero (it failed on its own)."""
    return not _decided(e.record) if e.rank == 0 else e.code != 0


def conclude(exits: Sequence[RankExit], world: int) -> Conclusion:
    """What the pod reports, from how each worker ended.

    1. Rank 0 left a record of a decided outcome (Passed, gates failed, invalid input):
       it stands, with its exit code, whatever happened to the others afterwards.
    2. Otherwise the rank that failed first is the cause: once one rank fails and leaves, the
       others' next collective fails too, later. A rank killed by a signal the launcher did
       not send comes first (no other rank's failure kills a process); then the failures by
       when each happened. When the cause is rank 0 and it left a record of its own error,
       that record stands; else the launcher writes one naming the rank.
    """
    main = next((e for e in exits if e.rank == 0), None)
    if main is not None and _decided(main.record):
        return Conclusion(int(main.record["exitCode"]))  # type: ignore[index]
    first = min((e for e in exits if failed(e)), key=lambda e: (not e.killed, e.failed_at), default=None)
    if first is None:  # rank 0 never ended (cannot happen once every rank is reaped)
        return Conclusion(EXIT_UNEXPECTED, f"rank 0 of {world} {_describe(EXIT_UNEXPECTED)}")
    if first.rank == 0 and first.record is not None:
        return Conclusion(int(first.record.get("exitCode") or EXIT_UNEXPECTED))
    error = (first.record or {}).get("error")
    who = f"rank {first.rank} of {world}"
    line = f"{who}: {error}" if error else f"{who} {_describe(first.code)}"
    # A rank that found invalid input of its own (its scratch space full) ends the pod as one process would.
    return Conclusion(EXIT_INVALID_INPUT if first.code == EXIT_INVALID_INPUT else EXIT_UNEXPECTED, line, first)


_KEPT_FIELDS = (
    "modelVersion",
    "inputModel",
    "forgetSamples",
    "forgetDigest",
    "device",
    "durationSeconds",
)
"""What a failed rank's own record says that stays true in the launcher's record of the failure."""


def failure_record(
    draft: RecordDraft, line: str, rank_record: dict[str, Any] | None, exit_code: int = EXIT_UNEXPECTED
) -> str:
    """The compact record of a run that a rank's failure ended (what the operator puts in status).

    ``draft`` is the launcher's own (started when the pod did, with the world size); what the failed
    rank had learnt (the version, the input model, the forget set, the device, its phase timings) is kept."""
    fields = draft.failed(exit_code, line).dump()
    kept = {key: rank_record[key] for key in _KEPT_FIELDS if rank_record and key in rank_record}
    if isinstance(kept.get("durationSeconds"), dict):
        kept["durationSeconds"] = {**kept["durationSeconds"], "total": fields["durationSeconds"]["total"]}
    return compact(ResultRecord.model_validate({**fields, **kept}))


def _free_port() -> int:
    """A port free now on the loopback interface (rank 0's store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Workers:
    """The worker processes, in a process group of their own so that waiting sees only them."""

    def __init__(self, command: Sequence[str], world: int, folder: Path) -> None:
        self.world = world
        self.records = [folder / f"rank-{rank}.json" for rank in range(world)]
        port = _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        group = 0
        for rank in range(world):
            env = worker_env(os.environ, rank, world, port, self.records[rank])
            proc = subprocess.Popen(list(command), env=env, process_group=group)
            group = group or proc.pid
            self.procs.append(proc)
        self.group = group
        self.rank_of = {proc.pid: rank for rank, proc in enumerate(self.procs)}
        self.alive = set(self.rank_of)
        self.signalled = False

    def signal_all(self, signum: int) -> None:
        """``signum`` to the workers' whole process group: what a rank started (compile workers) goes too."""
        self.signalled = True
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)

    def reap(self, block: bool) -> RankExit | None:
        """The next worker to have ended (in the order they ended), or None when none has (``block=False``)."""
        flags = os.WEXITED | (0 if block else os.WNOHANG)
        try:
            info = os.waitid(os.P_PGID, self.group, flags)
        except ChildProcessError:
            return None
        if info is None:
            return None
        seen = time.monotonic()
        rank = self.rank_of[info.si_pid]
        self.alive.discard(info.si_pid)
        code = -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status
        self.procs[rank].returncode = code  # reaped here: keep Popen from waiting on it again
        record, failed_at = read_rank_record(self.records[rank])
        killed = code < 0 and not self.signalled
        return RankExit(rank, code, record, seen if failed_at is None else failed_at, killed)

    def wait(self) -> list[RankExit]:
        """Every worker's exit, in order.

        After a failure, or once rank 0 has ended (nothing the others could still do matters then),
        the others get a grace period to end on their own, then are stopped: no rank is left behind,
        and the launcher never waits on one that hangs."""
        exits: list[RankExit] = []
        deadline: float | None = None
        stopping = False
        while self.alive:
            ended = self.reap(block=deadline is None)
            if ended is not None:
                exits.append(ended)
                if deadline is None and self.alive and (failed(ended) or ended.rank == 0):
                    deadline = time.monotonic() + GRACE_SECONDS
                continue
            if deadline is not None and time.monotonic() > deadline:
                self.signal_all(signal.SIGTERM if not stopping else signal.SIGKILL)
                deadline, stopping = time.monotonic() + STOP_SECONDS, True
            time.sleep(0.05)
        return exits


def launch(
    argv: Sequence[str],
    world: int,
    termination: Path | None,
    failure_record: Callable[[str, dict[str, Any] | None, int], str],
) -> int:
    """Run ``unlearn <argv>`` as ``world`` ranks; the pod's exit code.

    ``failure_record(line, rank_record, exit_code)`` gives the compact record to write when the
    launcher reports a failure itself (from the failed rank's record, if it left one).
    """
    with tempfile.TemporaryDirectory(prefix="unlearn-ranks-") as folder:
        workers = _Workers([sys.executable, "-m", "unlearn.cli", *argv], world, Path(folder))

        def forward(signum: int, frame: FrameType | None) -> None:
            workers.signal_all(signum)  # the pod is stopping: the workers stop with it

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            exits = workers.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    result = conclude(exits, world)
    if result.failure is not None:
        print(f"error: {result.failure}", file=sys.stderr)
        if termination is not None:
            rank_record = result.failed.record if result.failed else None
            termination.write_text(failure_record(result.failure, rank_record, result.exit_code))
    return result.exit_code
