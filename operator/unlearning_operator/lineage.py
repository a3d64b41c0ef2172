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

Tenants can edit ConfigMaps in their namespace, and the lineage decides which
weights the next request starts from and a serving system loads, so it is
tamper-evident: each version's entry carries ``previous``, the digest of the
entry before it, and its own ``digest`` (sha256 of its canonical JSON,
``previous`` included). ``parse`` verifies the whole chain and refuses a
lineage that does not verify with a ``LineageError`` that says which version
breaks it; the operator then fails the request (``LineageBroken``) rather
than start from, or add to, a history it cannot vouch for. An edit that
recomputes every digest is not caught here; the audit record of each run
that added a version holds that version's digest (``lineageDigest``), and
the audit records are immutable.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

from unlearning_contracts.record import CompactRecord
from unlearning_contracts.spec import UnlearningRequestSpec

from .labels import COMPONENT_LINEAGE, LABEL_MODEL, common_labels

LINEAGE_PREFIX = "unlearn-model-"


def lineage_name(model: str) -> str:
    """ConfigMap name for a model (model names are DNS labels of at most 63 characters)."""
    return f"{LINEAGE_PREFIX}{model}"


class LineageError(ValueError):
    """A lineage ConfigMap that cannot be read or whose chain does not verify; the message says which."""


