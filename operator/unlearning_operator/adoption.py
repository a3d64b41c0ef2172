"""Whether an object found under one of the operator's names is one the operator made. Pure.

Every child name is deterministic (names.py), which is what lets a restarted
operator find its Job instead of creating a second one. It also lets a
tenant create an object under that name first: a Job running any image, a
spec ConfigMap with another spec, a pod labelled with our Job's name, an
"audit record" saying Passed. Each function here answers one question, "is
this ours?", with None (it is) or the reason it is not; the controller then
fails the request with ``NameConflict`` and that reason, and never adopts,
reads or references the object.

What "ours" means, per kind, and why each mark is checked:

* Every object made for a request carries the operator's managed-by label,
  the request's name label and the request's uid annotation (all three:
  labels alone are what a tenant copies first).
* The Job and the spec ConfigMap also carry exactly one controller
  ownerReference, to the request's uid.
* A Job must also be named by the request's status (``jobName``): the
  operator records the Job there before it creates it (status.py), and only
  the operator writes status. Metadata can be copied; this cannot. Its
  build annotations must agree with what status recorded. (A Job made by
  operator 0.1, before build annotations existed, carries only the model
  version: ``build_of`` takes the rest from what status recorded at launch.)
* The spec ConfigMap's data must be exactly what the operator would write:
  it is the spec the pod runs, so equal data is harmless whoever wrote it.
* The audit ConfigMap (owner-less and immutable by design) must hold exactly
  the record the operator would write, up to when it was written
  (``completionTime``, no earlier than the request): a retry after a crash
  finds its own record; a tenant's differs.
* A pod is the Job's only when its controller ownerReference and its
  ``batch.kubernetes.io/controller-uid`` label name the Job's uid and it runs
  the Job's container image: the Job controller's own pods, never a pod that
  merely carries the Job's name label.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from unlearning_contracts.api import API_GROUP_VERSION, CALIBRATION, REQUEST
from unlearning_contracts.record import CompactRecord

from .audit_configmap import OUTCOME_KEY
from .calibration_jobs import CalibrationRef
from .jobs import CONTAINER_NAME, BuiltFrom, RequestRef, built_from
from .labels import (
    ANNOTATION_CALIBRATION_UID,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_REQUEST_UID,
    ANNOTATION_SPEC_GENERATION,
    LABEL_CALIBRATION,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_REQUEST,
    MANAGED_BY,
)

LABEL_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
"""Set by the Job controller on the pods it creates (the Job's own selector)."""


def _metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    return dict(obj.get("metadata") or {})


def _describe(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', 'object')} {_metadata(obj).get('name', '?')}"


def marks_problem(obj: Mapping[str, Any], ref: RequestRef, *, owned: bool) -> str | None:
    """Why ``obj`` lacks the marks of an object made for ``ref`` (None: it has them all).

    ``owned``: it must also have exactly one controller ownerReference, to the
    request; otherwise (audit records) it must have none.
    """
    metadata = _metadata(obj)
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    what = _describe(obj)
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_REQUEST) != ref.name:
        return f"{what} does not carry the operator's labels for request {ref.name}"
    if annotations.get(ANNOTATION_REQUEST_UID) != ref.uid:
        return f"{what} was not made for this request object (its {ANNOTATION_REQUEST_UID} differs)"
    owners = metadata.get("ownerReferences") or []
    if not owned:
        return f"{what} has owners, which the operator never gives it" if owners else None
    controllers = [o for o in owners if o.get("controller")]
    if len(controllers) != 1 or not _is_request(controllers[0], ref):
        return f"{what} is not controlled by request {ref.name} (uid {ref.uid})"
    return None


def calibration_marks_problem(obj: Mapping[str, Any], ref: CalibrationRef) -> str | None:
    """Why ``obj`` (a Job, ConfigMap or NetworkPolicy of a calibration) lacks the marks of one the operator
    made for ``ref`` (None: it has them all): our labels, the calibration's uid, one controller owner, it."""
    metadata = _metadata(obj)
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    what = _describe(obj)
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_CALIBRATION) != ref.name:
        return f"{what} does not carry the operator's labels for calibration {ref.name}"
    if annotations.get(ANNOTATION_CALIBRATION_UID) != ref.uid:
        return f"{what} was not made for this calibration object (its {ANNOTATION_CALIBRATION_UID} differs)"
    controllers = [o for o in metadata.get("ownerReferences") or [] if o.get("controller")]
    if len(controllers) != 1 or not (
        controllers[0].get("uid") == ref.uid
        and controllers[0].get("kind") == CALIBRATION.kind
        and controllers[0].get("apiVersion") == API_GROUP_VERSION
        and controllers[0].get("name") == ref.name
    ):
        return f"{what} is not controlled by calibration {ref.name} (uid {ref.uid})"
    return None


def _is_request(owner: Mapping[str, Any], ref: RequestRef) -> bool:
    return (
        owner.get("uid") == ref.uid
        and owner.get("kind") == REQUEST.kind
        and owner.get("apiVersion") == API_GROUP_VERSION
        and owner.get("name") == ref.name
    )


def build_of(job: Mapping[str, Any], status: Mapping[str, Any], output_location: str | None) -> BuiltFrom | None:
    """What ``job`` was built from: its build annotations, or for a Job of operator 0.1 (only the model-version
    annotation) what status recorded when it was launched, and the spec's output location (the spec was
    frozen once status named the Job). None: neither."""
    built = built_from(dict(job))
    if built is not None:
        return built
    metadata = _metadata(job)
    annotations = metadata.get("annotations") or {}
    if ANNOTATION_MODEL_VERSION not in annotations or ANNOTATION_SPEC_GENERATION in annotations or not output_location:
        return None
    try:
        return BuiltFrom(
            model=str((metadata.get("labels") or {})[LABEL_MODEL]),
            model_version=int(annotations[ANNOTATION_MODEL_VERSION]),
            generation=int(status["observedGeneration"]),
            input_model=str(status["inputModel"]["uri"]),
            output_location=output_location,
        )
    except (KeyError, TypeError, ValueError):
        return None


