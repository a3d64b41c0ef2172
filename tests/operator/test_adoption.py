"""Is an object under one of the operator's names one it made? Table tests over forged variants."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.operator.factories import REF, V0, record, spec
from unlearning_operator import adoption
from unlearning_operator import status as st
from unlearning_operator.audit_configmap import build_audit_configmap
from unlearning_operator.jobs import build_job, build_spec_configmap
from unlearning_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()
T = datetime(2026, 1, 1, 12, tzinfo=UTC)
Change = Callable[[dict[str, Any]], None]


def launched_status() -> dict[str, Any]:
    return st.launching(
        None, job_name=built_job()["metadata"]["name"], model_version=1, input_model={}, generation=1, now=T
    )


OUT = "pvc://models/digits/versions"


def built_job() -> dict[str, Any]:
    job = build_job(REF, spec(), SETTINGS, V0, SETTINGS.job_image)
    job["metadata"]["uid"] = "job-uid-1"
    return job


def meta(path: str, value: Any) -> Change:
    """Set (or with None, delete) one label or annotation: ``labels.<key>`` / ``annotations.<key>``."""
    group, key = path.split(".", 1)

    def change(obj: dict[str, Any]) -> None:
        node = obj["metadata"].setdefault(group, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value

    return change


def owners(value: list[dict[str, Any]]) -> Change:
    def change(obj: dict[str, Any]) -> None:
        obj["metadata"]["ownerReferences"] = value

    return change


def problem_of(job: dict[str, Any], status: dict[str, Any]) -> str | None:
    return adoption.job_problem(job, REF, status, adoption.build_of(job, status, OUT))


OTHER_OWNER = {"apiVersion": "unlearn.dev/v1alpha1", "kind": "UnlearningRequest", "name": REF.name, "uid": "other"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (meta("labels.app.kubernetes.io/managed-by", None), "does not carry the operator's labels"),
        (meta("labels.unlearn.dev/request", "someone-else"), "does not carry the operator's labels"),
        (meta("annotations.unlearn.dev/request-uid", "forged"), "was not made for this request object"),
        (owners([]), "is not controlled by request"),
        (owners([{**OTHER_OWNER, "controller": True}]), "is not controlled by request"),
        (owners([{**OTHER_OWNER, "uid": REF.uid, "kind": "Deployment", "controller": True}]), "is not controlled"),
        (
            owners([{**OTHER_OWNER, "uid": REF.uid, "controller": True}, {**OTHER_OWNER, "controller": True}]),
            "is not controlled by request",
        ),
        (meta("annotations.unlearn.dev/model-version", "7"), "writes model version 7, not the 1 recorded"),
        (meta("annotations.unlearn.dev/spec-generation", "2"), "was built from spec generation 2"),
        (meta("annotations.unlearn.dev/input-model", None), "lacks the operator's build annotations"),
    ],
)
def test_a_job_missing_any_mark_is_not_adopted(change: Change, words: str) -> None:
    job = built_job()
    assert problem_of(job, launched_status()) is None
    change(job)
    problem = problem_of(job, launched_status())
    assert problem is not None
    assert words in problem


def test_a_job_with_every_mark_is_still_not_ours_unless_status_names_it() -> None:
    # A tenant can copy labels, annotations and an ownerReference (the uid is readable); not our status.
    forged = built_job()
    queued = st.queued(None, st.REASON_WAITING_FOR_CAPACITY, "waiting", 1, T)
    problem = problem_of(forged, queued)
    assert problem is not None
    assert "is not the Job this request's status records: the operator did not create it" in problem


def test_spec_configmap_must_hold_exactly_our_spec() -> None:
    ours = build_spec_configmap(REF, spec(), V0)
    assert adoption.spec_configmap_problem(copy.deepcopy(ours), ours, REF) is None
    forged = copy.deepcopy(ours)
    forged["data"]["request.yaml"] = forged["data"]["request.yaml"].replace("digits/versions", "../../etc")
    assert "holds another spec" in str(adoption.spec_configmap_problem(forged, ours, REF))
    unowned = copy.deepcopy(ours)
    del unowned["metadata"]["ownerReferences"]
    assert "is not controlled by request" in str(adoption.spec_configmap_problem(unowned, ours, REF))


def final() -> dict[str, Any]:
    return st.with_audit(st.finished(launched_status(), record(), T), "x")


def audit(completion_time: str = "2026-01-01T12:00:00Z") -> dict[str, Any]:
    status = dict(final(), completionTime=completion_time)
    return build_audit_configmap(REF, spec(), status, record())


def with_outcome(**fields: Any) -> Change:
    def change(cm: dict[str, Any]) -> None:
        outcome = json.loads(cm["data"]["outcome.json"])
        outcome.update(fields)
        cm["data"]["outcome.json"] = json.dumps(outcome)

    return change


def data(key: str, value: str | None) -> Change:
    def change(cm: dict[str, Any]) -> None:
        if value is None:
            cm["data"].pop(key)
        else:
            cm["data"][key] = value

    return change


def mutable(cm: dict[str, Any]) -> None:
    cm["immutable"] = False


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # The probe: a ConfigMap made in advance under the record's name, saying Passed.
        (data("record.json", json.dumps({"verdict": "Passed"})), "holds another record"),
        (with_outcome(modelVersion=7), "holds another record"),
        (data("extra.json", "{}"), "holds another record"),
        (data("record.json", None), "holds another record"),
        (mutable, "is not immutable"),
        (owners([{**OTHER_OWNER, "uid": REF.uid}]), "has owners"),
        (meta("annotations.unlearn.dev/request-uid", None), "was not made for this request object"),
        # Written before the request existed: not by the operator, whatever it says.
        (with_outcome(completionTime="2025-12-31T00:00:00Z"), "holds another record"),
        (data("outcome.json", "not json"), "holds another record"),
    ],
)
def test_an_audit_record_that_is_not_exactly_ours_is_not_referenced(change: Change, words: str) -> None:
    ours = audit()
    taken = copy.deepcopy(ours)
    change(taken)
    problem = adoption.audit_problem(taken, ours, REF, created="2026-01-01T10:00:00Z")
    assert problem is not None
    assert words in problem


def test_our_own_record_from_an_earlier_try_is_recognised() -> None:
    # A retry after a crash writes the same record a few seconds later: only completionTime differs.
    earlier, now = audit("2026-01-01T12:00:00Z"), audit("2026-01-01T12:00:07Z")
    assert adoption.audit_problem(earlier, now, REF, created="2026-01-01T10:00:00Z") is None


def pod(job: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The pod the Job controller makes for ``job``, with metadata/spec changes applied."""
    uid = job["metadata"]["uid"]
    body: dict[str, Any] = {
        "metadata": {
            "name": f"{job['metadata']['name']}-abcde",
            "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"], adoption.LABEL_CONTROLLER_UID: uid},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "uid": uid, "controller": True}],
        },
        "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
    }
    for key, value in changes.items():
        if key == "image":
            body["spec"]["containers"][0]["image"] = value
        elif key == "owners":
            body["metadata"]["ownerReferences"] = value
        elif key == "labels":
            body["metadata"]["labels"] = value
    return body


