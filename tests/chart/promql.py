"""The metric names a PromQL expression (or a Grafana variable query) reads.

Not a PromQL parser: a tokenizer that is enough for dashboard expressions.
It removes what can hold identifiers that are not metrics (strings, label
matchers ``{...}``, ranges and subqueries ``[...]``, grouping clauses such as
``by (le, method)``, Grafana variables), then keeps each identifier that is
not a keyword and is not followed by ``(`` (a function or an aggregation).
The trade-off: an expression this cannot read is better caught by the test
that uses it (an unknown name fails loudly) than by a full grammar here.
"""

from __future__ import annotations

import re

# Keywords, binary operators spelt as words and literals; never metric names.
KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
        "start",
        "end",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"\d[\w.]*|[A-Za-z_:][A-Za-z0-9_:]*|\S")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(?P<args>.*)\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\(\s*(?P<expr>.*)\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Every metric name the expression selects, histogram suffixes included."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)
    text = _MATCHERS.sub(" ", text)
    # Ranges may nest in subqueries ([1h:5m] inside rate(...[...])); peel until none is left.
    while _RANGE.search(text):
        text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    tokens = _TOKEN.findall(text)
    names = set()
    for index, token in enumerate(tokens):
        if token[0].isdigit() or not (token[0].isalpha() or token[0] in "_:"):
            continue
        if token in KEYWORDS:
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if following == "(":
            continue
        names.add(token)
    return names


def variable_query_metrics(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus variable query.

    ``label_values(metric_or_selector, label)`` reads the metric; the
    one-argument form ``label_values(label)`` reads none; ``query_result(expr)``
    and ``metrics(regex)`` are handled as PromQL and as nothing respectively.
    """
    if match := _LABEL_VALUES.match(query):
        args = match.group("args")
        depth = 0
        for position, char in enumerate(args):
            depth += char in "({["
            depth -= char in ")}]"
            if char == "," and depth == 0:
                return metric_names(args[:position])
        return set()
    if match := _QUERY_RESULT.match(query):
        return metric_names(match.group("expr"))
    if query.strip().startswith("metrics("):
        return set()
    return metric_names(query)
