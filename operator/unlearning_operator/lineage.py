"""Model lineage: which version of a logical model is current, and where it came from.

One ConfigMap per logical model and namespace, ``unlearn-model-<model>``,
holds ``current`` (JSON: version, uri, sha256, request, parent) and
``history`` (a JSON list of every version, oldest first). A serving system
reads ``current`` to know which weights to load; the operator reads it to
start each request from the newest unlearned version, so a later request
never undoes an earlier one.

Version 0 is the ``spec.model.source`` of the first request that names the
model (its sha256 is unknown to the operator until a job has hashed it, so it
is recorded as empty and filled from the first record's ``inputModel``).
Only a run with verdict Passed that wrote an output model becomes current: a
failed gate leaves the previous version serving.

The ConfigMap is not owned by any request (deleting a request must not
delete the model's history) and is updated with the resourceVersion it was
read at, so two writers cannot lose each other's versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec

from .labels import COMPONENT_LINEAGE, LABEL_MODEL, common_labels

LINEAGE_PREFIX = "unlearn-model-"


def lineage_name(model: str) -> str:
    """ConfigMap name for a model (model names are DNS labels of at most 63 characters)."""
    return f"{LINEAGE_PREFIX}{model}"


@dataclass(frozen=True)
class Version:
    version: int
    uri: str
    sha256: str
    request: str
    parent: int | None

    def dump(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uri": self.uri,
            "sha256": self.sha256,
            "request": self.request,
            "parent": self.parent,
        }

    @classmethod
    def load(cls, raw: dict[str, Any]) -> Version:
        return cls(
            version=int(raw["version"]),
            uri=str(raw["uri"]),
            sha256=str(raw.get("sha256", "")),
            request=str(raw.get("request", "")),
            parent=None if raw.get("parent") is None else int(raw["parent"]),
        )


@dataclass(frozen=True)
class Lineage:
    model: str
    current: Version
    history: tuple[Version, ...]


def initial(spec: UnlearningRequestSpec, request: str) -> Lineage:
    """Version 0: the source named by the first request for the model."""
    v0 = Version(version=0, uri=spec.model.source.uri, sha256="", request=request, parent=None)
    return Lineage(model=spec.model.name, current=v0, history=(v0,))


def parse(config_map: dict[str, Any]) -> Lineage:
    """Read a lineage ConfigMap; raise ValueError naming the key when it is corrupt."""
    data = config_map.get("data") or {}
    name = (config_map.get("metadata") or {}).get("name", "?")
    try:
        current = Version.load(json.loads(data["current"]))
        history = tuple(Version.load(item) for item in json.loads(data.get("history", "[]")))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"lineage ConfigMap {name}: key current/history is not valid lineage JSON ({error})") from None
    model = (config_map.get("metadata") or {}).get("labels", {}).get(LABEL_MODEL, "")
    return Lineage(model=model or name.removeprefix(LINEAGE_PREFIX), current=current, history=history or (current,))


def advance(lineage: Lineage, record: CompactRecord, request: str) -> Lineage:
    """The lineage after a run; unchanged unless the run Passed and wrote a model.

    Idempotent: replaying the same record (a restarted operator) adds nothing.
    """
    history = list(lineage.history)
    current = lineage.current
    first = history[0]
    if (
        record.input_model is not None
        and first.version == 0
        and not first.sha256
        and record.input_model.uri == first.uri
    ):
        # The job hashed version 0 for us; record it so the chain is verifiable end to end.
        first = replace(first, sha256=record.input_model.sha256)
        history[0] = first
        if current.version == 0:
            current = first
    already = any(v.request == request and v.version > 0 for v in history)
    if record.verdict == "Passed" and record.output_model is not None and not already:
        current = Version(
            version=current.version + 1,
            uri=record.output_model.uri,
            sha256=record.output_model.sha256,
            request=request,
            parent=current.version,
        )
        history.append(current)
    return Lineage(lineage.model, current, tuple(history))


def build_lineage_configmap(lineage: Lineage, namespace: str) -> dict[str, Any]:
    """The ConfigMap manifest (no owner reference: the history outlives requests)."""
    labels = common_labels(instance=lineage.model, component=COMPONENT_LINEAGE, model=lineage.model)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": lineage_name(lineage.model), "namespace": namespace, "labels": labels},
        "data": {
            "current": json.dumps(lineage.current.dump(), sort_keys=True),
            "history": json.dumps([v.dump() for v in lineage.history], sort_keys=True),
        },
    }
