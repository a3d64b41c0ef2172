"""Operator settings: one typed, frozen object read from the environment at start-up.

Every variable is optional and has a default chosen for a small GPU cluster;
the Helm chart sets them from its values. Each setting declares its variable
and its parser beside the field (``env(...)`` in the field's metadata), and
``ENV_VARS`` lists them from there: the chart's Deployment test and the
settings table in docs/operator.md are checked against that list, so a new
setting is one field here (plus its chart value and doc row, which the tests
ask for).

Parsing is strict on purpose: a typo in a resource quantity or a JSON node
selector would otherwise surface hours later as a Job the API server refuses,
so start-up fails instead with one line naming the variable and what to change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

from unlearning_contracts.factories import parse_allowed_modules
from unlearning_contracts.spec import DEFAULT_VOLUME_ROOT

from .quantities import quantity

DEFAULT_JOB_IMAGE = "ghcr.io/unlearning-operator/unlearn-job:0.1.0"

_CPU = re.compile(r"^\d+(\.\d+)?m?$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class SettingsError(ValueError):
    """An invalid environment variable; the message names it."""


Parse = Callable[[str, str], Any]
"""(variable name, raw value) -> the field's value; raises SettingsError naming the variable."""


@dataclass(frozen=True)
class Env:
    """Where a setting comes from: its environment variable, how its text is read, and its chart value."""

    name: str
    parse: Parse
    chart: str | None = None
    """The chart value that sets it (dotted), named in messages that tell a tenant what the admin allows."""


_ENV = "env"


def env(name: str, parse: Parse, chart: str | None = None) -> dict[str, Env]:
    """A setting field's metadata: ``field(default=..., metadata=env("UNLEARNING_X", parser, "job.x"))``."""
    return {_ENV: Env(name, parse, chart)}


# -- parsers ------------------------------------------------------------------------------------


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _namespaces(name: str, raw: str) -> tuple[str, ...]:
    namespaces = _csv(name, raw)
    for namespace in namespaces:
        if not _NAMESPACE.match(namespace):
            raise SettingsError(
                f"{name}: {namespace!r} is not a namespace name "
                "(globs are not supported: list the namespaces, or leave empty for cluster-wide)"
            )
    return namespaces


def _images(name: str, raw: str) -> frozenset[str]:
    return frozenset(_csv(name, raw))


def _modules(name: str, raw: str) -> tuple[str, ...]:
    # The job reads the same list with the same parser (contracts' factories.py): one meaning of a prefix.
    try:
        return parse_allowed_modules(raw)
    except ValueError as error:
        raise SettingsError(f"{name}: {error}; no wildcards") from None


def _names(name: str, raw: str) -> frozenset[str]:
    names = _csv(name, raw)
    for item in names:
        if not _SUBDOMAIN.match(item) or len(item) > 253:
            raise SettingsError(f"{name}: {item!r} is not an object name (a DNS subdomain such as batch-low)")
    return frozenset(names)


def _queue(name: str, raw: str) -> str:
    queue = raw.strip()
    if not _NAMESPACE.match(queue) or len(queue) > 63:
        raise SettingsError(f"{name}={raw!r}: not a LocalQueue name (a DNS label such as team-gpus)")
    return queue


def _integer(minimum: int, maximum: int) -> Parse:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected an integer") from None
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name}={value}: must be between {minimum} and {maximum}")
        return value

    return parse


def _quantity(pattern: re.Pattern[str], example: str) -> Parse:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if not pattern.match(value):
            raise SettingsError(f"{name}={raw!r}: not a Kubernetes quantity (for example {example})")
        return value

    return parse


def _json(name: str, raw: str, kind: type) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{name}: not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else "a JSON list"
        raise SettingsError(f"{name}: expected {expected}, got {type(value).__name__}")
    return value


def _json_object(name: str, raw: str) -> dict[str, Any]:
    return dict(_json(name, raw, dict))


