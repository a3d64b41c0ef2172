"""The whole-Job benchmark's pure parts: the requests it runs are valid requests with the defaults (or retrain
under the original's recipe), and its table says what was measured. The run itself is in docs/benchmarks.md."""

from __future__ import annotations

import pytest

from bench import __main__ as bench_main
from bench import job_time
from unlearning_contracts.spec import parse_manifest

pytestmark = pytest.mark.unit


def test_the_default_request_names_no_method_and_retrain_names_the_recipe() -> None:
    data = {"source": "digits"}
    default = parse_manifest(job_time.request("digits", data, [3, 1, 2], "d-random-default", {}))
    assert default.spec.method.name == "auto"  # the default a user gets: calibrated with the bank
    assert default.spec.tuning.max_attempts > 1  # and the default attempt budget
    assert default.spec.forget.indices == [3, 1, 2]
    retrain = {"name": "retrain", "retain": {"lr": 1e-3, "epochs": 150, "batchSize": 64}}
    again = parse_manifest(job_time.request("digits", data, [3], "d-random-retrain", retrain))
    assert (again.spec.method.name, again.spec.method.retain.epochs, again.spec.tuning.max_attempts) == (
        "retrain",
        150,
        1,
    )
    assert again.spec.model.source.claim_name == "models"


def test_the_table_shows_the_whole_job_speed_up_and_where_the_time_went() -> None:
    phases = {"load": 2.0, "preAudit": 1.0, "unlearn": 3.0, "postAudit": 1.0, "save": 0.1, "total": 7.1}
    run = {
        "dataset": "digits",
        "kind": "class",
        "forgetRows": 135,
        "trainRows": 1347,
        "default": {"wallSeconds": 10.0, "method": "calibrated", "verdict": "Passed", "phases": phases},
        "retrain": {"wallSeconds": 40.0, "phases": {**phases, "unlearn": 33.0}},
        "speedup": 4.0,
        "unlearnSpeedup": 11.0,
    }
    result = {
        "date": "2026-11-28T21:00:00+00:00",
        "machine": {"cpu": "x", "cores": 2, "loadAverageAtStart": 1.5},
        "wallSeconds": 120.0,
        "seed": 0,
        "command": "python -m bench job-time",
        "runs": [run],
    }
    table = job_time.render(result)
    assert (
        "| digits | class | 135 of 1347 | calibrated, Passed | 10.0 | 2.0 / 2.0 / 3.0 / 0.10, 7.1 | 40.0 | 33.0"
        in table
    )
    assert "**4.0x**" in table
    assert "11.0x" in table
    assert "banks of K = 4." in table  # a run from before the field: its banks had K = 4
    assert "banks of K = 10." in job_time.render({**result, "runs": [{**run, "bankFolds": 10}]})


def test_the_bench_command_lists_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main([]) == 0
    assert "job-time" in capsys.readouterr().out
