"""Whether the operator runs a parsed request at all: what only the cluster admin may allow. Pure.

The spec model (contracts) already refused what is malformed. What remains
is trust: a request is written by a tenant the admin does not trust, so
before anything is created the operator checks, in this order, and rejects
the request with the first failing check's reason and every message of it:

1. ``spec.job.image``: the operator's job image or one the admin allowed
   (``jobs.resolve_image``): any other image runs any code.
2. ``spec.model.architecture.factory``: only from a module the admin allowed
   (``factory_problems``): a factory is code the job imports and calls, and
   ``os:system`` would run a shell command with the GPU and the output claim.
   The Job gets the same list and checks it again before importing.
3. Every location names a claim (``claim_problems``): in a pod a plain path
   points into the pod's own filesystem, so an output written there is gone
   with the pod while the lineage would point at it.
4. ``spec.job`` within the admin's bounds (placement.py).

The checks take the spec's parts (a ``ModelSpec``, locations, a ``JobSpec``),
so another kind that runs a tenant's Jobs is admitted by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from unlearning_contracts.calibration import UnlearningCalibrationSpec
from unlearning_contracts.factories import factory_allowed
from unlearning_contracts.spec import Location, ModelSpec, UnlearningRequestSpec

from . import status as states
from .jobs import ImageNotAllowedError, resolve_image
from .placement import placement_problems
from .settings import OperatorSettings, where_set


@dataclass(frozen=True)
class Refusal:
    """Why a request is Rejected: a condition reason and what to change."""

    reason: str
    message: str


@dataclass(frozen=True)
class Admitted:
    """A request the operator runs, and the image its Job runs."""

    image: str


def factory_problems(model: ModelSpec, settings: OperatorSettings, field: str = "spec.model") -> list[str]:
    architecture = model.architecture
    if architecture is None or architecture.factory is None:
        return []
    if factory_allowed(architecture.factory, settings.allowed_factory_modules):
        return []
    allowed = ", ".join(settings.allowed_factory_modules) or "none"
    return [
        f"{field}.architecture.factory: {architecture.factory} is not allowed: a factory is code the job imports "
        f"and runs, so its module must be under a prefix the cluster admin allows (allowed: {allowed}; "
        f"{where_set('allowed_factory_modules')}); use architecture.torchvision or ask the admin"
    ]


def request_locations(spec: UnlearningRequestSpec) -> list[tuple[str, Location | None]]:
    """Every location a request names, with its field path."""
    return [
        ("spec.model.source", spec.model.source),
        ("spec.data.train", spec.data.train),
        ("spec.data.test", spec.data.test),
        ("spec.forget.indicesFile", spec.forget.indices_file),
        ("spec.output.location", spec.output.location),
    ]


def calibration_locations(spec: UnlearningCalibrationSpec) -> list[tuple[str, Location | None]]:
    """Every location a calibration names, with its field path."""
    return [
        ("spec.model.source", spec.model.source),
        ("spec.data.train", spec.data.train),
        ("spec.data.test", spec.data.test),
        ("spec.output.location", spec.output.location),
    ]


def claim_problems(locations: Iterable[tuple[str, Location | None]]) -> list[str]:
    return [
        f"{field}: {location.path} names no claimName: in a cluster every location is a path inside a "
        "PersistentVolumeClaim (a plain path is the pod's own filesystem, gone when it ends); add claimName"
        for field, location in locations
        if location is not None and location.claim_name is None
    ]


def admit(spec: UnlearningRequestSpec | UnlearningCalibrationSpec, settings: OperatorSettings) -> Admitted | Refusal:
    """The image to run, or the first failing check's reason with all of its messages (a request's or a
    calibration's: both run a tenant's Jobs, under the same rules)."""
    locations = request_locations(spec) if isinstance(spec, UnlearningRequestSpec) else calibration_locations(spec)
    try:
        image = resolve_image(spec, settings)
    except ImageNotAllowedError as error:
        return Refusal(states.REASON_IMAGE_NOT_ALLOWED, str(error))
    checks = (
        (states.REASON_FACTORY_NOT_ALLOWED, factory_problems(spec.model, settings)),
        (states.REASON_CLAIM_REQUIRED, claim_problems(locations)),
        (states.REASON_PLACEMENT_NOT_ALLOWED, placement_problems(spec.job, settings)),
    )
    for reason, problems in checks:
        if problems:
            return Refusal(reason, "; ".join(problems))
    return Admitted(image)
