"""Which reference bank a request uses. Pure: the request's wish and the namespace's calibrations in, a choice out.

A request uses the newest Ready UnlearningCalibration of its model whose
``spec.data`` equals its own (and whose name is ``spec.calibration.name``
when one is given). The rules, in order:

1. ``policy: Disabled``: no bank, whatever exists.
2. A Ready match: use the newest (latest completion, then creation, then
   name), so a refreshed bank takes over as soon as it is written.
3. ``IfAvailable`` without one: run uncalibrated now, never wait (a
   calibration still running is named in the message, not waited for).
4. ``Required`` without one: wait while a match is still on its way
   (Pending, Queued, Running, Merging); with none at all, wait a short grace
   (``GRACE_SECONDS`` from the request's creation, because one
   ``kubectl apply -f dir/`` creates the calibration and the request in an
   order the operator's two watches need not see), then reject, saying what
   to create.

The operator passes a chosen bank to the job, which verifies what no
object in the API can prove: the file's sha256, that its data digest is the
data it loaded, and that the bank was made for this model's lineage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from unlearning_contracts.spec import CalibrationUse, DataSpec

from . import calibration_status as cal
from . import status as states

GRACE_SECONDS = 30.0

USE = "Use"
NONE = "None"
WAIT = "Wait"
REJECT = "Reject"


@dataclass(frozen=True)
class BankUse:
    """The bank handed to a request's Job."""

    name: str
    """namespace/name of the UnlearningCalibration."""
    uri: str
    sha256: str

    def dump(self) -> dict[str, str]:
        return {"name": self.name, "uri": self.uri, "sha256": self.sha256}

    def annotation(self) -> str:
        """The Job's annotation text: a restarted operator reads the choice back from the Job."""
        return json.dumps(self.dump(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> BankUse | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(name=str(raw["name"]), uri=str(raw["uri"]), sha256=str(raw["sha256"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Offer:
    """One UnlearningCalibration of the namespace, as a request sees it."""

    namespace: str
    name: str
    model: str
    data: DataSpec | None
    """Its parsed spec.data; None when its spec is invalid (it never matches)."""
    phase: str | None
    created: str
    completed: str = ""
    bank: BankUse | None = None
    folds: int = 0
    folds_done: int = 0

    def describe(self) -> str:
        phase = self.phase or "new"
        if phase == cal.RUNNING and self.folds:
            return f"{self.name} ({phase}, {self.folds_done}/{self.folds} folds)"
        return f"{self.name} ({phase})"


@dataclass(frozen=True)
class BankChoice:
    action: str
    """USE, NONE (run uncalibrated), WAIT (stay Pending) or REJECT."""
    reason: str
    """The CalibrationReady condition's reason (status.py)."""
    message: str
    bank: BankUse | None = None


def _newest(offers: list[Offer]) -> Offer:
    return max(offers, key=lambda o: (o.completed, o.created, o.name))


def choose(
    use: CalibrationUse,
    *,
    namespace: str,
    model: str,
    data: DataSpec,
    offers: list[Offer],
    waited_seconds: float,
) -> BankChoice:
    """The bank for a request of ``model`` on ``data`` in ``namespace``, among ``offers``."""
    if use.policy == "Disabled":
        return BankChoice(NONE, states.REASON_CALIBRATION_DISABLED, "spec.calibration.policy is Disabled")
    what = f"UnlearningCalibration {use.name}" if use.name else "UnlearningCalibration"
    mine = [o for o in offers if o.namespace == namespace and (use.name is None or o.name == use.name)]
    wrong = [o for o in mine if o.model != model or o.data != data]
    matching = [o for o in mine if o.model == model and o.data == data]
    ready = [o for o in matching if o.phase == cal.READY and o.bank is not None]
    if ready:
        best = _newest(ready)
        assert best.bank is not None
        return BankChoice(
            USE,
            states.REASON_CALIBRATION_FOUND,
            f"uses the bank of {best.bank.name} (sha256 {best.bank.sha256[:12]})",
            best.bank,
        )
    on_the_way = sorted((o for o in matching if o.phase not in cal.TERMINAL_PHASES), key=lambda o: (o.created, o.name))
    subject = f"no Ready {what} of model {model} with this spec.data in namespace {namespace}"
    if wrong and use.name:
        offer = wrong[0]
        subject += f" ({use.name} is for model {offer.model}" + (
            ")" if offer.model != model else " with other spec.data)"
        )
    if use.policy == "IfAvailable":
        message = f"{subject}: runs uncalibrated (policy IfAvailable)"
        if on_the_way:
            message += f"; {on_the_way[0].describe()} is not waited for"
        return BankChoice(NONE, states.REASON_NO_CALIBRATION, message)
    if on_the_way:
        return BankChoice(
            WAIT,
            states.REASON_WAITING_FOR_CALIBRATION,
            f"waiting for {on_the_way[0].describe()} to become Ready (spec.calibration.policy Required)",
        )
    if waited_seconds < GRACE_SECONDS and not (use.name and wrong):
        return BankChoice(
            WAIT,
            states.REASON_WAITING_FOR_CALIBRATION,
            f"{subject} yet (spec.calibration.policy Required); rejected if none appears "
            f"within {GRACE_SECONDS:.0f} s of the request's creation",
        )
    ended = sorted(o.describe() for o in matching)
    message = f"{subject}" + (f" (ended: {', '.join(ended)})" if ended else "")
    message += (
        ": spec.calibration.policy Required: create an UnlearningCalibration for the model "
        "(examples/calibrations/digits.yaml) or set spec.calibration.policy IfAvailable"
    )
    return BankChoice(REJECT, states.REASON_CALIBRATION_MISSING, message)
