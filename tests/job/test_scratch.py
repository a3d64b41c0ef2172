"""The job stops with a clear, non-retryable error before its /tmp outgrows the pod's limit.

The kubelet would evict the pod instead ("Usage of EmptyDir volume "tmp"
exceeds the limit"), and the Job would retry the same work. Here the real
CLI runs with ``UNLEARN_TMP_LIMIT`` set, as in a pod, and a scratch folder
that fills up before or during the run.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.job.conftest import RunCli, request
from unlearn import runner, scratch
from unlearning_contracts.record import EXIT_INVALID_INPUT, EXIT_PASSED

MIB = 2**20


def fill(path: Path, size: int) -> Path:
    # Random-free but real blocks (no sparse file: the kubelet counts allocated bytes, and so does the guard).
    with path.open("wb") as out:
        out.write(b"\x01" * size)
    return path


@pytest.mark.unit
def test_usage_counts_allocated_bytes_in_nested_folders(tmp_path: Path) -> None:
    fill(tmp_path / "a", MIB)
    (tmp_path / "cache" / "deep").mkdir(parents=True)
    fill(tmp_path / "cache" / "deep" / "b", 3 * MIB)
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as out:
        out.truncate(50 * MIB)  # 50 MiB long, nothing allocated
    used = scratch.usage(tmp_path)
    assert 4 * MIB <= used < 4 * MIB + 64 * 1024


@pytest.mark.unit
@pytest.mark.parametrize(
    ("quantity", "expected"), [("4Gi", 4 * 2**30), ("500M", 500 * 10**6), ("1.5Ki", 1536), ("2048", 2048)]
)
def test_quantities(quantity: str, expected: int) -> None:
    assert scratch.quantity_bytes(quantity) == expected


@pytest.mark.unit
def test_threshold_and_message(tmp_path: Path) -> None:
    limit = 100 * MIB
    assert scratch.over_limit(89 * MIB, limit, tmp_path, "100Mi") is None
    message = scratch.over_limit(95 * MIB, limit, tmp_path, "100Mi")
    assert message is not None
    assert "holds 95 MiB, 95% of its 100Mi limit" in message
    assert "job.tmpSizeLimit" in message
    with pytest.raises(ValueError, match="UNLEARN_TMP_LIMIT='lots'"):
        scratch.quantity_bytes("lots")


@pytest.mark.unit
def test_no_limit_no_guard(tmp_path: Path) -> None:
    fill(tmp_path / "big", 2 * MIB)
    with scratch.guard({}, tmp_path):
        pass  # outside a pod nothing is measured


@pytest.fixture
def scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv(scratch.ENV_LIMIT, "4Mi")
    monkeypatch.setattr(scratch, "INTERVAL_SECONDS", 0.05)
    return folder


def _manifest(demo_root: Path, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    work = tmp_path / "in"
    work.mkdir()
    model = work / "digits-mlp.pt2"
    shutil.copy(demo_root / "models" / "digits" / "digits-mlp.pt2", model)
    return request(str(model), str(tmp_path / "out")), model


def _assert_stopped_cleanly(result: Any, model: Path, before: bytes, out: Path) -> None:
    assert result.code == EXIT_INVALID_INPUT, result.stderr[-1500:]
    assert result.record is not None
    assert "scratch space" in result.record["error"]
    assert "of its 4Mi limit" in result.record["error"]
    assert "job.tmpSizeLimit" in result.record["error"]
    assert "outputModel" not in result.record
    assert model.read_bytes() == before
    assert not list(out.glob("*.pt2"))


@pytest.mark.job
def test_a_full_scratch_folder_stops_the_job_before_it_starts(
    demo_root: Path, tmp_path: Path, scratch_dir: Path, run_cli: RunCli
) -> None:
    manifest, model = _manifest(demo_root, tmp_path)
    before = model.read_bytes()
    fill(scratch_dir / "left-over", 4 * MIB)
    result = run_cli(manifest, "--model-version", "1")
    _assert_stopped_cleanly(result, model, before, tmp_path / "out")


@pytest.mark.job
def test_a_scratch_folder_that_fills_during_the_run_stops_it(
    demo_root: Path, tmp_path: Path, scratch_dir: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, model = _manifest(demo_root, tmp_path)
    before = model.read_bytes()
    load_data = runner.load_data

    def load_and_fill(*args: Any, **kwargs: Any) -> Any:
        # Past the guard's first look: a library cache growing while the job runs.
        fill(scratch_dir / "cache", 4 * MIB)
        return load_data(*args, **kwargs)

    monkeypatch.setattr(runner, "load_data", load_and_fill)
    result = run_cli(manifest, "--model-version", "1")
    _assert_stopped_cleanly(result, model, before, tmp_path / "out")


@pytest.mark.job
def test_a_job_within_its_limit_is_untouched(
    demo_root: Path, tmp_path: Path, scratch_dir: Path, run_cli: RunCli
) -> None:
    # The control: the same run, with room to spare, passes (and the guard's thread is gone after it).
    manifest, _ = _manifest(demo_root, tmp_path)
    fill(scratch_dir / "small", MIB)
    result = run_cli(manifest, "--model-version", "1")
    assert result.code == EXIT_PASSED, result.stderr[-1500:]
    assert not [t for t in threading.enumerate() if t.name == "scratch-guard"]
