"""Settings from the environment: defaults, parsing, and one-line errors naming the variable."""

from __future__ import annotations

from typing import Any

import pytest

from unlearning_operator.settings import ENV_VARS, OperatorSettings, SettingsError, load_settings, where_set

pytestmark = pytest.mark.unit


def test_defaults_without_env() -> None:
    settings = load_settings({})
    assert settings == OperatorSettings()
    assert settings.clusterwide
    assert (settings.job_gpus, settings.job_cpu, settings.job_memory) == (1, "4", "16Gi")
    assert (settings.job_deadline_seconds, settings.job_backoff_limit, settings.job_ttl_seconds) == (21600, 2, 86400)
    assert (settings.max_concurrent_jobs, settings.pending_alert_seconds) == (4, 120)
    assert (settings.metrics_port, settings.health_port, settings.job_volume_root) == (8080, 8081, "/volumes")
    # Nothing a tenant could use against the cluster is allowed by default.
    assert settings.allowed_factory_modules == ()
    assert settings.allowed_priority_classes == frozenset()
    assert settings.allow_keyless_tolerations is False
    assert (settings.max_job_gpus, settings.max_job_cpu, settings.max_job_memory) == (8, "32", "256Gi")
    assert settings.max_job_deadline_seconds == 86400
    assert (settings.job_queue_name, settings.require_queue_name) == (None, False)
    assert settings.max_concurrent_jobs_per_namespace == 0


