"""The UnlearningRequest operator (kopf): requests in, GPU Jobs out, results into status and audit records."""

__version__ = "0.1.0"
