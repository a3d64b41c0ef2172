"""Pure builders: a parsed request + operator settings -> the Job and its spec ConfigMap.

Nothing here talks to the API; every field is tested one by one in
tests/operator/test_jobs.py. The handler gathers the inputs (the request, the
model's current lineage version, the settings), calls these builders and
creates the objects if absent.

Choices worth knowing:

* The pod reads the *effective* manifest from a ConfigMap mounted at
  /etc/unlearning/request.yaml, in which ``spec.model.source`` is replaced by
  the model's current lineage version. The job therefore never needs API
  access (no service-account token is mounted) and a later request starts
  from the newest unlearned weights, never from the stale original.
* A claim that is both input and output is mounted once, read-write:
  two mounts of one claim would give the job two views of the same files.
* ``podFailurePolicy`` fails the Job at once on the job's non-retryable exit
  codes (gates failed, invalid input: retrying gives the same answer and
  burns GPU hours) and ignores disruptions (a preempted or drained node is
  not the job's fault and must not eat into backoffLimit).
* The restricted Pod Security profile, read-only root filesystem included;
  PyTorch and matplotlib write caches, so HOME and /tmp are an emptyDir.
* Local disk is bounded: /tmp has a sizeLimit and the container an
  ephemeral-storage request and limit, so a job cannot fill a node's disk.
  The job is told its /tmp limit (``UNLEARN_TMP_LIMIT``) and stops with a
  clear error before the kubelet would evict it (unlearn.scratch).
* With each Job comes a NetworkPolicy that selects its pod and allows no
  traffic (the job has no token and talks to nobody), unless the admin
  widened egress in the chart (``networkPolicy.job.egress``).
* A pod with several GPUs runs the job data-parallel, one process per GPU
  (``--nproc-per-node``: the job's own launcher, which keeps the exit code the
  failure policy reads, unlike torchrun). NCCL passes data between processes
  on one node through shared memory, and a container's /dev/shm is 64 MiB by
  default, so such a pod mounts an in-memory emptyDir there
  (``UNLEARNING_JOB_SHM_SIZE``; it counts against the memory limit).
* No ``ttlSecondsAfterFinished`` at creation: the operator sets it once the
  Job's result is recorded (completion.py), so Kubernetes cannot delete a
  finished Job, and with it the only copy of its record, before then.
* The Job's annotations say what it was built from (spec generation, model
  version, input model, output location): completion takes them from there,
  never from a later read of the request.
* The container gets the admin's factory allow-list
  (``UNLEARN_ALLOWED_FACTORY_MODULES``); the job checks it again before it
  imports anything a request names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from unlearning_contracts.api import API_GROUP_VERSION, REQUEST
from unlearning_contracts.calibration import UnlearningCalibrationSpec
from unlearning_contracts.factories import ENV_ALLOWED_FACTORY_MODULES
from unlearning_contracts.record import NON_RETRYABLE_EXIT_CODES
from unlearning_contracts.spec import Location, UnlearningRequestSpec

from .banks import BankUse
from .labels import (
    ANNOTATION_BANK,
    ANNOTATION_INPUT_MODEL,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_OUTPUT_LOCATION,
    ANNOTATION_REQUEST_UID,
    ANNOTATION_SPEC_GENERATION,
    COMPONENT_JOB,
    LABEL_COMPONENT,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_REQUEST,
    MANAGED_BY,
    request_labels,
)
from .lineage import Version
from .names import job_name, network_policy_name, spec_configmap_name
from .placement import Placement, resolve_placement
from .settings import OperatorSettings, where_set

CONTAINER_NAME = "unlearn"
SPEC_MOUNT_DIR = "/etc/unlearning"
SPEC_FILE = "request.yaml"
SPEC_PATH = f"{SPEC_MOUNT_DIR}/{SPEC_FILE}"
SHM_MOUNT_PATH = "/dev/shm"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
NON_ROOT_UID = 65532
GPU_RESOURCE = "nvidia.com/gpu"
# The job's own guard against outgrowing /tmp (read by unlearn.scratch).
ENV_TMP_LIMIT = "UNLEARN_TMP_LIMIT"


@dataclass(frozen=True)
class RequestRef:
    """The identity of the request object that owns the children."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        # No blockOwnerDeletion: it would need update on unlearningrequests/finalizers
        # under the OwnerReferencesPermissionEnforcement admission plugin, and
        # background garbage collection deletes the Job either way.
        return {
            "apiVersion": API_GROUP_VERSION,
            "kind": REQUEST.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
        }


