"""Deterministic child names: the same request always yields the same names.

This is what makes the operator restart-safe: a restarted operator computes
the Job name again, finds the Job (409 on create) and adopts it instead of
launching a second one. The short hash of the request's uid tells apart a
request deleted and re-created under the same name (its old Job may still be
terminating), so the new one never adopts a stale Job.
"""

from __future__ import annotations

import hashlib


def short_hash(uid: str, length: int = 8) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:length]


def job_name(request: str, uid: str) -> str:
    """``<request>-<8 hex>``: at most 57 characters, so pod names stay within 63."""
    return f"{request}-{short_hash(uid)}"


def spec_configmap_name(request: str, uid: str) -> str:
    return f"{job_name(request, uid)}-spec"


def network_policy_name(request: str, uid: str) -> str:
    return f"{job_name(request, uid)}-isolation"


def audit_configmap_name(request: str, uid: str) -> str:
    """``unlearn-audit-<request>-<8 hex>``: one immutable record per request object."""
    return f"unlearn-audit-{request}-{short_hash(uid)}"
