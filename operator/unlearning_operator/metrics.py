"""Prometheus metrics, created at start-up in the operator's own registry.

Nothing is registered at import: tests build as many registries as they
like, and importing the package never opens a port. Labels are bounded sets
only (phase, verdict, method, reason, gate, handler, result, age,
calibrated): a request or model name as a label would grow a time series per
request forever. That is why the bank age "per model" is two numbers that do
not name models (model names are the tenants' choice): the stalest model's
bank age, and how many models fall in each of four age bands.

Every bounded label set exists from start-up, at 0 (``create_label_sets``).
A labelled counter or histogram otherwise appears at its first
``.inc()``/``.observe()``, Prometheus sees a new series starting at 1, and
``increase()`` counts no rise: the first OOM kill, handler error or gate
failure after each start never showed on the dashboard. Over the 23
lifecycles of tests/monitoring/lifecycles.py, ``increase()`` counted 7 of 23
completions that way and 22 of 23 with the label sets created at 0
(docs/monitoring.md; the one left is finished before the first scrape).

The dashboard in the chart is tested against ``metric_names``; rename a
metric here and that test fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import METHODS, GatesSpec

from . import calibration_status as cal
from . import status as states
from .views import parse_time

# Unlearning jobs take minutes to hours; queue waits seconds to hours.
DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0, 43200.0)
QUEUE_BUCKETS = (0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)
AUC_BUCKETS = (0.45, 0.5, 0.52, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)
GAP_BUCKETS = (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
DROP_BUCKETS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
# A fold retrains the model from scratch: seconds (the digits demo) to many hours.
FOLD_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 57600.0, 86400.0)

DAY = 86400.0
BANK_AGES: tuple[tuple[str, float], ...] = (("under_1d", DAY), ("1d_to_7d", 7 * DAY), ("7d_to_30d", 30 * DAY))
"""The age label's values (each bound is exclusive), then "over_30d": four series whatever the number of models."""
OLDEST_AGE = "over_30d"

# The bounded label values, each created at 0 by build_registry().
# "Error": the job ended without a record (OOM, deadline, deleted, malformed).
VERDICTS = ("Passed", "Failed", "Error")
# Every reason a finished request's Complete condition can carry when it failed.
FAILURE_REASONS = (
    states.REASON_GATES_FAILED,
    states.REASON_INVALID_INPUT,
    states.REASON_OOM,
    states.REASON_EVICTED,
    states.REASON_DEADLINE,
    states.REASON_BACKOFF,
    states.REASON_IMAGE_PULL,
    states.REASON_JOB_DELETED,
    states.REASON_BAD_RESULT,
    states.REASON_ERROR,
    states.REASON_NAME_CONFLICT,
    states.REASON_SPEC_CHANGED,
    states.REASON_LINEAGE_BROKEN,
    states.REASON_LAUNCH_REFUSED,
)
# The gate label's values: the spec's gate fields (camelCase), and "other" for
# a failed gate this operator's spec does not name (a record from a newer job).
GATES = tuple(info.alias or name for name, info in GatesSpec.model_fields.items())
OTHER_GATE = "other"
# The operator's handlers and background tasks (main.py's kopf handlers, Runtime.spawn names, the tick,
# and the tick's retries: resume a launch, finish a request, a Job's TTL, a deleted request's audit record).
HANDLERS = (
    *("request", "job", "launch", "queue", "event", "pending", "tick", "resume", "finish", "ttl", "audit"),
    *("calibration", "calibration-job", "reject"),
)
AUDIT_WRITTEN = "written"
AUDIT_FAILED = "failed"
WAITING_PHASES = (states.PENDING, states.QUEUED)
CALIBRATION_RESULTS = (cal.READY, cal.FAILED)
# Every reason a failed calibration's Ready condition can carry.
CALIBRATION_FAILURE_REASONS = (
    cal.REASON_FOLD_FAILED,
    cal.REASON_MERGE_FAILED,
    cal.REASON_JOB_DELETED,
    cal.REASON_BAD_RECORD,
    cal.REASON_NAME_CONFLICT,
    cal.REASON_ERROR,
)