def _node_selector(name: str, raw: str) -> dict[str, str]:
    selector = _json_object(name, raw)
    if not all(isinstance(v, str) for v in selector.values()):
        raise SettingsError(f"{name}: every value must be a string")
    return selector


def _tolerations(name: str, raw: str) -> tuple[dict[str, Any], ...]:
    tolerations = _json(name, raw, list)
    if not all(isinstance(t, dict) for t in tolerations):
        raise SettingsError(f"{name}: every item must be a JSON object (a core/v1 Toleration)")
    return tuple(tolerations)


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    return value == "true"


def _egress(name: str, raw: str) -> tuple[dict[str, Any], ...]:
    rules = _json(name, raw, list)
    if not all(isinstance(rule, dict) for rule in rules):
        raise SettingsError(f"{name}: every item must be a JSON object (a NetworkPolicyEgressRule)")
    return tuple(rules)


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> int:
    """A memory-style quantity ("4Gi", "500M", "1024") in bytes; ValueError for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?", quantity.strip())
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2) or ""])


def _folder(name: str, raw: str) -> str:
    root = raw.strip()
    if not root.startswith("/") or root == "/":
        raise SettingsError(f"{name}={raw!r}: expected an absolute folder such as /volumes")
    return root.rstrip("/")


# -- the settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs to know besides the requests themselves."""

    watch_namespaces: tuple[str, ...] = field(default=(), metadata=env("UNLEARNING_WATCH_NAMESPACES", _namespaces))
    """Namespaces to watch; empty means cluster-wide (needs a ClusterRole)."""
    job_image: str = field(default=DEFAULT_JOB_IMAGE, metadata=env("UNLEARNING_JOB_IMAGE", _text))
    """Image every Job runs unless a request picks another allow-listed one."""
    allowed_images: frozenset[str] = field(
        default=frozenset(), metadata=env("UNLEARNING_ALLOWED_IMAGES", _images, "job.allowedImages")
    )
    """Images a request may choose in spec.job.image; job_image is always allowed."""
    allowed_factory_modules: tuple[str, ...] = field(
        default=(), metadata=env("UNLEARNING_ALLOWED_FACTORY_MODULES", _modules, "job.allowedFactoryModules")
    )
    """Module prefixes a request's model.architecture.factory may come from (empty: no factory runs).

    A factory is code the job imports and calls, so it is the admin's to allow
    (for modules baked into a derived job image); the Job gets the same list.
    """
    job_gpus: int = field(default=1, metadata=env("UNLEARNING_JOB_GPUS", _integer(0, 64)))
    """nvidia.com/gpu per pod when the request does not say (0 = CPU-only, limit omitted)."""
    job_cpu: str = field(default="4", metadata=env("UNLEARNING_JOB_CPU", _quantity(_CPU, '"4" or "500m"')))
    """CPU request and limit: data loading and the audit's sklearn attack run on CPU."""
    job_memory: str = field(default="16Gi", metadata=env("UNLEARNING_JOB_MEMORY", _quantity(_MEMORY, '"16Gi"')))
    """Memory request and limit: the audit holds up to audit.maxSamples per set in memory."""
    job_ephemeral_storage: str = field(
        default="6Gi", metadata=env("UNLEARNING_JOB_EPHEMERAL_STORAGE", _quantity(_MEMORY, '"6Gi"'))
    )
    """Local-disk request and limit of a Job pod: its /tmp plus logs (models and data are on claims)."""
    job_tmp_size: str = field(default="4Gi", metadata=env("UNLEARNING_JOB_TMP_SIZE", _quantity(_MEMORY, '"4Gi"')))
    """sizeLimit of the Job pod's /tmp emptyDir; the job stops at 90% of it with a clear error."""
    job_network_policy: bool = field(default=True, metadata=env("UNLEARNING_JOB_NETWORK_POLICY", _bool))
    """Create, with each Job, a NetworkPolicy that denies its pod all traffic (but job_egress)."""
    job_egress: tuple[Mapping[str, Any], ...] = field(default=(), metadata=env("UNLEARNING_JOB_EGRESS", _egress))
    """Extra NetworkPolicyEgressRules for Job pods (the admin's choice; the job itself needs no network)."""
    job_shm_size: str = field(default="1Gi", metadata=env("UNLEARNING_JOB_SHM_SIZE", _quantity(_MEMORY, '"1Gi"')))
    """/dev/shm of a pod with several GPUs (in-memory, counted in its memory): NCCL's transport between them."""
    job_node_selector: Mapping[str, str] = field(
        default_factory=dict, metadata=env("UNLEARNING_JOB_NODE_SELECTOR", _node_selector)
    )
    """Node selector of Job pods (JSON object); a request's keys win."""
    job_tolerations: tuple[Mapping[str, Any], ...] = field(
        default=(), metadata=env("UNLEARNING_JOB_TOLERATIONS", _tolerations)
    )
    """Tolerations of Job pods (JSON list); a request's are appended."""
    job_affinity: Mapping[str, Any] = field(default_factory=dict, metadata=env("UNLEARNING_JOB_AFFINITY", _json_object))
    """Affinity of Job pods (JSON object)."""
    job_priority_class: str | None = field(default=None, metadata=env("UNLEARNING_JOB_PRIORITY_CLASS", _text))
    """Priority class of Job pods unless a request names one."""
    allowed_priority_classes: frozenset[str] = field(
        default=frozenset(),
        metadata=env("UNLEARNING_ALLOWED_PRIORITY_CLASSES", _names, "job.bounds.allowedPriorityClasses"),
    )
    """Priority classes a request may name in spec.job.priorityClassName (job_priority_class always)."""
    allow_keyless_tolerations: bool = field(
        default=False, metadata=env("UNLEARNING_ALLOW_KEYLESS_TOLERATIONS", _bool, "job.bounds.allowKeylessTolerations")
    )
    """Whether a request may tolerate with no key (operator Exists), which tolerates every taint."""
    max_job_gpus: int = field(default=8, metadata=env("UNLEARNING_MAX_JOB_GPUS", _integer(0, 64), "job.bounds.maxGpus"))
    """Most nvidia.com/gpu a request may ask for (one 8-GPU node by default)."""
    max_job_cpu: str = field(
        default="32", metadata=env("UNLEARNING_MAX_JOB_CPU", _quantity(_CPU, '"32"'), "job.bounds.maxCpu")
    )
    """Most CPU a request may ask for."""
    max_job_memory: str = field(
        default="256Gi",
        metadata=env("UNLEARNING_MAX_JOB_MEMORY", _quantity(_MEMORY, '"256Gi"'), "job.bounds.maxMemory"),
    )
    """Most memory a request may ask for."""
    max_job_deadline_seconds: int = field(
        default=86400,
        metadata=env(
            "UNLEARNING_MAX_JOB_DEADLINE_SECONDS", _integer(60, 30 * 24 * 3600), "job.bounds.maxActiveDeadlineSeconds"
        ),
    )
    """Longest spec.job.activeDeadlineSeconds a request may set: one day holds a GPU long enough."""
    job_queue_name: str | None = field(
        default=None, metadata=env("UNLEARNING_JOB_QUEUE_NAME", _queue, "job.kueue.queueName")
    )
    """Kueue LocalQueue of Jobs whose request names none (empty: such Jobs bypass Kueue)."""
    require_queue_name: bool = field(
        default=False, metadata=env("UNLEARNING_REQUIRE_QUEUE_NAME", _bool, "job.kueue.required")
    )
    """With Kueue: every Job must go through a LocalQueue (the request's or job_queue_name)."""
    job_deadline_seconds: int = field(
        default=21600, metadata=env("UNLEARNING_JOB_DEADLINE_SECONDS", _integer(60, 30 * 24 * 3600))
    )
    """activeDeadlineSeconds: six hours bounds a runaway job on a shared GPU."""
    job_backoff_limit: int = field(default=2, metadata=env("UNLEARNING_JOB_BACKOFF_LIMIT", _integer(0, 100)))
    """Retries after crashes (not after gate failures or invalid input: those fail at once)."""
    job_ttl_seconds: int = field(
        default=86400, metadata=env("UNLEARNING_JOB_TTL_SECONDS", _integer(0, 365 * 24 * 3600))
    )
    """ttlSecondsAfterFinished: the result is in status and the audit record by then."""
    max_concurrent_jobs: int = field(
        default=4, metadata=env("UNLEARNING_MAX_CONCURRENT_JOBS", _integer(1, 100000), "job.maxConcurrentJobs")
    )
    """Cluster-wide cap on unfinished Jobs; the rest wait in phase Queued."""
    max_concurrent_jobs_per_namespace: int = field(
        default=0,
        metadata=env(
            "UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE", _integer(0, 100000), "job.maxConcurrentJobsPerNamespace"
        ),
    )
    """Cap on one namespace's unfinished Jobs (0: only the global cap), so one tenant cannot hold every slot."""
    calibration_parallelism: int = field(
        default=2, metadata=env("UNLEARNING_CALIBRATION_PARALLELISM", _integer(1, 32), "job.calibrationParallelism")
    )
    """Folds of one calibration trained at once, each holding one slot of the cap: half the default
    cap, so that a calibration never holds every slot and requests keep running beside it."""
    pending_alert_seconds: int = field(
        default=120, metadata=env("UNLEARNING_PENDING_ALERT_SECONDS", _integer(1, 7 * 24 * 3600))
    )
    """A pod pending longer than this gets a PodPending condition saying why."""
    metrics_port: int = field(default=8080, metadata=env("UNLEARNING_METRICS_PORT", _integer(1, 65535)))
    """Port of the Prometheus /metrics endpoint."""
    health_port: int = field(default=8081, metadata=env("UNLEARNING_HEALTH_PORT", _integer(1, 65535)))
    """Port of the liveness (/healthz) and readiness (/readyz) endpoints (health.py)."""
    job_volume_root: str = field(default=DEFAULT_VOLUME_ROOT, metadata=env("UNLEARNING_JOB_VOLUME_ROOT", _folder))
    """Where the pod mounts each claim (as /<root>/<claimName>)."""
    leader_election: bool = field(default=False, metadata=env("UNLEARNING_LEADER_ELECTION", _bool))
    """Run as one of several replicas of which exactly one reconciles (leader.py); off for a lone process."""
    lease_namespace: str = field(default="", metadata=env("UNLEARNING_LEASE_NAMESPACE", _text))
    """Namespace of the leader-election Lease (the chart: the release's namespace)."""
    lease_name: str = field(default="unlearning-operator", metadata=env("UNLEARNING_LEASE_NAME", _text))
    """Name of the Lease; replicas that share it share the work."""
    lease_duration_seconds: int = field(
        default=15, metadata=env("UNLEARNING_LEASE_DURATION_SECONDS", _integer(1, 3600))
    )
    """A Lease nobody renews is free after this long: the handover time after a crash."""
    lease_renew_deadline_seconds: int = field(
        default=10, metadata=env("UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS", _integer(1, 3600))
    )
    """A leader that cannot renew for this long exits; below the lease duration."""
    lease_retry_period_seconds: int = field(
        default=2, metadata=env("UNLEARNING_LEASE_RETRY_PERIOD_SECONDS", _integer(1, 3600))
    )
    """Renewal interval of the leader and polling interval of a standby."""

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces

    def image_allowed(self, image: str) -> bool:
        return image == self.job_image or image in self.allowed_images


