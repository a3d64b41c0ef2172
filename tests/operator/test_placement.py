"""The admin's bounds on spec.job, over the contracts' JobSpec (any kind with a job block), table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from unlearning_contracts.spec import JobSpec
from unlearning_operator.placement import placement_problems, resolve_placement
from unlearning_operator.settings import OperatorSettings, load_settings

pytestmark = pytest.mark.unit

DEFAULTS = OperatorSettings()


def job(**fields: Any) -> JobSpec:
    return JobSpec.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "env", "words"),
    [
        # The probe: each of these was accepted as asked.
        ({"gpus": 64}, {}, ["spec.job.gpus: 64 is above this cluster's bound of 8", "job.bounds.maxGpus"]),
        ({"cpu": "500"}, {}, ["spec.job.cpu: 500 is above this cluster's bound of 32", "UNLEARNING_MAX_JOB_CPU"]),
        ({"memory": "2Ti"}, {}, ["spec.job.memory: 2Ti is above this cluster's bound of 256Gi", "maxMemory"]),
        (
            {"activeDeadlineSeconds": 7 * 24 * 3600},
            {},
            ["spec.job.activeDeadlineSeconds: 604800 is above this cluster's bound of 86400 s"],
        ),
        (
            {"priorityClassName": "system-node-critical"},
            {},
            ["spec.job.priorityClassName: system-node-critical is not allowed", "this cluster allows none"],
        ),
        (
            {"priorityClassName": "system-node-critical"},
            {"UNLEARNING_ALLOWED_PRIORITY_CLASSES": "batch-low,batch-high"},
            ["pick one of: batch-high, batch-low", "job.bounds.allowedPriorityClasses"],
        ),
        (
            {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}, {"operator": "Exists"}]},
            {},
            ["spec.job.tolerations[1]: a toleration without a key tolerates every taint"],
        ),
        ({}, {"UNLEARNING_REQUIRE_QUEUE_NAME": "true"}, ["spec.job.queueName: required", "job.kueue.required"]),
        # Binary and decimal quantities compare exactly: 33 cores in millicores is still over 32.
        ({"cpu": "33000m"}, {}, ["spec.job.cpu: 33000m is above"]),
        ({"memory": "275G"}, {}, ["spec.job.memory: 275G is above"]),
    ],
)
def test_beyond_a_bound_names_the_field_and_the_bound(
    fields: dict[str, Any], env: dict[str, str], words: list[str]
) -> None:
    problems = placement_problems(job(**fields), load_settings(env))
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0]


@pytest.mark.parametrize(
    ("fields", "env"),
    [
        ({}, {}),
        ({"gpus": 8, "cpu": "32", "memory": "256Gi", "activeDeadlineSeconds": 86400}, {}),
        ({"memory": "274877906944"}, {}),  # 256Gi in bytes: equal is within
        ({"priorityClassName": "batch-low"}, {"UNLEARNING_JOB_PRIORITY_CLASS": "batch-low"}),
        ({"priorityClassName": "batch-high"}, {"UNLEARNING_ALLOWED_PRIORITY_CLASSES": "batch-high"}),
        ({"tolerations": [{"operator": "Exists"}]}, {"UNLEARNING_ALLOW_KEYLESS_TOLERATIONS": "true"}),
        ({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}]}, {}),
        ({"queueName": "team-gpus"}, {"UNLEARNING_REQUIRE_QUEUE_NAME": "true"}),
        # The admin's default queue satisfies the requirement.
        ({}, {"UNLEARNING_REQUIRE_QUEUE_NAME": "true", "UNLEARNING_JOB_QUEUE_NAME": "shared"}),
        ({"gpus": 16}, {"UNLEARNING_MAX_JOB_GPUS": "16"}),
    ],
)
def test_within_the_bounds(fields: dict[str, Any], env: dict[str, str]) -> None:
    assert placement_problems(job(**fields), load_settings(env)) == []


def test_every_problem_is_reported_at_once() -> None:
    asked = job(gpus=64, cpu="64", memory="1Ti", activeDeadlineSeconds=604800, tolerations=[{"operator": "Exists"}])
    fields = [p.split(":")[0] for p in placement_problems(asked, DEFAULTS, field="spec.job")]
    assert fields == [
        "spec.job.gpus",
        "spec.job.cpu",
        "spec.job.memory",
        "spec.job.activeDeadlineSeconds",
        "spec.job.tolerations[0]",
    ]


def test_the_field_prefix_is_the_callers() -> None:
    # A calibration checks its own spec.job with the same function.
    assert placement_problems(job(gpus=9), DEFAULTS, field="calibration.spec.job")[0].startswith(
        "calibration.spec.job.gpus: 9"
    )


def test_resolve_fills_the_operators_defaults() -> None:
    settings = load_settings(
        {
            "UNLEARNING_JOB_NODE_SELECTOR": '{"pool": "gpu", "zone": "a"}',
            "UNLEARNING_JOB_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
            "UNLEARNING_JOB_PRIORITY_CLASS": "batch-low",
            "UNLEARNING_JOB_QUEUE_NAME": "shared",
        }
    )
    placed = resolve_placement(job(gpus=2, nodeSelector={"zone": "b"}, tolerations=[{"key": "d"}]), settings)
    assert (placed.gpus, placed.cpu, placed.memory, placed.deadline_seconds) == (2, "4", "16Gi", 21600)
    assert placed.node_selector == {"pool": "gpu", "zone": "b"}
    assert placed.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "d"}]
    assert (placed.priority_class, placed.queue_name) == ("batch-low", "shared")
    bare = resolve_placement(job(gpus=0), DEFAULTS)
    assert (bare.gpus, bare.priority_class, bare.queue_name, bare.tolerations) == (0, None, None, [])
