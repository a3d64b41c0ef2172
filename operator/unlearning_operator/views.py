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

from unlearning_contracts.api import API_GROUP_VERSION, REQUEST
from unlearning_contracts.spec import SpecError, UnlearningRequestSpec, parse_spec

from .jobs import RequestRef
from .k8s import ObjectRef
from .labels import LABEL_REQUEST
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
class JobView:
    """What the operator keeps of a Job it made (the job index's value)."""

    namespace: str
    name: str
    request: str
    owner_uid: str
    created: str
    outcome: str
    active: int
    ready: int
    suspended: bool
    uid: str = ""
    ttl: int | None = None
    """spec.ttlSecondsAfterFinished: None until the operator has recorded the Job's result."""


def request_view(body: Mapping[str, Any]) -> RequestView:
    metadata = body.get("metadata") or {}
    raw = dict(body.get("spec") or {})
    spec: UnlearningRequestSpec | None = None
    error: str | None = None
    try:
        spec = parse_spec(raw)
    except SpecError as invalid:
        error = str(invalid)
    model = raw.get("model")
    return RequestView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        created=str(metadata.get("creationTimestamp", "")),
        generation=int(metadata.get("generation", 1) or 1),
        spec=spec,
        spec_error=error,
        model=spec.model.name if spec is not None else str(model.get("name", "")) if isinstance(model, dict) else "",
        status=copy.deepcopy(dict(body.get("status") or {})),
        deleting=bool(metadata.get("deletionTimestamp")),
        submitted=copy.deepcopy(raw) if spec is None else None,
    )


def job_view(body: Mapping[str, Any]) -> JobView:
    metadata = body.get("metadata") or {}
    owners = metadata.get("ownerReferences") or []
    owner_uid = next((str(o.get("uid", "")) for o in owners if o.get("kind") == REQUEST.kind), "")
    status = body.get("status") or {}
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    return JobView(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        request=str((metadata.get("labels") or {}).get(LABEL_REQUEST, "")),
        owner_uid=owner_uid,
        created=str(metadata.get("creationTimestamp", "")),
        outcome=job_outcome(dict(body)),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        suspended=bool((body.get("spec") or {}).get("suspend")),
        uid=str(metadata.get("uid", "")),
        ttl=int(ttl) if ttl is not None else None,
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