def job_problem(
    job: Mapping[str, Any], ref: RequestRef, status: Mapping[str, Any], built: BuiltFrom | None
) -> str | None:
    """Why ``job`` is not the Job the operator launched for this request (None: it is); ``built``: ``build_of``."""
    problem = marks_problem(job, ref, owned=True)
    if problem is not None:
        return problem
    name = _metadata(job).get("name")
    if status.get("jobName") != name:
        return f"Job {name} is not the Job this request's status records: the operator did not create it"
    if built is None:
        return f"Job {name} lacks the operator's build annotations"
    if built.model_version != status.get("modelVersion"):
        return f"Job {name} writes model version {built.model_version}, not the {status.get('modelVersion')} recorded"
    if built.generation != status.get("observedGeneration"):
        return f"Job {name} was built from spec generation {built.generation}, not the one recorded"
    return None


def spec_configmap_problem(existing: Mapping[str, Any], built: Mapping[str, Any], ref: RequestRef) -> str | None:
    """Why ``existing`` is not the spec ConfigMap the operator would write (None: it is)."""
    problem = marks_problem(existing, ref, owned=True)
    if problem is not None:
        return problem
    if existing.get("data") != built.get("data"):
        return f"{_describe(existing)} holds another spec than the one this request runs"
    return None


def network_policy_problem(existing: Mapping[str, Any], built: Mapping[str, Any], ref: RequestRef) -> str | None:
    """Why ``existing`` is not the Job's NetworkPolicy the operator would write (None: it is).

    A policy a tenant made in advance under our name could allow the Job pod
    everything; only the operator's own, isolating exactly as built, is adopted.
    """
    problem = marks_problem(existing, ref, owned=True)
    if problem is not None:
        return problem
    found, ours = dict(existing.get("spec") or {}), dict(built.get("spec") or {})
    # Compared by what isolates; the API server defaults inside rules (a port's protocol), never these.
    if (
        found.get("podSelector") != ours.get("podSelector")
        or set(found.get("policyTypes") or []) != set(ours.get("policyTypes") or [])
        or found.get("ingress")
        or len(found.get("egress") or []) != len(ours.get("egress") or [])
    ):
        return f"{_describe(existing)} holds other rules than the ones the operator gives this request's Job"
    return None


def audit_problem(existing: Mapping[str, Any], built: Mapping[str, Any], ref: RequestRef, created: str) -> str | None:
    """Why ``existing`` is not the audit record the operator would write (None: it is, from an earlier try).

    ``created`` is the request's creationTimestamp: a record of it cannot have
    been written before it existed.
    """
    problem = marks_problem(existing, ref, owned=False)
    if problem is not None:
        return problem
    what = _describe(existing)
    if existing.get("immutable") is not True:
        return f"{what} is not immutable"
    data, ours = dict(existing.get("data") or {}), dict(built.get("data") or {})
    if set(data) != set(ours) or any(data[k] != ours[k] for k in ours if k != OUTCOME_KEY):
        return f"{what} holds another record than this request's"
    try:
        theirs, mine = json.loads(data[OUTCOME_KEY]), json.loads(ours[OUTCOME_KEY])
    except (TypeError, ValueError):
        return f"{what} holds another record than this request's"
    written = theirs.pop("completionTime", None) if isinstance(theirs, dict) else None
    mine.pop("completionTime", None)
    if theirs != mine or not isinstance(written, str) or not created <= written:
        return f"{what} holds another record than this request's"
    return None


def job_pods(job: Mapping[str, Any], pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the Job's own pods, the others) among pods listed by the Job's name label."""
    uid = _metadata(job).get("uid")
    image = _container_image((job.get("spec") or {}).get("template") or {})
    own: list[dict[str, Any]] = []
    foreign: list[dict[str, Any]] = []
    for pod in pods:
        metadata = _metadata(pod)
        controllers = [o for o in metadata.get("ownerReferences") or [] if o.get("controller")]
        ours = (
            uid is not None
            and len(controllers) == 1
            and controllers[0].get("kind") == "Job"
            and controllers[0].get("uid") == uid
            and (metadata.get("labels") or {}).get(LABEL_CONTROLLER_UID) == uid
            and image is not None
            and _container_image(pod) == image
        )
        (own if ours else foreign).append(pod)
    return own, foreign


def _container_image(pod_or_template: Mapping[str, Any]) -> str | None:
    for container in (pod_or_template.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            return str(container.get("image"))
    return None


def record_problem(record: CompactRecord, built: BuiltFrom) -> str | None:
    """Why the record does not belong to what the Job was ``built`` to do (None: it does).

    The lineage moves to what a record says, so a record naming another
    model, another version or a file outside the Job's output folder is
    refused whoever wrote it.
    """
    if record.model != built.model:
        return f"the record is for model {record.model}, the Job for {built.model}"
    if record.model_version is not None and record.model_version != built.model_version:
        return f"the record is for model version {record.model_version}, the Job writes {built.model_version}"
    if record.input_model is not None and record.input_model.uri != built.input_model:
        return f"the record's input model {record.input_model.uri} is not the Job's input {built.input_model}"
    if record.output_model is not None:
        uri = record.output_model.uri
        inside = uri.startswith(built.output_location.rstrip("/") + "/") and ".." not in uri.split("/")
        if not inside:
            return f"the record's output model {uri} is outside the Job's output location {built.output_location}"
    return None
