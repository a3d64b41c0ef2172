"""Pure builders: a parsed calibration + operator settings -> its manifest ConfigMap, folds Job and merge Job.

Nothing here talks to the API; tests/operator/test_calibration_jobs.py
checks every field. The pod is the request Job's (jobs.py's builders): the
restricted profile, no API token, the manifest from a ConfigMap, each claim
at ``<volume root>/<claim>``. What differs, and why:

* The folds Job is Indexed: ``completions: K``, one index per reference
  model, ``unlearn calibrate-fold ... --fold $(JOB_COMPLETION_INDEX)``.
  ``backoffLimitPerIndex`` retries a crashed fold alone (the other folds'
  hours of training are kept), and ``maxFailedIndexes: 0`` fails the Job
  once any fold has used its retries: a bank with a missing fold is no bank.
  The pod failure policy fails an index at once on exit 4 (invalid input:
  every retry would say the same), and ignores disruptions.
* ``JOB_COMPLETION_INDEX`` is declared from the pod's completion-index
  annotation, which the Job controller has set on every Indexed pod since
  Kubernetes 1.21 (it injects the same variable from the label since 1.28
  and skips it when the container declares it), so the command means the
  same on every supported cluster.
* ``parallelism`` is what the scheduler granted (scheduling.py); the
  Indexed Job never runs more folds at once than that.
* The merge Job needs no GPU: it reads K small fold files and writes one.
* Both commands carry ``--require-claims``, like a request's: the job
  refuses a location without a claim before it trains anything.
* The output folder is the calibration's own (names.bank_folder), so a
  calibration created again under the same name never overwrites a bank
  that requests' records name.
* Both Jobs and the ConfigMap are owned by the calibration (deleted with it
  by the garbage collector); the bank files on the claim are not objects
  and stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from unlearning_contracts.api import API_GROUP_VERSION, CALIBRATION
from unlearning_contracts.calibration import UnlearningCalibrationSpec
from unlearning_contracts.record import EXIT_INVALID_INPUT, NON_RETRYABLE_EXIT_CODES
from unlearning_contracts.spec import Location

from .jobs import (
    SPEC_MOUNT_DIR,
    failure_policy,
    isolation_policy,
    pod_spec,
    resources,
    restricted_container,
    spec_and_claim_volumes,
)
from .labels import (
    ANNOTATION_CALIBRATION_UID,
    COMPONENT_CALIBRATION_FOLDS,
    COMPONENT_CALIBRATION_MERGE,
    LABEL_CALIBRATION,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    calibration_labels,
)
from .names import (
    bank_folder,
    calibration_configmap_name,
    calibration_job_name,
    calibration_network_policy_name,
    merge_job_name,
)
from .placement import resolve_placement
from .settings import OperatorSettings

MANIFEST_FILE = "calibration.yaml"
MANIFEST_PATH = f"{SPEC_MOUNT_DIR}/{MANIFEST_FILE}"
INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
BANK_FILE = "bank.npz"


@dataclass(frozen=True)
class CalibrationRef:
    """The identity of the calibration object that owns the children."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        # No blockOwnerDeletion, as for requests: background garbage collection deletes the Jobs either way.
        return {
            "apiVersion": API_GROUP_VERSION,
            "kind": CALIBRATION.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
        }


def output_location(ref: CalibrationRef, spec: UnlearningCalibrationSpec) -> Location:
    """The calibration's own folder: ``<spec.output.location.path>/<name>-<uid[:8]>``."""
    base = spec.output.location
    path = f"{base.path.rstrip('/')}/{bank_folder(ref.name, ref.uid)}"
    return base.model_copy(update={"path": path})


def effective_spec(ref: CalibrationRef, spec: UnlearningCalibrationSpec) -> UnlearningCalibrationSpec:
    """The spec the folds and the merge run: the output is the calibration's own folder."""
    output = spec.output.model_copy(update={"location": output_location(ref, spec)})
    return spec.model_copy(update={"output": output})


def manifest(ref: CalibrationRef, spec: UnlearningCalibrationSpec) -> dict[str, Any]:
    """The whole manifest handed to ``unlearn calibrate-fold`` and ``calibrate-merge`` (nulls kept)."""
    return {
        "apiVersion": API_GROUP_VERSION,
        "kind": CALIBRATION.kind,
        "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
        "spec": effective_spec(ref, spec).model_dump(mode="json", by_alias=True),
    }


