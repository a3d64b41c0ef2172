"""The dashboard test's tokenizer: what it keeps and what it must drop."""

from __future__ import annotations

import pytest

from tests.chart.promql import metric_names, variable_query_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('up{job=~"$job"}', {"up"}),
        ('sum by (phase) (unlearning_requests{job=~"a|b", phase!="x"})', {"unlearning_requests"}),
        (
            "histogram_quantile(0.95, sum by (le, method) (rate(unlearning_job_duration_seconds_bucket[5m])))",
            {"unlearning_job_duration_seconds_bucket"},
        ),
        ("sum(rate(a_total[$__rate_interval])) by (le) / sum(rate(b_count[1h:5m]))", {"a_total", "b_count"}),
        ("x_sum / on(instance) group_left(pod) y_info", {"x_sum", "y_info"}),
        ("rate(a[5m] offset 1h) > bool 2 and b unless c or d", {"a", "b", "c", "d"}),
        ("sum without(instance, job) (m) * 1e3 + 0.5", {"m"}),
        ('count(m{label="by (le)", other="rate(x[5m])"})', {"m"}),
        ('{__name__="m"}', set()),
        ("increase(unlearning_gpu_seconds_total[$__range]) / 3600", {"unlearning_gpu_seconds_total"}),
    ],
)
def test_metric_names(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("label_values(unlearning_requests, job)", {"unlearning_requests"}),
        ('label_values(up{job="x"}, namespace)', {"up"}),
        ("label_values(namespace)", set()),
        ("query_result(topk(3, sum by (method) (m_total)))", {"m_total"}),
        ("metrics(unlearning_.*)", set()),
    ],
)
def test_variable_query_metrics(query: str, expected: set[str]) -> None:
    assert variable_query_metrics(query) == expected
