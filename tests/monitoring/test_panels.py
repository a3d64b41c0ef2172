"""Every dashboard panel, evaluated by Prometheus' own engine over the operator's real metrics.

tests/chart/test_dashboard.py checks that each metric a panel names exists;
this evaluates the queries. The operator's registry is driven through its own
code over 23 request lifecycles with two restarts (lifecycles.py), scraped
every 30 s, and each panel's query, with Grafana's variables filled in, is
run by promtool at a busy moment and again two hours after the last event.
A panel passes when it returns at least one number (not NaN). The counts and
quantiles it shows are then compared with what the run did.

The mutation cases are the negative control: small, plausible mistakes in a
query (a dropped suffix, a lost ``le``, a wrong matcher, a missing
parenthesis, the former rate window of the quantile panels) must make the
same check fail.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.monitoring import grafana
from tests.monitoring.lifecycles import JOB, LIFECYCLES, TARGET, Run
from tests.monitoring.promtool import Result, evaluate
from unlearning_operator.metrics import DURATION_BUCKETS, FOLD_BUCKETS, QUEUE_BUCKETS

pytestmark = pytest.mark.unit

DASHBOARD = grafana.load()
VALUES = grafana.variables(DASHBOARD, job=JOB, namespace=TARGET["namespace"])
QUERIES = grafana.queries(DASHBOARD)
# Busy: jobs finished in the hour before (and the audit retry is under way).
BUSY = 110 * 60


def late(run: Run) -> int:
    """Two hours after the last completion: jobs take minutes to hours, a panel must still show data."""
    return run.last_completion + 2 * 3600


def expr_of(title: str, ref: str = "A") -> str:
    return next(q.expr for q in QUERIES if q.panel == title and q.ref == ref)


def shows_data(result: Result) -> bool:
    return result.error is None and bool(result.numbers)


def values_by(result: Result, label: str) -> dict[str, float]:
    return {s.labels.get(label, ""): s.value for s in result.numbers}


@pytest.fixture(scope="module")
def results(promtool: Path, series: list[dict[str, str]], run: Run) -> dict[tuple[str, int], Result]:
    """Every panel's query at BUSY and at late(run), plus the times the number checks read."""
    times = [BUSY, late(run), 10 * 60, 65 * 60, 78 * 60, (136 + 30) * 60, *calibration_times(run)]
    exprs = [grafana.substitute(q.expr, VALUES) for q in QUERIES]
    exprs += ["count by (job) (unlearning_requests)", "count by (namespace) (unlearning_requests)"]
    return evaluate(promtool, series, [(e, t) for e in exprs for t in times])


def calibration_times(run: Run) -> list[int]:
    """Five minutes after each calibration ended (within the hour its end is counted in)."""
    return [at + 300 for at, _ in run.calibrations.values()]


def result(results: dict[tuple[str, int], Result], title: str, at: int, ref: str = "A") -> Result:
    return results[(grafana.substitute(expr_of(title, ref), VALUES), at)]


def test_there_are_panels_to_evaluate() -> None:
    assert len(QUERIES) >= 20
    assert len({q.panel for q in QUERIES}) >= 19


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}/{q.ref}" for q in QUERIES])
def test_every_panel_shows_data_while_busy_and_long_after(
    query: grafana.Query, results: dict[tuple[str, int], Result], run: Run
) -> None:
    expr = grafana.substitute(query.expr, VALUES)
    for at in (BUSY, late(run)):
        got = results[(expr, at)]
        assert got.error is None, f"{query.panel!r} does not parse: {got.error}\n{expr}"
        assert got.numbers, f"{query.panel!r} shows nothing at {at / 3600:.2f} h: {got.samples}\n{expr}"


def test_variables_offer_the_operators_job_and_namespace(results: dict[tuple[str, int], Result], run: Run) -> None:
    # label_values(unlearning_requests, job) and (..., namespace): what the $job and $namespace pickers list.
    jobs = results[("count by (job) (unlearning_requests)", late(run))]
    namespaces = results[("count by (namespace) (unlearning_requests)", late(run))]
    assert {s.labels["job"] for s in jobs.numbers} == {JOB}
    assert {s.labels["namespace"] for s in namespaces.numbers} == {TARGET["namespace"]}


def counted(run: Run, start: int, end: int, key: Callable[..., str]) -> Counter[str]:
    """Completions in (start, end] that Prometheus can count: not those a new pod finished before
    its first scrape (its counters start above 0, and increase() sees no rise)."""
    return Counter(key(c) for c in run.completions if start < c.at <= end and c.at not in run.new_pods[1:])


def test_completions_are_whole_counts_of_what_finished(results: dict[tuple[str, int], Result], run: Run) -> None:
    for at in (BUSY, 78 * 60, (136 + 30) * 60):
        by_verdict = values_by(result(results, "Completions by verdict (1h)", at), "verdict")
        expected = counted(run, at - 3600, at, lambda c: c.verdict)
        assert {v: n for v, n in by_verdict.items() if n} == dict(expected), f"at {at / 60:.0f} min"
        by_method = values_by(result(results, "Completions by method (1h)", at), "method")
        assert {m: n for m, n in by_method.items() if n} == dict(counted(run, at - 3600, at, lambda c: c.method))
    # Long after, the panels show zeros (the series exist), not gaps.
    quiet = values_by(result(results, "Completions by verdict (1h)", late(run)), "verdict")
    assert quiet == {"Passed": 0.0, "Failed": 0.0, "Error": 0.0}


