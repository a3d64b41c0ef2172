"""Everything about a request that can be checked before torch is imported.

``unlearn run`` validates the manifest (``unlearning_contracts.spec``), then
calls ``check`` here, and only then imports torch and the runner: importing
torch costs seconds and about a gigabyte, and none of these answers needs it.
The runner calls ``check`` too when used as a library, so no path skips it.
In order, each with the reason it comes where it does:

1. **The factory allow-list**, before anything the request names is
   imported (``unlearning_contracts.factories``): importing a module runs
   its code.
2. **The method does something**: settings whose epochs are all 0 would
   publish a copy, or untrained weights (``tuning.idle_reason``).
3. **Claims**: with ``require_claims`` (the operator's Job passes
   ``--require-claims``) every location must name a claim: in a pod a plain
   path points into the container's own file system, and a lineage would
   point into a finished pod's ``/tmp``. Locally, plain paths are fine.
4. **Inputs exist where they should**: the model, the data and the index
   file, each a regular file (or a folder for image folders and torchvision
   datasets) inside its claim (``files``).
5. **The output**: a folder the job may write (or create) inside its claim,
   and a version that is not published yet: ``--model-version N`` when
   version N exists is refused instead of replacing it, and so is an output
   that would be the input model. One exception, so that a retry can finish
   what it started: with ``--run-id`` (the operator passes the request's
   uid), a version N that this same run published before its pod ended
   without reporting it (killed between publishing and writing the
   termination message) is recognised by its record beside it (the run id,
   Passed, version N, the model's uri and sha256 matching the file) and
   reported again instead of refused or redone (``own_published``). Anything
   else at that name stays refused.
6. **The bank** (``--calibration-*``, set by the operator): a well-formed
   location (a claim under ``require_claims``), a sha256 of 64 hex digits and
   a ``namespace/name``. Whether the file is there and fits is decided after
   the data are loaded (``unlearn.bank.use_bank``), by the request's policy.

``check_calibration`` does the same for an UnlearningCalibration (``unlearn
calibrate``, ``calibrate-fold``, ``calibrate-merge``): allow-list, claims,
inputs, and the output folder the fold files and the bank go to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from unlearn import fit, tuning
from unlearn.errors import InvalidInputError
from unlearn.files import OutputFolder, Place, resolve
from unlearning_contracts.calibration import CalibrationManifest
from unlearning_contracts.factories import ENV_ALLOWED_FACTORY_MODULES, factory_allowed, factory_module
from unlearning_contracts.record import ResultRecord
from unlearning_contracts.spec import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    Location,
    Manifest,
    ModelFormat,
    describe_validation_error,
)

EXPORTED_SUFFIX = ".pt2"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CALIBRATION_NAME = re.compile(rf"^{DNS_LABEL[1:-1]}/{DNS_SUBDOMAIN[1:-1]}$")
MAX_RECORD_BYTES = 16 * 1024 * 1024
"""A published full record is read back (``own_published``) up to this size; it is a few KiB per attempt."""
MAX_RUN_ID_BYTES = 128
VERSION_FILE = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)\.(pt2|pt|pth|safetensors|ts|json)$")


@dataclass(frozen=True)
class BankRef:
    """The reference bank a request was given (``unlearn run --calibration-*``); ``unlearn.bank`` reads it."""

    uri: str
    sha256: str | None = None
    name: str = ""


@dataclass(frozen=True)
class RunOptions:
    volume_root: Path = Path("/volumes")
    device: str = "auto"
    model_version: int | None = None
    progress: bool = False
    job_image: str = field(default_factory=lambda: os.environ.get("UNLEARN_JOB_IMAGE", ""))
    allowed_factories: tuple[str, ...] = ()
    """Module prefixes an architecture factory may come from (``unlearning_contracts.factories``)."""
    require_claims: bool = False
    """Every location must name a claim (in a pod: a plain path would be the container's own file system)."""
    run_id: str | None = None
    """Who this run is, across the Job's retries (the operator passes the request's uid); kept in the record's
    config, so that a retry recognises the version an earlier attempt of the same run published."""
    calibration: BankRef | None = None
    """The bank the operator resolved for the model (``--calibration-*``); None: no bank given."""


@dataclass(frozen=True)
class Plan:
    """What the checks settled: the resolved method, and where the new version goes under which names."""

    hyper: tuning.Hyper
    model: Place
    output: OutputFolder
    version: int
    model_file: str
    """File name of the new version (``<name>-v<N>.<ext>``, the input's format and extension)."""

    published: ResultRecord | None = None
    """The full record of version ``version``, when an earlier attempt of this run published it (``own_published``):
    the run reports it again instead of running."""

    @property
    def record_file(self) -> str:
        return self.model_file.rsplit(".", 1)[0] + ".json"

    @property
    def failed_file(self) -> str:
        return self.model_file.rsplit(".", 1)[0] + ".failed.json"


def next_version(folder: Path, name: str) -> int:
    """One more than the highest published version in ``folder`` (v0 is the original)."""
    highest = 0
    if folder.is_dir():
        for path in folder.iterdir():
            match = VERSION_FILE.match(path.name)
            if match and match["name"] == name:
                highest = max(highest, int(match["version"]))
    return highest + 1


def model_suffix(model_format: ModelFormat, source: Path) -> str:
    """The extension of a model file written in ``model_format`` from ``source`` (the input's own)."""
    return EXPORTED_SUFFIX if model_format == "exported" else (source.suffix or ".pt")


def refuse_factory(factory: str) -> InvalidInputError:
    """The error for a factory whose module the cluster admin did not allow."""
    return InvalidInputError(
        f"model.architecture.factory: module {factory_module(factory)} is not allowed: the cluster admin allows "
        f"factory modules by prefix (the operator passes them in {ENV_ALLOWED_FACTORY_MODULES}; locally "
        f"unlearn run --allow-factory {factory_module(factory)})"
    )


def _claimed(location: Location | None, field_name: str, require: bool) -> None:
    if require and location is not None and location.claim_name is None:
        raise InvalidInputError(
            f"{field_name}: {location.uri} names no claim: in a cluster every location is a path inside a "
            "PersistentVolumeClaim: set claimName"
        )


def _factory(manifest: Manifest | CalibrationManifest, allowed: tuple[str, ...]) -> None:
    arch = manifest.spec.model.architecture
    if arch is not None and arch.factory is not None and not factory_allowed(arch.factory, allowed):
        raise refuse_factory(arch.factory)


def _inputs(manifest: Manifest | CalibrationManifest, root: Path) -> Place:
    """The model file and the data, each where it should be (rule 4); the model's place."""
    spec = manifest.spec
    model = resolve(spec.model.source, root, "model.source")
    model.require_file()
    for name, location in (("data.train", spec.data.train), ("data.test", spec.data.test)):
        if location is not None:
            place = resolve(location, root, name)
            if spec.data.source == "npz":
                place.require_file()
            else:
                place.require_folder()
    return model


def bank_location(ref: BankRef, require_claims: bool) -> Location:
    """``--calibration-*`` checked (rule 6): the bank's location, parsed and bounded like a spec location."""
    try:
        location = Location.from_uri(ref.uri)
    except ValidationError as error:
        message = describe_validation_error(error, prefix="--calibration-bank")
        raise InvalidInputError(f"{message} (pvc://<claim>/<path> or a path)") from None
    _claimed(location, "--calibration-bank", require_claims)
    if ref.sha256 is not None and not SHA256_HEX.match(ref.sha256):
        raise InvalidInputError("--calibration-sha256: expected 64 lowercase hex digits (the bank's sha256)")
    if ref.name and (len(ref.name) > 63 + 1 + 253 or not CALIBRATION_NAME.match(ref.name)):
        raise InvalidInputError("--calibration-name: expected namespace/name of an UnlearningCalibration")
    return location


def check(manifest: Manifest, options: RunOptions) -> Plan:
    """Run the checks of the module doc in order; the first problem is an InvalidInputError (exit 4)."""
    spec = manifest.spec
    _factory(manifest, options.allowed_factories)

    hyper = tuning.resolve(spec.method)
    idle = tuning.idle_reason(hyper)
    if idle is not None:
        raise InvalidInputError(idle)

    locations = {
        "model.source": spec.model.source,
        "data.train": spec.data.train,
        "data.test": spec.data.test,
        "forget.indicesFile": spec.forget.indices_file,
        "output.location": spec.output.location,
    }
    for name, location in locations.items():
        _claimed(location, name, options.require_claims)

    if options.calibration is not None:
        bank_location(options.calibration, options.require_claims)

    root = options.volume_root
    model = _inputs(manifest, root)
    if spec.forget.indices_file is not None:
        resolve(spec.forget.indices_file, root, "forget.indicesFile").require_file()

    output = OutputFolder(resolve(spec.output.location, root, "output.location"))
    output.check()
    folder = output.place.real()
    version = options.model_version if options.model_version is not None else next_version(folder, spec.model.name)
    model_file = f"{spec.model.name}-v{version}{model_suffix(spec.model.format, model.path)}"
    plan = Plan(hyper=hyper, model=model, output=output, version=version, model_file=model_file)
    fit.check_output(folder / model_file, model.real())
    if options.run_id is not None:
        published = own_published(plan, options.run_id)
        if published is not None:
            return dataclasses.replace(plan, published=published)
    for name in (plan.model_file, plan.record_file):
        if output.exists(name):
            raise InvalidInputError(
                f"--model-version {version}: version {version} of {spec.model.name} is already published "
                f"({output.place.uri}/{name}): a published version is never replaced; leave --model-version out "
                "to take the next free one"
            )
    return plan


def own_published(plan: Plan, run_id: str) -> ResultRecord | None:
    """The record of version ``plan.version`` when this run (``run_id``) published it, else None.

    A pod can be killed after publishing and before its termination message
    is written; the Job then starts another pod with the same arguments. The
    version it finds is its own when its full record names the same run id,
    verdict Passed, version and output uri, and the model file's sha256 is
    the one that record gives. Anything else (another run's version, a
    record that does not parse, a missing model or record) is not ours, and
    ``check`` refuses the version as already published. A model file that
    no longer matches its own record is refused with that reason: someone
    changed it after it was published, and reporting it would vouch for it.
    """
    output = plan.output
    if not (output.exists(plan.model_file) and output.exists(plan.record_file)):
        return None
    record_place = _in_output(output, plan.record_file)
    try:
        record = ResultRecord.model_validate_json(record_place.read_bytes(MAX_RECORD_BYTES))
    except (ValidationError, InvalidInputError):
        return None
    model_uri = _in_output(output, plan.model_file).uri
    if (
        record.config.get("runId") != run_id
        or record.verdict != "Passed"
        or record.model_version != plan.version
        or record.output_model is None
        or record.output_model.uri != model_uri
    ):
        return None
    digest = hashlib.sha256()
    with _in_output(output, plan.model_file).open() as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != record.output_model.sha256:
        raise InvalidInputError(
            f"--model-version {plan.version}: {model_uri} was published by this run but no longer matches the "
            f"sha256 in its record ({output.place.uri}/{plan.record_file}): it was changed after publishing; "
            "restore it, or remove both files so that the version can be written again"
        )
    return record


def _in_output(output: OutputFolder, name: str) -> Place:
    """A file in the output folder as a Place of its own (same claim, confined the same way)."""
    place = output.place
    return dataclasses.replace(place, uri=f"{place.uri.rstrip('/')}/{name}", path=place.path / name)


@dataclass(frozen=True)
class CalibrationPlan:
    """What the checks of a calibration settled: the model's place and the output folder."""

    model: Place | None
    output: OutputFolder


def check_calibration(
    manifest: CalibrationManifest,
    allowed_factories: tuple[str, ...],
    require_claims: bool,
    volume_root: Path,
    *,
    inputs: bool = True,
) -> CalibrationPlan:
    """The checks of the module doc for a calibration, in the same order (InvalidInputError: exit 4).

    ``inputs``: check the model and the data too (the folds and a local run read them; the merge reads
    only the output folder, and its plan's ``model`` is then None).
    """
    spec = manifest.spec
    _factory(manifest, allowed_factories)
    locations = {
        "model.source": spec.model.source,
        "data.train": spec.data.train,
        "data.test": spec.data.test,
        "output.location": spec.output.location,
    }
    for name, location in locations.items():
        _claimed(location, name, require_claims)
    model = _inputs(manifest, volume_root) if inputs else None
    output = OutputFolder(resolve(spec.output.location, volume_root, "output.location"))
    output.check()
    return CalibrationPlan(model=model, output=output)
