"""What the operator keeps of each request and Job: the values of kopf's two indexes. Pure.

kopf builds these from every watch event (main.py's index handlers), so the
work done here happens once per event, not once per use: the spec is parsed
here, and a view keeps either the typed spec or the message that says what
is wrong with it (the request is then Rejected with that message).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from unlearning_contracts.api import API_GROUP_VERSION, CALIBRATION, REQUEST
from unlearning_contracts.calibration import UnlearningCalibrationSpec, parse_calibration_spec
from unlearning_contracts.spec import SpecError, UnlearningRequestSpec, parse_spec

from .calibration_jobs import CalibrationRef
from .jobs import RequestRef
from .k8s import ObjectRef
from .labels import LABEL_CALIBRATION, LABEL_REQUEST
from .results import job_outcome

Key = tuple[str, str]
"""(namespace, name) of a request; a Job is indexed under its request's key."""


@dataclass(frozen=True)
class RequestView:
    """What the operator keeps of a request (the request index's value)."""

    namespace: str
    name: str
    uid: str
    created: str
    generation: int
    spec: UnlearningRequestSpec | None
    """The parsed spec, or None when it is invalid (then ``spec_error`` says why)."""
    spec_error: str | None
    model: str
    """spec.model.name, read from the raw spec when the spec is invalid (the scheduler still groups by it)."""
    status: dict[str, Any]
    deleting: bool = False
    submitted: dict[str, Any] | None = None
    """The raw spec, kept only when it is invalid (its Rejected audit record shows it as submitted)."""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def ref(self) -> RequestRef:
        return RequestRef(name=self.name, namespace=self.namespace, uid=self.uid)

    @property
    def object_ref(self) -> ObjectRef:
        return ObjectRef(API_GROUP_VERSION, REQUEST.kind, self.name, self.namespace, self.uid)


@dataclass(frozen=True)
class CalibrationView:
    """What the operator keeps of a calibration (the calibration index's value)."""

    namespace: str
    name: str
    uid: str
    created: str
    generation: int
    spec: UnlearningCalibrationSpec | None
    """The parsed spec, or None when it is invalid (then ``spec_error`` says why)."""
    spec_error: str | None
    model: str
    status: dict[str, Any]
    deleting: bool = False

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def ref(self) -> CalibrationRef:
        return CalibrationRef(name=self.name, namespace=self.namespace, uid=self.uid)

    @property
    def object_ref(self) -> ObjectRef:
        return ObjectRef(API_GROUP_VERSION, CALIBRATION.kind, self.name, self.namespace, self.uid)


@dataclass(frozen=True)
class JobView:
    """What the operator keeps of a Job it made (a job index's value)."""

    namespace: str
    name: str
    request: str
    """The owner's name from our label (unlearn.dev/request, or unlearn.dev/calibration)."""
    owner_uid: str
    """uid of the controller owner reference of our kind (empty when there is none)."""
    created: str
    outcome: str
    active: int
    ready: int
    suspended: bool
    uid: str = ""
    ttl: int | None = None
    """spec.ttlSecondsAfterFinished: None until the operator has recorded the Job's result."""
    owner_kind: str = REQUEST.kind
    completed_indexes: str = ""
    """An Indexed Job's completed indices as the Job controller writes them (0-2,4)."""
    failed_indexes: str = ""
    parallelism: int = 1
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


def _parse(raw: dict[str, Any], parse: Any) -> tuple[Any, str | None]:
    try:
        return parse(raw), None
    except SpecError as invalid:
        return None, str(invalid)


def _model_name(spec: Any, raw: dict[str, Any]) -> str:
    if spec is not None:
        return str(spec.model.name)
    model = raw.get("model")
    return str(model.get("name", "")) if isinstance(model, dict) else ""


def calibration_view(body: Mapping[str, Any]) -> CalibrationView:
    metadata = body.get("metadata") or {}
    raw = dict(body.get("spec") or {})
    spec, error = _parse(raw, parse_calibration_spec)
    return CalibrationView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        created=str(metadata.get("creationTimestamp", "")),
        generation=int(metadata.get("generation", 1) or 1),
        spec=spec,
        spec_error=error,
        model=_model_name(spec, raw),
        status=copy.deepcopy(dict(body.get("status") or {})),
        deleting=bool(metadata.get("deletionTimestamp")),
    )


def request_view(body: Mapping[str, Any]) -> RequestView:
    metadata = body.get("metadata") or {}
    raw = dict(body.get("spec") or {})
    spec, error = _parse(raw, parse_spec)
    return RequestView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        created=str(metadata.get("creationTimestamp", "")),
        generation=int(metadata.get("generation", 1) or 1),
        spec=spec,
        spec_error=error,
        model=_model_name(spec, raw),
        status=copy.deepcopy(dict(body.get("status") or {})),
        deleting=bool(metadata.get("deletionTimestamp")),
        submitted=copy.deepcopy(raw) if spec is None else None,
    )


def job_view(body: Mapping[str, Any]) -> JobView:
    """A Job of a request (unlearn.dev/request label) or of a calibration (unlearn.dev/calibration label)."""
    metadata = body.get("metadata") or {}
    labels = metadata.get("labels") or {}
    kind = CALIBRATION.kind if LABEL_CALIBRATION in labels else REQUEST.kind
    owner = labels.get(LABEL_CALIBRATION if kind == CALIBRATION.kind else LABEL_REQUEST, "")
    owners = metadata.get("ownerReferences") or []
    # Only a controller reference counts: a Job that merely lists one of ours among its owners is not ours.
    owner_uid = next((str(o.get("uid", "")) for o in owners if o.get("kind") == kind and o.get("controller")), "")
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    ttl = spec.get("ttlSecondsAfterFinished")
    return JobView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        request=str(owner),
        owner_uid=owner_uid,
        created=str(metadata.get("creationTimestamp", "")),
        outcome=job_outcome(dict(body)),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        suspended=bool(spec.get("suspend")),
        uid=str(metadata.get("uid", "")),
        ttl=int(ttl) if ttl is not None else None,
        owner_kind=kind,
        completed_indexes=str(status.get("completedIndexes") or ""),
        failed_indexes=str(status.get("failedIndexes") or ""),
        parallelism=int(spec.get("parallelism") or 1),
        annotations=tuple(sorted((str(k), str(v)) for k, v in (metadata.get("annotations") or {}).items())),
    )


def values(index: Mapping[Any, Any] | None, key: Any) -> list[Any]:
    """The values kopf's index holds under ``key`` (none when the index is not bound yet)."""
    if index is None or key not in index:
        return []
    return list(index[key])


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as the API writes it, or None when absent."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
