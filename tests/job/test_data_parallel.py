"""Data-parallel runs on the CPU (gloo): N ranks compute what one process computes, and report once.

The tolerance and where it comes from. Every rank walks the same global
batches and the summed gradient is the global batch's mean gradient
(unlearn/distributed.py), so one process and two ranks differ only in the
order float sums are taken. In float64 that is visible at the last bits only:
every method ends within ``FLOAT64_TOLERANCE`` of the one-process weights
(measured: at most 1.4e-16). In float32, Adam divides each step by the root of
the gradient's second moment, so a weight whose gradient is nearly zero (and
thus mostly rounding) can take a different step: the weights agree within
``FLOAT32_TOLERANCE`` on the shortened methods (measured: 9.2e-7 for scrub,
9.7e-8 for calibrated, with and without the stopping rule, 3e-8 for the others;
1.8e-5 for scrub under its earlier schedule) and within
``REQUEST_WEIGHT_TOLERANCE`` after the whole default request (measured: 6.4e-6;
4.2e-4 under scrub's earlier schedule), where
the audit's numbers came out identical to four decimals. The ranks themselves
stay bit-identical: they apply the same summed gradients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.job.conftest import RunCli, request
from tests.job.ranks import DTYPES, RUNS, on_ranks, problem, run_methods
from unlearn import launch
from unlearn.distributed import Ranks, backend_for, device_for, ranks_from_env
from unlearn.errors import InvalidInputError
from unlearn.launch import Conclusion, RankExit, conclude, read_rank_record, worker_env, write_rank_record
from unlearning_contracts.record import ResultRecord

FLOAT64_TOLERANCE = 1e-12
FLOAT32_TOLERANCE = 1e-4
REQUEST_WEIGHT_TOLERANCE = 2e-3


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- pure parts ---------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 65])
def test_shares_cover_every_row_once_and_differ_by_at_most_one(world: int, n: int) -> None:
    shares = [Ranks(rank, world).share(n) for rank in range(world)]
    rows = [row for s in shares for row in range(s.start, s.stop)]
    assert rows == list(range(n))  # contiguous, in rank order, nothing twice
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, Ranks()),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, Ranks(1, 4, 1, 4)),
        # Two nodes of two: the global rank and the rank on this node differ.
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, Ranks(3, 4, 1, 2)),
    ],
)
def test_ranks_from_torchrun_environment(environ: dict[str, str], expected: Ranks) -> None:
    assert ranks_from_env(environ) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    "environ",
    [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "0"}],
)
def test_inconsistent_rank_environment_is_refused_with_what_sets_it(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="torchrun"):
        ranks_from_env(environ)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "local_rank", "gpus", "device", "backend"),
    [
        ("auto", 0, 0, "cpu", "gloo"),
        ("cuda", 0, 1, "cuda", None),  # one process: the current device, no process group
        ("cpu", 1, 4, "cpu", "gloo"),
        ("auto", 3, 4, "cuda:3", "nccl"),
        ("cuda", 1, 4, "cuda:1", "nccl"),
        # Two ranks on one GPU (trying the path on a one-GPU machine): NCCL refuses a shared device.
        ("auto", 1, 1, "cuda:0", "gloo"),
    ],
)
def test_device_and_backend_per_rank(
    requested: str, local_rank: int, gpus: int, device: str, backend: str | None
) -> None:
    world = 1 if backend is None else 4 if gpus >= 4 else 2
    ranks = Ranks(local_rank, world, local_rank, world)
    chosen = device_for(requested, ranks, gpus)
    assert str(chosen) == device
    if backend is not None:
        assert backend_for(chosen, ranks, gpus) == backend


@pytest.mark.unit
def test_asking_for_cuda_without_one_or_nccl_on_the_cpu_says_what_to_do() -> None:
    with pytest.raises(InvalidInputError, match="--device cpu"):
        device_for("cuda", Ranks(), 0)
    with pytest.raises(ValueError, match="needs CUDA"):
        backend_for(torch.device("cpu"), Ranks(0, 2, 0, 2), 0, "nccl")


@pytest.mark.unit
def test_workers_get_torchruns_variables() -> None:
    env = worker_env({"PATH": "/bin"}, 1, 4, 29500, Path("/tmp/r/rank-1.json"))
    assert env["PATH"] == "/bin"
    assert ranks_from_env(env) == Ranks(1, 4, 1, 4)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
    assert env["UNLEARN_RANK_RECORD"] == "/tmp/r/rank-1.json"


@pytest.mark.unit
def test_a_rank_record_round_trips_and_a_missing_or_torn_one_reads_as_none(tmp_path: Path) -> None:
    record = ResultRecord(
        request_id="R", request_name="r", namespace="n", model="m", method="scrub", verdict="Failed", exit_code=1,
        error="unexpected error: X", started_at="t0", finished_at="t1", world_size=2,
    )  # fmt: skip
    path = tmp_path / "rank-1.json"
    write_rank_record(path, record, 12.5)
    found, failed_at = read_rank_record(path)
    assert failed_at == 12.5
    assert found is not None
    assert (found["error"], found["worldSize"]) == ("unexpected error: X", 2)
    assert read_rank_record(tmp_path / "none.json") == (None, None)
    path.write_text('{"failedAt": 1.0, "rec')
    assert read_rank_record(path) == (None, None)


@pytest.mark.unit
def test_the_launcher_does_not_import_torch() -> None:
    # It runs as the pod's first process beside N ranks: no seconds of import, no GPU memory of its own.
    probe = "import sys, unlearn.cli, unlearn.launch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# A worker that stands for a rank: rank 0 reports Passed and leaves; rank 1 starts a child of its own, then
# hangs (as a rank stuck in a collective or in the teardown would).
_HANGING_RANK = """
import json, os, subprocess, sys, time
rank = int(os.environ["RANK"])
if rank == 0:
    record = {"exitCode": 0, "verdict": "Passed"}
    open(os.environ["UNLEARN_RANK_RECORD"], "w").write(json.dumps({"failedAt": None, "record": record}))
    sys.exit(0)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.unit