def _declared() -> list[tuple[str, Env]]:
    return [(f.name, f.metadata[_ENV]) for f in fields(OperatorSettings)]


ENV_VARS: tuple[str, ...] = tuple(declared.name for _, declared in _declared())
"""Every variable the operator reads, in field order."""


def where_set(field_name: str) -> str:
    """How the admin changes a setting, for messages: ``chart value job.x (UNLEARNING_X)``."""
    declared = dict(_declared())[field_name]
    if declared.chart is None:
        return declared.name
    return f"chart value {declared.chart} ({declared.name})"


def load_settings(environ: Mapping[str, str]) -> OperatorSettings:
    """Parse the UNLEARNING_* variables; raise SettingsError naming the first bad one."""
    values: dict[str, Any] = {}
    for name, declared in _declared():
        raw = environ.get(declared.name)
        if raw is not None and raw.strip() != "":
            values[name] = declared.parse(declared.name, raw)
    settings = OperatorSettings(**values)
    if quantity_bytes(settings.job_tmp_size) >= quantity_bytes(settings.job_ephemeral_storage):
        raise SettingsError(
            f"UNLEARNING_JOB_TMP_SIZE={settings.job_tmp_size}: must be below UNLEARNING_JOB_EPHEMERAL_STORAGE="
            f"{settings.job_ephemeral_storage} (the pod's limit counts /tmp and its logs together)"
        )
    if settings.leader_election:
        if not _NAMESPACE.match(settings.lease_namespace):
            raise SettingsError(
                f"UNLEARNING_LEASE_NAMESPACE={settings.lease_namespace!r}: leader election needs the namespace "
                "of its Lease (the chart sets it to the release namespace)"
            )
        if not (
            settings.lease_retry_period_seconds
            < settings.lease_renew_deadline_seconds
            < settings.lease_duration_seconds
        ):
            raise SettingsError(
                f"UNLEARNING_LEASE_RENEW_DEADLINE_SECONDS={settings.lease_renew_deadline_seconds}: must lie between "
                f"the retry period ({settings.lease_retry_period_seconds}) and the lease duration "
                f"({settings.lease_duration_seconds}), so that a leader steps down before a standby may take over"
            )
    if settings.metrics_port == settings.health_port:
        raise SettingsError(f"UNLEARNING_HEALTH_PORT={settings.health_port}: must differ from UNLEARNING_METRICS_PORT")
    _check_defaults_within_bounds(settings)
    return settings


