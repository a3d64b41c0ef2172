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

Writes go to a temporary name in the destination folder and are renamed, so a
reader never sees a half-written model, and a destination equal to the input
is refused: inputs are never modified.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from unlearn.errors import InvalidInputError
from unlearning_contracts.spec import ModelSpec

EXPORTED_SUFFIX = ".pt2"


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
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


def _build_architecture(spec: ModelSpec) -> Callable[[], nn.Module]:
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InvalidInputError(f"model.source {path}: not a state dict (a mapping of names to tensors)")
    return loaded


def load_model(spec: ModelSpec, path: Path) -> LoadedModel:
    """Load the model at ``path`` as ``spec.format`` says; InvalidInputError names the file on failure."""
    where = f"model.source {path}"
    if not path.is_file():
        raise InvalidInputError(f"{where}: no such file: fix model.source (claimName and path)")
    if not os.access(path, os.R_OK):
        raise InvalidInputError(f"{where}: not readable by the job: check the file's permissions")
    try:
        if spec.format == "exported":
            program = torch.export.load(str(path))
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
            scripted: nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return LoadedModel(scripted, "torchscript", path.suffix or ".pt", path)
        build = _build_architecture(spec)
        state = _read_state_dict(path)
        built = build()
        try:
            built.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise InvalidInputError(
                f"{where}: the weights do not fit model.architecture ({_first_line(error)})"
            ) from None
        return LoadedModel(built, "state-dict", path.suffix or ".pt", path, build=build)
    except InvalidInputError:
        raise
    except Exception as error:  # torch raises many types for a corrupt file; all mean "cannot load"
        raise InvalidInputError(
            f"{where}: cannot load as model.format {spec.format} ({_first_line(error)}): check the file and format"
        ) from None


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


def atomic_write(dest: Path, write: Callable[[Path], None], protect: tuple[Path, ...] = ()) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``dest``, then rename it to ``dest``.

    The temporary file is removed on any failure, so no partial output is left;
    ``protect`` lists paths (the inputs) that must never be overwritten.
    """
    dest_resolved = dest.resolve()
    for path in protect:
        if path.exists() and path.resolve() == dest_resolved:
            raise InvalidInputError(f"output.location: {dest} is the input model: choose another output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(loaded: LoadedModel, dest: Path) -> None:
    """Write ``loaded.module`` to ``dest`` (atomically) in the format it was loaded from."""
    module = loaded.module

    def write(tmp: Path) -> None:
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
            # torch.export.save picks the container from the suffix; the temp name has none.
            with tmp.open("wb") as handle:
                torch.export.save(program, handle)
        elif loaded.format == "torchscript":
            with tmp.open("wb") as handle:
                torch.jit.save(module, handle)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            if loaded.suffix == ".safetensors":
                save_file(state, str(tmp))
            else:
                torch.save(state, tmp)

    atomic_write(dest, write, protect=(loaded.source,))
