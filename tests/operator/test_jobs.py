"""The Job and spec ConfigMap builders, field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.operator.factories import REF, V0, raw_spec, spec
from unlearning_contracts.record import NON_RETRYABLE_EXIT_CODES
from unlearning_contracts.spec import UnlearningRequestSpec, parse_manifest, parse_spec
from unlearning_operator.banks import BankUse
from unlearning_operator.jobs import (
    BuiltFrom,
    ImageNotAllowedError,
    RequestRef,
    build_job,
    build_network_policy,
    build_spec_configmap,
    built_from,
    claims,
    effective_spec,
    gpus_of,
    resolve_image,
    ttl_patch,
)
from unlearning_operator.lineage import Version
from unlearning_operator.settings import OperatorSettings, load_settings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()


def job_for(
    ref: RequestRef, request: UnlearningRequestSpec, settings: OperatorSettings, current: Version
) -> dict[str, Any]:
    """build_job with the image the controller resolves (and checks) first."""
    return build_job(ref, request, settings, current, resolve_image(request, settings))


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"])


def test_name_is_deterministic_and_short_enough_for_pods() -> None:
    first = job_for(REF, spec(), SETTINGS, V0)
    again = job_for(REF, spec(), SETTINGS, V0)
    assert first == again
    name = first["metadata"]["name"]
    assert name.startswith("digits-gdpr-")
    other = job_for(REF.__class__(REF.name, REF.namespace, "another-uid"), spec(), SETTINGS, V0)
    assert other["metadata"]["name"] != name
    long_ref = REF.__class__("r" * 48, REF.namespace, REF.uid)
    assert len(job_for(long_ref, spec(), SETTINGS, V0)["metadata"]["name"]) + 6 <= 63


def test_metadata_labels_owner_and_annotations() -> None:
    job = job_for(REF, spec(), SETTINGS, V0)
    meta = job["metadata"]
    assert meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "unlearning-operator",
        "app.kubernetes.io/instance": "digits-gdpr",
        "app.kubernetes.io/component": "unlearning-job",
        "app.kubernetes.io/managed-by": "unlearning-operator",
        "app.kubernetes.io/part-of": "unlearning-operator",
        "unlearn.dev/request": "digits-gdpr",
        "unlearn.dev/model": "digits-mlp",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "unlearn.dev/v1alpha1",
            "kind": "UnlearningRequest",
            "name": "digits-gdpr",
            "uid": REF.uid,
            "controller": True,
        }
    ]
    # What completion reads back, never from the request (whose spec may be another generation's).
    assert meta["annotations"] == {
        "unlearn.dev/request-uid": REF.uid,
        "unlearn.dev/spec-generation": "1",
        "unlearn.dev/model-version": "1",
        "unlearn.dev/input-model": "pvc://models/digits/m.pt2",
        "unlearn.dev/output-location": "pvc://models/digits/versions",
    }
    assert job["spec"]["template"]["metadata"]["labels"]["unlearn.dev/request"] == "digits-gdpr"


def test_build_annotations_read_back() -> None:
    v3 = Version(3, "pvc://models/digits/versions/v3/model.pt2", "aa", "r3", 2)
    job = build_job(REF, spec(), SETTINGS, v3, SETTINGS.job_image, generation=4)
    assert built_from(job) == BuiltFrom(
        model="digits-mlp",
        model_version=4,
        generation=4,
        input_model="pvc://models/digits/versions/v3/model.pt2",
        output_location="pvc://models/digits/versions",
    )
    del job["metadata"]["annotations"]["unlearn.dev/spec-generation"]
    assert built_from(job) is None


def test_command_points_at_the_mounted_manifest_and_the_next_version() -> None:
    v3 = Version(3, "pvc://models/digits/versions/v3/model.pt2", "aa", "r3", 2)
    c = container(job_for(REF, spec(), SETTINGS, v3))
    assert c["command"] == [
        "unlearn",
        "run",
        "/etc/unlearning/request.yaml",
        "--volume-root",
        "/volumes",
        "--require-claims",
        "--model-version",
        "4",
        "--run-id",
        REF.uid,
    ]
    assert {"name": "UNLEARN_JOB_IMAGE", "value": SETTINGS.job_image} in c["env"]
    # No factory may run unless the admin allowed its module: the job gets the (empty) list too.
    assert {"name": "UNLEARN_ALLOWED_FACTORY_MODULES", "value": ""} in c["env"]


def test_the_job_gets_the_admins_factory_prefixes() -> None:
    settings = load_settings({"UNLEARNING_ALLOWED_FACTORY_MODULES": "mylab.models, vision"})
    c = container(job_for(REF, spec(), settings, V0))
    assert {"name": "UNLEARN_ALLOWED_FACTORY_MODULES", "value": "mylab.models,vision"} in c["env"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"


@pytest.mark.parametrize(
    ("overrides", "env", "gpus", "cpu", "memory"),
    [
        ({}, {}, "1", "4", "16Gi"),
        ({"job.gpus": 2, "job.cpu": "8", "job.memory": "32Gi"}, {}, "2", "8", "32Gi"),
        ({}, {"UNLEARNING_JOB_GPUS": "4", "UNLEARNING_JOB_CPU": "2", "UNLEARNING_JOB_MEMORY": "4Gi"}, "4", "2", "4Gi"),
        ({"job.gpus": 0}, {}, None, "4", "16Gi"),
        ({}, {"UNLEARNING_JOB_GPUS": "0"}, None, "4", "16Gi"),
    ],
)
def test_resources(overrides: dict[str, Any], env: dict[str, str], gpus: str | None, cpu: str, memory: str) -> None:
    c = container(job_for(REF, spec(**overrides), load_settings(env), V0))
    assert c["resources"]["requests"] == {"cpu": cpu, "memory": memory, "ephemeral-storage": "6Gi"}
    limits = c["resources"]["limits"]
    assert (limits["cpu"], limits["memory"], limits["ephemeral-storage"]) == (cpu, memory, "6Gi")
    assert limits.get("nvidia.com/gpu") == gpus
    assert "nvidia.com/gpu" not in c["resources"]["requests"]


@pytest.mark.parametrize(
    ("overrides", "env", "processes", "shm"),
    [
        # One process: no launcher flag, no /dev/shm volume (the job passes no data between processes).
        ({}, {}, None, None),
        ({"job.gpus": 0}, {}, None, None),
        ({"job.gpus": 1}, {"UNLEARNING_JOB_GPUS": "4"}, None, None),
        # One process per GPU, with an in-memory /dev/shm for NCCL.
        ({"job.gpus": 2}, {}, "2", "1Gi"),
        ({}, {"UNLEARNING_JOB_GPUS": "4"}, "4", "1Gi"),
        ({"job.gpus": 8}, {"UNLEARNING_JOB_SHM_SIZE": "8Gi"}, "8", "8Gi"),
    ],
)
def test_several_gpus_run_one_process_each_with_shared_memory(
    overrides: dict[str, Any], env: dict[str, str], processes: str | None, shm: str | None
) -> None:
    job = job_for(REF, spec(**overrides), load_settings(env), V0)
    command = container(job)["command"]
    assert command[:5] == ["unlearn", "run", "/etc/unlearning/request.yaml", "--volume-root", "/volumes"]
    assert command[5:10] == ["--require-claims", "--model-version", "1", "--run-id", REF.uid]
    assert command[10:] == ([] if processes is None else ["--nproc-per-node", processes])
    if processes is not None:
        assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == processes  # one process per GPU held
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    if shm is None:
        assert "/dev/shm" not in mounts
    else:
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}


def test_restricted_pod_security() -> None:
    job = job_for(REF, spec(), SETTINGS, V0)
    pod = pod_spec(job)
    c = container(job)
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_local_disk_is_bounded_and_the_job_knows_its_tmp_limit() -> None:
    settings = load_settings({"UNLEARNING_JOB_EPHEMERAL_STORAGE": "3Gi", "UNLEARNING_JOB_TMP_SIZE": "2Gi"})
    job = job_for(REF, spec(), settings, V0)
    c = container(job)
    # /tmp alone (the kubelet evicts past sizeLimit) and the container as a whole (logs included).
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}} in pod_spec(job)["volumes"]
    assert c["resources"]["requests"]["ephemeral-storage"] == "3Gi"
    assert c["resources"]["limits"]["ephemeral-storage"] == "3Gi"
    assert {"name": "UNLEARN_TMP_LIMIT", "value": "2Gi"} in c["env"]


def test_network_policy_denies_the_job_pod_everything() -> None:
    job = job_for(REF, spec(), SETTINGS, V0)
    policy = build_network_policy(REF, spec(), SETTINGS)
    assert policy["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert policy["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert policy["metadata"]["name"] == f"{job['metadata']['name']}-isolation"
    # It selects the pods of this Job by their template labels (what exists before the Job does)...
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # ...and not those of another request in the namespace.
    other = job_for(REF.__class__("other", REF.namespace, "uid-2"), spec(), SETTINGS, V0)
    assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    # Both directions isolated, no rule at all: no traffic in or out.
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"]
    assert "egress" not in policy["spec"]


def test_network_policy_egress_is_widened_only_by_the_admin() -> None:
    rule = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 9000, "protocol": "TCP"}]}
    settings = load_settings({"UNLEARNING_JOB_EGRESS": f"[{json.dumps(rule)}]"})
    policy = build_network_policy(REF, spec(), settings)
    assert policy["spec"]["egress"] == [rule]
    assert "ingress" not in policy["spec"]


def test_job_limits_and_failure_policy() -> None:
    job = job_for(REF, spec(), SETTINGS, V0)["spec"]
    assert job["backoffLimit"] == 2
    assert job["activeDeadlineSeconds"] == 21600
    # Set only once the result is recorded: Kubernetes must not delete the Job (and its record) before.
    assert "ttlSecondsAfterFinished" not in job
    assert ttl_patch(SETTINGS) == {"spec": {"ttlSecondsAfterFinished": 86400}}
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "unlearn", "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)},
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert "suspend" not in job
    custom = job_for(REF, spec(**{"job.activeDeadlineSeconds": 600}), SETTINGS, V0)["spec"]
    assert custom["activeDeadlineSeconds"] == 600


def test_placement_merges_settings_and_spec() -> None:
    settings = load_settings(
        {
            "UNLEARNING_JOB_NODE_SELECTOR": '{"pool": "gpu", "zone": "a"}',
            "UNLEARNING_JOB_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
            "UNLEARNING_JOB_AFFINITY": '{"nodeAffinity": {"x": 1}}',
            "UNLEARNING_JOB_PRIORITY_CLASS": "batch-low",
        }
    )
    request = spec(
        **{
            "job.nodeSelector": {"zone": "b"},
            "job.tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
        }
    )
    pod = pod_spec(job_for(REF, request, settings, V0))
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml"},
    ]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "batch-low"
    own = pod_spec(job_for(REF, spec(**{"job.priorityClassName": "urgent"}), settings, V0))
    assert own["priorityClassName"] == "urgent"
    bare = pod_spec(job_for(REF, spec(), SETTINGS, V0))
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & bare.keys()


def test_kueue_queue_label_and_suspend() -> None:
    job = job_for(REF, spec(**{"job.queueName": "gpu-queue"}), SETTINGS, V0)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_the_operators_default_queue_applies_when_the_request_names_none() -> None:
    settings = load_settings({"UNLEARNING_JOB_QUEUE_NAME": "team-gpus"})
    job = job_for(REF, spec(), settings, V0)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert job["spec"]["suspend"] is True
    own = job_for(REF, spec(**{"job.queueName": "other"}), settings, V0)
    assert own["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "other"


@pytest.mark.parametrize(
    ("image", "env", "expected"),
    [
        (None, {}, OperatorSettings().job_image),
        ("reg/job:2", {"UNLEARNING_ALLOWED_IMAGES": "reg/job:2"}, "reg/job:2"),
        ("reg/default:1", {"UNLEARNING_JOB_IMAGE": "reg/default:1"}, "reg/default:1"),
    ],
)
def test_image_from_settings_or_allow_list(image: str | None, env: dict[str, str], expected: str) -> None:
    c = container(job_for(REF, spec(**{"job.image": image}), load_settings(env), V0))
    assert c["image"] == expected


def test_image_outside_allow_list_is_refused_with_what_to_do() -> None:
    with pytest.raises(ImageNotAllowedError, match=r"spec\.job\.image: evil/miner:1 is not allowed"):
        resolve_image(spec(**{"job.image": "evil/miner:1"}), SETTINGS)


@pytest.mark.parametrize(
    ("overrides", "current", "read_only", "read_write"),
    [
        # Model and output on one claim: mounted once, read-write.
        ({}, V0, [], ["models"]),
        # Separate output claim: models read-only.
        ({"output.location.claimName": "outputs"}, V0, ["models"], ["outputs"]),
        # Data and forget file on their own claims.
        (
            {
                "output.location.claimName": "outputs",
                "data": {"source": "npz", "train": {"claimName": "data", "path": "train.npz"}},
                "forget": {"indicesFile": {"claimName": "tickets", "path": "t.json"}},
            },
            V0,
            ["data", "models", "tickets"],
            ["outputs"],
        ),
        # Version 2 lives on the output claim: the original claim is no longer mounted.
        (
            {"output.location.claimName": "outputs"},
            Version(2, "pvc://outputs/digits/versions/v2/model.pt2", "", "r2", 1),
            [],
            ["outputs"],
        ),
    ],
)
def test_claims_mounts(
    overrides: dict[str, Any], current: Version, read_only: list[str], read_write: list[str]
) -> None:
    request = spec(**overrides)
    assert claims(effective_spec(request, current)) == (read_only, read_write)
    job = job_for(REF, request, SETTINGS, current)
    pod = pod_spec(job)
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for claim in read_only + read_write:
        mount = mounts[f"/volumes/{claim}"]
        volume = volumes[mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        assert mount["readOnly"] is (claim in read_only)
        assert volume["persistentVolumeClaim"]["readOnly"] is (claim in read_only)
    claim_mounts = [p for p in mounts if p.startswith("/volumes/")]
    assert len(claim_mounts) == len(read_only) + len(read_write)
    assert mounts["/etc/unlearning"]["readOnly"] is True


def test_volume_root_from_settings() -> None:
    settings = load_settings({"UNLEARNING_JOB_VOLUME_ROOT": "/mnt"})
    c = container(job_for(REF, spec(), settings, V0))
    assert c["command"][4] == "/mnt"
    assert any(m["mountPath"] == "/mnt/models" for m in c["volumeMounts"])


def test_spec_configmap_carries_the_effective_manifest() -> None:
    v2 = Version(2, "pvc://models/digits/versions/v2/model.pt2", "bb", "r2", 1)
    request = spec(**{"gates.maxMiaClassifierAccuracy": None, "requestId": None})
    cm = build_spec_configmap(REF, request, v2)
    assert cm["metadata"]["name"] == job_for(REF, request, SETTINGS, v2)["metadata"]["name"] + "-spec"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == REF.uid
    assert cm["metadata"]["annotations"] == {"unlearn.dev/request-uid": REF.uid}
    assert cm["metadata"]["labels"]["app.kubernetes.io/component"] == "unlearning-job"
    manifest = parse_manifest(yaml.safe_load(cm["data"]["request.yaml"]))
    assert manifest.spec.model.source.uri == "pvc://models/digits/versions/v2/model.pt2"
    assert manifest.spec.forget.indices == [3, 17, 42]
    assert manifest.request_id == "team-a/digits-gdpr"
    # The default gate is kept as the spec resolved it, not re-defaulted by the job.
    assert manifest.spec.gates.max_mia_classifier_accuracy == 0.6
    volumes = {v["name"]: v for v in pod_spec(job_for(REF, request, SETTINGS, v2))["volumes"]}
    assert volumes["request-spec"]["configMap"]["name"] == cm["metadata"]["name"]


def test_disabled_gate_stays_disabled_in_the_manifest() -> None:
    raw = raw_spec()
    raw["gates"] = {"maxMiaClassifierAccuracy": None}
    request = parse_spec(raw)
    assert request.gates.max_mia_classifier_accuracy is None
    manifest = parse_manifest(yaml.safe_load(build_spec_configmap(REF, request, V0)["data"]["request.yaml"]))
    assert manifest.spec.gates.max_mia_classifier_accuracy is None


@pytest.mark.parametrize(
    ("containers", "gpus"),
    [
        ([{"name": "unlearn", "resources": {"limits": {"nvidia.com/gpu": "4", "cpu": "2"}}}], 4),
        ([{"name": "unlearn", "resources": {"limits": {"cpu": "2"}}}], 0),
        ([{"name": "unlearn"}], 0),
        (
            [
                {"name": "a", "resources": {"limits": {"nvidia.com/gpu": 1}}},
                {"name": "b", "resources": {"limits": {"nvidia.com/gpu": "2"}}},
            ],
            3,
        ),
        ([], 0),
    ],
)
def test_gpus_of_a_job_is_its_containers_gpu_limits(containers: list[dict[str, Any]], gpus: int) -> None:
    assert gpus_of({"spec": {"template": {"spec": {"containers": containers}}}}) == gpus


def test_gpus_of_the_built_job_follow_the_request() -> None:
    assert gpus_of(job_for(REF, spec(**{"job.gpus": 2}), SETTINGS, V0)) == 2
    assert gpus_of(job_for(REF, spec(**{"job.gpus": 0}), SETTINGS, V0)) == 0


def test_a_bank_is_passed_with_its_digest_and_mounted_read_only() -> None:
    bank = BankUse("team-a/digits-cal", "pvc://banks/digits/digits-cal-7c6b5a49/bank.npz", "ba" * 32)
    job = build_job(REF, spec(), SETTINGS, V0, SETTINGS.job_image, bank=bank)
    c = container(job)
    assert c["command"][-6:] == [
        "--calibration-bank",
        "pvc://banks/digits/digits-cal-7c6b5a49/bank.npz",
        "--calibration-sha256",
        "ba" * 32,
        "--calibration-name",
        "team-a/digits-cal",
    ]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/volumes/banks"]["readOnly"] is True
    volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == mounts["/volumes/banks"]["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "banks", "readOnly": True}
    assert BankUse.from_annotation(job["metadata"]["annotations"]["unlearn.dev/calibration-bank"]) == bank
    # A bank on the output claim: that claim stays mounted once, read-write.
    on_output = BankUse("team-a/c", "pvc://models/banks/bank.npz", "ab" * 32)
    assert claims(effective_spec(spec(), V0), on_output) == ([], ["models"])
    # No bank: no flag, no annotation.
    plain = build_job(REF, spec(), SETTINGS, V0, SETTINGS.job_image)
    assert "--calibration-bank" not in container(plain)["command"]
    assert "unlearn.dev/calibration-bank" not in plain["metadata"]["annotations"]
