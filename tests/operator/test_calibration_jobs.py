"""The calibration's builders, field by field: the manifest ConfigMap, the Indexed folds Job, the merge Job."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.operator.factories import CAL_REF, REF, V0, calibration, spec
from tests.operator.test_jobs import container, pod_spec
from unlearning_contracts.calibration import UnlearningCalibrationSpec, parse_calibration_spec
from unlearning_operator.calibration_jobs import (
    CalibrationRef,
    build_calibration_configmap,
    build_calibration_job,
    build_calibration_network_policy,
    build_merge_job,
    claims,
    manifest,
    output_location,
    parallelism_for,
)
from unlearning_operator.jobs import build_job
from unlearning_operator.names import calibration_configmap_name
from unlearning_operator.settings import OperatorSettings, load_settings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()
IMAGE = SETTINGS.job_image


def folds_job(
    spec: UnlearningCalibrationSpec | None = None, settings: OperatorSettings = SETTINGS, parallelism: int = 2
) -> dict[str, Any]:
    return build_calibration_job(CAL_REF, spec or calibration(), settings, IMAGE, parallelism)


def merge_job(spec: UnlearningCalibrationSpec | None = None, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    return build_merge_job(CAL_REF, spec or calibration(), settings, IMAGE)


def test_names_are_deterministic_and_fit_every_index_host_name() -> None:
    assert folds_job() == folds_job()
    name = folds_job()["metadata"]["name"]
    assert name.startswith("digits-cal-")
    assert merge_job()["metadata"]["name"] == f"{name}-merge"
    other = CalibrationRef(CAL_REF.name, CAL_REF.namespace, "another-uid")
    assert build_calibration_job(other, calibration(), SETTINGS, IMAGE, 2)["metadata"]["name"] != name
    # The longest name the CRD allows (48) with the largest K (32): the Job controller's pod
    # host name "<job>-31" and the merge Job's name (its job-name label value) stay within 63.
    longest = CalibrationRef("c" * 48, "team-a", CAL_REF.uid)
    spec = calibration(folds=32)
    assert len(build_calibration_job(longest, spec, SETTINGS, IMAGE, 2)["metadata"]["name"] + "-31") <= 63
    assert len(build_merge_job(longest, spec, SETTINGS, IMAGE)["metadata"]["name"]) <= 63


@pytest.mark.parametrize("build", [folds_job, merge_job])
def test_owner_labels_and_annotations(build: Any) -> None:
    job = build()
    meta = job["metadata"]
    component = "calibration-folds" if build is folds_job else "calibration-merge"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "unlearning-operator",
        "app.kubernetes.io/instance": "digits-cal",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "unlearning-operator",
        "app.kubernetes.io/part-of": "unlearning-operator",
        "unlearn.dev/calibration": "digits-cal",
        "unlearn.dev/model": "digits-mlp",
    }
    assert "unlearn.dev/request" not in meta["labels"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "unlearn.dev/v1alpha1",
            "kind": "UnlearningCalibration",
            "name": "digits-cal",
            "uid": CAL_REF.uid,
            "controller": True,
        }
    ]
    assert meta["annotations"] == {"unlearn.dev/calibration-uid": CAL_REF.uid}
    assert job["spec"]["template"]["metadata"]["labels"]["unlearn.dev/calibration"] == "digits-cal"


def test_folds_job_is_indexed_with_per_index_retries() -> None:
    spec = folds_job(calibration(folds=6), load_settings({"UNLEARNING_JOB_BACKOFF_LIMIT": "3"}), parallelism=3)["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 6
    assert spec["parallelism"] == 3
    # A crashed fold retries alone, three times; then the Job fails: a bank with a missing fold is no bank.
    assert spec["backoffLimitPerIndex"] == 3
    assert spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec
    assert spec["podFailurePolicy"] == {
        "rules": [
            {"action": "FailIndex", "onExitCodes": {"containerName": "unlearn", "operator": "In", "values": [4]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    assert spec["activeDeadlineSeconds"] == 21600
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert "suspend" not in spec


def test_folds_command_takes_the_index_from_the_completion_annotation() -> None:
    c = container(folds_job())
    assert c["command"] == [
        "unlearn",
        "calibrate-fold",
        "/etc/unlearning/calibration.yaml",
        "--fold",
        "$(JOB_COMPLETION_INDEX)",
        "--volume-root",
        "/volumes",
        "--require-claims",
    ]
    assert {
        "name": "JOB_COMPLETION_INDEX",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
    } in c["env"]
    assert {"name": "UNLEARN_JOB_IMAGE", "value": IMAGE} in c["env"]


def test_merge_job_runs_once_without_a_gpu() -> None:
    job = merge_job()
    spec = job["spec"]
    assert "completionMode" not in spec
    assert spec["backoffLimit"] == 2
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "unlearn", "operator": "In", "values": [3, 4]},
    }
    c = container(job)
    assert c["command"] == [
        "unlearn",
        "calibrate-merge",
        "/etc/unlearning/calibration.yaml",
        "--volume-root",
        "/volumes",
        "--require-claims",
    ]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "6Gi"}


@pytest.mark.parametrize(
    ("overrides", "gpus", "cpu", "memory"),
    [
        ({}, "1", "4", "16Gi"),
        ({"job.gpus": 2, "job.cpu": "8", "job.memory": "32Gi"}, "2", "8", "32Gi"),
        ({"job.gpus": 0}, None, "4", "16Gi"),
    ],
)
def test_fold_resources(overrides: dict[str, Any], gpus: str | None, cpu: str, memory: str) -> None:
    c = container(folds_job(calibration(**overrides)))
    assert c["resources"]["requests"] == {"cpu": cpu, "memory": memory, "ephemeral-storage": "6Gi"}
    assert c["resources"]["limits"].get("nvidia.com/gpu") == gpus


@pytest.mark.parametrize("build", [folds_job, merge_job])
def test_the_pod_is_the_request_jobs_restricted_pod(build: Any) -> None:
    request_pod = pod_spec(build_job(REF, spec(), SETTINGS, V0, IMAGE))
    pod = pod_spec(build())
    for key in ("restartPolicy", "automountServiceAccountToken", "enableServiceLinks", "securityContext"):
        assert pod[key] == request_pod[key], key
    assert container(build())["securityContext"] == request_pod["containers"][0]["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    # Local disk bounded as a request's: /tmp's size limit, told to the job, and an ephemeral-storage limit.
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in container(build())["env"]}
    request_env = {e["name"]: e.get("value") for e in request_pod["containers"][0]["env"]}
    for name in ("UNLEARN_TMP_LIMIT", "UNLEARN_ALLOWED_FACTORY_MODULES", "HOME"):
        assert env[name] == request_env[name], name


def test_placement_is_the_request_jobs_with_the_admins_defaults() -> None:
    settings = load_settings(
        {
            "UNLEARNING_JOB_QUEUE_NAME": "gpu-queue",
            "UNLEARNING_JOB_PRIORITY_CLASS": "batch-low",
            "UNLEARNING_ALLOWED_FACTORY_MODULES": "models.zoo",
        }
    )
    for job in (folds_job(settings=settings), merge_job(settings=settings)):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["suspend"] is True
        assert pod_spec(job)["priorityClassName"] == "batch-low"
        assert {"name": "UNLEARN_ALLOWED_FACTORY_MODULES", "value": "models.zoo"} in container(job)["env"]


def test_network_policy_isolates_both_jobs_pods() -> None:
    policy = build_calibration_network_policy(CAL_REF, calibration(), SETTINGS)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"]
    assert "egress" not in policy["spec"]
    for job in (folds_job(), merge_job()):
        assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert (
        not selector.items()
        <= build_job(REF, spec(), SETTINGS, V0, IMAGE)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["metadata"]["annotations"] == {"unlearn.dev/calibration-uid": CAL_REF.uid}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == CAL_REF.uid


@pytest.mark.parametrize("build", [folds_job, merge_job])
def test_mounts_inputs_read_only_and_the_output_claim_read_write(build: Any) -> None:
    pod = pod_spec(build())
    c = container(build())
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    configmap = volumes[mounts["/etc/unlearning"]["name"]]["configMap"]["name"]
    assert configmap == calibration_configmap_name(CAL_REF.name, CAL_REF.uid) == "digits-cal-00353c0e-spec"
    assert mounts["/volumes/models"]["readOnly"] is True
    assert volumes[mounts["/volumes/models"]["name"]]["persistentVolumeClaim"] == {
        "claimName": "models",
        "readOnly": True,
    }
    assert mounts["/volumes/banks"]["readOnly"] is False


def test_claim_both_input_and_output_is_mounted_once_read_write() -> None:
    spec = calibration(**{"output.location.claimName": "models"})
    assert claims(spec) == ([], ["models"])
    mounts = [m["mountPath"] for m in container(folds_job(spec))["volumeMounts"]]
    assert mounts.count("/volumes/models") == 1


def test_placement_and_kueue() -> None:
    settings = load_settings(
        {"UNLEARNING_JOB_NODE_SELECTOR": '{"pool": "gpu"}', "UNLEARNING_JOB_PRIORITY_CLASS": "batch-low"}
    )
    spec = calibration(**{"job.queueName": "team-a-gpu", "job.nodeSelector": {"gpu": "a100"}})
    for job in (folds_job(spec, settings), merge_job(spec, settings)):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
        assert job["spec"]["suspend"] is True
        pod = pod_spec(job)
        assert pod["nodeSelector"] == {"pool": "gpu", "gpu": "a100"}
        assert pod["priorityClassName"] == "batch-low"


def test_the_output_is_the_calibrations_own_folder() -> None:
    location = output_location(CAL_REF, calibration(**{"output.location.path": "digits/banks/"}))
    assert location.claim_name == "banks"
    assert location.path == "digits/banks/digits-cal-7c6b5a49"
    # A calibration created again under the same name (a new uid) never writes into the first one's folder.
    again = CalibrationRef(CAL_REF.name, CAL_REF.namespace, "0a0a0a0a-1111-2222-3333-444455556666")
    assert output_location(again, calibration()).path == "digits/digits-cal-0a0a0a0a"


def test_configmap_carries_the_manifest_the_jobs_run() -> None:
    cm = build_calibration_configmap(CAL_REF, calibration())
    assert cm["metadata"]["ownerReferences"][0]["uid"] == CAL_REF.uid
    assert cm["metadata"]["labels"]["unlearn.dev/calibration"] == "digits-cal"
    loaded = yaml.safe_load(cm["data"]["calibration.yaml"])
    assert loaded == manifest(CAL_REF, calibration())
    assert (loaded["apiVersion"], loaded["kind"]) == ("unlearn.dev/v1alpha1", "UnlearningCalibration")
    assert loaded["metadata"] == {"name": "digits-cal", "namespace": "team-a", "uid": CAL_REF.uid}
    assert loaded["spec"]["output"]["location"] == {"claimName": "banks", "path": "digits/digits-cal-7c6b5a49"}
    # The job parses it with the very model the operator did.
    parsed = parse_calibration_spec(loaded["spec"])
    assert parsed.recipe == calibration().recipe
    assert parsed.folds == 4


@pytest.mark.parametrize(
    ("folds", "env", "expected"),
    [
        (4, {}, 2),
        (4, {"UNLEARNING_CALIBRATION_PARALLELISM": "8"}, 4),
        (8, {"UNLEARNING_CALIBRATION_PARALLELISM": "8", "UNLEARNING_MAX_CONCURRENT_JOBS": "3"}, 3),
        (2, {"UNLEARNING_CALIBRATION_PARALLELISM": "1"}, 1),
    ],
)
def test_parallelism_is_bounded_by_k_the_setting_and_the_cap(folds: int, env: dict[str, str], expected: int) -> None:
    assert parallelism_for(folds, load_settings(env)) == expected
