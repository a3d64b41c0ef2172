"""Every bad input ends clean: exit code, one line naming the field or file, nothing published, inputs unchanged.

The cases are in tests/job/bad_inputs.py (real files, a real manifest, the
real CLI: in this process, or as a separate process where a process limit or
an import must be observed); docs/reliability.md's table is generated from
the same list. For every case this checks:

* the exit code, and exactly one ``error:`` line whose text is the case's
  message (paths replaced by placeholders), with no traceback or torch
  warning around it;
* the compact record in the termination log (at most 4 KiB) and the full
  record (``--result``) carry the same message and no output model;
* the workspace, every claim and the folder outside them, is byte for byte
  what it was: nothing published, no empty output folder, no input changed;
* a refusal before torch never reached the runner (and, run as a process,
  never imported torch).

Divergence is not bad input (a failed attempt, exit 3), and an unexpected
error is retryable: both are tested at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.job import bad_inputs
from tests.job.bad_inputs import CASES, SIDE_EFFECT, SIDE_EFFECT_ENV, Case, Work, matches, normalise
from tests.job.conftest import RunCli, request
from unlearn import cli, runner
from unlearn.demo import mlp
from unlearning_contracts.record import EXIT_GATES_FAILED, EXIT_INVALID_INPUT, TERMINATION_MESSAGE_LIMIT

pytestmark = pytest.mark.job

ROOT = Path(__file__).resolve().parents[2]
# Run as a process: the CLI's own main, reporting at the end whether torch was imported.
PROBE = (
    "import sys\n"
    "from unlearn import cli\n"
    "code = cli.main(sys.argv[1:])\n"
    "sys.stderr.write('probe: torch imported\\n' if 'torch' in sys.modules else 'probe: torch not imported\\n')\n"
    "sys.exit(code)\n"
)


@dataclass
class Ran:
    code: int
    stderr: str
    record: dict[str, Any] | None
    termination: str | None
    reached_runner: bool


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: its kind and, for a file, its sha256; links by target, never followed."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[key] = f"link {os.readlink(path)}"
            elif stat.S_ISREG(info.st_mode):
                found[key] = "file " + hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = f"mode {stat.S_IFMT(info.st_mode)}"
    return found


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[None]:
    # The full output claim is a real small filesystem, so the job tier needs root (as CI and make test run);
    # elsewhere the case fails saying so rather than checking nothing.
    if os.geteuid() != 0:
        pytest.fail("the disk-full case mounts a tmpfs as its full claim: run the job tier as root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.fail("mounting a tmpfs for the disk-full case was refused: run the job tier where root may mount")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _argv(work: Work, manifest: Path, report: Path) -> list[str]:
    return [
        "run",
        str(manifest),
        "--volume-root",
        str(work.volumes),
        "--device",
        "cpu",
        "--model-version",
        "1",
        "--result",
        str(report / "result.json"),
        "--termination-log",
        str(report / "termination-log"),
        *work.args,
    ]


def write_manifest(work: Work) -> Path:
    if work.manifest_path is not None:
        return work.manifest_path
    manifest = work.root / "request.yaml"
    manifest.write_text(work.manifest_text if work.manifest_text is not None else work.valid_yaml())
    return manifest


def run_case(
    case: Case, work: Work, report: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Ran:
    argv = _argv(work, write_manifest(work), report)
    reached = False
    if case.subprocess:
        limit = work.rlimit_fsize

        def limits() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        done = subprocess.run(
            [sys.executable, "-c", PROBE, *argv],
            env={**os.environ, **work.env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=limits,
            check=False,
        )
        code, stderr = done.returncode, done.stderr
        reached = "probe: torch imported" in stderr
        assert reached or "probe: torch not imported" in stderr, stderr[-2000:]
    else:
        for name, value in work.env.items():
            monkeypatch.setenv(name, value)
        real_run = runner.run

        def spy(*args: Any, **kwargs: Any) -> runner.Outcome:
            nonlocal reached
            reached = True
            return real_run(*args, **kwargs)

        monkeypatch.setattr(runner, "run", spy)
        code = cli.main(argv)
        stderr = capsys.readouterr().err
    result, termination = report / "result.json", report / "termination-log"
    record = json.loads(result.read_text()) if result.exists() else None
    text = termination.read_text() if termination.exists() else None
    return Ran(code, stderr, record, text, reached)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_clean(
    case: Case, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, report = tmp_path / "work", tmp_path / "report"
    root.mkdir()
    report.mkdir()
    work = Work(root, demo_root / "models" / "digits" / "digits-mlp.pt2")
    with contextlib.ExitStack() as stack:
        if case.id == "disk-full-tmpfs":
            stack.enter_context(tmpfs(work.claim("out"), 256 * 1024))
        case.build(work)
        write_manifest(work)
        before = snapshot(root)
        ran = run_case(case, work, report, capsys, monkeypatch)
        after = snapshot(root)

    assert ran.code == case.exit_code, ran.stderr[-3000:]
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, ran.stderr[-3000:]
    message = normalise(errors[0].removeprefix("error: "), root)
    assert matches(message, case.message), f"\n got: {message}\nwant: {case.message}"
    noise = [
        line
        for line in ran.stderr.splitlines()
        if "Traceback" in line or (line[:1] in ("W", "E") and line[1:5].isdigit())
    ]
    assert noise == [], noise  # no torch warning or traceback before the one line

    assert ran.termination is not None
    assert len(ran.termination.encode()) <= TERMINATION_MESSAGE_LIMIT
    compact = json.loads(ran.termination)
    assert compact["exitCode"] == case.exit_code
    assert normalise(compact["error"], root) == message
    if case.stage == "manifest":
        assert ran.record is None  # no manifest, no record: the termination message says why
    else:
        assert ran.record is not None
        assert normalise(ran.record["error"], root) == message
        assert ran.record["exitCode"] == case.exit_code
        assert ran.record["verdict"] == "Failed"
        assert "outputModel" not in ran.record
        assert "outputModel" not in compact

    assert after == before  # nothing published, no folder created, no input changed
    before_torch = case.stage in ("manifest", "preflight")
    assert ran.reached_runner is not before_torch


def test_the_table_has_every_case_once_and_enough_of_them() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    assert sum(case.issue for case in CASES) >= 20


def test_the_docs_table_is_the_generated_one() -> None:
    doc = bad_inputs.DOC.read_text()
    assert doc == bad_inputs.with_table(doc), "regenerate it: python -m tests.job.bad_inputs --docs docs/reliability.md"


def test_an_allowed_factory_is_imported_and_a_refused_one_is_not(demo_root: Path, tmp_path: Path) -> None:
    """The side-effect module does write its file when allowed: the refusal's check above can fail."""
    for allowed, imported in (("tests.job.side", False), (SIDE_EFFECT, True)):
        root, report = tmp_path / allowed / "work", tmp_path / allowed / "report"
        root.mkdir(parents=True)
        report.mkdir()
        work = Work(root, demo_root / "models" / "digits" / "digits-mlp.pt2")
        bad_inputs._state_dict_model(work, {"factory": f"{SIDE_EFFECT}:build"})
        marker = tmp_path / allowed / "imported"
        manifest = root / "request.yaml"
        manifest.write_text(work.valid_yaml())
        argv = [*_argv(work, manifest, report), "--allow-factory", allowed]
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *argv],
            env={**os.environ, SIDE_EFFECT_ENV: str(marker)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert marker.exists() is imported, done.stderr[-2000:]
        assert (done.returncode == EXIT_INVALID_INPUT) is not imported, done.stderr[-2000:]


def test_a_record_that_cannot_be_reported_publishes_nothing(
    demo_root: Path, tmp_path: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compact record is built before anything is published (the spec's byte bounds make it always fit)."""

    def too_big(record: Any) -> str:
        raise ValueError("compact record is 5000 bytes, over 4096")

    monkeypatch.setattr(runner, "compact", too_big)
    out = tmp_path / "out"
    manifest = request(
        str(demo_root / "models" / "digits" / "digits-mlp.pt2"),
        str(out),
        spec={
            "method": {"name": "gradient-ascent", "forget": {"epochs": 1}, "retain": {"epochs": 1}},
            "gates": {"maxMiaAuc": 1.0, "maxTestAccuracyDrop": 100.0},
            "tuning": {"maxAttempts": 1},
        },
    )
    result = run_cli(manifest)
    assert result.code == runner.EXIT_UNEXPECTED
    assert result.record is not None
    assert result.record["error"] == "unexpected error: ValueError: compact record is 5000 bytes, over 4096"
    assert "outputModel" not in result.record
    assert not out.exists()  # not even the folder


def test_divergence_is_a_failed_verdict_not_a_crash(demo_root: Path, tmp_path: Path, run_cli: RunCli) -> None:
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    before = model.read_bytes()
    manifest = request(
        str(model),
        str(tmp_path / "out"),
        spec={
            "method": {"name": "gradient-ascent", "forget": {"lr": 1.0, "epochs": 30}, "retain": {"epochs": 0}},
            "tuning": {"maxAttempts": 1},
        },
    )
    result = run_cli(manifest)
    assert result.code == EXIT_GATES_FAILED
    assert result.record is not None
    assert result.record["verdict"] == "Failed"
    assert result.record["reasons"][0].startswith("diverged: the forget (ascent) loss")
    assert "lower method.forget.lr" in result.record["reasons"][0]
    assert "post" not in result.record["attempts"][0]
    assert model.read_bytes() == before
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["digits-mlp-v1.failed.json"]  # the record of what was tried, and no model


class _BreaksOnLargeBatches(nn.Module):
    """Loads and passes the two-sample probe, then fails like a crash would (a bug, not bad input)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("simulated CUDA error: an illegal memory access")
        return self.net(x)  # type: ignore[no-any-return]


def breaks_on_large_batches() -> nn.Module:
    return _BreaksOnLargeBatches()


def test_an_unexpected_error_is_retryable_and_recorded(tmp_path: Path, run_cli: RunCli) -> None:
    weights = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in breaks_on_large_batches().state_dict().items()}, str(weights))
    before = weights.read_bytes()
    manifest = request(
        str(weights),
        str(tmp_path / "out"),
        spec={
            "model": {
                "name": "digits-mlp",
                "format": "state-dict",
                "source": {"path": str(weights)},
                "architecture": {"factory": "tests.job.test_bad_input:breaks_on_large_batches"},
            }
        },
    )
    result = run_cli(manifest, "--allow-factory", "tests.job.test_bad_input")
    assert result.code not in (0, EXIT_GATES_FAILED, EXIT_INVALID_INPUT)
    assert result.record is not None
    assert result.record["exitCode"] == result.code
    assert result.record["error"].startswith("unexpected error: RuntimeError: simulated CUDA error")
    assert result.termination is not None
    assert json.loads(result.termination)["exitCode"] == result.code
    assert weights.read_bytes() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_retry_reports_the_version_its_killed_attempt_published(
    demo_root: Path, tmp_path: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between publishing and reporting, then retried with the same arguments: the Job's next pod reports
    the version its first pod published (the lineage can move) instead of failing as "already published"; another
    run, or a file changed since, is still refused."""
    out = tmp_path / "out"
    manifest = request(
        str(demo_root / "models" / "digits" / "digits-mlp.pt2"),
        str(out),
        spec={
            "method": {"name": "gradient-ascent", "forget": {"epochs": 1}, "retain": {"epochs": 1}},
            "gates": {"maxMiaAuc": 1.0, "maxTestAccuracyDrop": 100.0},
            "tuning": {"maxAttempts": 1},
        },
    )
    args = ("--model-version", "1", "--run-id", "uid-a")

    def killed(path: Path, record: Any) -> None:
        raise KeyboardInterrupt  # the pod dies here: published, nothing reported

    with monkeypatch.context() as patch:
        patch.setattr(cli, "write_termination_message", killed)
        with pytest.raises(KeyboardInterrupt):
            run_cli(manifest, *args)
    model, record_file = out / "digits-mlp-v1.pt2", out / "digits-mlp-v1.json"
    published = json.loads(record_file.read_text())
    data = model.read_bytes()
    assert published["config"]["runId"] == "uid-a"
    assert published["outputModel"]["sha256"] == hashlib.sha256(data).hexdigest()

    def no_second_run(*a: Any, **k: Any) -> runner.Outcome:
        raise AssertionError("the retry ran the work again")

    monkeypatch.setattr(runner, "run", no_second_run)
    retry = run_cli(manifest, *args)
    assert retry.code == 0, retry.stderr
    assert retry.termination is not None
    compact = json.loads(retry.termination)
    assert compact["verdict"] == "Passed"
    assert compact["modelVersion"] == 1
    assert compact["outputModel"] == published["outputModel"]
    assert compact["startedAt"] == published["startedAt"]  # the first attempt's record, not a new one
    assert retry.record == published
    assert model.read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["digits-mlp-v1.json", "digits-mlp-v1.pt2"]

    # Another run (another request, whatever its name) finds someone else's version 1: refused, as before.
    other = run_cli(manifest, "--model-version", "1", "--run-id", "uid-b")
    assert other.code == EXIT_INVALID_INPUT
    assert "version 1 of digits-mlp is already published" in other.stderr
    # So is a run without a run id (unlearn run locally).
    assert run_cli(manifest, "--model-version", "1").code == EXIT_INVALID_INPUT

    # The file changed after publishing: the record no longer vouches for it, and the run says so.
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    changed = run_cli(manifest, *args)
    assert changed.code == EXIT_INVALID_INPUT
    assert changed.record is not None
    assert changed.record["error"] == (
        f"--model-version 1: {out}/digits-mlp-v1.pt2 was published by this run but no longer matches the sha256 in "
        f"its record ({out}/digits-mlp-v1.json): it was changed after publishing; restore it, or remove both files "
        "so that the version can be written again"
    )
    assert "outputModel" not in changed.record


def test_a_run_id_is_bounded(tmp_path: Path, run_cli: RunCli) -> None:
    result = run_cli(request(str(tmp_path / "m.pt2"), str(tmp_path / "out")), "--run-id", "x" * 129)
    assert result.code == EXIT_INVALID_INPUT
    assert result.record is not None
    assert result.record["error"] == "--run-id: give 1 to 128 bytes of printable text (the request's uid)"
    assert not (tmp_path / "out").exists()
