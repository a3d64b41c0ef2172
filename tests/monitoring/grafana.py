"""The dashboard's queries as Grafana sends them to Prometheus: variables replaced.

Grafana computes ``$__interval`` from the time range and the panel's width
(about 1 minute for the default 24 h on a 1,400 px panel) and
``$__rate_interval`` as max($__interval + scrape interval, 4 x scrape
interval); ``$__range`` is the dashboard's range. The chart's monitors scrape
every 30 s, so $__rate_interval is 2 minutes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "unlearning-operator" / "dashboards" / "unlearning-operator.json"

SCRAPE_INTERVAL = 30
INTERVAL = 60
RATE_INTERVAL = max(INTERVAL + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL)
RANGE = "24h"

_VARIABLE = re.compile(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)")


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries, those nested in collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel.get("targets"):
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [Query(p["title"], t["refId"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


def variables(dashboard: dict[str, Any], job: str, namespace: str) -> dict[str, str]:
    """Values for every variable the queries may use: Grafana's own, the dashboard's defaults,
    and one operator's job and namespace (the values its label_values() queries would offer)."""
    values = {
        "__interval": f"{INTERVAL}s",
        "__rate_interval": f"{RATE_INTERVAL}s",
        "__range": RANGE,
        "job": job,
        "namespace": namespace,
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] in ("interval", "custom", "constant"):
            values[variable["name"]] = variable["current"]["value"]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression with each $variable replaced; an unknown one raises (a panel would break)."""

    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name not in values:
            raise KeyError(f"the query uses ${name}, which neither Grafana nor the dashboard defines")
        return values[name]

    return _VARIABLE.sub(value, expr)