EACH_VARIABLE: list[tuple[dict[str, str], str, Any]] = [
    ({"UNLEARNING_WATCH_NAMESPACES": "a, b,,c"}, "watch_namespaces", ("a", "b", "c")),
    ({"UNLEARNING_WATCH_NAMESPACES": " "}, "watch_namespaces", ()),
    ({"UNLEARNING_JOB_IMAGE": "reg/job:2"}, "job_image", "reg/job:2"),
    ({"UNLEARNING_ALLOWED_IMAGES": "a:1,b:2"}, "allowed_images", frozenset({"a:1", "b:2"})),
    ({"UNLEARNING_JOB_GPUS": "0"}, "job_gpus", 0),
    ({"UNLEARNING_JOB_CPU": "500m"}, "job_cpu", "500m"),
    ({"UNLEARNING_JOB_MEMORY": "8Gi"}, "job_memory", "8Gi"),
    ({"UNLEARNING_JOB_SHM_SIZE": "4Gi"}, "job_shm_size", "4Gi"),
    ({"UNLEARNING_JOB_NODE_SELECTOR": '{"gpu": "a100"}'}, "job_node_selector", {"gpu": "a100"}),
    (
        {"UNLEARNING_JOB_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]'},
        "job_tolerations",
        ({"key": "nvidia.com/gpu", "operator": "Exists"},),
    ),
    ({"UNLEARNING_JOB_AFFINITY": '{"nodeAffinity": {}}'}, "job_affinity", {"nodeAffinity": {}}),
    ({"UNLEARNING_JOB_PRIORITY_CLASS": "batch-low"}, "job_priority_class", "batch-low"),
    ({"UNLEARNING_JOB_DEADLINE_SECONDS": "3600"}, "job_deadline_seconds", 3600),
    ({"UNLEARNING_JOB_BACKOFF_LIMIT": "0"}, "job_backoff_limit", 0),
    ({"UNLEARNING_JOB_TTL_SECONDS": "60"}, "job_ttl_seconds", 60),
    ({"UNLEARNING_MAX_CONCURRENT_JOBS": "10"}, "max_concurrent_jobs", 10),
    ({"UNLEARNING_CALIBRATION_PARALLELISM": "8"}, "calibration_parallelism", 8),
    ({"UNLEARNING_PENDING_ALERT_SECONDS": "30"}, "pending_alert_seconds", 30),
    ({"UNLEARNING_METRICS_PORT": "9090"}, "metrics_port", 9090),
    ({"UNLEARNING_HEALTH_PORT": "9091"}, "health_port", 9091),
    ({"UNLEARNING_JOB_VOLUME_ROOT": "/mnt/vols/"}, "job_volume_root", "/mnt/vols"),
    ({"UNLEARNING_JOB_EPHEMERAL_STORAGE": "20Gi"}, "job_ephemeral_storage", "20Gi"),
    ({"UNLEARNING_JOB_TMP_SIZE": "1Gi"}, "job_tmp_size", "1Gi"),
    ({"UNLEARNING_JOB_NETWORK_POLICY": "False"}, "job_network_policy", False),
    ({"UNLEARNING_JOB_EGRESS": '[{"ports": [{"port": 53}]}]'}, "job_egress", ({"ports": [{"port": 53}]},)),
    ({"UNLEARNING_LEADER_ELECTION": "true", "UNLEARNING_LEASE_NAMESPACE": "ops"}, "leader_election", True),
    ({"UNLEARNING_LEASE_NAMESPACE": "ops"}, "lease_namespace", "ops"),
    ({"UNLEARNING_LEASE_NAME": "op-1"}, "lease_name", "op-1"),
    ({"UNLEARNING_LEASE_DURATION_SECONDS": "30"}, "lease_duration_seconds", 30),
    ({"UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS": "8"}, "lease_renew_deadline_seconds", 8),
    ({"UNLEARNING_LEASE_RETRY_PERIOD_SECONDS": "1"}, "lease_retry_period_seconds", 1),
    (
        {"UNLEARNING_ALLOWED_FACTORY_MODULES": "mylab.models, vision"},
        "allowed_factory_modules",
        ("mylab.models", "vision"),
    ),
    (
        {"UNLEARNING_ALLOWED_PRIORITY_CLASSES": "batch-low,batch.high"},
        "allowed_priority_classes",
        frozenset({"batch-low", "batch.high"}),
    ),
    ({"UNLEARNING_ALLOW_KEYLESS_TOLERATIONS": "True"}, "allow_keyless_tolerations", True),
    ({"UNLEARNING_MAX_JOB_GPUS": "16"}, "max_job_gpus", 16),
    ({"UNLEARNING_MAX_JOB_CPU": "64"}, "max_job_cpu", "64"),
    ({"UNLEARNING_MAX_JOB_MEMORY": "512Gi"}, "max_job_memory", "512Gi"),
    ({"UNLEARNING_MAX_JOB_DEADLINE_SECONDS": "43200"}, "max_job_deadline_seconds", 43200),
    ({"UNLEARNING_JOB_QUEUE_NAME": "team-gpus"}, "job_queue_name", "team-gpus"),
    ({"UNLEARNING_REQUIRE_QUEUE_NAME": "false"}, "require_queue_name", False),
    ({"UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE": "2"}, "max_concurrent_jobs_per_namespace", 2),
]


@pytest.mark.parametrize(("env", "field", "expected"), EACH_VARIABLE)
def test_each_variable(env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(load_settings(env), field) == expected


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"UNLEARNING_JOB_GPUS": "one"}, "UNLEARNING_JOB_GPUS"),
        ({"UNLEARNING_JOB_GPUS": "-1"}, "UNLEARNING_JOB_GPUS"),
        ({"UNLEARNING_JOB_CPU": "4 cores"}, "UNLEARNING_JOB_CPU"),
        ({"UNLEARNING_JOB_MEMORY": "16GB"}, "UNLEARNING_JOB_MEMORY"),
        ({"UNLEARNING_JOB_SHM_SIZE": "lots"}, "UNLEARNING_JOB_SHM_SIZE"),
        ({"UNLEARNING_JOB_NODE_SELECTOR": "gpu=a100"}, "UNLEARNING_JOB_NODE_SELECTOR"),
        ({"UNLEARNING_JOB_NODE_SELECTOR": "[]"}, "UNLEARNING_JOB_NODE_SELECTOR"),
        ({"UNLEARNING_JOB_NODE_SELECTOR": '{"gpu": 1}'}, "UNLEARNING_JOB_NODE_SELECTOR"),
        ({"UNLEARNING_JOB_TOLERATIONS": "{}"}, "UNLEARNING_JOB_TOLERATIONS"),
        ({"UNLEARNING_JOB_TOLERATIONS": "[1]"}, "UNLEARNING_JOB_TOLERATIONS"),
        ({"UNLEARNING_JOB_AFFINITY": "[]"}, "UNLEARNING_JOB_AFFINITY"),
        ({"UNLEARNING_JOB_DEADLINE_SECONDS": "10"}, "UNLEARNING_JOB_DEADLINE_SECONDS"),
        ({"UNLEARNING_MAX_CONCURRENT_JOBS": "0"}, "UNLEARNING_MAX_CONCURRENT_JOBS"),
        ({"UNLEARNING_CALIBRATION_PARALLELISM": "33"}, "UNLEARNING_CALIBRATION_PARALLELISM"),
        ({"UNLEARNING_METRICS_PORT": "70000"}, "UNLEARNING_METRICS_PORT"),
        ({"UNLEARNING_WATCH_NAMESPACES": "team-*"}, "UNLEARNING_WATCH_NAMESPACES"),
        ({"UNLEARNING_JOB_VOLUME_ROOT": "volumes"}, "UNLEARNING_JOB_VOLUME_ROOT"),
        ({"UNLEARNING_METRICS_PORT": "9000", "UNLEARNING_HEALTH_PORT": "9000"}, "UNLEARNING_HEALTH_PORT"),
        ({"UNLEARNING_JOB_EPHEMERAL_STORAGE": "lots"}, "UNLEARNING_JOB_EPHEMERAL_STORAGE"),
        # /tmp counts against the container's limit: it must leave room for the logs.
        ({"UNLEARNING_JOB_TMP_SIZE": "6Gi"}, "UNLEARNING_JOB_TMP_SIZE"),
        ({"UNLEARNING_JOB_NETWORK_POLICY": "yes"}, "UNLEARNING_JOB_NETWORK_POLICY"),
        ({"UNLEARNING_JOB_EGRESS": "{}"}, "UNLEARNING_JOB_EGRESS"),
        ({"UNLEARNING_JOB_EGRESS": '["all"]'}, "UNLEARNING_JOB_EGRESS"),
        ({"UNLEARNING_LEADER_ELECTION": "on"}, "UNLEARNING_LEADER_ELECTION"),
        # Leader election needs to know where its Lease is.
        ({"UNLEARNING_LEADER_ELECTION": "true"}, "UNLEARNING_LEASE_NAMESPACE"),
        # A leader must give up before a standby may take over.
        (
            {
                "UNLEARNING_LEADER_ELECTION": "true",
                "UNLEARNING_LEASE_NAMESPACE": "ops",
                "UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS": "20",
            },
            "UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS",
        ),
        ({"UNLEARNING_ALLOWED_FACTORY_MODULES": "mylab.*"}, "UNLEARNING_ALLOWED_FACTORY_MODULES"),
        ({"UNLEARNING_ALLOWED_FACTORY_MODULES": "os:system"}, "UNLEARNING_ALLOWED_FACTORY_MODULES"),
        ({"UNLEARNING_ALLOWED_PRIORITY_CLASSES": "Batch_Low"}, "UNLEARNING_ALLOWED_PRIORITY_CLASSES"),
        ({"UNLEARNING_ALLOW_KEYLESS_TOLERATIONS": "maybe"}, "UNLEARNING_ALLOW_KEYLESS_TOLERATIONS"),
        ({"UNLEARNING_MAX_JOB_CPU": "lots"}, "UNLEARNING_MAX_JOB_CPU"),
        ({"UNLEARNING_JOB_QUEUE_NAME": "Team GPUs"}, "UNLEARNING_JOB_QUEUE_NAME"),
        ({"UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE": "-1"}, "UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE"),
        # A default beyond its own bound would reject every request that leaves the field out.
        ({"UNLEARNING_MAX_JOB_GPUS": "0"}, "UNLEARNING_JOB_GPUS=1: above UNLEARNING_MAX_JOB_GPUS"),
        ({"UNLEARNING_JOB_CPU": "33"}, "UNLEARNING_JOB_CPU=33: above UNLEARNING_MAX_JOB_CPU"),
        ({"UNLEARNING_MAX_JOB_MEMORY": "8Gi"}, "UNLEARNING_JOB_MEMORY=16Gi: above UNLEARNING_MAX_JOB_MEMORY"),
        (
            {"UNLEARNING_JOB_DEADLINE_SECONDS": "90000"},
            "UNLEARNING_JOB_DEADLINE_SECONDS=90000: above UNLEARNING_MAX_JOB_DEADLINE_SECONDS",
        ),
    ],
)
def test_invalid_values_name_the_variable_in_one_line(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(names)
    assert "\n" not in message


def test_every_setting_declares_one_variable_and_each_is_tested_above() -> None:
    assert len(ENV_VARS) == len(set(ENV_VARS)) == len(OperatorSettings.__dataclass_fields__)
    assert all(name.startswith("UNLEARNING_") for name in ENV_VARS)
    assert {name for env, _, _ in EACH_VARIABLE for name in env} == set(ENV_VARS)


def test_bound_messages_name_the_chart_value_and_the_variable() -> None:
    assert where_set("max_job_gpus") == "chart value job.bounds.maxGpus (UNLEARNING_MAX_JOB_GPUS)"
    assert where_set("allowed_factory_modules") == (
        "chart value job.allowedFactoryModules (UNLEARNING_ALLOWED_FACTORY_MODULES)"
    )
    # A setting without a declared chart value is named by its variable alone.
    assert where_set("metrics_port") == "UNLEARNING_METRICS_PORT"


def test_job_image_is_always_allowed() -> None:
    settings = load_settings({"UNLEARNING_JOB_IMAGE": "reg/job:2", "UNLEARNING_ALLOWED_IMAGES": "reg/job:3"})
    assert settings.image_allowed("reg/job:2")
    assert settings.image_allowed("reg/job:3")
    assert not settings.image_allowed("evil/job:1")