def test_only_the_jobs_own_pods_are_read() -> None:
    job = built_job()
    own = pod(job)
    name_label_only = pod(job, labels={"batch.kubernetes.io/job-name": job["metadata"]["name"]}, owners=[])
    other_image = pod(job, image="evil/miner:1")
    uncontrolled = pod(job, owners=[{"kind": "Job", "uid": "job-uid-1", "controller": False}])
    other_job = pod(job, owners=[{"kind": "Job", "uid": "job-uid-2", "controller": True}])
    mine, foreign = adoption.job_pods(job, [own, name_label_only, other_image, uncontrolled, other_job])
    assert mine == [own]
    assert foreign == [name_label_only, other_image, uncontrolled, other_job]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"model": "other-model"}, "the record is for model other-model"),
        ({"modelVersion": 5}, "the record is for model version 5, the Job writes 1"),
        ({"inputModel": {"uri": "pvc://models/other.pt2", "sha256": "1"}}, "is not the Job's input"),
        (
            {"outputModel": {"uri": "pvc://models/anywhere/evil.pt2", "sha256": "1", "format": "exported"}},
            "is outside the Job's output location",
        ),
        (
            {"outputModel": {"uri": f"{OUT}/../../escape.pt2", "sha256": "1", "format": "exported"}},
            "is outside the Job's output location",
        ),
        (
            {"outputModel": {"uri": f"{OUT}-sibling/v1.pt2", "sha256": "1", "format": "exported"}},
            "is outside the Job's output location",
        ),
    ],
)
def test_a_record_must_be_for_what_the_job_was_built_to_do(overrides: dict[str, Any], words: str) -> None:
    inside = {"uri": f"{OUT}/digits-mlp-v1.pt2", "sha256": "1", "format": "exported"}
    good = record(outputModel=inside, inputModel={"uri": V0.uri, "sha256": "1"})
    built = adoption.build_of(built_job(), launched_status(), None)
    assert built is not None
    assert adoption.record_problem(good, built) is None
    problem = adoption.record_problem(record(**{"outputModel": inside, **overrides}), built)
    assert problem is not None
    assert words in problem


def test_a_job_of_the_previous_operator_is_still_finished() -> None:
    # Operator 0.1 wrote only the model-version annotation, and status after creating the Job: upgrading
    # must not strand the Jobs it started. What is missing comes from status (spec frozen since it named it).
    legacy = built_job()
    for key in ("unlearn.dev/spec-generation", "unlearn.dev/input-model", "unlearn.dev/output-location"):
        del legacy["metadata"]["annotations"][key]
    status = st.running(
        None,
        job_name=legacy["metadata"]["name"],
        attempt=1,
        model_version=1,
        input_model={"uri": V0.uri, "sha256": ""},
        generation=1,
        now=T,
    )
    built = adoption.build_of(legacy, status, OUT)
    assert built == adoption.BuiltFrom("digits-mlp", 1, 1, V0.uri, OUT)
    assert adoption.job_problem(legacy, REF, status, built) is None
    # Half of the new annotations is not a legacy Job: it is a forged or damaged one.
    legacy["metadata"]["annotations"]["unlearn.dev/spec-generation"] = "1"
    assert adoption.build_of(legacy, status, OUT) is None