def test_every_failure_reason_and_gate_is_counted_on_first_occurrence(
    results: dict[tuple[str, int], Result], run: Run
) -> None:
    # Each reason occurs once or twice in the run, most of them first after a
    # restart: without label sets created at start-up, their first event
    # would be a new series starting at 1 and count as nothing.
    for at in (BUSY, (136 + 30) * 60):
        reasons = values_by(result(results, "Job failures by reason (1h)", at), "reason")
        expected = counted(run, at - 3600, at, lambda c: c.reason)
        expected.pop("Passed", None)
        assert {r: n for r, n in reasons.items() if n} == dict(expected), f"at {at / 60:.0f} min"
    gates = values_by(result(results, "Gate failures by gate (1h)", BUSY), "gate")
    # r17 (100 min) failed two gates; r10 (46 min) is outside the hour before BUSY.
    assert {g: n for g, n in gates.items() if n} == {"maxForgetAccuracy": 1.0, "maxMiaAuc": 1.0}


def test_quantile_panels_read_the_right_buckets_long_after_the_last_job(
    results: dict[tuple[str, int], Result], run: Run
) -> None:
    at = late(run)
    window = _seconds(VALUES["window"])
    created = {c.name: c.created for c in LIFECYCLES}
    waits = sorted(t - created[name] for name, t in run.launched.items() if at - window < t <= at)
    true_p95 = waits[math.ceil(0.95 * len(waits)) - 1]
    (p95,) = result(results, "Queue wait p95 ($window)", at).numbers
    assert _bucket(p95.value, QUEUE_BUCKETS) == _bucket(true_p95, QUEUE_BUCKETS), (p95.value, waits)
    durations = values_by(result(results, "Job duration p95 by method ($window)", at), "method")
    assert set(durations) == {c.method for c in LIFECYCLES}
    for method, value in durations.items():
        # Start to completion as the operator saw it (a result finished late counts late).
        longest = max(c.at - run.launched[c.name] for c in run.completions if c.method == method)
        assert 0 < value <= _upper(longest, DURATION_BUCKETS), (method, value, longest)


def test_gauges_and_stats(results: dict[tuple[str, int], Result], run: Run) -> None:
    at = late(run)
    phases = values_by(result(results, "Requests by phase", at), "phase")
    finished = Counter("Succeeded" if c.verdict == "Passed" else "Failed" for c in run.completions)
    assert phases == {"Pending": 0, "Queued": 0, "Running": 0, "Rejected": 0, **finished}
    assert [s.value for s in result(results, "Operator up", at).numbers] == [1.0]
    # At 10 min r05 (created at 5 min) waits for a slot; nothing is Pending.
    oldest = values_by(result(results, "Oldest waiting request", 10 * 60), "phase")
    assert oldest == {"Queued": 300.0, "Pending": 0.0}
    # r12's audit record cannot be written from 60 to 70 min: the Job's event tries once, then the periodic
    # check retries at every tick (the driver ticks once per 30 s scrape, at 60 min right after the event).
    audit = values_by(result(results, "Audit records (1h)", 65 * 60), "result")
    assert audit["failed"] == 1 + (65 - 60) * 60 // 30 + 1
    assert result(results, "Audit records (1h)", 65 * 60, "B").numbers[0].value == 1
    assert result(results, "Audit records (1h)", 78 * 60, "B").numbers[0].value == 0
    restarts = result(results, "Container restarts (1h)", (136 + 30) * 60)
    assert [s.value for s in restarts.numbers] == [1.0]


def test_gpu_hours_in_range_add_up(results: dict[tuple[str, int], Result], run: Run) -> None:
    gpus = {c.name: c.gpus for c in LIFECYCLES}
    expected = sum(
        gpus[c.name] * (c.at - run.launched[c.name]) / 3600
        for c in run.completions
        if c.reason != "JobDeleted" and c.at not in run.new_pods[1:]
    )
    shown = sum(s.value for s in result(results, "GPU-hours in range", late(run)).numbers)
    # increase() extrapolates a series that ended (the replaced pod's) by up to half a scrape interval.
    assert shown == pytest.approx(expected, rel=0.01)


