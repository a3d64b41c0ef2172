"""promtool and one driven run of the operator, shared by the monitoring tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.monitoring.lifecycles import Run, drive
from tests.monitoring.promtool import PromtoolError, fetch_promtool, input_series


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool from Debian's prometheus package, fetched once and cached (promtool.sh).

    A fetch that fails fails the tests: CI must evaluate the dashboard, not skip it.
    """
    try:
        return fetch_promtool()
    except PromtoolError as exc:
        pytest.fail(f"promtool: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def run() -> Run:
    """The 23 lifecycles of tests/monitoring/lifecycles.py through the operator (about 10 s)."""
    # The operator logs the injected API errors with tracebacks, as in production; not here.
    logger = logging.getLogger("unlearning_operator")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return drive()
    finally:
        logger.setLevel(level)


@pytest.fixture(scope="session")
def series(run: Run) -> list[dict[str, str]]:
    """The run as promtool's input series."""
    return input_series(run.series)
