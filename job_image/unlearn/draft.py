"""The result record while a run fills it in, and where it is reported; torch-free.

Torch-free so that a request refused before torch is imported (``unlearn
run`` checks the manifest and the preflight first) still gets its record.

A ``RecordDraft`` starts with what the manifest says (request, model,
method, image, start time) and gathers fields phase by phase; ``record``
freezes it into a ``ResultRecord`` with a verdict and an exit code. Every
string it takes from outside the spec is bounded here in bytes (the image
from the environment, the device name, an error message), as the spec
bounds its own: the compact record must always fit the termination message.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import unlearn
from unlearn.files import atomic_write
from unlearn.preflight import RunOptions
from unlearning_contracts.calibration import CalibrationManifest, CalibrationRecord, FoldRecord
from unlearning_contracts.record import ResultRecord, compact, truncate_utf8
from unlearning_contracts.spec import MAX_ERROR_BYTES, MAX_IMAGE_BYTES, Manifest

MAX_DEVICE_BYTES = 64
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def bounded(text: str, max_bytes: int) -> str:
    """One line of printable text of at most ``max_bytes`` in UTF-8 (control characters become spaces)."""
    flat = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text.strip())
    return truncate_utf8(flat, max_bytes)


def one_line(error: BaseException | str) -> str:
    """The first line of an error message, bounded for the record."""
    text = str(error).strip()
    return bounded(text.splitlines()[0] if text else type(error).__name__, MAX_ERROR_BYTES)


class RecordDraft:
    """The record's fields so far, the phase timings, and how to finish it."""

    def __init__(self, manifest: Manifest, options: RunOptions, world_size: int = 1) -> None:
        spec = manifest.spec
        self.started = time.perf_counter()
        self.durations: dict[str, float] = {}
        self.fields: dict[str, Any] = {
            "request_id": manifest.request_id,
            "request_name": manifest.name,
            "namespace": manifest.namespace,
            "model": spec.model.name,
            "method": spec.method.name,
            "started_at": now(),
            "job_image": bounded(options.job_image, MAX_IMAGE_BYTES),
            "code_version": unlearn.__version__,
            "world_size": world_size,
        }

    def set_device(self, name: str) -> None:
        self.fields["device"] = bounded(name, MAX_DEVICE_BYTES)

    def timed(self, phase: str, start: float) -> None:
        self.durations[phase] = round(self.durations.get(phase, 0.0) + time.perf_counter() - start, 3)

    def record(self, verdict: Literal["Passed", "Failed"], exit_code: int, **extra: Any) -> ResultRecord:
        durations = dict(self.durations)
        durations["total"] = round(time.perf_counter() - self.started, 3)
        return ResultRecord(
            verdict=verdict,
            exit_code=exit_code,
            finished_at=now(),
            duration_seconds=durations,
            **self.fields,
            **extra,
        )

    def failed(self, exit_code: int, error: BaseException | str) -> ResultRecord:
        """The record of a run that ended on ``error`` (invalid input, or a crash): what it measured, and why."""
        message = one_line(error)
        self.fields.pop("reasons", None)
        return self.record("Failed", exit_code, error=message, reasons=[message])


def json_bytes(payload: dict[str, Any]) -> bytes:
    """A record file's bytes: indented, sorted, one trailing newline."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    data = json_bytes(payload)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)


def write_termination_message(path: Path, record: ResultRecord) -> None:
    """The compact record (<= 4 KiB) where the kubelet reads the termination message."""
    path.write_text(compact(record), encoding="utf-8")


def write_refusal(path: Path, exit_code: int, error: str) -> None:
    """A manifest that could not be parsed has no record: the exit code and the one-line error, <= 4 KiB."""
    path.write_text(json.dumps({"exitCode": exit_code, "error": bounded(error, MAX_ERROR_BYTES)}), encoding="utf-8")


def default_termination_log() -> Path | None:
    """``/dev/termination-log`` in a pod (it exists and is writable there), else nothing."""
    path = DEFAULT_TERMINATION_LOG
    return path if path.exists() and os.access(path, os.W_OK) else None


# -- calibrations (``unlearn calibrate``, ``calibrate-fold``, ``calibrate-merge``) -------------------------------


def failed_fold(manifest: CalibrationManifest, fold: int, code: int, error: str, started_at: str) -> FoldRecord:
    """The record of a fold that ended on ``error`` (refused before torch, invalid input, or a crash)."""
    return FoldRecord(
        calibration=manifest.calibration_id,
        fold=fold,
        exit_code=code,
        error=one_line(error),
        started_at=started_at,
        finished_at=now(),
    )


def failed_calibration(
    manifest: CalibrationManifest, code: int, error: str, started_at: str, job_image: str
) -> CalibrationRecord:
    """The record of a calibration (or its merge) that ended on ``error``."""
    spec = manifest.spec
    return CalibrationRecord(
        calibration=manifest.calibration_id,
        model=spec.model.name,
        folds=spec.folds,
        seed=spec.seed,
        exit_code=code,
        error=one_line(error),
        recipe=spec.recipe.model_dump(mode="json", by_alias=True),
        started_at=started_at,
        finished_at=now(),
        job_image=bounded(job_image, MAX_IMAGE_BYTES),
        code_version=unlearn.__version__,
    )