@dataclass(frozen=True)
class Version:
    version: int
    uri: str
    sha256: str
    request: str
    parent: int | None
    previous: str = ""
    """The digest of the version before (empty for version 0)."""
    digest: str = ""
    """sha256 of this entry's canonical JSON (``previous`` included, ``digest`` not)."""

    def content(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uri": self.uri,
            "sha256": self.sha256,
            "request": self.request,
            "parent": self.parent,
            "previous": self.previous,
        }

    def expected_digest(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sealed(self) -> Version:
        """This entry with its digest (re)computed."""
        return replace(self, digest=self.expected_digest())

    def dump(self) -> dict[str, Any]:
        return {**self.content(), "digest": self.digest}

    @classmethod
    def load(cls, raw: dict[str, Any]) -> Version:
        return cls(
            version=int(raw["version"]),
            uri=str(raw["uri"]),
            sha256=str(raw.get("sha256", "")),
            request=str(raw.get("request", "")),
            parent=None if raw.get("parent") is None else int(raw["parent"]),
            previous=str(raw.get("previous") or ""),
            digest=str(raw.get("digest") or ""),
        )


@dataclass(frozen=True)
class Lineage:
    model: str
    current: Version
    history: tuple[Version, ...]


def initial(spec: UnlearningRequestSpec, request: str) -> Lineage:
    """Version 0: the source named by the first request for the model."""
    v0 = Version(version=0, uri=spec.model.source.uri, sha256="", request=request, parent=None).sealed()
    return Lineage(model=spec.model.name, current=v0, history=(v0,))


def chain_problem(lineage: Lineage) -> str | None:
    """Why the lineage's chain does not verify (None: it does). Pure."""
    previous = ""
    for index, entry in enumerate(lineage.history):
        where = f"version {entry.version}"
        if entry.version != index:
            return f"the versions are not 0, 1, 2, ... ({where} is entry {index}): one was removed or reordered"
        if entry.parent != (index - 1 if index else None):
            return f"{where} names parent {entry.parent}, not the version before it"
        if not entry.digest:
            return f"{where} carries no digest (written by hand, or before lineages were chained)"
        if entry.previous != previous:
            return f"{where} does not carry the digest of the version before it: the chain is broken there"
        if entry.digest != entry.expected_digest():
            return f"{where} was changed after it was written (its digest no longer matches)"
        previous = entry.digest
    if not lineage.history or lineage.current != lineage.history[-1]:
        return "current is not the newest version of history"
    return None


def parse(config_map: dict[str, Any]) -> Lineage:
    """Read a lineage ConfigMap and verify its chain; raise LineageError saying what is wrong and what to do."""
    data = config_map.get("data") or {}
    name = (config_map.get("metadata") or {}).get("name", "?")
    try:
        current = Version.load(json.loads(data["current"]))
        history = tuple(Version.load(item) for item in json.loads(data.get("history", "[]")))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LineageError(
            f"lineage ConfigMap {name}: key current/history is not valid lineage JSON ({error}): {_REPAIR}"
        ) from None
    model = (config_map.get("metadata") or {}).get("labels", {}).get(LABEL_MODEL, "")
    lineage = Lineage(model=model or name.removeprefix(LINEAGE_PREFIX), current=current, history=history)
    problem = chain_problem(lineage)
    if problem is not None:
        raise LineageError(f"lineage ConfigMap {name} does not verify: {problem}: {_REPAIR}")
    return lineage


_REPAIR = (
    "restore it from the audit records of the runs that wrote it (each holds its version's lineageDigest), "
    "or delete it to start the model again from spec.model.source"
)


def advance(lineage: Lineage, record: CompactRecord, request: str) -> Lineage:
    """The lineage after a run; unchanged unless the run Passed and wrote a model.

    Idempotent: replaying the same record (a restarted operator) adds nothing.
    """
    history = list(lineage.history)
    current = lineage.current
    first = history[0]
    if (
        record.input_model is not None
        and len(history) == 1
        and not first.sha256
        and record.input_model.uri == first.uri
    ):
        # The job hashed version 0 for us; record it so the chain is verifiable end to end.
        # Only while version 0 is alone: re-sealing it later would break every digest after it.
        first = replace(first, sha256=record.input_model.sha256).sealed()
        history[0] = first
        current = first
    already = any(v.request == request and v.version > 0 for v in history)
    if record.verdict == "Passed" and record.output_model is not None and not already:
        current = Version(
            version=current.version + 1,
            uri=record.output_model.uri,
            sha256=record.output_model.sha256,
            request=request,
            parent=current.version,
            previous=current.digest,
        ).sealed()
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


def seal_unchained(config_map: dict[str, Any]) -> dict[str, Any]:
    """The ConfigMap of a lineage written before versions were chained, with its chain computed.

    For the one-time upgrade of lineages that operator 0.1 wrote (none of
    their entries carries a digest); the admin checks the history first, since
    sealing vouches for it. A lineage with any digest is refused: it was
    chained already, so a missing or wrong digest there means an edit.
    """
    data = config_map.get("data") or {}
    name = (config_map.get("metadata") or {}).get("name", "?")
    try:
        history = [Version.load(item) for item in json.loads(data.get("history", "[]"))]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LineageError(f"lineage ConfigMap {name}: key history is not valid lineage JSON ({error})") from None
    if not history or any(v.digest or v.previous for v in history):
        raise LineageError(f"lineage ConfigMap {name}: not an unchained lineage; only those are sealed")
    sealed: list[Version] = []
    for entry in history:
        sealed.append(replace(entry, previous=sealed[-1].digest if sealed else "").sealed())
    model = (config_map.get("metadata") or {}).get("labels", {}).get(LABEL_MODEL) or name.removeprefix(LINEAGE_PREFIX)
    chained = Lineage(model=model, current=sealed[-1], history=tuple(sealed))
    problem = chain_problem(chained)
    if problem is not None:
        raise LineageError(f"lineage ConfigMap {name} cannot be sealed: {problem}")
    result = dict(config_map)
    result["data"] = {**data, "current": json.dumps(chained.current.dump(), sort_keys=True)}
    result["data"]["history"] = json.dumps([v.dump() for v in chained.history], sort_keys=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m unlearning_operator.lineage seal < lineages.json``: seal unchained lineages (upgrade from 0.1).

    Reads a ConfigMap or a List of them (``kubectl get -o json``) and writes the
    sealed ones as a List for ``kubectl replace -f -``.
    """
    args = sys.argv[1:] if argv is None else argv
    if args != ["seal"]:
        print("usage: python -m unlearning_operator.lineage seal < configmaps.json", file=sys.stderr)
        return 2
    given = json.load(sys.stdin)
    items = given.get("items", []) if given.get("kind", "").endswith("List") else [given]
    try:
        sealed = [seal_unchained(item) for item in items]
    except LineageError as error:
        print(f"unlearning_operator.lineage: {error}", file=sys.stderr)
        return 1
    json.dump({"apiVersion": "v1", "kind": "List", "items": sealed}, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