class ImageNotAllowedError(ValueError):
    """spec.job.image is not on the operator's allow-list."""


def resolve_image(spec: UnlearningRequestSpec | UnlearningCalibrationSpec, settings: OperatorSettings) -> str:
    image = spec.job.image
    if image is None:
        return settings.job_image
    if not settings.image_allowed(image):
        allowed = sorted({settings.job_image, *settings.allowed_images})
        raise ImageNotAllowedError(
            f"spec.job.image: {image} is not allowed; remove it to use the default or pick one of: "
            f"{', '.join(allowed)} ({where_set('allowed_images')})"
        )
    return image


def effective_spec(spec: UnlearningRequestSpec, current: Version) -> UnlearningRequestSpec:
    """The spec the job runs: the model's source is its current lineage version."""
    model = spec.model.model_copy(update={"source": Location.from_uri(current.uri)})
    return spec.model_copy(update={"model": model})


def effective_manifest(ref: RequestRef, spec: UnlearningRequestSpec, current: Version) -> dict[str, Any]:
    """The whole manifest handed to ``unlearn run`` (the same format a user applies).

    Dumped with nulls kept: a gate the user disabled with null must stay
    disabled rather than take its default again in the job.
    """
    effective = effective_spec(spec, current)
    spec_dict = effective.model_dump(mode="json", by_alias=True)
    if spec.request_id is None:
        spec_dict["requestId"] = f"{ref.namespace}/{ref.name}"
    return {
        "apiVersion": API_GROUP_VERSION,
        "kind": REQUEST.kind,
        "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
        "spec": spec_dict,
    }


def build_spec_configmap(ref: RequestRef, spec: UnlearningRequestSpec, current: Version) -> dict[str, Any]:
    """The ConfigMap with the effective manifest, owned by the request (deleted with it)."""
    manifest = effective_manifest(ref, spec, current)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": spec_configmap_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": request_labels(request=ref.name, component=COMPONENT_JOB, model=spec.model.name),
            "annotations": {ANNOTATION_REQUEST_UID: ref.uid},
            "ownerReferences": [ref.owner_reference()],
        },
        "data": {SPEC_FILE: yaml.safe_dump(manifest, sort_keys=False)},
    }


def claims(spec: UnlearningRequestSpec, bank: BankUse | None = None) -> tuple[list[str], list[str]]:
    """(read-only input claims, read-write output claims), sorted, without duplicates.

    Takes the effective spec, so the model's current version (possibly on
    the output claim) decides what is mounted; a bank's claim is an input.
    """
    inputs: set[str] = set()
    bank_location = Location.from_uri(bank.uri) if bank is not None else None
    for location in (spec.model.source, spec.data.train, spec.data.test, spec.forget.indices_file, bank_location):
        if location is not None and location.claim_name is not None:
            inputs.add(location.claim_name)
    outputs = {spec.output.location.claim_name} - {None}
    read_write = sorted(c for c in outputs if c is not None)
    read_only = sorted(inputs - set(read_write))
    return read_only, read_write


def processes(gpus: int) -> int:
    """Processes the job runs: one per GPU, and one on the CPU."""
    return max(1, gpus)


def resources(placement: Placement, settings: OperatorSettings, *, gpus: int | None = None) -> dict[str, Any]:
    """Requests and limits (equal, for predictable scheduling), local disk included; the GPU limit only
    when GPUs are asked for. ``gpus`` overrides the placement's (a calibration's merge Job needs none)."""
    count = placement.gpus if gpus is None else gpus
    storage = settings.job_ephemeral_storage
    limits: dict[str, Any] = {"cpu": placement.cpu, "memory": placement.memory, "ephemeral-storage": storage}
    if count > 0:
        limits[GPU_RESOURCE] = str(count)
    return {
        "requests": {"cpu": placement.cpu, "memory": placement.memory, "ephemeral-storage": storage},
        "limits": limits,
    }


