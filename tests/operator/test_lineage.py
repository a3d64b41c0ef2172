"""Model lineage: version 0 from the first request, only Passed runs advance, replay-safe."""

from __future__ import annotations

import json

import pytest

from tests.operator.factories import record, spec
from unlearning_operator import lineage as lin

pytestmark = pytest.mark.unit


def test_initial_is_the_spec_source() -> None:
    lineage = lin.initial(spec(), "r1")
    assert lineage.current == lin.Version(0, "pvc://models/digits/m.pt2", "", "r1", None)
    assert lineage.history == (lineage.current,)


def test_passed_run_becomes_current_with_parent() -> None:
    lineage = lin.advance(lin.initial(spec(), "r1"), record(), "r1")
    assert lineage.current == lin.Version(1, "pvc://models/digits/versions/v1/model.pt2", "22" * 32, "r1", 0)
    assert [v.version for v in lineage.history] == [0, 1]
    # The job hashed version 0: the chain is now verifiable from the start.
    assert lineage.history[0].sha256 == "11" * 32


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
    with pytest.raises(ValueError, match="lineage ConfigMap unlearn-model-m"):
        lin.parse({"metadata": {"name": "unlearn-model-m"}, "data": {"current": "{"}})