def test_calibration_panels_show_what_the_calibrations_did(results: dict[tuple[str, int], Result], run: Run) -> None:
    at = late(run)
    # Two banks written, one calibration failed on its fold; none left running.
    phases = values_by(result(results, "Calibrations by phase", at), "phase")
    assert phases == {"Pending": 0, "Queued": 0, "Running": 0, "Merging": 0, "Ready": 2, "Failed": 1, "Rejected": 0}
    for name, (ended, phase) in run.calibrations.items():
        shown = values_by(result(results, "Calibrations ended (1h)", ended + 300), "result")
        assert shown[phase] == 1, (name, shown)
        reasons = values_by(result(results, "Calibrations ended (1h)", ended + 300, "B"), "reason")
        assert {r: n for r, n in reasons.items() if n} == ({"FoldFailed": 1.0} if phase == "Failed" else {}), name
    # Fold run times: c01's 30 s folds in the window at BUSY, c02's and c03's 5 min ones long after.
    for when, names in ((BUSY, ("c01",)), (at, ("c02", "c03"))):
        (p95,) = result(results, "Fold duration p95 ($window)", when).numbers
        longest = max(d for name in names for d in run.fold_durations[name])
        assert _bucket(p95.value, FOLD_BUCKETS) == _bucket(longest, FOLD_BUCKETS), (when, p95.value)
    # The stalest bank is c01's (digits, written at 1.5 min): its age, and both banks under a day old.
    ready_at = {name: ended for name, (ended, phase) in run.calibrations.items() if phase == "Ready"}
    (stalest,) = result(results, "Bank age", at).numbers
    # The gauge is set at each periodic pass, so it may lag the scrape by up to one pass.
    assert at - ready_at["c01"] - 60 <= stalest.value <= at - ready_at["c01"]
    bands = values_by(result(results, "Bank age", at, "B"), "age")
    assert bands == {"under_1d": 2.0, "1d_to_7d": 0.0, "7d_to_30d": 0.0, "over_30d": 0.0}


def test_requests_run_calibrated_are_counted_by_the_records_word(
    results: dict[tuple[str, int], Result], run: Run
) -> None:
    assert any(c.calibrated for c in run.completions), "no request used c01's bank"
    for at in (BUSY, 78 * 60, (136 + 30) * 60):
        shown = values_by(result(results, "Requests run calibrated (1h)", at), "calibrated")
        # Only runs that left a record say (an OOM kill, a deadline or a deleted Job leave none).
        expected = counted(run, at - 3600, at, lambda c: str(c.calibrated).lower() if c.verdict != "Error" else "")
        expected.pop("", None)
        assert {k: v for k, v in shown.items() if v} == dict(expected), f"at {at / 60:.0f} min"
    (gpu,) = result(results, "Calibration GPU-hours per hour", BUSY).numbers
    assert gpu.value == 0  # c01 ended at 1.5 min, long before the hour before BUSY


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[duration[-1]]


def _bucket(value: float, bounds: tuple[float, ...]) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _upper(value: float, bounds: tuple[float, ...]) -> float:
    return next((bound for bound in bounds if value <= bound), math.inf)


# Plausible slips in a query; each must make "shows data" fail. (panel, change)
MUTATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "drop _total": (
        "Completions by verdict (1h)",
        lambda e: e.replace("unlearning_requests_completed_total", "unlearning_requests_completed"),
    ),
    "drop _bucket": (
        "Queue wait p95 ($window)",
        lambda e: e.replace("unlearning_queue_wait_seconds_bucket", "unlearning_queue_wait_seconds"),
    ),
    "drop le": ("Job duration p95 by method ($window)", lambda e: e.replace("by (le, method)", "by (method)")),
    "wrong job matcher": ("Requests by phase", lambda e: e.replace('job=~"$job"', 'job="unlearning-operator"')),
    "wrong label value": ("Gate failures by gate (1h)", lambda e: e.replace('{job=~"$job"}', '{gate="maxMIAAuc"}')),
    "histogram_quantile over a gauge": (
        "Queue wait p95 ($window)",
        lambda e: e.replace("rate(unlearning_queue_wait_seconds_bucket", "(unlearning_requests").replace(
            "[$window]", ""
        ),
    ),
    "missing parenthesis": ("Completions by method (1h)", lambda e: e[:-1]),
    "quantile over the rate interval (defect 1)": (
        "Queue wait p95 ($window)",
        lambda e: e.replace("[$window]", "[$__rate_interval]"),
    ),
    "fold quantile over the rate interval": (
        "Fold duration p95 ($window)",
        lambda e: e.replace("[$window]", "[$__rate_interval]"),
    ),
    "fold quantile without le": ("Fold duration p95 ($window)", lambda e: e.replace("by (le)", "")),
    "quantile by method over the rate interval (defect 1)": (
        "Job duration p95 by method ($window)",
        lambda e: e.replace("[$window]", "[$__rate_interval]"),
    ),
}


@pytest.fixture(scope="module")
def mutated(promtool: Path, series: list[dict[str, str]], run: Run) -> dict[str, tuple[str, Result]]:
    cases = {}
    for name, (title, change) in MUTATIONS.items():
        expr = change(expr_of(title))
        assert expr != expr_of(title), f"mutation {name!r} changed nothing"
        cases[name] = grafana.substitute(expr, VALUES)
    got = evaluate(promtool, series, [(e, late(run)) for e in cases.values()])
    return {name: (expr, got[(expr, late(run))]) for name, expr in cases.items()}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_query_is_caught(name: str, mutated: dict[str, tuple[str, Result]]) -> None:
    expr, got = mutated[name]
    assert not shows_data(got), f"mutation {name!r} still shows data: {got.samples}\n{expr}"