@dataclass(frozen=True)
class Completion:
    """What one finished request adds to the metrics (derived by ``completion``)."""

    method: str
    verdict: str
    """Passed or Failed from the record; Error when the run left none."""
    failure_reason: str | None
    """The Complete condition's reason, unless the request Succeeded."""
    post_mia_auc: float | None
    post_confidence_gap: float | None
    test_accuracy_drop: float | None
    failed_gates: tuple[str, ...]
    seconds: float | None
    """Job creation to completion; None when no Job ran."""
    gpu_seconds: float
    calibrated: bool | None = None
    """From the record's calibration (None when the run left no record)."""


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Gauge
    completed: Counter
    job_duration: Histogram
    queue_wait: Histogram
    post_mia_auc: Histogram
    post_confidence_gap: Histogram
    test_accuracy_drop: Histogram
    gate_failures: Counter
    job_failures: Counter
    handler_errors: Counter
    gpu_seconds: Counter
    audit_writes: Counter
    audit_unwritten: Gauge
    oldest_waiting: Gauge
    leader: Gauge
    calibrations: Gauge
    calibrations_completed: Counter
    calibration_failures: Counter
    fold_duration: Histogram
    calibration_gpu_seconds: Counter
    oldest_bank_age: Gauge
    models_by_bank_age: Gauge
    requests_calibrated: Counter

    def set_calibration_counts(self, counts: dict[str, int]) -> None:
        """Every calibration phase always present (0 when empty)."""
        for phase in cal.PHASES:
            self.calibrations.labels(phase=phase).set(counts.get(phase, 0))

    def set_bank_ages(self, ages: list[float]) -> None:
        """Ages (seconds) of each model's newest Ready bank: the oldest, and how many models per age band."""
        self.oldest_bank_age.set(max(ages, default=0.0))
        for label, count in bank_age_counts(ages).items():
            self.models_by_bank_age.labels(age=label).set(count)

    def observe_calibration(self, done: CalibrationCompletion) -> None:
        self.calibrations_completed.labels(result=done.result).inc()
        if done.failure_reason is not None:
            self.calibration_failures.labels(reason=done.failure_reason).inc()
        if done.gpu_seconds:
            self.calibration_gpu_seconds.inc(done.gpu_seconds)

    def set_phase_counts(self, counts: dict[str, int]) -> None:
        """Every phase always present (0 when empty) so dashboards do not show gaps."""
        for phase in states.PHASES:
            self.requests.labels(phase=phase).set(counts.get(phase, 0))

    def set_oldest_waiting(self, seconds: dict[str, float]) -> None:
        """Age of the oldest Pending and of the oldest Queued request (0 when none waits)."""
        for phase in WAITING_PHASES:
            self.oldest_waiting.labels(phase=phase).set(seconds.get(phase, 0.0))

    def create_label_sets(self) -> None:
        """Every bounded label set at 0, so that the first event of each is counted (module docstring)."""
        for method in METHODS:
            for verdict in VERDICTS:
                self.completed.labels(verdict=verdict, method=method)
            for histogram in (self.job_duration, self.post_mia_auc, self.post_confidence_gap, self.test_accuracy_drop):
                histogram.labels(method=method)
            self.gpu_seconds.labels(method=method)
        for reason in FAILURE_REASONS:
            self.job_failures.labels(reason=reason)
        for gate in (*GATES, OTHER_GATE):
            self.gate_failures.labels(gate=gate)
        for handler in HANDLERS:
            self.handler_errors.labels(handler=handler)
        for result in (AUDIT_WRITTEN, AUDIT_FAILED):
            self.audit_writes.labels(result=result)
        self.set_phase_counts({})
        self.set_oldest_waiting({})
        for result in CALIBRATION_RESULTS:
            self.calibrations_completed.labels(result=result)
        for reason in CALIBRATION_FAILURE_REASONS:
            self.calibration_failures.labels(reason=reason)
        for calibrated in ("true", "false"):
            self.requests_calibrated.labels(calibrated=calibrated)
        self.set_calibration_counts({})
        self.set_bank_ages([])

    def observe(self, done: Completion) -> None:
        """Count one finished request (what to count is decided by ``completion``)."""
        method = done.method
        self.completed.labels(verdict=done.verdict, method=method).inc()
        if done.failure_reason is not None:
            self.job_failures.labels(reason=done.failure_reason).inc()
        if done.post_mia_auc is not None:
            self.post_mia_auc.labels(method=method).observe(done.post_mia_auc)
        if done.post_confidence_gap is not None:
            self.post_confidence_gap.labels(method=method).observe(done.post_confidence_gap)
        if done.test_accuracy_drop is not None:
            self.test_accuracy_drop.labels(method=method).observe(done.test_accuracy_drop)
        for gate in done.failed_gates:
            self.gate_failures.labels(gate=gate).inc()
        if done.seconds is not None:
            self.job_duration.labels(method=method).observe(done.seconds)
        if done.gpu_seconds:
            self.gpu_seconds.labels(method=method).inc(done.gpu_seconds)
        if done.calibrated is not None:
            self.requests_calibrated.labels(calibrated="true" if done.calibrated else "false").inc()


