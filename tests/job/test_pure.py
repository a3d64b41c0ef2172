"""Unit tests of the pure parts: tuning rules, fit checks, the record, versions, splits, indices.

The audit's statistics are in test_stats.py, the gates' rules in test_gates.py.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from unlearn import fit, tuning
from unlearn.data import _npz_member, declared_split, load_forget_indices
from unlearn.errors import InvalidInputError
from unlearn.runner import forget_digest, next_version
from unlearning_contracts.record import (
    TERMINATION_MESSAGE_LIMIT,
    Attempt,
    AuditMetrics,
    CompactRecord,
    ResultRecord,
    compact,
    numbers,
    result_json_schema,
)
from unlearning_contracts.spec import ForgetSpec, GatesSpec, Location, MethodSpec, StageSpec

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(0)
# Every gate with a default, unset.
NO_GATES: dict[str, None] = {
    "maxTestAccuracyDrop": None,
    "maxMiaClassifierAccuracy": None,
    "maxEstimatedGap": None,
    "minMembershipPValue": None,
    "maxClassReadability": None,
}


def audit_numbers(**values: Any) -> AuditMetrics:
    """AuditMetrics with ``values`` and 0.0 for every other number the record declares."""
    return AuditMetrics(**({name: 0.0 for name, _, _, _ in numbers()} | values))


def test_at_least_one_gate_must_be_set() -> None:
    with pytest.raises(ValidationError, match="every gate is null, so the verdict would be Passed"):
        GatesSpec.model_validate({**NO_GATES})
    one = GatesSpec.model_validate({**NO_GATES, "maxMiaAuc": 0.6})
    assert one.max_mia_auc == 0.6  # the gates' rules themselves: test_gates.py


# -- tuning --------------------------------------------------------------------------------------


def test_resolve_takes_spec_values_over_method_defaults() -> None:
    h = tuning.resolve(MethodSpec(name="gradient-ascent", retain=StageSpec(epochs=7), seed=3))
    assert (h.forget_lr, h.forget_epochs, h.forget_batch) == (1e-4, 5, 64)
    assert (h.retain_lr, h.retain_epochs) == (5e-5, 7)
    assert h.seed == 3
    assert MethodSpec().name == "auto"
    assert tuning.resolve(MethodSpec()).method == "scrub"  # without a bank or a class removed
    assert tuning.resolve(MethodSpec(), calibrated=True).method == "calibrated"


def test_forgetting_too_little_doubles_the_forget_lr_then_adds_epochs() -> None:
    h = tuning.resolve(MethodSpec(name="neggrad-plus"))
    nxt = tuning.next_attempt(h, {"forgetting"})
    assert nxt is not None
    assert nxt.forget_lr == 2 * h.forget_lr
    assert nxt.forget_epochs == h.forget_epochs
    capped = tuning.next_attempt(replace(h, forget_lr=tuning.MAX_FORGET_LR), {"forgetting"})
    assert capped is not None
    assert capped.forget_lr == tuning.MAX_FORGET_LR
    assert capped.forget_epochs == h.forget_epochs + h.forget_epochs // 2


@pytest.mark.parametrize(
    ("kinds", "diverged"), [({"utility"}, False), ({"utility", "forgetting"}, True), (set(), True)]
)
def test_damage_or_divergence_halves_the_lr_and_cuts_epochs(kinds: set[str], diverged: bool) -> None:
    h = replace(tuning.resolve(MethodSpec(name="gradient-ascent")), forget_epochs=6)
    nxt = tuning.next_attempt(h, kinds, diverged=diverged)
    assert nxt is not None
    assert nxt.forget_lr == h.forget_lr / 2
    assert nxt.forget_epochs == 4
    assert tuning.next_attempt(replace(h, forget_epochs=1), kinds, diverged=diverged).forget_epochs == 1  # type: ignore[union-attr]


def test_no_rule_means_stop() -> None:
    assert tuning.next_attempt(tuning.resolve(MethodSpec()), set()) is None
    assert tuning.next_attempt(tuning.resolve(MethodSpec(name="retrain")), {"forgetting"}) is None


@pytest.mark.parametrize(
    ("method", "forget", "retain", "alpha"),
    [
        ("gradient-ascent", (1e-4, 5, 64), (5e-5, 3, 64), 0.0),
        ("neggrad-plus", (1e-3, 8, 64), (0.0, 0, 64), 0.995),
        ("scrub", (3e-3, 4, 64), (1e-3, 5, 64), 0.03125),
        ("salun", (1e-3, 5, 64), (0.0, 0, 64), 0.0),
        ("retrain", (0.0, 0, 64), (1e-3, 150, 64), 0.0),
    ],
)
def test_each_methods_defaults(
    method: str, forget: tuple[float, int, int], retain: tuple[float, int, int], alpha: float
) -> None:
    h = tuning.resolve(MethodSpec(name=method))  # type: ignore[arg-type]
    assert (h.forget_lr, h.forget_epochs, h.forget_batch) == forget
    assert (h.retain_lr, h.retain_epochs, h.retain_batch) == retain
    assert (h.alpha, h.saliency_sparsity) == (alpha, 0.5)


# -- fit: do model, data and output go together -----------------------------------------------------


@pytest.mark.parametrize(
    ("check", "words"),
    [
        (lambda: fit.check_output(Path("/v/m.pt2"), Path("/v/m.pt2")), "output.location: /v/m.pt2 would overwrite"),
        (lambda: fit.check_sample_shape((64,), (8, 8)), None),  # a different rank: the format cannot tell
        (lambda: fit.check_sample_shape((-1, 64), (5, 64)), None),  # -1: any size
        (lambda: fit.check_sample_shape((64,), (32,)), "data: samples have shape (32,) but the model takes (64,)"),
        (lambda: fit.check_sample_shape(None, (32,)), None),
        (lambda: fit.check_outputs((2, 10, 3), None), "model.source: the model returns shape (10, 3) per sample"),
        (lambda: fit.check_outputs((2, 10), 12), "model.numClasses: 12 but the model has 10 outputs"),
        (lambda: fit.check_outputs((2, 10), 10), None),
        (lambda: fit.check_labels("data.test", 10, 10), "data.test: label 10 is out of range for a model with 10"),
        (lambda: fit.check_labels("data.train", 9, 10), None),
    ],
)
def test_fit_checks_name_the_field_to_change(check: Any, words: str | None) -> None:
    if words is None:
        check()
        return
    with pytest.raises(InvalidInputError) as caught:
        check()
    assert str(caught.value).startswith(words)
    assert "\n" not in str(caught.value)


def test_a_failed_forward_pass_is_a_data_model_mismatch() -> None:
    error = fit.forward_failed((8, 8), RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 32x10)\nmore"))
    assert str(error) == (
        "data: samples of shape (8, 8) do not fit the model "
        "(mat1 and mat2 shapes cannot be multiplied (2x64 and 32x10)): fix data or model"
    )
    assert fit.check_outputs((2, 7), None) == 7


# -- record ----------------------------------------------------------------------------------------


def _metrics() -> AuditMetrics:
    return audit_numbers(
        forget_accuracy=12.5,
        retain_accuracy=99.9,
        test_accuracy=97.3,
        confidence_gap=-0.01,
        mia_auc=0.51,
        mia_classifier_accuracy=0.55,
        forget_loss=3.2,
        samples={"forget": 40},
    )


def _record(reasons: int, attempts: int) -> ResultRecord:
    return ResultRecord(
        request_id="GDPR-2026-0042",
        request_name="r",
        namespace="default",
        model="digits-mlp",
        model_version=3,
        method="scrub",
        verdict="Failed",
        reasons=[
            f"miaAuc 0.{i:03d} > maxMiaAuc 0.600 after a long explanation of what happened" for i in range(reasons)
        ],
        exit_code=3,
        pre=_metrics(),
        post=_metrics(),
        attempts=[
            Attempt(
                number=i,
                hyperparameters={"forget_lr": 1e-3},
                post=_metrics(),
                verdict="Failed",
                reasons=["x" * 200],
                duration_seconds=1.0,
            )
            for i in range(attempts)
        ]
        + [Attempt(number=attempts, hyperparameters={}, verdict="Failed", reasons=["diverged"], duration_seconds=0.1)],
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:01:00+00:00",
        config={"big": "y" * 10000},
    )


def test_record_validates_against_its_schema() -> None:
    jsonschema.validate(_record(3, 2).dump(), result_json_schema())


@pytest.mark.parametrize(("reasons", "attempts"), [(2, 1), (300, 10)])
def test_compact_copy_fits_the_termination_message(reasons: int, attempts: int) -> None:
    text = compact(_record(reasons, attempts))
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = CompactRecord.model_validate(json.loads(text))
    assert parsed.verdict == "Failed"
    assert parsed.attempt_count == attempts + 1
    assert parsed.post is not None
    assert parsed.post.mia_auc == 0.51


def test_forget_digest_names_the_set_not_the_order() -> None:
    assert forget_digest(np.array([3, 1, 2])) == forget_digest(np.array([1, 2, 3]))
    assert forget_digest(np.array([1, 2])) != forget_digest(np.array([1, 3]))


# -- versions, splits, index files ------------------------------------------------------------------


def test_next_version_counts_published_versions_only(tmp_path: Path) -> None:
    assert next_version(tmp_path / "absent", "m") == 1
    for name in ("m-v1.pt2", "m-v1.json", "m-v3.json", "m-v9.failed.json", "other-v7.pt2", ".m-v8.pt2.tmp-1-ab"):
        (tmp_path / name).write_text("")
    assert next_version(tmp_path, "m") == 4


def test_declared_split_is_deterministic_and_disjoint() -> None:
    train, test = declared_split(100, 0.25, 0)
    again, _ = declared_split(100, 0.25, 0)
    assert len(test) == 25
    assert np.array_equal(train, again)
    assert not set(train) & set(test)
    assert not np.array_equal(declared_split(100, 0.25, 1)[1], test)


@pytest.mark.parametrize("suffix", [".npy", ".json", ".txt"])
def test_forget_indices_from_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"forget{suffix}"
    if suffix == ".npy":
        np.save(path, np.array([9, 2, 5]))
    elif suffix == ".json":
        path.write_text("[9, 2, 5]")
    else:
        path.write_text("# rows of subject 42\n9\n2\n5\n")
    spec = ForgetSpec(indices_file=Location(path=str(path)))
    assert load_forget_indices(spec, 100, tmp_path).tolist() == [2, 5, 9]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1.5]", "is not an index"),
        ('{"a": 1}', "expected a JSON list"),
        ("[true]", "is not an index"),
        ("nope", "cannot read"),
    ],
)
def test_bad_index_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        load_forget_indices(ForgetSpec(indices_file=Location(path=str(path))), 100, tmp_path)


def test_an_npz_member_over_the_memory_budget_is_refused_before_reading(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((100, 64), np.float32), y=np.zeros(100, np.int64))
    with zipfile.ZipFile(tmp_path / "d.npz") as archive:
        assert _npz_member(archive, "x.npy", "data.train d.npz", budget=1 << 20).shape == (100, 64)
        with pytest.raises(InvalidInputError, match=r"x needs 0.0 GiB in memory, more than the job may use"):
            _npz_member(archive, "x.npy", "data.train d.npz", budget=1000)