def test_the_launcher_leaves_no_rank_behind_once_rank_0_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "GRACE_SECONDS", 1.0)
    child_pid = tmp_path / "child.pid"
    started = time.monotonic()
    workers = launch._Workers([sys.executable, "-c", _HANGING_RANK, str(child_pid)], 2, tmp_path)
    exits = workers.wait()
    assert time.monotonic() - started < 30  # not the 600 s the hanging rank would take
    assert sorted((e.rank, e.code) for e in exits) == [(0, 0), (1, -signal.SIGTERM)]
    assert conclude(exits, 2) == Conclusion(0)  # rank 0's outcome stands
    deadline = time.monotonic() + 10
    while _running(int(child_pid.read_text())):  # the hanging rank's own child went with it
        assert time.monotonic() < deadline, "a process of a rank was left behind"
        time.sleep(0.1)


def _record(code: int, error: str | None = None) -> dict[str, Any]:
    return {"exitCode": code, "verdict": "Passed" if code == 0 else "Failed", **({"error": error} if error else {})}


CLOSED = _record(1, "unexpected error: RuntimeError: Connection closed by peer")  # what a survivor of a dead peer says
OOM = _record(1, "unexpected error: OutOfMemoryError: CUDA out of memory")
FULL = _record(4, "scratch space /tmp holds 3700 MiB")
KILLED_1 = RankExit(1, -9, None, 10.0, killed=True)
SAYS_KILLED_1 = Conclusion(1, "rank 1 of 2 was killed by SIGKILL (out of memory?)", KILLED_1)
OOM_1 = RankExit(1, 1, OOM, 10.0)
SAYS_OOM_1 = Conclusion(1, "rank 1 of 2: unexpected error: OutOfMemoryError: CUDA out of memory", OOM_1)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exits", "expected"),
    [
        # Every rank ended well: rank 0's record and code stand (gates failed is a decided outcome, not a crash).
        ([RankExit(1, 0), RankExit(0, 0, _record(0))], Conclusion(0)),
        ([RankExit(0, 3, _record(3)), RankExit(1, 0)], Conclusion(3)),
        ([RankExit(0, 4, _record(4, "output.location: x")), RankExit(1, 0)], Conclusion(4)),
        # Rank 0 decided, then another rank failed while leaving: the outcome stands.
        ([RankExit(0, 0, _record(0)), RankExit(1, -9, None, 12.0, killed=True)], Conclusion(0)),
        # Rank 1 was killed; rank 0 then failed on the broken collective, even if its word came first.
        (
            [KILLED_1, RankExit(0, 1, CLOSED, 10.5)],
            SAYS_KILLED_1,
        ),
        (
            [RankExit(0, 1, CLOSED, 9.9), KILLED_1],
            SAYS_KILLED_1,
        ),
        # Rank 1 failed on its own and left; rank 0, frozen in a collective, was stopped by the launcher.
        (
            [OOM_1, RankExit(0, -15, None, 25.0)],
            SAYS_OOM_1,
        ),
        # The order of exits does not matter, the order of failures does: rank 1 failed first.
        (
            [RankExit(0, 1, CLOSED, 10.2), OOM_1],
            SAYS_OOM_1,
        ),
        # Rank 0 failed first, on its own, and said so: its record stands, though rank 1 exited before it.
        ([RankExit(1, 1, CLOSED, 10.2), RankExit(0, 1, OOM, 10.0)], Conclusion(1)),
        ([RankExit(0, 1, _record(1, "unexpected error: OSError: disk full"), 3.0), RankExit(1, 0)], Conclusion(1)),
        # Rank 1 found its scratch space full (invalid input of its own): exit code 4, as one process would end.
        (
            [RankExit(1, 4, FULL, 10.0), RankExit(0, 1, CLOSED, 10.4)],
            Conclusion(4, "rank 1 of 2: scratch space /tmp holds 3700 MiB", RankExit(1, 4, FULL, 10.0)),
        ),
        # Rank 0 died without a record.
        (
            [RankExit(0, -11, None, 4.0, killed=True), RankExit(1, -15, None, 20.0)],
            Conclusion(1, "rank 0 of 2 was killed by SIGSEGV", RankExit(0, -11, None, 4.0, killed=True)),
        ),
        (
            [RankExit(1, 0), RankExit(0, 2, None, 4.0)],
            Conclusion(1, "rank 0 of 2 exited with code 2 without a result record", RankExit(0, 2, None, 4.0)),
        ),
    ],
)
def test_what_the_pod_reports_from_its_ranks_exits(exits: list[RankExit], expected: Conclusion) -> None:
    assert conclude(exits, 2) == expected


