"""What only the cluster admin may allow: image, factory, claims, placement, in that order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.operator.factories import spec
from unlearning_contracts.spec import load_manifest
from unlearning_operator import status as st
from unlearning_operator.admission import Admitted, Refusal, admit
from unlearning_operator.settings import OperatorSettings, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

STATE_DICT = {
    "name": "digits-mlp",
    "format": "state-dict",
    "source": {"claimName": "models", "path": "m.safetensors"},
}


def with_factory(factory: str) -> dict[str, Any]:
    return {"model": {**STATE_DICT, "architecture": {"factory": factory, "kwargs": {"command": "touch /tmp/x"}}}}


@pytest.mark.parametrize(
    ("overrides", "env", "reason", "words"),
    [
        ({"job.image": "evil/miner:1"}, {}, st.REASON_IMAGE_NOT_ALLOWED, "spec.job.image: evil/miner:1"),
        (
            with_factory("os:system"),
            {},
            st.REASON_FACTORY_NOT_ALLOWED,
            "spec.model.architecture.factory: os:system is not allowed",
        ),
        (
            with_factory("mylabx.nets:build"),
            {"UNLEARNING_ALLOWED_FACTORY_MODULES": "mylab"},
            st.REASON_FACTORY_NOT_ALLOWED,
            "(allowed: mylab; chart value job.allowedFactoryModules (UNLEARNING_ALLOWED_FACTORY_MODULES))",
        ),
        (
            {"output.location.claimName": None, "output.location.path": "/tmp/out"},
            {},
            st.REASON_CLAIM_REQUIRED,
            "spec.output.location: /tmp/out names no claimName",
        ),
        (
            {"model.source.claimName": None},
            {},
            st.REASON_CLAIM_REQUIRED,
            "spec.model.source: digits/m.pt2 names no claimName",
        ),
        (
            {"data": {"source": "npz", "train": {"claimName": "data", "path": "t.npz"}, "test": {"path": "/d.npz"}}},
            {},
            st.REASON_CLAIM_REQUIRED,
            "spec.data.test: /d.npz names no claimName",
        ),
        (
            {"forget": {"indicesFile": {"path": "f.json"}}},
            {},
            st.REASON_CLAIM_REQUIRED,
            "spec.forget.indicesFile: f.json names no claimName",
        ),
        ({"job.gpus": 64}, {}, st.REASON_PLACEMENT_NOT_ALLOWED, "spec.job.gpus: 64 is above"),
    ],
)
def test_refusals_say_which_field_and_what_allows_it(
    overrides: dict[str, Any], env: dict[str, str], reason: str, words: str
) -> None:
    decision = admit(spec(**overrides), load_settings(env))
    assert isinstance(decision, Refusal)
    assert decision.reason == reason
    assert words in decision.message


def test_an_allowed_factory_and_a_claimed_request_run() -> None:
    settings = load_settings({"UNLEARNING_ALLOWED_FACTORY_MODULES": "mylab"})
    assert admit(spec(**with_factory("mylab.nets:build")), settings) == Admitted(settings.job_image)
    assert admit(spec(), OperatorSettings()) == Admitted(OperatorSettings().job_image)


def test_the_first_failing_check_decides_and_lists_all_of_its_problems() -> None:
    both = spec(**{"job.image": "evil/miner:1", "job.gpus": 64})
    assert admit(both, OperatorSettings()).reason == st.REASON_IMAGE_NOT_ALLOWED  # type: ignore[union-attr]
    claimless = spec(**{"model.source.claimName": None, "output.location.claimName": None})
    decision = admit(claimless, OperatorSettings())
    assert isinstance(decision, Refusal)
    assert decision.message.count("names no claimName") == 2


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/requests/*.yaml")), ids=lambda p: p.name)
def test_every_example_is_admitted_by_the_default_bounds(path: Path) -> None:
    # The examples are what people copy: they must run on an operator installed with the chart's defaults.
    manifest = load_manifest(path)
    assert admit(manifest.spec, OperatorSettings()) == Admitted(OperatorSettings().job_image)
