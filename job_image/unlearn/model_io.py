"""Loading and saving models in the three formats of contract 4.

* ``exported``: a ``torch.export`` program (``.pt2``). ``ExportedProgram.module()``
  gives a trainable ``GraphModule``: tests/job/test_formats.py checks that
  gradients flow and Adam steps work on the torch the tests run with (2.15 on
  CPU, 2.11 on the GPU machine); the job image's base ships torch 2.10, which
  those tests have not run on. Its ``train()``/``eval()`` raise ``NotImplementedError`` by
  design, so the graph has no mode switch: models with dropout or batch norm
  should ship as a state dict instead. After unlearning the module is exported
  again with the program's own example inputs (batch dimension left dynamic).
* ``state-dict``: safetensors or ``torch.save`` weights loaded into a torchvision
  architecture (built by name with ``weights=None``: nothing is downloaded) or an
  importable ``package.module:function`` factory. Saved back in the same format.
* ``torchscript``: ``torch.jit.load``; deprecated upstream but still loadable and
  trainable. Saved with ``torch.jit.save``.

A model file is read through ``files.Place`` (a regular file, never through a
link out of its claim), hashed from the very handle it is loaded from, and
loaded with torch's own warnings captured: a corrupt file gives one line
that says what torch found, not a dozen lines of traceback first.

A state dict's architecture may name a ``package.module:function`` factory
only when the cluster admin allowed its module
(``unlearning_contracts.factories``): the check comes before the import,
because importing a module runs its code. The factory must return an
``nn.Module``.

Saving serialises the whole model into memory first and only then writes
the bytes (``serialize``): torch's own file writer, on a full disk, throws
from a destructor and aborts the process (SIGABRT, no record); a Python
write fails with ENOSPC that the runner turns into a clear record. The bytes
are published by ``files.OutputFolder`` (temporary name, then link).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torchvision
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from unlearn.errors import InvalidInputError
from unlearn.files import Place, atomic_write, gib, memory_budget, plain
from unlearn.preflight import EXPORTED_SUFFIX, model_suffix, refuse_factory
from unlearning_contracts.factories import factory_allowed
from unlearning_contracts.spec import ModelSpec

log = logging.getLogger("unlearn")


@dataclass
class LoadedModel:
    """A model ready to train, and what is needed to write it back in its format."""

    module: nn.Module
    format: str
    suffix: str
    source: Path
    example_inputs: tuple[Any, ...] | None = None
    sample_shape: tuple[int, ...] | None = None  # per-sample input shape when the format records it
    build: Callable[[], nn.Module] | None = None  # a fresh architecture (state dicts only)
    sha256: str = field(default="")
    """Of the bytes that were loaded (read from the same handle)."""


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return _sha256(handle)


def _sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def set_mode(module: nn.Module, training: bool) -> None:
    """train()/eval() where the format allows it; exported graphs have no mode (see module doc)."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def _build_architecture(spec: ModelSpec, allowed_factories: Sequence[str]) -> Callable[[], nn.Module]:
    arch = spec.architecture
    assert arch is not None  # the spec enforces it for state dicts
    kwargs = dict(arch.kwargs)
    if arch.torchvision is not None:
        name = arch.torchvision
        if name not in torchvision.models.list_models():
            raise InvalidInputError(
                f"model.architecture.torchvision: torchvision has no model {name!r} (for example resnet18)"
            )

        def build_torchvision() -> nn.Module:
            return torchvision.models.get_model(name, weights=None, **kwargs)  # type: ignore[no-any-return]

        builder: Callable[[], nn.Module] = build_torchvision
    else:
        assert arch.factory is not None
        # Importing a module runs its code: nothing the admin did not allow is imported (not even its package).
        if not factory_allowed(arch.factory, allowed_factories):
            raise refuse_factory(arch.factory)
        module_name, _, attr = arch.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise InvalidInputError(
                f"model.architecture.factory: cannot import {arch.factory} ({_first_line(error)}): "
                "bake it into the image"
            ) from None

        def build_factory() -> nn.Module:
            built = factory(**kwargs)
            if not isinstance(built, nn.Module):
                raise InvalidInputError(
                    f"model.architecture.factory: {arch.factory} returned {type(built).__name__}, not a module"
                )
            return built

        builder = build_factory
    try:
        builder()
    except InvalidInputError:
        raise
    except Exception as error:  # any builder error is the user's arguments
        raise InvalidInputError(
            f"model.architecture: cannot build the network ({_first_line(error)}): check kwargs"
        ) from None
    return builder


def _read_state_dict(handle: BinaryIO, suffix: str, where: str) -> dict[str, torch.Tensor]:
    if suffix == ".safetensors":
        return load_safetensors(handle.read())
    loaded = torch.load(handle, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InvalidInputError(f"{where}: not a state dict (a mapping of names to tensors)")
    return loaded


@contextlib.contextmanager
def _quiet_torch() -> Iterator[list[str]]:
    """Capture what torch logs or warns while a file loads; yields the lines (the first cause comes first).

    torch.export logs a whole traceback before raising "check the warnings
    above"; the cause it found goes into our one line instead, the rest to
    the debug log.
    """
    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            cause = record.exc_info[1] if record.exc_info else None
            found.append(_first_line(cause) if cause is not None else record.getMessage().splitlines()[0])
            log.debug("torch while loading: %s", record.getMessage(), exc_info=record.exc_info)

    # torch configures its own stderr handlers ("torch", "torch.export", ...), each not propagating.
    loggers = [logging.getLogger("torch")] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.handlers
    ]
    saved = [(logger, logger.handlers[:]) for logger in loggers]
    keep = Keep()
    caught: list[warnings.WarningMessage] = []
    try:
        for logger in loggers:
            logger.handlers[:] = [keep]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        for logger, handlers in saved:
            logger.handlers[:] = handlers
        for warning in caught:
            log.debug("torch warned while loading: %s", warning.message)


