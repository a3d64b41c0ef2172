"""promtool (from Debian's prometheus package) as the tests' PromQL engine.

``promtool test rules`` evaluates PromQL against input series written in the
expanding notation of Prometheus' test language. Two uses:

* ``run_tests``: a rules file and its test cases (alerts that must fire or
  stay silent), pass or fail as promtool says.
* ``evaluate``: the value of any expression at any time. Each expression is
  given to promtool expecting nothing; promtool then reports what it got, and
  that report (``got: {labels} value, ...``) is parsed back. An expression
  that returns nothing passes and is reported as an empty result; one that
  does not parse comes back as an error. The report's format is Prometheus
  2.x's (cmd/promtool/unittest.go); ``test_evaluate_reads_promtools_report``
  checks the parser against known values, so a changed format fails loudly.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.monitoring.lifecycles import STALE, Labels, Value

FETCH_SCRIPT = Path(__file__).resolve().parent / "promtool.sh"


class PromtoolError(RuntimeError):
    """promtool could not be fetched, or did not run."""


def fetch_promtool(script: Path = FETCH_SCRIPT, timeout: float = 600) -> Path:
    """Run promtool.sh (instant when cached) and return the binary it prints last."""
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PromtoolError(f"{script} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("promtool.sh:")]
        raise PromtoolError(lines[-1] if lines else f"{script} failed: {done.stderr[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def series_selector(labels: Labels | Mapping[str, str]) -> str:
    """``name{label="value", ...}`` as the test language writes a series."""
    items = dict(labels)
    name = items.pop("__name__")
    inner = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(items.items()))
    return f"{name}{{{inner}}}"


def _number(value: float) -> str:
    if value == math.floor(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def encode(values: Sequence[Value]) -> str:
    """A series' values in the expanding notation, runs collapsed: ``_x3 0x10 1 stale``.

    ``ax n`` stands for n+1 copies of a; ``_x n`` for n missing samples.
    """
    tokens: list[str] = []
    index = 0
    while index < len(values):
        value = values[index]
        run = 1
        while index + run < len(values) and values[index + run] == value:
            run += 1
        if value is None:
            tokens.append(f"_x{run}" if run > 1 else "_")
        elif value == STALE:
            tokens.extend(["stale"] * run)
        else:
            assert isinstance(value, float)
            text = _number(value)
            tokens.append(f"{text}x{run - 1}" if run > 1 else text)
        index += run
    return " ".join(tokens)


def input_series(series: Mapping[Labels, Sequence[Value]]) -> list[dict[str, str]]:
    return [{"series": series_selector(labels), "values": encode(values)} for labels, values in sorted(series.items())]


def duration(seconds: int) -> str:
    return f"{seconds}s"


def run_tests(
    promtool: Path,
    tests: list[dict[str, Any]],
    rule_files: Iterable[Path] = (),
    evaluation_interval: str = "30s",
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` on one test file made of ``tests``; rule files by absolute path."""
    with tempfile.TemporaryDirectory(prefix="promtool-") as tmp:
        path = Path(tmp) / "tests.yaml"
        document = {
            "rule_files": [str(p) for p in rule_files],
            "evaluation_interval": evaluation_interval,
            "tests": tests,
        }
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1 << 20))
        return subprocess.run(
            [str(promtool), "test", "rules", str(path)], capture_output=True, text=True, timeout=300, check=False
        )


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Result:
    """An expression's value at one time: its samples, or the error promtool gave."""

    samples: tuple[Sample, ...] = ()
    error: str | None = None

    @property
    def numbers(self) -> list[Sample]:
        """The samples that are numbers (NaN left out)."""
        return [s for s in self.samples if not math.isnan(s.value)]


_FAILED_EXPR = re.compile(r'^\s*expr: (?P<expr>"(?:[^"\\]|\\.)*"), time: (?P<time>[0-9a-z]+),(?: err: (?P<err>.*))?$')
_GOT = re.compile(r"^\s*got: (?P<got>.*)$")
_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")


def _seconds(text: str) -> int:
    """A Prometheus duration as promtool prints it (``2h30m``, ``45s``, ``0s``)."""
    match = _DURATION.match(text)
    if match is None or not text:
        raise ValueError(f"cannot read the duration {text!r} in promtool's report")
    parts = {k: int(v) for k, v in match.groupdict(default="0").items()}
    return parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]


def parse_samples(text: str) -> tuple[Sample, ...]:
    """``{a="x", b="y"} 1.5E+00, {} NaN`` (promtool's ``got:``) into samples; ``nil`` is none."""
    if text.strip() == "nil":
        return ()
    samples = []
    position = 0
    label = re.compile(r'\s*(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"\s*(?P<end>[,}])')
    value = re.compile(r"\s*(?P<value>[-+0-9.eEaINfn]+)\s*(?:,\s*|$)")
    while position < len(text):
        if text[position] != "{":
            raise ValueError(f"unexpected {text[position : position + 30]!r} in promtool's report")
        position += 1
        labels: dict[str, str] = {}
        if text[position] == "}":
            position += 1
        else:
            while True:
                match = label.match(text, position)
                if match is None:
                    raise ValueError(f"cannot read labels at {text[position : position + 40]!r}")
                labels[match["key"]] = json.loads(f'"{match["value"]}"')
                position = match.end()
                if match["end"] == "}":
                    break
        match = value.match(text, position)
        if match is None:
            raise ValueError(f"cannot read a value at {text[position : position + 30]!r}")
        samples.append(Sample(labels, float(match["value"])))
        position = match.end()
    return tuple(samples)


def evaluate(
    promtool: Path,
    series: list[dict[str, str]],
    queries: Iterable[tuple[str, int]],
    interval: int = 30,
) -> dict[tuple[str, int], Result]:
    """The value of each (expression, time in seconds) over the input series, in one promtool run."""
    wanted = list(dict.fromkeys(queries))
    cases = [{"expr": expr, "eval_time": duration(at), "exp_samples": []} for expr, at in wanted]
    done = run_tests(promtool, [{"interval": duration(interval), "input_series": series, "promql_expr_test": cases}])
    results = {query: Result() for query in wanted}
    output = done.stdout + done.stderr
    lines = output.splitlines()
    for index, line in enumerate(lines):
        match = _FAILED_EXPR.match(line)
        if match is None:
            continue
        key = (json.loads(match["expr"]), _seconds(match["time"]))
        if key not in results:
            raise ValueError(f"promtool reported an expression that was not asked: {line.strip()}")
        if match["err"] is not None:
            results[key] = Result(error=match["err"])
            continue
        got = next((m for m in (_GOT.match(ln) for ln in lines[index + 1 : index + 4]) if m), None)
        if got is None:
            raise ValueError(f"no 'got:' line after {line.strip()!r} in promtool's report")
        results[key] = Result(samples=parse_samples(got["got"]))
    if done.returncode != 0 and not any(_FAILED_EXPR.match(ln) for ln in lines):
        raise PromtoolError(f"promtool test rules failed without a result:\n{output[-2000:]}")
    return results