def spec_and_claim_volumes(
    configmap: str, read_only: list[str], read_write: list[str], settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the manifest ConfigMap, a bounded /tmp, and each claim at ``<volume root>/<claim>``."""
    root = settings.job_volume_root
    volumes: list[dict[str, Any]] = [
        {"name": "request-spec", "configMap": {"name": configmap}},
        {"name": "tmp", "emptyDir": {"sizeLimit": settings.job_tmp_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "request-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for index, (claim, ro) in enumerate([(c, True) for c in read_only] + [(c, False) for c in read_write]):
        volume = f"pvc-{index}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": ro}})
        mounts.append({"name": volume, "mountPath": f"{root}/{claim}", "readOnly": ro})
    return volumes, mounts


def restricted_container(
    *,
    image: str,
    command: list[str],
    resources: dict[str, Any],
    mounts: list[dict[str, Any]],
    settings: OperatorSettings,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The job container under the restricted Pod Security profile, read-only root filesystem included,
    told the admin's factory allow-list and its /tmp limit."""
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [
            {"name": "UNLEARN_JOB_IMAGE", "value": image},
            {"name": ENV_ALLOWED_FACTORY_MODULES, "value": ",".join(settings.allowed_factory_modules)},
            {"name": "HOME", "value": "/tmp"},
            {"name": ENV_TMP_LIMIT, "value": settings.job_tmp_size},
            *(env or []),
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def pod_spec(container: dict[str, Any], volumes: list[dict[str, Any]], placement: Placement) -> dict[str, Any]:
    """The pod: no API token, no service links, non-root; placed where ``placement`` says."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if placement.node_selector:
        spec["nodeSelector"] = placement.node_selector
    if placement.tolerations:
        spec["tolerations"] = placement.tolerations
    if placement.affinity:
        spec["affinity"] = placement.affinity
    if placement.priority_class:
        spec["priorityClassName"] = placement.priority_class
    return spec


def failure_policy(action: str, codes: tuple[int, ...]) -> dict[str, Any]:
    """``action`` (FailJob, or FailIndex for an Indexed Job) at once on ``codes``; disruptions ignored.

    Retrying a non-retryable exit gives the same answer and burns GPU hours;
    a preempted or drained node is not the job's fault and must not eat into
    the backoff limit.
    """
    return {
        "rules": [
            {
                "action": action,
                "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": list(codes)},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def bank_arguments(bank: BankUse) -> list[str]:
    """``unlearn run``'s flags that hand it the bank (the job verifies the digest itself)."""
    return [
        "--calibration-bank",
        bank.uri,
        "--calibration-sha256",
        bank.sha256,
        "--calibration-name",
        bank.name,
    ]


def build_job(
    ref: RequestRef,
    spec: UnlearningRequestSpec,
    settings: OperatorSettings,
    current: Version,
    image: str,
    *,
    generation: int = 1,
    bank: BankUse | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job for one request at ``generation``, running ``image`` (admitted: admission.py).

    ``bank``: the reference bank chosen for it (banks.py), passed with
    ``--calibration-*`` and its claim mounted read-only (read-write only when
    it is the output claim too: one mount per claim).
    """
    effective = effective_spec(spec, current)
    placement = resolve_placement(spec.job, settings)
    output_version = current.version + 1
    name = job_name(ref.name, ref.uid)
    labels = request_labels(request=ref.name, component=COMPONENT_JOB, model=spec.model.name)
    job_labels = dict(labels)
    if placement.queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = placement.queue_name

    read_only, read_write = claims(effective, bank)
    volumes, mounts = spec_and_claim_volumes(spec_configmap_name(ref.name, ref.uid), read_only, read_write, settings)
    command = [
        "unlearn",
        "run",
        SPEC_PATH,
        "--volume-root",
        settings.job_volume_root,
        # Defence in depth beside the operator's own check: in a pod a plain path is the container's disk.
        "--require-claims",
        "--model-version",
        str(output_version),
        # The same across the Job's retries: a pod killed after publishing its version and before
        # reporting it leaves a retry that recognises that version as its own (job: preflight).
        "--run-id",
        ref.uid,
    ]
    if processes(placement.gpus) > 1:
        command += ["--nproc-per-node", str(processes(placement.gpus))]
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.job_shm_size}})
        mounts.append({"name": "dshm", "mountPath": SHM_MOUNT_PATH})
    if bank is not None:
        command += bank_arguments(bank)
    container = restricted_container(
        image=image, command=command, resources=resources(placement, settings), mounts=mounts, settings=settings
    )
    job_spec: dict[str, Any] = {
        "backoffLimit": settings.job_backoff_limit,
        "activeDeadlineSeconds": placement.deadline_seconds,
        "podFailurePolicy": failure_policy("FailJob", NON_RETRYABLE_EXIT_CODES),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec(container, volumes, placement)},
    }
    if placement.queue_name:
        # Kueue admits the Job by unsuspending it once quota is free.
        job_spec["suspend"] = True
    annotations = {
        ANNOTATION_REQUEST_UID: ref.uid,
        ANNOTATION_SPEC_GENERATION: str(generation),
        ANNOTATION_MODEL_VERSION: str(output_version),
        ANNOTATION_INPUT_MODEL: current.uri,
        ANNOTATION_OUTPUT_LOCATION: spec.output.location.uri,
    }
    if bank is not None:
        annotations[ANNOTATION_BANK] = bank.annotation()
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ref.namespace,
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": job_spec,
    }


def model_version_of(job: dict[str, Any], default: int) -> int:
    """The output model version a Job writes (its annotation), or ``default`` when it carries none."""
    return int((job["metadata"].get("annotations") or {}).get(ANNOTATION_MODEL_VERSION, default))


@dataclass(frozen=True)
class BuiltFrom:
    """What a Job was built with, read back from the annotations the operator wrote on it."""

    model: str
    model_version: int
    generation: int
    input_model: str
    output_location: str


def built_from(job: dict[str, Any]) -> BuiltFrom | None:
    """The Job's build annotations, or None when any is missing or unreadable (not a Job this operator made)."""
    metadata = job.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    try:
        return BuiltFrom(
            model=str((metadata.get("labels") or {})[LABEL_MODEL]),
            model_version=int(annotations[ANNOTATION_MODEL_VERSION]),
            generation=int(annotations[ANNOTATION_SPEC_GENERATION]),
            input_model=str(annotations[ANNOTATION_INPUT_MODEL]),
            output_location=str(annotations[ANNOTATION_OUTPUT_LOCATION]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def ttl_patch(settings: OperatorSettings) -> dict[str, Any]:
    """The merge patch that lets Kubernetes delete a finished Job, once its result is recorded."""
    return {"spec": {"ttlSecondsAfterFinished": settings.job_ttl_seconds}}


def gpus_of(job: dict[str, Any]) -> int:
    """GPUs a Job's pod holds: the sum of its containers' nvidia.com/gpu limits."""
    containers = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)) for c in containers)


def job_pod_selector(ref: RequestRef) -> dict[str, str]:
    """Labels every pod of the request's Job carries (from the pod template, so also before the Job exists)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_JOB, LABEL_REQUEST: ref.name}


def isolation_policy(
    *,
    name: str,
    namespace: str,
    selector: dict[str, str],
    labels: dict[str, str],
    annotations: dict[str, str],
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """A NetworkPolicy that lets the selected pods receive nothing and send nothing but settings.job_egress."""
    policy_spec: dict[str, Any] = {
        "podSelector": {"matchLabels": selector},
        # Both types with no ingress rule and (by default) no egress rule: deny all.
        "policyTypes": ["Ingress", "Egress"],
    }
    if settings.job_egress:
        policy_spec["egress"] = [dict(rule) for rule in settings.job_egress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "spec": policy_spec,
    }


def build_network_policy(ref: RequestRef, spec: UnlearningRequestSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The request's NetworkPolicy: its Job pod may receive nothing and send nothing but settings.job_egress.

    Owned by the request (deleted with it) and created before the Job, so the
    pod never runs unisolated on a CNI that enforces policies.
    """
    return isolation_policy(
        name=network_policy_name(ref.name, ref.uid),
        namespace=ref.namespace,
        selector=job_pod_selector(ref),
        labels=request_labels(request=ref.name, component=COMPONENT_JOB, model=spec.model.name),
        # The marks adoption checks (adoption.network_policy_problem): a policy under this name that
        # the operator did not make for this request object is a conflict, never adopted.
        annotations={ANNOTATION_REQUEST_UID: ref.uid},
        owner=ref.owner_reference(),
        settings=settings,
    )
