"""How many events the dashboard counts, with and without the label sets created at start-up.

    .venv/bin/python -m tests.monitoring.measure

Drives the lifecycles of lifecycles.py twice: once as the operator is, once
with ``Metrics.create_label_sets`` reduced to what it did before (only the
phase gauge), and prints what promtool's ``increase()`` over the whole run
counts against what happened. The numbers are quoted in docs/monitoring.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from unittest import mock

from tests.monitoring.lifecycles import END, LIFECYCLES, Run, drive
from tests.monitoring.promtool import evaluate, fetch_promtool, input_series
from unlearning_operator.metrics import Metrics

QUERIES = {
    "completions": "sum(increase(unlearning_requests_completed_total[24h]))",
    "job failures": "sum(increase(unlearning_job_failures_total[24h]))",
    "gate failures": "sum(increase(unlearning_gate_failures_total[24h]))",
    "handler errors": "sum(increase(unlearning_handler_errors_total[24h]))",
}


def _only_phases(self: Metrics) -> None:
    self.set_phase_counts({})


def measure(run: Run) -> dict[str, float]:
    promtool = fetch_promtool()
    got = evaluate(promtool, input_series(run.series), [(q, END) for q in QUERIES.values()])
    return {name: sum(s.value for s in got[(q, END)].numbers) for name, q in QUERIES.items()}


def main() -> None:
    logging.getLogger("unlearning_operator").setLevel(logging.CRITICAL)
    start = time.monotonic()
    run = drive()
    seconds = time.monotonic() - start
    with mock.patch.object(Metrics, "create_label_sets", _only_phases):
        before = drive()
    reasons = Counter(c.reason for c in run.completions)
    happened = {
        "completions": len(run.completions),
        "job failures": sum(n for r, n in reasons.items() if r != "Passed"),
        "gate failures": sum(len(c.ending.split(",")) for c in LIFECYCLES if c.ending.startswith("gates:")),
        "handler errors": None,
    }
    print(f"drive: {len(run.completions)} completions, {len(run.series)} series, {seconds:.1f} s")
    print(f"{'':16}{'happened':>10}{'counted before':>16}{'counted now':>13}")
    now, old = measure(run), measure(before)
    for name in QUERIES:
        shown = "-" if happened[name] is None else str(happened[name])
        print(f"{name:16}{shown:>10}{old[name]:>16.2f}{now[name]:>13.2f}")


if __name__ == "__main__":
    main()