# -- the engine on two ranks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return on_ranks(2, tmp_path_factory.mktemp("ranks"))


@pytest.mark.job
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_method_on_two_ranks_matches_one_process(two_ranks: list[dict[str, Any]], dtype: torch.dtype) -> None:
    one = run_methods(Ranks(), dtype)
    original = problem(dtype)[0]
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    for method in RUNS:
        rank0, rank1 = (r["weights"][str(dtype)][method] for r in two_ranks)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"{method}: the ranks drifted apart"
        difference = max_difference(one[method], rank0)
        assert difference <= tolerance, method
        # And the method did something: the weights moved, and far more than the two runs differ.
        assert max_difference(one[method], original) > max(1e-4, 10 * difference), method
    # The stopping rule took the same decisions on both ranks as in one process: as many steps and checks,
    # the same chosen step, the same estimate (decided on rank 0 from logits gathered from both).
    monitored = [key for key in one if key.endswith(" monitor")]
    assert monitored == ["calibrated+stopping monitor"]
    for key in monitored:
        rank0, rank1 = (r["weights"][str(dtype)][key] for r in two_ranks)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), key
        assert all(torch.equal(one[key][k], rank0[k]) for k in ("steps", "checks", "chosen")), (one[key], rank0)
        assert float(one[key]["estimate"]) == pytest.approx(float(rank0["estimate"]), rel=1e-4)
        assert int(rank0["checks"]) >= 3  # the rule ran (step 0, then every 2 steps)


