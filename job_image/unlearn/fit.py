"""Do the inputs fit together? Pure checks of the loaded model, data and output folder.

Each raises ``InvalidInputError`` with one line that names the field to
change (exit code 4, never retried). The runner gathers the facts (shapes,
label ranges, a probe forward pass) and calls these in order; the messages
are tested table by table in tests/job/test_pure.py.
"""

from __future__ import annotations

from pathlib import Path

from unlearn.errors import InvalidInputError


def check_output(dest: Path, source: Path) -> None:
    """The new version must not be written over the input model (inputs are never modified)."""
    if dest.resolve() == source.resolve():
        raise InvalidInputError(f"output.location: {dest} would overwrite the input model: choose another folder")


def check_sample_shape(model_takes: tuple[int, ...] | None, samples: tuple[int, ...]) -> None:
    """Samples against the per-sample input shape the model records (-1: any size); nothing to say without one."""
    if model_takes is None or len(model_takes) != len(samples):
        return
    if any(expected not in (-1, got) for expected, got in zip(model_takes, samples, strict=True)):
        raise InvalidInputError(
            f"data: samples have shape {samples} but the model takes {model_takes}: fix data or model"
        )


def forward_failed(samples: tuple[int, ...], error: BaseException) -> InvalidInputError:
    """The error for a probe forward pass that raised: any failure there is a mismatch of data and model."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return InvalidInputError(f"data: samples of shape {samples} do not fit the model ({first}): fix data or model")


def check_outputs(probe: tuple[int, ...], num_classes: int | None) -> int:
    """The number of classes from the probe's output shape (batch, classes), checked against model.numClasses."""
    if len(probe) != 2:
        raise InvalidInputError(f"model.source: the model returns shape {probe[1:]} per sample, not class logits")
    outputs = probe[1]
    if num_classes is not None and num_classes != outputs:
        raise InvalidInputError(f"model.numClasses: {num_classes} but the model has {outputs} outputs")
    return outputs


def check_labels(name: str, top: int, outputs: int) -> None:
    """The largest label of a data set must be a class the model has."""
    if top >= outputs:
        raise InvalidInputError(
            f"{name}: label {top} is out of range for a model with {outputs} outputs: fix the labels or the model"
        )
