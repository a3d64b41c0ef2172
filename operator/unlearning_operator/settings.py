"""Operator settings: one typed, frozen object read from the environment at start-up.

Every variable is optional and has a default chosen for a small GPU cluster;
the Helm chart sets them from its values. Parsing is strict on purpose: a
typo in a resource quantity or a JSON node selector would otherwise surface
hours later as a Job the API server refuses, so start-up fails instead with
one line naming the variable and what to change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unlearning_contracts.spec import DEFAULT_VOLUME_ROOT

DEFAULT_JOB_IMAGE = "ghcr.io/unlearning-operator/unlearn-job:0.1.0"

_CPU = re.compile(r"^\d+(\.\d+)?m?$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SettingsError(ValueError):
    """An invalid environment variable; the message names it."""


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs to know besides the requests themselves."""

    watch_namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means cluster-wide (needs a ClusterRole)."""
    job_image: str = DEFAULT_JOB_IMAGE
    """Image every Job runs unless a request picks another allow-listed one."""
    allowed_images: frozenset[str] = frozenset()
    """Images a request may choose in spec.job.image; job_image is always allowed."""
    job_gpus: int = 1
    """nvidia.com/gpu per pod when the request does not say (0 = CPU-only, limit omitted)."""
    job_cpu: str = "4"
    """CPU request and limit: data loading and the audit's sklearn attack run on CPU."""
    job_memory: str = "16Gi"
    """Memory request and limit: the audit holds up to audit.maxSamples per set in memory."""
    job_node_selector: Mapping[str, str] = field(default_factory=dict)
    job_tolerations: tuple[Mapping[str, Any], ...] = ()
    job_affinity: Mapping[str, Any] = field(default_factory=dict)
    job_priority_class: str | None = None
    job_deadline_seconds: int = 21600
    """activeDeadlineSeconds: six hours bounds a runaway job on a shared GPU."""
    job_backoff_limit: int = 2
    """Retries after crashes (not after gate failures or invalid input: those fail at once)."""
    job_ttl_seconds: int = 86400
    """ttlSecondsAfterFinished: the result is in status and the audit record by then."""
    max_concurrent_jobs: int = 4
    """Cluster-wide cap on unfinished Jobs; the rest wait in phase Queued."""
    pending_alert_seconds: int = 120
    """A pod pending longer than this gets a PodPending condition saying why."""
    metrics_port: int = 8080
    health_port: int = 8081
    job_volume_root: str = DEFAULT_VOLUME_ROOT
    """Where the pod mounts each claim (as /<root>/<claimName>)."""

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces

    def image_allowed(self, image: str) -> bool:
        return image == self.job_image or image in self.allowed_images


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _int(name: str, raw: str, minimum: int, maximum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name}={value}: must be between {minimum} and {maximum}")
    return value


def _json(name: str, raw: str, kind: type) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{name}: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else "a JSON list"
        raise SettingsError(f"{name}: expected {expected}, got {type(value).__name__}")
    return value


def _pattern(name: str, raw: str, pattern: re.Pattern[str], example: str) -> str:
    value = raw.strip()
    if not pattern.match(value):
        raise SettingsError(f"{name}={raw!r}: not a Kubernetes quantity (for example {example})")
    return value


