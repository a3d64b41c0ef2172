"""Which bank a request uses: the newest Ready match, or why it runs without one, waits, or is rejected."""

from __future__ import annotations

from typing import Any

import pytest

from unlearning_contracts.spec import CalibrationUse, DataSpec, Location
from unlearning_operator import banks
from unlearning_operator import calibration_status as cal
from unlearning_operator import status as st

pytestmark = pytest.mark.unit

DIGITS = DataSpec()
OTHER = DataSpec(source="npz", train=Location(claim_name="data", path="train.npz"))


def offer(
    name: str,
    phase: str | None = cal.READY,
    *,
    model: str = "m",
    data: DataSpec | None = DIGITS,
    completed: str = "2026-01-02T00:00:00Z",
    created: str = "2026-01-01T00:00:00Z",
    ns: str = "a",
) -> banks.Offer:
    bank = banks.BankUse(f"{ns}/{name}", f"pvc://banks/{name}/bank.npz", name * 4) if phase == cal.READY else None
    return banks.Offer(
        namespace=ns,
        name=name,
        model=model,
        data=data,
        phase=phase,
        created=created,
        completed=completed if phase == cal.READY else "",
        bank=bank,
        folds=4,
        folds_done=2,
    )


def choose(
    offers: list[banks.Offer], policy: str = "IfAvailable", name: str | None = None, waited: float = 60.0
) -> Any:
    use = CalibrationUse(policy=policy, name=name)  # type: ignore[arg-type]
    return banks.choose(use, namespace="a", model="m", data=DIGITS, offers=offers, waited_seconds=waited)


@pytest.mark.parametrize(
    ("offers", "policy", "name", "waited", "action", "chosen"),
    [
        # Rule 2: the newest Ready match, by completion time.
        ([offer("old", completed="2026-01-02T00:00:00Z"), offer("new", completed="2026-01-03T00:00:00Z")],
         "IfAvailable", None, 60.0, banks.USE, "new"),
        ([offer("old", completed="2026-01-02T00:00:00Z"), offer("new", completed="2026-01-03T00:00:00Z")],
         "Required", None, 60.0, banks.USE, "new"),
        # ... only of the same model, data and namespace.
        ([offer("x", model="other"), offer("y", data=OTHER), offer("z", ns="b"), offer("ok")],
         "IfAvailable", None, 60.0, banks.USE, "ok"),
        # A calibration with an invalid spec (no data) never matches.
        ([offer("broken", data=None)], "IfAvailable", None, 60.0, banks.NONE, None),
        # A name picks that one even when a newer one exists.
        ([offer("old", completed="2026-01-02T00:00:00Z"), offer("new", completed="2026-01-03T00:00:00Z")],
         "Required", "old", 60.0, banks.USE, "old"),
        # Rule 1: Disabled uses nothing.
        ([offer("ok")], "Disabled", None, 60.0, banks.NONE, None),
        # Rule 3: IfAvailable never waits.
        ([offer("running", cal.RUNNING)], "IfAvailable", None, 60.0, banks.NONE, None),
        ([], "IfAvailable", None, 0.0, banks.NONE, None),
        # Rule 4: Required waits for one on its way, whatever the time ...
        ([offer("running", cal.RUNNING), offer("failed", cal.FAILED)], "Required", None, 3600.0, banks.WAIT, None),
        ([offer("new", None)], "Required", None, 3600.0, banks.WAIT, None),
        # ... and for one to appear during the grace after creation, then rejects.
        ([], "Required", None, 5.0, banks.WAIT, None),
        ([], "Required", None, banks.GRACE_SECONDS, banks.REJECT, None),
        ([offer("failed", cal.FAILED), offer("bad", cal.REJECTED)], "Required", None, 60.0, banks.REJECT, None),
        # A named calibration of another model: rejected at once, no grace.
        ([offer("wrong", model="other")], "Required", "wrong", 0.0, banks.REJECT, None),
    ],
)  # fmt: skip
def test_choice(
    offers: list[banks.Offer], policy: str, name: str | None, waited: float, *, action: str, chosen: str | None
) -> None:
    choice = choose(offers, policy, name, waited)
    assert choice.action == action, choice.message
    assert (choice.bank.name.split("/")[1] if choice.bank else None) == chosen


def test_messages_say_what_happens_and_what_to_change() -> None:
    used = choose([offer("cal1")])
    assert (used.reason, used.message) == (st.REASON_CALIBRATION_FOUND, "uses the bank of a/cal1 (sha256 cal1cal1cal1)")
    assert used.bank == banks.BankUse("a/cal1", "pvc://banks/cal1/bank.npz", "cal1cal1cal1cal1")

    none = choose([offer("busy", cal.RUNNING)])
    assert none.reason == st.REASON_NO_CALIBRATION
    assert "no Ready UnlearningCalibration of model m with this spec.data in namespace a" in none.message
    assert "runs uncalibrated (policy IfAvailable)" in none.message
    assert "busy (Running, 2/4 folds) is not waited for" in none.message

    waiting = choose([offer("busy", cal.RUNNING)], "Required")
    assert waiting.reason == st.REASON_WAITING_FOR_CALIBRATION
    assert waiting.message == "waiting for busy (Running, 2/4 folds) to become Ready (spec.calibration.policy Required)"

    grace = choose([], "Required", waited=1.0)
    assert "rejected if none appears within 30 s" in grace.message

    missing = choose([offer("gone", cal.FAILED)], "Required")
    assert missing.reason == st.REASON_CALIBRATION_MISSING
    assert "(ended: gone (Failed))" in missing.message
    assert "create an UnlearningCalibration for the model (examples/calibrations/digits.yaml)" in missing.message
    assert "or set spec.calibration.policy IfAvailable" in missing.message

    wrong = choose([offer("other-model", model="x")], "Required", "other-model")
    assert "(other-model is for model x)" in wrong.message
    other_data = choose([offer("npz", data=OTHER)], "IfAvailable", "npz")
    assert "(npz is for model m with other spec.data)" in other_data.message

    disabled = choose([offer("ok")], "Disabled")
    assert (disabled.reason, disabled.message) == (
        st.REASON_CALIBRATION_DISABLED,
        "spec.calibration.policy is Disabled",
    )


def test_ties_break_by_creation_then_name() -> None:
    same = "2026-01-02T00:00:00Z"
    offers = [
        offer("b", completed=same, created="2026-01-01T00:00:00Z"),
        offer("a", completed=same, created="2026-01-01T00:00:01Z"),
    ]
    assert choose(offers).bank.name == "a/a"
    offers = [offer("b", completed=same), offer("a", completed=same)]
    assert choose(offers).bank.name == "a/b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name":"a/c","sha256":"ff","uri":"pvc://b/x/bank.npz"}', banks.BankUse("a/c", "pvc://b/x/bank.npz", "ff")),
        (None, None),
        ("", None),
        ("not json", None),
        ('{"name": "a/c"}', None),
    ],
)
def test_the_jobs_annotation_round_trips(text: str | None, expected: banks.BankUse | None) -> None:
    assert banks.BankUse.from_annotation(text) == expected
    if expected is not None:
        assert banks.BankUse.from_annotation(expected.annotation()) == expected
