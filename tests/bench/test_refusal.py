"""The refusal benchmark measures what it says: both refusals exit 4, with CPU and memory read from the child."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import refusal

pytestmark = pytest.mark.job


def test_refusal_benchmark_measures_both_cases(tmp_path: Path) -> None:
    out = tmp_path / "refusal.json"
    assert refusal.main(["--runs", "1", "--json", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == set(refusal.CASES)
    for measured in cases.values():
        assert measured["exit"] == 4
        assert measured["cpu_s"] > 0
        assert measured["max_rss_mb"] > 1