def _check_defaults_within_bounds(settings: OperatorSettings) -> None:
    """A default above its own bound would reject every request that leaves the field out."""
    pairs: list[tuple[str, object, Fraction, str, Fraction]] = [
        (
            "UNLEARNING_JOB_GPUS",
            settings.job_gpus,
            Fraction(settings.job_gpus),
            "UNLEARNING_MAX_JOB_GPUS",
            Fraction(settings.max_job_gpus),
        ),
        (
            "UNLEARNING_JOB_CPU",
            settings.job_cpu,
            quantity(settings.job_cpu),
            "UNLEARNING_MAX_JOB_CPU",
            quantity(settings.max_job_cpu),
        ),
        (
            "UNLEARNING_JOB_MEMORY",
            settings.job_memory,
            quantity(settings.job_memory),
            "UNLEARNING_MAX_JOB_MEMORY",
            quantity(settings.max_job_memory),
        ),
        (
            "UNLEARNING_JOB_DEADLINE_SECONDS",
            settings.job_deadline_seconds,
            Fraction(settings.job_deadline_seconds),
            "UNLEARNING_MAX_JOB_DEADLINE_SECONDS",
            Fraction(settings.max_job_deadline_seconds),
        ),
    ]
    for name, shown, value, bound_name, bound in pairs:
        if value > bound:
            raise SettingsError(f"{name}={shown}: above {bound_name}; raise the bound or lower the default")