@pytest.mark.job
def test_ranks_share_errors_and_decisions(two_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (r["errors"] for r in two_ranks)
    # An invalid input found on rank 1 alone ends both ranks with its message.
    assert rank0["agree, invalid input on rank 1"] == ("InvalidInputError", "data.train: x")
    assert rank1["agree, invalid input on rank 1"] == ("InvalidInputError", "data.train: x")
    # Without an error each rank keeps its own value.
    assert (rank0["agree, nothing raised"], rank1["agree, nothing raised"]) == (("returned", "0"), ("returned", "10"))
    # Rank 0 decides for all; its error reaches the others as an error of rank 0.
    assert rank1["decide, rank 0 returns"] == ("returned", "'rank 0 decided'")
    assert rank0["decide, rank 0 raises"] == ("ValueError", "bad numbers")
    assert rank1["decide, rank 0 raises"] == ("RankError", "rank 0: ValueError: bad numbers")


# -- the job on two ranks -----------------------------------------------------------------------------


PERCENT = {
    "forgetAccuracy": "forget",
    "retainAccuracy": "retain",
    "testAccuracy": "heldout",
    "testAccuracyDrop": "heldout",
    "miaEfficacy": "forget",
}
"""Audit numbers in percent of a set's samples: one sample that tips the other way moves them by 100 / n
(a drop, before minus after, by up to twice that)."""


def _leaves(numbers: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) for every number of an audit, nested ones (intervals, sample counts) included."""
    for key, value in numbers.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def run_launcher(
    tmp: Path, manifest: dict[str, Any], *args: str, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``unlearn run --nproc-per-node 2`` as the Job runs it: a process of its own."""
    path = tmp / "request.yaml"
    path.write_text(yaml.safe_dump(manifest))
    command = [sys.executable, "-m", "unlearn.cli", "run", str(path), "--device", "cpu", "--nproc-per-node", "2"]
    command += ["--termination-log", str(tmp / "termination-log"), *args]
    env = {**os.environ, "UNLEARN_COLLECTIVE_TIMEOUT_S": "300"}
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr)


