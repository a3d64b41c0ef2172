"""values.yaml documents every value and agrees with values.schema.json.

Pure checks on the files (no helm): a key without a one-line comment, or a
key the schema does not declare (which `helm install` would then reject), or
a default the schema refuses, fails here with the key's dotted path.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from unlearning_operator.settings import OperatorSettings

CHART = Path(__file__).resolve().parents[2] / "charts" / "unlearning-operator"

pytestmark = pytest.mark.unit

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


def schema_node(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in path:
        if node is None:
            return None
        properties = node.get("properties")
        if properties is not None and part in properties:
            node = properties[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def documented_keys() -> list[tuple[str, bool]]:
    """(dotted key, has a comment) for each key line of values.yaml, list items skipped."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    found = []
    for number, line in enumerate(lines):
        match = _KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [key for _, key in stack] + [match["key"]]
        stack.append((indent, match["key"]))
        previous = lines[number - 1].strip() if number else ""
        commented = previous.startswith("#") or "#" in match["rest"]
        found.append((".".join(path), commented))
    return found


def test_every_value_has_a_comment() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = []
    for dotted, commented in documented_keys():
        parent = schema_node(schema, dotted.split(".")[:-1])
        # Keys inside a free-form map (resources.requests.cpu, a node selector
        # entry) are Kubernetes' own fields, documented by the map's comment.
        free_form = parent is not None and "properties" not in parent
        if not commented and not free_form:
            missing.append(dotted)
    assert not missing, f"values.yaml keys without a one-line comment above them: {missing}"


def test_every_value_is_declared_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    undeclared = [dotted for dotted, _ in documented_keys() if schema_node(schema, dotted.split(".")) is None]
    assert not undeclared, f"values.yaml keys missing from values.schema.json: {undeclared}"


def _objects(node: dict[str, Any], path: str = "") -> list[str]:
    """Paths of object schemas that let unknown keys through."""
    found = []
    if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
        found.append(path or "<root>")
    for key, child in node.get("properties", {}).items():
        found += _objects(child, f"{path}.{key}".lstrip("."))
    return found


def test_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _objects(schema) == []


def test_defaults_match_the_operator_settings() -> None:
    # The chart's job defaults are what an operator without the chart would use.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = OperatorSettings()
    job = values["job"]
    assert f"{job['image']['repository']}:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}" == (
        defaults.job_image
    )
    assert job["gpus"] == defaults.job_gpus
    assert job["cpu"] == defaults.job_cpu
    assert job["memory"] == defaults.job_memory
    assert job["ephemeralStorage"] == defaults.job_ephemeral_storage
    assert job["tmpSizeLimit"] == defaults.job_tmp_size
    assert job["activeDeadlineSeconds"] == defaults.job_deadline_seconds
    assert job["backoffLimit"] == defaults.job_backoff_limit
    assert job["ttlSecondsAfterFinished"] == defaults.job_ttl_seconds
    assert job["maxConcurrentJobs"] == defaults.max_concurrent_jobs
    assert job["maxConcurrentJobsPerNamespace"] == defaults.max_concurrent_jobs_per_namespace
    assert job["allowedFactoryModules"] == list(defaults.allowed_factory_modules) == []
    bounds = job["bounds"]
    assert bounds["maxGpus"] == defaults.max_job_gpus
    assert bounds["maxCpu"] == defaults.max_job_cpu
    assert bounds["maxMemory"] == defaults.max_job_memory
    assert bounds["maxActiveDeadlineSeconds"] == defaults.max_job_deadline_seconds
    assert bounds["allowedPriorityClasses"] == sorted(defaults.allowed_priority_classes) == []
    assert bounds["allowKeylessTolerations"] is defaults.allow_keyless_tolerations is False
    assert job["kueue"] == {"queueName": "", "required": False}
    assert defaults.job_queue_name is None
    assert defaults.require_queue_name is False
    assert job["pendingAlertSeconds"] == defaults.pending_alert_seconds
    assert job["volumeRoot"] == defaults.job_volume_root
    assert values["ports"] == {"metrics": defaults.metrics_port, "health": defaults.health_port}
    election = values["leaderElection"]
    assert election["leaseDurationSeconds"] == defaults.lease_duration_seconds
    assert election["renewDeadlineSeconds"] == defaults.lease_renew_deadline_seconds
    assert election["retryPeriodSeconds"] == defaults.lease_retry_period_seconds


def test_chart_values_named_in_messages_exist() -> None:
    # A Rejected message tells the tenant which chart value allows more; that value must exist.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for item in fields(OperatorSettings):
        declared = item.metadata["env"]
        if declared.chart is None:
            continue
        node: Any = values
        for part in declared.chart.split("."):
            assert isinstance(node, dict)
            assert part in node, f"{declared.name}: chart value {declared.chart} missing"
            node = node[part]
