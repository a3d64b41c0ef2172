"""Test tiers (see pyproject markers): unit, job, cluster, e2e, gpu."""

# The real control plane, fake GPU node and per-test namespaces (tests/cluster/fixtures.py).
pytest_plugins = ["tests.cluster.fixtures"]