@pytest.mark.job
def test_the_request_on_two_processes_gives_the_one_process_result_once(
    demo_root: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    model = str(demo_root / "models" / "digits" / "digits-mlp.pt2")
    one = run_cli(request(model, str(tmp_path / "one")))
    assert one.code == 0, one.stderr
    proc = run_launcher(tmp_path, request(model, str(tmp_path / "two")), "--result", str(tmp_path / "result.json"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr

    # Written once: one model, one record beside it, no temporary files; one table printed.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["digits-mlp-v1.json", "digits-mlp-v1.pt2"]
    assert stdout.count("verdict Passed") == 1
    termination = json.loads((tmp_path / "termination-log").read_text())
    record = json.loads((tmp_path / "result.json").read_text())
    assert termination["worldSize"] == record["worldSize"] == record["config"]["worldSize"] == 2
    assert one.record is not None
    assert one.record["worldSize"] == 1
    assert "[rank 1]" not in stderr  # the other rank says nothing unless something goes wrong

    # The same numbers: percentages within one sample of the set they count (their intervals too), counts
    # exact, the rest within 1e-3.
    for phase in ("pre", "post"):
        ours, theirs = dict(_leaves(one.record[phase])), dict(_leaves(record[phase]))
        assert ours.keys() == theirs.keys(), phase
        samples = one.record[phase]["samples"]
        for path, value in ours.items():
            percent = next((key for key in PERCENT if key in path), None)
            if isinstance(value, int):
                assert theirs[path] == value, (phase, path)
            elif percent is not None:
                one_sample = 100 / samples[PERCENT[percent]]
                slack = 2 * one_sample if percent.endswith("Drop") else one_sample
                assert abs(theirs[path] - value) <= slack + 1e-9, (phase, path)
            else:
                assert theirs[path] == pytest.approx(value, abs=1e-3), (phase, path)
    saved = [torch.export.load(tmp_path / d / "digits-mlp-v1.pt2").module().state_dict() for d in ("one", "two")]
    assert max_difference(*saved) <= REQUEST_WEIGHT_TOLERANCE


@pytest.mark.job
def test_calibrated_unlearning_on_two_processes_takes_the_one_process_decisions(
    demo_root: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    # The calibrated method under its stopping rule (without a bank: the fallback targets, which the rule
    # runs on too): the same steps, the same chosen step, the same evidence and verdict as one process.
    model = str(demo_root / "models" / "digits" / "digits-mlp.pt2")
    spec = {"method": {"name": "calibrated"}, "tuning": {"maxAttempts": 1}}
    one = run_cli(request(model, str(tmp_path / "one"), spec=spec))
    assert one.record is not None, one.stderr
    proc = run_launcher(
        tmp_path, request(model, str(tmp_path / "two"), spec=spec), "--result", str(tmp_path / "result.json")
    )
    _, stderr = proc.communicate(timeout=600)
    record = json.loads((tmp_path / "result.json").read_text())
    assert proc.returncode == one.code, stderr
    assert (record["worldSize"], record["method"], record["verdict"]) == (2, "calibrated", one.record["verdict"])
    ours, theirs = one.record["evidence"], record["evidence"]
    assert ours["steps"] > 0  # the rule ran
    assert (theirs["steps"], theirs["chosenStep"]) == (ours["steps"], ours["chosenStep"])
    assert (theirs["targets"], theirs["calibrated"]) == (ours["targets"], ours["calibrated"]) == ("fallback", False)
    samples = one.record["post"]["samples"]["forget"]
    assert abs(theirs["forgetAccuracy"] - ours["forgetAccuracy"]) <= 100 / samples + 1e-9
    assert theirs["estimatedGap"] == pytest.approx(ours["estimatedGap"], abs=0.05)


@pytest.mark.job
def test_a_request_the_preflight_refuses_starts_no_rank(demo_root: Path, tmp_path: Path) -> None:
    # The launcher checks the request once, without torch, before it starts a rank: one line, one record.
    (tmp_path / "taken").write_text("a file where the output folder should be")
    model = str(demo_root / "models" / "digits" / "digits-mlp.pt2")
    proc = run_launcher(tmp_path, request(model, str(tmp_path / "taken")))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    taken = tmp_path / "taken"
    assert len(errors) == 1
    assert errors[0].startswith(f"error: output.location {taken}: {taken} is a regular file, not a folder")
    assert "starting 2 data-parallel processes" not in stderr
    assert "[rank" not in stderr
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert (termination["exitCode"], termination["worldSize"]) == (4, 2)
    assert termination["error"] == errors[0].removeprefix("error: ")


def _infinite_model(path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))


@pytest.mark.job
def test_invalid_input_found_on_rank_0_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    # Past the preflight: the pre-audit's numbers are computed on rank 0 alone, which finds the model's
    # outputs infinite; rank 1, waiting for those numbers, gets the refusal and ends without a word.
    model = tmp_path / "inf.pt2"
    _infinite_model(model)
    started = time.monotonic()
    proc = run_launcher(tmp_path, request(str(model), str(tmp_path / "out")))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 4, stderr
    assert time.monotonic() - started < 120  # no collective waited for its timeout (300 s here)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.source {model}: the model gives non-finite outputs"]
    assert "[rank 1]" not in stderr
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert (termination["exitCode"], termination["worldSize"]) == (4, 2)
    assert termination["error"] == errors[0].removeprefix("error: ")
    assert not (tmp_path / "out").exists()  # nothing published, not even an empty folder


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker of this rank, once it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.job
def test_a_rank_killed_mid_run_ends_the_pod_with_one_line_and_a_record(demo_root: Path, tmp_path: Path) -> None:
    model = str(demo_root / "models" / "digits" / "digits-mlp.pt2")
    # A long retraining, so that the ranks are still in their loop when one dies.
    spec = {"method": {"name": "retrain", "retain": {"epochs": 1000}}}
    log = tmp_path / "stderr"
    with log.open("w") as stderr_file:
        proc = run_launcher(tmp_path, request(model, str(tmp_path / "out"), spec=spec), stderr=stderr_file)
    try:
        deadline = time.monotonic() + 500
        while "retrain epoch 1/" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the ranks never started training"
            time.sleep(0.5)
        rank0, rank1 = _worker(proc.pid, 0), _worker(proc.pid, 1)
        assert rank0 is not None
        assert rank1 is not None
        # Rank 0 frozen, as a rank waiting on a dead peer under NCCL would be: it cannot notice on its own,
        # so the launcher must end it. Then rank 1 dies as the out-of-memory killer would kill it.
        os.kill(rank0, signal.SIGSTOP)
        os.kill(rank1, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 was killed by SIGKILL (out of memory?)"]
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert (termination["exitCode"], termination["verdict"]) == (1, "Failed")
    assert termination["error"] == "rank 1 of 2 was killed by SIGKILL (out of memory?)"
    assert (termination["worldSize"], termination["requestId"]) == (2, "TEST-1")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.pt2"))
    assert _worker(proc.pid, 0) is None  # no rank left behind