def build_calibration_configmap(ref: CalibrationRef, spec: UnlearningCalibrationSpec) -> dict[str, Any]:
    """The ConfigMap with the effective manifest, owned by the calibration."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": calibration_configmap_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": calibration_labels(
                calibration=ref.name, component=COMPONENT_CALIBRATION_FOLDS, model=spec.model.name
            ),
            "annotations": {ANNOTATION_CALIBRATION_UID: ref.uid},
            "ownerReferences": [ref.owner_reference()],
        },
        "data": {MANIFEST_FILE: yaml.safe_dump(manifest(ref, spec), sort_keys=False)},
    }


def claims(spec: UnlearningCalibrationSpec) -> tuple[list[str], list[str]]:
    """(read-only input claims, read-write output claims), sorted; a claim both is mounted once, read-write."""
    inputs = {
        location.claim_name
        for location in (spec.model.source, spec.data.train, spec.data.test)
        if location is not None and location.claim_name is not None
    }
    outputs = {spec.output.location.claim_name} - {None}
    read_write = sorted(c for c in outputs if c is not None)
    return sorted(inputs - set(read_write)), read_write


def parallelism_for(folds: int, settings: OperatorSettings) -> int:
    """Folds trained at once: K, bounded by the calibration setting and the caps (global and per namespace),
    so that a calibration can always start once its slots are free."""
    bound = min(folds, settings.calibration_parallelism, settings.max_concurrent_jobs)
    if settings.max_concurrent_jobs_per_namespace > 0:
        bound = min(bound, settings.max_concurrent_jobs_per_namespace)
    return max(1, bound)


def _job(
    ref: CalibrationRef,
    spec: UnlearningCalibrationSpec,
    settings: OperatorSettings,
    *,
    name: str,
    component: str,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    job_spec: dict[str, Any],
) -> dict[str, Any]:
    placement = resolve_placement(spec.job, settings)
    labels = calibration_labels(calibration=ref.name, component=component, model=spec.model.name)
    job_labels = dict(labels)
    if placement.queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = placement.queue_name
        # Kueue admits the Job by unsuspending it once quota is free.
        job_spec["suspend"] = True
    job_spec["template"] = {"metadata": {"labels": labels}, "spec": pod_spec(container, volumes, placement)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ref.namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_CALIBRATION_UID: ref.uid},
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": job_spec,
    }


def _pod_parts(
    ref: CalibrationRef, spec: UnlearningCalibrationSpec, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    read_only, read_write = claims(effective_spec(ref, spec))
    return spec_and_claim_volumes(calibration_configmap_name(ref.name, ref.uid), read_only, read_write, settings)


def build_calibration_job(
    ref: CalibrationRef,
    spec: UnlearningCalibrationSpec,
    settings: OperatorSettings,
    image: str,
    parallelism: int,
) -> dict[str, Any]:
    """The Indexed Job: index k trains reference model k (every training row outside fold k)."""
    volumes, mounts = _pod_parts(ref, spec, settings)
    root = settings.job_volume_root
    command = [
        "unlearn",
        "calibrate-fold",
        MANIFEST_PATH,
        "--fold",
        f"$({INDEX_ENV})",
        "--volume-root",
        root,
        # As for a request's Job: in a pod a plain path is the container's own disk, gone with it.
        "--require-claims",
    ]
    index_env = {
        "name": INDEX_ENV,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
    }
    placement = resolve_placement(spec.job, settings)
    container = restricted_container(
        image=image,
        command=command,
        resources=resources(placement, settings),
        mounts=mounts,
        settings=settings,
        env=[index_env],
    )
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.folds,
        "parallelism": parallelism,
        "backoffLimitPerIndex": settings.job_backoff_limit,
        "maxFailedIndexes": 0,
        "activeDeadlineSeconds": resolve_placement(spec.job, settings).deadline_seconds,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "podFailurePolicy": failure_policy("FailIndex", (EXIT_INVALID_INPUT,)),
    }
    return _job(
        ref,
        spec,
        settings,
        name=calibration_job_name(ref.name, ref.uid),
        component=COMPONENT_CALIBRATION_FOLDS,
        container=container,
        volumes=volumes,
        job_spec=job_spec,
    )


def build_merge_job(
    ref: CalibrationRef, spec: UnlearningCalibrationSpec, settings: OperatorSettings, image: str
) -> dict[str, Any]:
    """The merge Job: checks the K fold files and writes bank.npz and bank.json (no GPU)."""
    volumes, mounts = _pod_parts(ref, spec, settings)
    command = [
        "unlearn",
        "calibrate-merge",
        MANIFEST_PATH,
        "--volume-root",
        settings.job_volume_root,
        "--require-claims",
    ]
    container = restricted_container(
        image=image,
        command=command,
        resources=resources(resolve_placement(spec.job, settings), settings, gpus=0),
        mounts=mounts,
        settings=settings,
    )
    job_spec: dict[str, Any] = {
        "backoffLimit": settings.job_backoff_limit,
        "activeDeadlineSeconds": resolve_placement(spec.job, settings).deadline_seconds,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "podFailurePolicy": failure_policy("FailJob", NON_RETRYABLE_EXIT_CODES),
    }
    return _job(
        ref,
        spec,
        settings,
        name=merge_job_name(ref.name, ref.uid),
        component=COMPONENT_CALIBRATION_MERGE,
        container=container,
        volumes=volumes,
        job_spec=job_spec,
    )


def calibration_pod_selector(ref: CalibrationRef) -> dict[str, str]:
    """Labels every pod of the calibration's two Jobs carries (from their pod templates)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_CALIBRATION: ref.name}


def build_calibration_network_policy(
    ref: CalibrationRef, spec: UnlearningCalibrationSpec, settings: OperatorSettings
) -> dict[str, Any]:
    """The calibration's NetworkPolicy: its fold and merge pods may receive nothing and send nothing but
    settings.job_egress, as a request's Job pod. Created before the folds Job, owned by the calibration."""
    return isolation_policy(
        name=calibration_network_policy_name(ref.name, ref.uid),
        namespace=ref.namespace,
        selector=calibration_pod_selector(ref),
        labels=calibration_labels(calibration=ref.name, component=COMPONENT_CALIBRATION_FOLDS, model=spec.model.name),
        annotations={ANNOTATION_CALIBRATION_UID: ref.uid},
        owner=ref.owner_reference(),
        settings=settings,
    )