def load_settings(env: Mapping[str, str]) -> OperatorSettings:
    """Parse the UNLEARNING_* variables; raise SettingsError naming the first bad one."""

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value is not None and value.strip() != "" else None

    values: dict[str, Any] = {}
    if (raw := get("UNLEARNING_WATCH_NAMESPACES")) is not None:
        namespaces = _csv("UNLEARNING_WATCH_NAMESPACES", raw)
        for namespace in namespaces:
            if not _NAMESPACE.match(namespace):
                raise SettingsError(
                    f"UNLEARNING_WATCH_NAMESPACES: {namespace!r} is not a namespace name "
                    "(globs are not supported: list the namespaces, or leave empty for cluster-wide)"
                )
        values["watch_namespaces"] = namespaces
    if (raw := get("UNLEARNING_JOB_IMAGE")) is not None:
        values["job_image"] = raw.strip()
    if (raw := get("UNLEARNING_ALLOWED_IMAGES")) is not None:
        values["allowed_images"] = frozenset(_csv("UNLEARNING_ALLOWED_IMAGES", raw))
    if (raw := get("UNLEARNING_JOB_GPUS")) is not None:
        values["job_gpus"] = _int("UNLEARNING_JOB_GPUS", raw, 0, 64)
    if (raw := get("UNLEARNING_JOB_CPU")) is not None:
        values["job_cpu"] = _pattern("UNLEARNING_JOB_CPU", raw, _CPU, '"4" or "500m"')
    if (raw := get("UNLEARNING_JOB_MEMORY")) is not None:
        values["job_memory"] = _pattern("UNLEARNING_JOB_MEMORY", raw, _MEMORY, '"16Gi"')
    if (raw := get("UNLEARNING_JOB_NODE_SELECTOR")) is not None:
        selector = _json("UNLEARNING_JOB_NODE_SELECTOR", raw, dict)
        if not all(isinstance(v, str) for v in selector.values()):
            raise SettingsError("UNLEARNING_JOB_NODE_SELECTOR: every value must be a string")
        values["job_node_selector"] = selector
    if (raw := get("UNLEARNING_JOB_TOLERATIONS")) is not None:
        tolerations = _json("UNLEARNING_JOB_TOLERATIONS", raw, list)
        if not all(isinstance(t, dict) for t in tolerations):
            raise SettingsError("UNLEARNING_JOB_TOLERATIONS: every item must be a JSON object (a core/v1 Toleration)")
        values["job_tolerations"] = tuple(tolerations)
    if (raw := get("UNLEARNING_JOB_AFFINITY")) is not None:
        values["job_affinity"] = _json("UNLEARNING_JOB_AFFINITY", raw, dict)
    if (raw := get("UNLEARNING_JOB_PRIORITY_CLASS")) is not None:
        values["job_priority_class"] = raw.strip()
    if (raw := get("UNLEARNING_JOB_DEADLINE_SECONDS")) is not None:
        values["job_deadline_seconds"] = _int("UNLEARNING_JOB_DEADLINE_SECONDS", raw, 60, 30 * 24 * 3600)
    if (raw := get("UNLEARNING_JOB_BACKOFF_LIMIT")) is not None:
        values["job_backoff_limit"] = _int("UNLEARNING_JOB_BACKOFF_LIMIT", raw, 0, 100)
    if (raw := get("UNLEARNING_JOB_TTL_SECONDS")) is not None:
        values["job_ttl_seconds"] = _int("UNLEARNING_JOB_TTL_SECONDS", raw, 0, 365 * 24 * 3600)
    if (raw := get("UNLEARNING_MAX_CONCURRENT_JOBS")) is not None:
        values["max_concurrent_jobs"] = _int("UNLEARNING_MAX_CONCURRENT_JOBS", raw, 1, 100000)
    if (raw := get("UNLEARNING_PENDING_ALERT_SECONDS")) is not None:
        values["pending_alert_seconds"] = _int("UNLEARNING_PENDING_ALERT_SECONDS", raw, 1, 7 * 24 * 3600)
    if (raw := get("UNLEARNING_METRICS_PORT")) is not None:
        values["metrics_port"] = _int("UNLEARNING_METRICS_PORT", raw, 1, 65535)
    if (raw := get("UNLEARNING_HEALTH_PORT")) is not None:
        values["health_port"] = _int("UNLEARNING_HEALTH_PORT", raw, 1, 65535)
    if (raw := get("UNLEARNING_JOB_VOLUME_ROOT")) is not None:
        root = raw.strip()
        if not root.startswith("/") or root == "/":
            raise SettingsError(f"UNLEARNING_JOB_VOLUME_ROOT={raw!r}: expected an absolute folder such as /volumes")
        values["job_volume_root"] = root.rstrip("/")
    settings = OperatorSettings(**values)
    if settings.metrics_port == settings.health_port:
        raise SettingsError(f"UNLEARNING_HEALTH_PORT={settings.health_port}: must differ from UNLEARNING_METRICS_PORT")
    return settings
