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


def calibration_job_name(calibration: str, uid: str) -> str:
    """The folds (Indexed) Job: ``<calibration>-<8 hex>``, at most 57 characters, so that the
    Job controller's pod host name ``<job>-<index>`` stays a DNS label for every index below 32."""
    return f"{calibration}-{short_hash(uid)}"


def calibration_network_policy_name(calibration: str, uid: str) -> str:
    """The NetworkPolicy that isolates both Jobs' pods."""
    return f"{calibration_job_name(calibration, uid)}-isolation"


def merge_job_name(calibration: str, uid: str) -> str:
    """The merge Job: ``<calibration>-<8 hex>-merge``, at most 63 characters (its job-name label)."""
    return f"{calibration_job_name(calibration, uid)}-merge"


def calibration_configmap_name(calibration: str, uid: str) -> str:
    """The manifest both Jobs of a calibration read."""
    return f"{calibration_job_name(calibration, uid)}-spec"


def calibration_record_name(calibration: str, uid: str) -> str:
    """``unlearn-calibration-<calibration>-<8 hex>``: the immutable record of one calibration object."""
    return f"unlearn-calibration-{calibration}-{short_hash(uid)}"


def bank_folder(calibration: str, uid: str) -> str:
    """The calibration's own folder under spec.output.location: ``<calibration>-<uid[:8]>``.

    Per object, not per name: a calibration deleted and created again under
    the same name writes a new folder and never replaces the bank that
    earlier requests' records name. The uid's own first characters (not a
    hash) let a reader match the folder to ``kubectl get -o yaml``.
    """
    return f"{calibration}-{uid[:8]}"


def audit_configmap_name(request: str, uid: str) -> str:
    """``unlearn-audit-<request>-<8 hex>``: one immutable record per request object."""
    return f"unlearn-audit-{request}-{short_hash(uid)}"
