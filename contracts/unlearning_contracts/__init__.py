"""The contracts between the operator and the job: the request spec and the result record.

Pydantic (and PyYAML for manifests) only. The operator and the job both depend
on this package and it depends on neither, so importing it never loads torch,
kopf or the Kubernetes client (tests/contracts/test_layering.py checks it).
"""

__version__ = "0.1.0"
