"""Benchmarks: forgetting quality against retraining, job throughput (CPU and GPU), operator scale.

Run them with ``python -m bench <name> ...`` (``python -m bench --help`` lists them);
docs/benchmarks.md holds the results and the exact commands that produced them.
"""
