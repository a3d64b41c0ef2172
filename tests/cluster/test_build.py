"""build_binaries(): what the fixtures show when tests/cluster/build.sh fails or succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlaneError, build_binaries

pytestmark = pytest.mark.unit


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "build.sh"
    path.write_text("set -e\n" + body)
    return path


def test_failure_is_the_scripts_one_line(tmp_path: Path) -> None:
    fake = script(
        tmp_path,
        'echo "build.sh: building etcd ..." >&2\n'
        'echo "some compiler noise" >&2\n'
        'echo "build.sh: building etcd failed; see /x/build.log" >&2\n'
        "exit 1\n",
    )
    with pytest.raises(ControlPlaneError) as failed:
        build_binaries(fake)
    assert str(failed.value) == "build.sh: building etcd failed; see /x/build.log"


def test_success_returns_the_last_stdout_line(tmp_path: Path) -> None:
    fake = script(tmp_path, 'echo "progress"\necho "/cache/bin/key"\n')
    assert build_binaries(fake) == Path("/cache/bin/key")


def test_timeout_is_reported(tmp_path: Path) -> None:
    fake = script(tmp_path, "sleep 5\n")
    with pytest.raises(ControlPlaneError, match="did not finish"):
        build_binaries(fake, timeout=0.5)
