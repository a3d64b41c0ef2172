"""The data-parallel benchmark runs end to end on the CPU (two gloo ranks, a few hundred rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import data_parallel

pytestmark = pytest.mark.job


def test_two_ranks_measure_and_append_to_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dp.json"
    args = ["--model", "digits-mlp", "--samples", "640", "--epochs", "1", "--world", "2", "--out", str(out)]
    assert data_parallel.main(args) == 0
    assert data_parallel.main(args) == 0  # a second run appends
    runs = json.loads(out.read_text())
    assert len(runs) == 2
    (row,) = runs[0]["results"]
    assert (row["world"], row["backend"]) == (2, "gloo")
    assert row["samples_per_s"] > 0
    assert row["steps_per_s"] == pytest.approx(10 / row["seconds"], rel=0.01)  # 640 rows in batches of 64
    assert runs[0]["config"]["model"] == "digits-mlp"
    assert "samples/s" in capsys.readouterr().out
