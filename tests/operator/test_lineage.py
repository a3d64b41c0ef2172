"""Model lineage: version 0 from the first request, only Passed runs advance, replay-safe."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.operator.factories import record, spec
from unlearning_operator import lineage as lin

pytestmark = pytest.mark.unit


def test_initial_is_the_spec_source() -> None:
    lineage = lin.initial(spec(), "r1")
    assert lineage.current == lin.Version(0, "pvc://models/digits/m.pt2", "", "r1", None).sealed()
    assert lineage.current.digest == lineage.current.expected_digest() != ""
    assert lineage.history == (lineage.current,)


def test_passed_run_becomes_current_with_parent() -> None:
    lineage = lin.advance(lin.initial(spec(), "r1"), record(), "r1")
    v0 = lineage.history[0]
    assert (
        lineage.current
        == lin.Version(1, "pvc://models/digits/versions/v1/model.pt2", "22" * 32, "r1", 0, previous=v0.digest).sealed()
    )
    assert [v.version for v in lineage.history] == [0, 1]
    # The job hashed version 0: the chain is now verifiable from the start.
    assert v0.sha256 == "11" * 32
    assert lin.chain_problem(lineage) is None


@pytest.mark.parametrize(
    "the_record",
    [
        record(verdict="Failed", exitCode=3, reasons=["maxMiaAuc"]),
        record(outputModel=None),
    ],
)
def test_failed_or_modelless_run_keeps_current(the_record: object) -> None:
    start = lin.initial(spec(), "r1")
    after = lin.advance(start, the_record, "r1")  # type: ignore[arg-type]
    assert after.current.version == 0
    assert len(after.history) == 1


def test_replay_adds_nothing_and_chain_grows() -> None:
    one = lin.advance(lin.initial(spec(), "r1"), record(), "r1")
    assert lin.advance(one, record(), "r1") == one
    two = lin.advance(
        one,
        record(
            outputModel={"uri": "pvc://models/digits/versions/v2/model.pt2", "sha256": "33" * 32, "format": "exported"}
        ),
        "r2",
    )
    assert (two.current.version, two.current.parent, two.current.request) == (2, 1, "r2")


def test_configmap_roundtrip() -> None:
    lineage = lin.advance(lin.initial(spec(), "r1"), record(), "r1")
    cm = lin.build_lineage_configmap(lineage, "team-a")
    assert cm["metadata"]["name"] == "unlearn-model-digits-mlp"
    assert cm["metadata"]["labels"]["app.kubernetes.io/component"] == "lineage"
    assert cm["metadata"]["labels"]["unlearn.dev/model"] == "digits-mlp"
    assert "ownerReferences" not in cm["metadata"]
    assert json.loads(cm["data"]["current"])["version"] == 1
    assert lin.parse(cm) == lineage


def test_corrupt_configmap_names_itself() -> None:
    with pytest.raises(lin.LineageError, match="lineage ConfigMap unlearn-model-m: key current/history"):
        lin.parse({"metadata": {"name": "unlearn-model-m"}, "data": {"current": "{"}})


def three_versions() -> dict[str, Any]:
    one = lin.advance(lin.initial(spec(), "r1"), record(), "r1")
    out = {"uri": "pvc://models/digits/versions/v2/model.pt2", "sha256": "33" * 32, "format": "exported"}
    two = lin.advance(one, record(outputModel=out), "r2")
    return lin.build_lineage_configmap(two, "team-a")


def edit(cm: dict[str, Any], change: Callable[[list[dict[str, Any]]], None], *, current: bool = True) -> None:
    """Change the history as a person with `kubectl edit` would (current follows unless told not to)."""
    history = json.loads(cm["data"]["history"])
    change(history)
    cm["data"]["history"] = json.dumps(history)
    if current and history:
        cm["data"]["current"] = json.dumps(history[-1])


def point_at(path: str) -> Callable[[list[dict[str, Any]]], None]:
    def change(history: list[dict[str, Any]]) -> None:
        history[-1]["uri"] = path

    return change


def reseal_last(history: list[dict[str, Any]]) -> None:
    history[-1]["uri"] = "pvc://models/evil.pt2"
    history[-1]["digest"] = lin.Version.load(history[-1]).expected_digest()


def drop_middle(history: list[dict[str, Any]]) -> None:
    del history[1]


def swap_sha(history: list[dict[str, Any]]) -> None:
    history[1]["sha256"] = "ff" * 32


def strip_digests(history: list[dict[str, Any]]) -> None:
    for entry in history:
        entry.pop("digest"), entry.pop("previous")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # Pointing the current version at another file: the entry no longer matches its digest.
        (point_at("pvc://models/evil.pt2"), "version 2 was changed after it was written"),
        # Swapping an old version's checksum (to vouch for another file).
        (swap_sha, "version 1 was changed after it was written"),
        (drop_middle, "the versions are not 0, 1, 2"),
        (strip_digests, "version 0 carries no digest"),
    ],
)
def test_a_lineage_that_does_not_verify_is_refused_with_what_to_do(
    change: Callable[[list[dict[str, Any]]], None], words: str
) -> None:
    cm = three_versions()
    assert lin.parse(cm).current.version == 2
    edit(cm, change)
    with pytest.raises(lin.LineageError) as refused:
        lin.parse(cm)
    message = str(refused.value)
    assert "lineage ConfigMap unlearn-model-digits-mlp does not verify" in message
    assert words in message
    assert "delete it to start the model again from spec.model.source" in message


def test_resealing_one_entry_breaks_the_link_to_the_next() -> None:
    cm = three_versions()

    def reseal_middle(history: list[dict[str, Any]]) -> None:
        history[1]["uri"] = "pvc://models/evil.pt2"
        history[1]["digest"] = lin.Version.load(history[1]).expected_digest()

    edit(cm, reseal_middle)
    with pytest.raises(lin.LineageError, match="version 2 does not carry the digest of the version before it"):
        lin.parse(cm)


def test_current_must_be_the_newest_version() -> None:
    cm = three_versions()
    history = json.loads(cm["data"]["history"])
    cm["data"]["current"] = json.dumps(history[0])  # roll back by hand
    with pytest.raises(lin.LineageError, match="current is not the newest version of history"):
        lin.parse(cm)


def test_a_resealed_last_entry_verifies_alone_but_not_against_its_audit_record() -> None:
    # What the chain cannot catch by itself: the newest entry re-sealed after an edit. The audit record of
    # the run that wrote it holds its original digest, and the two differ.
    cm = three_versions()
    original = lin.parse(cm).current.digest
    edit(cm, reseal_last)
    assert lin.parse(cm).current.digest != original


def test_version_zero_is_hashed_only_while_alone() -> None:
    # A late record must not re-seal version 0 under versions chained to its old digest.
    one = lin.advance(lin.initial(spec(), "r1"), record(inputModel=None), "r1")
    assert one.history[0].sha256 == ""
    out = {"uri": "pvc://models/digits/versions/v2/model.pt2", "sha256": "33" * 32, "format": "exported"}
    two = lin.advance(
        one, record(outputModel=out, inputModel={"uri": "pvc://models/digits/m.pt2", "sha256": "1"}), "r2"
    )
    assert two.history[0] == one.history[0]
    assert lin.chain_problem(two) is None


def unchained() -> dict[str, Any]:
    """A lineage as operator 0.1 wrote it: no digests."""
    cm = three_versions()
    edit(cm, strip_digests)
    return cm


def test_an_unchained_lineage_of_the_previous_operator_can_be_sealed_once() -> None:
    cm = unchained()
    with pytest.raises(lin.LineageError):
        lin.parse(cm)
    sealed = lin.seal_unchained(cm)
    assert lin.parse(sealed).current.version == 2
    assert lin.parse(sealed) == lin.parse(three_versions())
    # Sealing again, or sealing a chained lineage that was edited, is refused: that would launder an edit.
    with pytest.raises(lin.LineageError, match="not an unchained lineage"):
        lin.seal_unchained(sealed)
    tampered = three_versions()
    edit(tampered, point_at("pvc://models/evil.pt2"))
    with pytest.raises(lin.LineageError, match="not an unchained lineage"):
        lin.seal_unchained(tampered)


def test_the_seal_command_reads_and_writes_kubectl_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = {"apiVersion": "v1", "kind": "ConfigMapList", "items": [unchained()]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(listing)))
    assert lin.main(["seal"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "List"
    assert lin.parse(out["items"][0]).current.version == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(three_versions())))
    assert lin.main(["seal"]) == 1
    assert "not an unchained lineage" in capsys.readouterr().err
