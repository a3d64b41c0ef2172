"""The chart's alerting rules (rules/alerts.yaml) with their placeholders filled in.

templates/prometheusrule.yaml does the same replacements with Helm; the
cluster-tier test in test_chart_rules.py checks that both give the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "unlearning-operator"
RULES = CHART / "rules" / "alerts.yaml"

# placeholder -> the metrics.prometheusRule value that replaces it
PLACEHOLDERS = {
    "__WAITING_SECONDS__": "waitingSeconds",
    "__ERROR_RATIO__": "jobErrorRatio",
    "__ERROR_MINIMUM__": "jobErrorMinimum",
    "__HANDLER_ERRORS__": "handlerErrors",
}


def defaults() -> dict[str, Any]:
    """metrics.prometheusRule of the chart's values.yaml."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]
    return values


def render(job: str, values: dict[str, Any] | None = None) -> str:
    """The rules file for one job-label regex and these values (default: the chart's)."""
    settings = {**defaults(), **(values or {})}
    text = RULES.read_text().replace("__JOB__", job)
    for placeholder, key in PLACEHOLDERS.items():
        text = text.replace(placeholder, str(settings[key]))
    return text


def alerts(text: str) -> list[dict[str, Any]]:
    document: dict[str, Any] = yaml.safe_load(text)
    return [rule for group in document["groups"] for rule in group["rules"]]
