"""Test tiers (see pyproject markers): unit, job, cluster, e2e, gpu."""