def load_model(spec: ModelSpec, source: Place | Path, allowed_factories: Sequence[str] = ()) -> LoadedModel:
    """Load the model at ``source`` as ``spec.format`` says; InvalidInputError names the file on failure.

    ``allowed_factories``: the module prefixes an architecture factory may come from (none by default).
    """
    place = source if isinstance(source, Place) else plain(source, "model.source")
    where = place.where
    path = place.path
    info = place.require_file()
    budget = memory_budget()
    if info.st_size > budget:
        raise InvalidInputError(
            f"{where}: {gib(info.st_size)}, more than the memory the job may use ({gib(budget)}): raise spec.job.memory"
        )
    build = _build_architecture(spec, allowed_factories) if spec.format == "state-dict" else None
    with place.open() as handle, _quiet_torch() as torch_said:
        try:
            digest = _sha256(handle)
            handle.seek(0)
            loaded = _load(spec, handle, path, where, build)
        except InvalidInputError:
            raise
        except Exception as error:  # torch raises many types for a corrupt file; all mean "cannot load"
            cause = torch_said[0] if torch_said else _first_line(error)
            raise InvalidInputError(
                f"{where}: cannot load as model.format {spec.format} ({cause[:200]}): check the file and format"
            ) from None
    loaded.sha256 = digest
    return loaded


def _load(
    spec: ModelSpec, handle: BinaryIO, path: Path, where: str, build: Callable[[], nn.Module] | None
) -> LoadedModel:
    if spec.format == "exported":
        program = torch.export.load(handle)
        module = program.module()
        example = program.example_inputs
        example_args = tuple(example[0]) if example is not None else None
        shape = None
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        user_inputs = list(program.graph_signature.user_inputs)
        for node in placeholders:
            if node.name in user_inputs and hasattr(node.meta.get("val"), "shape"):
                shape = tuple(int(s) if isinstance(s, int) else -1 for s in node.meta["val"].shape[1:])
                break
        return LoadedModel(module, "exported", EXPORTED_SUFFIX, path, example_args, shape)
    if spec.format == "torchscript":
        scripted: nn.Module = torch.jit.load(handle, map_location="cpu")  # type: ignore[no-untyped-call]
        return LoadedModel(scripted, "torchscript", model_suffix("torchscript", path), path)
    assert build is not None
    state = _read_state_dict(handle, path.suffix, where)
    built = build()
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(f"{where}: the weights do not fit model.architecture ({_first_line(error)})") from None
    return LoadedModel(built, "state-dict", model_suffix("state-dict", path), path, build=build)


def reinitialise(loaded: LoadedModel) -> None:
    """Fresh random weights of the same architecture (for ``retrain``), in place.

    State dicts rebuild the architecture with its own initialisers. Exported and
    TorchScript graphs keep no layer objects, so every parameter is drawn the way
    torch's Linear/Conv layers draw theirs: Kaiming-uniform for weights and
    uniform(+-1/sqrt(fan_in)) for the matching bias; 1-D weights (norm scales)
    start at one.
    """
    module = loaded.module
    if loaded.build is not None:
        fresh = loaded.build()
        module.load_state_dict(fresh.state_dict())
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for param in params.values():
            if param.ndim >= 2:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        for name, param in params.items():
            if param.ndim >= 2:
                continue
            prefix, _, leaf = name.rpartition(".")
            weight = params.get(f"{prefix}.weight" if prefix else "weight")
            if leaf == "bias" and weight is not None and weight.ndim >= 2:
                fan_in = weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(param, -bound, bound)
            elif leaf == "weight":
                nn.init.ones_(param)
            else:
                nn.init.zeros_(param)


def serialize(loaded: LoadedModel) -> bytes:
    """``loaded.module`` in the format it was loaded from, as bytes (nothing is written yet: see the module doc)."""
    module = loaded.module
    buffer = io.BytesIO()
    if loaded.format == "exported":
        args = loaded.example_inputs
        if args is None:
            raise InvalidInputError(
                f"model.source {loaded.source}: the program has no example inputs to re-export with"
            )
        # clone(): a view would serialise its whole base tensor as the example input.
        args = tuple(a.detach().clone().cpu() if isinstance(a, torch.Tensor) else a for a in args)
        dims = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) else None for a in args)
        with torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dims)
        torch.export.save(program, buffer)
    elif loaded.format == "torchscript":
        torch.jit.save(module, buffer)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        if loaded.suffix == ".safetensors":
            return save_safetensors(state)
        torch.save(state, buffer)
    return buffer.getvalue()


def save_model(loaded: LoadedModel, dest: Path) -> None:
    """Write ``loaded.module`` to a file of the user's (atomically), never over the input."""
    data = serialize(loaded)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(dest, write, protect=(loaded.source,))