@dataclass(frozen=True)
class CalibrationCompletion:
    """What one finished calibration adds to the metrics."""

    result: str
    """Ready or Failed."""
    failure_reason: str | None
    gpu_seconds: float


def bank_age_counts(ages: list[float]) -> dict[str, int]:
    """How many models' newest bank falls in each age band (every band present). Pure."""
    counts = {label: 0 for label, _ in BANK_AGES} | {OLDEST_AGE: 0}
    for age in ages:
        label = next((label for label, bound in BANK_AGES if age < bound), OLDEST_AGE)
        counts[label] += 1
    return counts


def calibration_completion(status: dict[str, Any]) -> CalibrationCompletion:
    """What a calibration that reached ``status`` (Ready or Failed) adds to the metrics. Pure."""
    phase = str(status.get("phase"))
    reason = None
    if phase != cal.READY:
        reason = (cal.get_ready_condition(status) or {}).get("reason", cal.REASON_ERROR)
    gpu = float((status.get("cost") or {}).get("gpuSeconds") or 0.0)
    return CalibrationCompletion(result=phase, failure_reason=reason, gpu_seconds=gpu)


def build_registry() -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    # Process and platform collectors give process_resident_memory_bytes and
    # friends in this registry too (the default registry is not served).
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    metrics = Metrics(
        registry=registry,
        requests=Gauge("unlearning_requests", "UnlearningRequests by phase.", ["phase"], registry=registry),
        completed=Counter(
            "unlearning_requests_completed",
            "Requests whose job ended, by verdict and method.",
            ["verdict", "method"],
            registry=registry,
        ),
        job_duration=Histogram(
            "unlearning_job_duration_seconds",
            "Job creation to completion.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
        queue_wait=Histogram(
            "unlearning_queue_wait_seconds",
            "Request creation to Job creation.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        ),
        post_mia_auc=Histogram(
            "unlearning_post_mia_auc",
            "Loss-attack AUC after unlearning (0.5: forget set indistinguishable from held-out).",
            ["method"],
            buckets=AUC_BUCKETS,
            registry=registry,
        ),
        post_confidence_gap=Histogram(
            "unlearning_post_confidence_gap",
            "Mean max-softmax on forget minus held-out, after unlearning.",
            ["method"],
            buckets=GAP_BUCKETS,
            registry=registry,
        ),
        test_accuracy_drop=Histogram(
            "unlearning_test_accuracy_drop_points",
            "Held-out accuracy before minus after unlearning (percentage points).",
            ["method"],
            buckets=DROP_BUCKETS,
            registry=registry,
        ),
        gate_failures=Counter(
            "unlearning_gate_failures", "Failed acceptance gates, by gate.", ["gate"], registry=registry
        ),
        job_failures=Counter(
            "unlearning_job_failures",
            "Requests that failed without passing, by reason (a status condition reason).",
            ["reason"],
            registry=registry,
        ),
        handler_errors=Counter(
            "unlearning_handler_errors", "Unexpected errors in operator handlers.", ["handler"], registry=registry
        ),
        gpu_seconds=Counter(
            "unlearning_gpu_seconds",
            "GPU-seconds used by finished jobs (GPUs x duration).",
            ["method"],
            registry=registry,
        ),
        audit_writes=Counter(
            "unlearning_audit_writes",
            "Audit ConfigMap writes of finished requests, by result (written, failed).",
            ["result"],
            registry=registry,
        ),
        audit_unwritten=Gauge(
            "unlearning_audit_records_unwritten",
            "Finished requests whose audit ConfigMap could not be written (they stay Running until it is).",
            registry=registry,
        ),
        oldest_waiting=Gauge(
            "unlearning_oldest_waiting_request_seconds",
            "Age of the oldest request still Pending or Queued, by phase (0 when none waits).",
            ["phase"],
            registry=registry,
        ),
        leader=Gauge(
            "unlearning_operator_leader",
            "1 in the replica that reconciles (holds the leader-election Lease), 0 in a standby.",
            registry=registry,
        ),
        calibrations=Gauge("unlearning_calibrations", "UnlearningCalibrations by phase.", ["phase"], registry=registry),
        calibrations_completed=Counter(
            "unlearning_calibrations_completed",
            "Calibrations that ended, by result (Ready or Failed).",
            ["result"],
            registry=registry,
        ),
        calibration_failures=Counter(
            "unlearning_calibration_failures",
            "Calibrations that failed, by reason (a status condition reason).",
            ["reason"],
            registry=registry,
        ),
        fold_duration=Histogram(
            "unlearning_calibration_fold_duration_seconds",
            "Run time of each reference model's training (one index of the folds Job).",
            buckets=FOLD_BUCKETS,
            registry=registry,
        ),
        calibration_gpu_seconds=Counter(
            "unlearning_calibration_gpu_seconds",
            "GPU-seconds used by calibrations' fold pods (GPUs x run time, retries included).",
            registry=registry,
        ),
        oldest_bank_age=Gauge(
            "unlearning_calibration_oldest_bank_age_seconds",
            "Age of the stalest bank: over models with a Ready calibration, the oldest newest bank (0: none).",
            registry=registry,
        ),
        models_by_bank_age=Gauge(
            "unlearning_calibration_models_by_bank_age",
            "Models by the age of their newest Ready bank (under_1d, 1d_to_7d, 7d_to_30d, over_30d).",
            ["age"],
            registry=registry,
        ),
        requests_calibrated=Counter(
            "unlearning_requests_calibrated",
            "Finished requests whose record says whether they ran with a reference bank.",
            ["calibrated"],
            registry=registry,
        ),
    )
    metrics.create_label_sets()
    return metrics


def gate_labels(record: CompactRecord) -> list[str]:
    """One gate label per failed gate of a Failed verdict, as the record names them.

    Bounded: a name that is not a gate of this operator's spec (a record
    from a newer job) counts as "other", and so does a Failed verdict that
    names none.
    """
    if record.verdict != "Failed" or record.error is not None:
        return []
    return [gate if gate in GATES else OTHER_GATE for gate in record.failed_gates] or [OTHER_GATE]


def completion(
    method: str | None, status: dict[str, Any], record: CompactRecord | None, gpus: int, ran: bool
) -> Completion:
    """What a request that reached ``status`` (its final status) adds to the metrics. Pure.

    ``method`` is the spec's (None when the spec could not be read); the
    record's method wins when it names one: the job resolves ``auto`` to the
    method that ran. ``gpus`` is what the Job's pod held; ``ran`` says whether
    a Job ran at all (a request failed before its Job existed has no duration
    and used no GPU).
    """
    if record is not None and record.method in METHODS:
        method = record.method
    post = record.post if record is not None else None
    pre = record.pre if record is not None else None
    failure = None
    if status.get("phase") != states.SUCCEEDED:
        failure = (states.get_condition(status, states.COMPLETE) or {}).get("reason", states.REASON_ERROR)
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    seconds = max(0.0, (end - start).total_seconds()) if ran and start is not None and end is not None else None
    return Completion(
        method=method or "unknown",
        verdict=record.verdict if record is not None else "Error",
        failure_reason=failure,
        post_mia_auc=post.mia_auc if post is not None else None,
        post_confidence_gap=post.confidence_gap if post is not None else None,
        test_accuracy_drop=pre.test_accuracy - post.test_accuracy if pre is not None and post is not None else None,
        failed_gates=tuple(gate_labels(record)) if record is not None else (),
        seconds=seconds,
        gpu_seconds=gpus * seconds if seconds is not None else 0.0,
        calibrated=record.calibration.calibrated if record is not None else None,
    )


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes (as written on /metrics, _total etc. included)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names: set[str] = set()
    for family in registry.collect():
        extra = suffixes.get(family.type)
        if extra:
            names.update(family.name + suffix for suffix in extra)
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples if not sample.name.endswith("_created"))
    return names


def serve(metrics: Metrics, port: int) -> None:
    """Serve /metrics on a background thread."""
    start_http_server(port, registry=metrics.registry)
