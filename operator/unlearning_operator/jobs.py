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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from unlearning_contracts.api import API_GROUP_VERSION, REQUEST
from unlearning_contracts.record import NON_RETRYABLE_EXIT_CODES
from unlearning_contracts.spec import Location, UnlearningRequestSpec

from .labels import (
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_REQUEST_UID,
    COMPONENT_JOB,
    LABEL_COMPONENT,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_REQUEST,
    MANAGED_BY,
    request_labels,
)
from .lineage import Version
from .names import job_name, network_policy_name, spec_configmap_name
from .settings import OperatorSettings

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


def resolve_image(spec: UnlearningRequestSpec, settings: OperatorSettings) -> str:
    image = spec.job.image
    if image is None:
        return settings.job_image
    if not settings.image_allowed(image):
        allowed = sorted({settings.job_image, *settings.allowed_images})
        raise ImageNotAllowedError(
            f"spec.job.image: {image} is not allowed; remove it to use the default or pick one of: {', '.join(allowed)}"
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
            "ownerReferences": [ref.owner_reference()],
        },
        "data": {SPEC_FILE: yaml.safe_dump(manifest, sort_keys=False)},
    }


def claims(spec: UnlearningRequestSpec) -> tuple[list[str], list[str]]:
    """(read-only input claims, read-write output claims), sorted, without duplicates.

    Takes the effective spec, so the model's current version (possibly on
    the output claim) decides what is mounted.
    """
    inputs: set[str] = set()
    for location in (spec.model.source, spec.data.train, spec.data.test, spec.forget.indices_file):
        if location is not None and location.claim_name is not None:
            inputs.add(location.claim_name)
    outputs = {spec.output.location.claim_name} - {None}
    read_write = sorted(c for c in outputs if c is not None)
    read_only = sorted(inputs - set(read_write))
    return read_only, read_write


def processes(gpus: int) -> int:
    """Processes the job runs: one per GPU, and one on the CPU."""
    return max(1, gpus)


def build_job(
    ref: RequestRef,
    spec: UnlearningRequestSpec,
    settings: OperatorSettings,
    current: Version,
    image: str,
) -> dict[str, Any]:
    """The batch/v1 Job for one request, running ``image`` (from ``resolve_image``, checked at validation)."""
    effective = effective_spec(spec, current)
    output_version = current.version + 1
    name = job_name(ref.name, ref.uid)
    labels = request_labels(request=ref.name, component=COMPONENT_JOB, model=spec.model.name)
    job_labels = dict(labels)
    if spec.job.queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = spec.job.queue_name

    root = settings.job_volume_root
    volumes: list[dict[str, Any]] = [
        {"name": "request-spec", "configMap": {"name": spec_configmap_name(ref.name, ref.uid)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": settings.job_tmp_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "request-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    read_only, read_write = claims(effective)
    for index, (claim, ro) in enumerate([(c, True) for c in read_only] + [(c, False) for c in read_write]):
        volume = f"pvc-{index}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": ro}})
        mounts.append({"name": volume, "mountPath": f"{root}/{claim}", "readOnly": ro})

    gpus = spec.job.gpus if spec.job.gpus is not None else settings.job_gpus
    command = [
        "unlearn",
        "run",
        SPEC_PATH,
        "--volume-root",
        root,
        # Defence in depth beside the operator's own check: in a pod a plain path is the container's disk.
        "--require-claims",
        "--model-version",
        str(output_version),
    ]
    if processes(gpus) > 1:
        command += ["--nproc-per-node", str(processes(gpus))]
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.job_shm_size}})
        mounts.append({"name": "dshm", "mountPath": SHM_MOUNT_PATH})
    cpu = spec.job.cpu or settings.job_cpu
    memory = spec.job.memory or settings.job_memory
    storage = settings.job_ephemeral_storage
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory, "ephemeral-storage": storage}
    if gpus > 0:
        limits[GPU_RESOURCE] = str(gpus)

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [
            {"name": "UNLEARN_JOB_IMAGE", "value": image},
            {"name": "HOME", "value": "/tmp"},
            {"name": ENV_TMP_LIMIT, "value": settings.job_tmp_size},
        ],
        "resources": {"requests": {"cpu": cpu, "memory": memory, "ephemeral-storage": storage}, "limits": limits},
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

    node_selector = {**settings.job_node_selector, **(spec.job.node_selector or {})}
    tolerations = [dict(t) for t in settings.job_tolerations] + [
        t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in spec.job.tolerations or []
    ]
    pod_spec: dict[str, Any] = {
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
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if settings.job_affinity:
        pod_spec["affinity"] = dict(settings.job_affinity)
    priority_class = spec.job.priority_class_name or settings.job_priority_class
    if priority_class:
        pod_spec["priorityClassName"] = priority_class

    job_spec: dict[str, Any] = {
        "backoffLimit": settings.job_backoff_limit,
        "activeDeadlineSeconds": spec.job.active_deadline_seconds or settings.job_deadline_seconds,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if spec.job.queue_name:
        # Kueue admits the Job by unsuspending it once quota is free.
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ref.namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_MODEL_VERSION: str(output_version), ANNOTATION_REQUEST_UID: ref.uid},
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": job_spec,
    }


def model_version_of(job: dict[str, Any], default: int) -> int:
    """The output model version a Job writes (its annotation), or ``default`` when it carries none."""
    return int((job["metadata"].get("annotations") or {}).get(ANNOTATION_MODEL_VERSION, default))


def gpus_of(job: dict[str, Any]) -> int:
    """GPUs a Job's pod holds: the sum of its containers' nvidia.com/gpu limits."""
    containers = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)) for c in containers)


def job_pod_selector(ref: RequestRef) -> dict[str, str]:
    """Labels every pod of the request's Job carries (from the pod template, so also before the Job exists)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_JOB, LABEL_REQUEST: ref.name}


def build_network_policy(ref: RequestRef, spec: UnlearningRequestSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The request's NetworkPolicy: its Job pod may receive nothing and send nothing but settings.job_egress.

    Owned by the request (deleted with it) and created before the Job, so the
    pod never runs unisolated on a CNI that enforces policies.
    """
    policy_spec: dict[str, Any] = {
        "podSelector": {"matchLabels": job_pod_selector(ref)},
        # Both types with no ingress rule and (by default) no egress rule: deny all.
        "policyTypes": ["Ingress", "Egress"],
    }
    if settings.job_egress:
        policy_spec["egress"] = [dict(rule) for rule in settings.job_egress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": request_labels(request=ref.name, component=COMPONENT_JOB, model=spec.model.name),
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": policy_spec,
    }
