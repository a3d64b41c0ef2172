"""Model formats round-trip, writes are atomic, retraining re-initialises, runs are reproducible."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tests.job.conftest import RunCli, request
from unlearn.data import load_data, load_digits_arrays
from unlearn.demo import mlp
from unlearn.engine import Context, TensorSet, unlearn
from unlearn.errors import InvalidInputError
from unlearn.files import atomic_write
from unlearn.model_io import LoadedModel, load_model, reinitialise, save_model
from unlearn.tuning import resolve
from unlearning_contracts.spec import Architecture, DataSpec, Location, MethodSpec, ModelSpec

pytestmark = pytest.mark.job


def _train_step(module: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(module(x), torch.zeros(len(x), dtype=torch.long))
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


def _roundtrip(spec: ModelSpec, source: Path, dest: Path, x: torch.Tensor) -> tuple[LoadedModel, LoadedModel]:
    loaded = load_model(spec, source, allowed_factories=("unlearn.demo",))
    before = loaded.module(x).detach()
    _train_step(loaded.module, x)  # trainable through the loaded form
    assert not torch.allclose(loaded.module(x), before)
    save_model(loaded, dest)
    again = load_model(spec.model_copy(update={"source": Location(path=str(dest))}), dest, ("unlearn.demo",))
    torch.testing.assert_close(again.module(x), loaded.module(x))
    return loaded, again


def test_exported_program_trains_and_reexports(tmp_path: Path) -> None:
    x = torch.rand(4, 64)
    program = torch.export.export(mlp(), (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    spec = ModelSpec(name="m", format="exported", source=Location(path=str(tmp_path / "m.pt2")))
    loaded, again = _roundtrip(spec, tmp_path / "m.pt2", tmp_path / "out" / "m-v1.pt2", x)
    assert loaded.sample_shape == (64,)
    assert again.module(torch.rand(7, 64)).shape == (7, 10)  # the batch dimension stays dynamic


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_state_dict_roundtrip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    source = tmp_path / f"resnet{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(source))
    else:
        torch.save(state, source)
    spec = ModelSpec(
        name="r",
        format="state-dict",
        source=Location(path=str(source)),
        architecture=Architecture(torchvision="resnet18", kwargs={"num_classes": 10}),
    )
    x = torch.rand(2, 3, 32, 32)
    loaded = load_model(spec, source)
    loaded.module.eval()
    torch.testing.assert_close(loaded.module(x), net.eval()(x))
    dest = tmp_path / "out" / f"r-v1{suffix}"
    save_model(loaded, dest)
    assert dest.read_bytes()[:8] == source.read_bytes()[:8]  # same container format as the input
    again = load_model(spec, dest)
    again.module.eval()
    torch.testing.assert_close(again.module(x), loaded.module(x))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated upstream, still supported here
def test_torchscript_roundtrip(tmp_path: Path) -> None:
    scripted = torch.jit.script(mlp())
    scripted.save(str(tmp_path / "m.ts"))  # type: ignore[no-untyped-call]
    spec = ModelSpec(name="m", format="torchscript", source=Location(path=str(tmp_path / "m.ts")))
    _roundtrip(spec, tmp_path / "m.ts", tmp_path / "out" / "m-v1.ts", torch.rand(4, 64))


def test_factory_architecture(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in mlp().state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    spec = ModelSpec(
        name="m",
        format="state-dict",
        source=Location(path=str(tmp_path / "m.safetensors")),
        architecture=Architecture(factory="unlearn.demo:mlp", kwargs={"classes": 10}),
    )
    _roundtrip(spec, tmp_path / "m.safetensors", tmp_path / "out" / "m-v1.safetensors", torch.rand(4, 64))


def test_reinitialise_an_exported_graph(tmp_path: Path) -> None:
    program = torch.export.export(mlp(), (torch.rand(2, 64),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = load_model(ModelSpec(name="m", source=Location(path=str(tmp_path / "m.pt2"))), tmp_path / "m.pt2")
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    reinitialise(loaded)
    after = loaded.module.state_dict()
    for name, value in after.items():
        assert not torch.equal(value, before[name]), name
    bias = after["0.bias"]
    assert bias.abs().max() <= 1 / np.sqrt(64)  # drawn like nn.Linear's own bias


def test_atomic_write_leaves_nothing_on_failure_and_never_overwrites_the_input(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "m-v1.pt2"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, fail)
    assert list((tmp_path / "out").iterdir()) == []

    atomic_write(dest, lambda tmp: tmp.write_bytes(b"v1"))
    atomic_write(dest, lambda tmp: tmp.write_bytes(b"v1 again"))
    assert dest.read_bytes() == b"v1 again"
    with pytest.raises(InvalidInputError, match="is the input model"):
        atomic_write(dest, lambda tmp: tmp.write_bytes(b"x"), protect=(dest,))
    assert dest.read_bytes() == b"v1 again"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m-v1.pt2"]


@pytest.mark.parametrize("method", ["gradient-ascent", "neggrad-plus", "scrub", "salun"])
def test_same_seed_same_numbers_on_cpu(method: str) -> None:
    data = load_digits_arrays()
    x, y = torch.from_numpy(data.x[:300]), torch.from_numpy(data.y[:300])
    forget, retain = TensorSet(x[:20], y[:20]), TensorSet(x[20:], y[20:])
    hyper = replace(resolve(MethodSpec(name=method)), forget_epochs=2, retain_epochs=1, weight_noise=1e-3)
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(123)
        model = mlp()
        unlearn(
            model,
            forget,
            retain,
            replace(hyper, seed=seed),
            Context(torch.device("cpu"), 10),
        )
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_retrain_on_an_exported_program(demo_root: Path, tmp_path: Path, run_cli: RunCli) -> None:
    model = demo_root / "models" / "digits" / "digits-mlp.pt2"
    manifest = request(
        str(model), str(tmp_path / "out"), spec={"method": {"name": "retrain", "retain": {"epochs": 30}}}
    )
    result = run_cli(manifest, "--plot", str(tmp_path / "confidence.png"))
    assert result.record is not None
    assert result.code == 0, result.record["reasons"]
    assert result.record["post"]["testAccuracy"] >= result.record["pre"]["testAccuracy"] - 2.0
    assert (tmp_path / "out" / "digits-mlp-v1.pt2").is_file()
    assert (tmp_path / "confidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _idx_file(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (dtype ubyte, ndim), big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_folder_is_read_without_download(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _idx_file(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx_file(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    spec = DataSpec(
        source="torchvision",
        torchvision_dataset="MNIST",
        train=Location(path=str(tmp_path)),
        test=Location(path=str(tmp_path)),
    )
    data = load_data(spec, tmp_path)
    assert data.train.x.shape == (30, 1, 28, 28)
    assert data.test.x.shape == (10, 1, 28, 28)
    assert data.train.x.min() >= 0.0
    assert data.train.x.max() <= 1.0
    missing = DataSpec(source="torchvision", torchvision_dataset="MNIST", train=Location(path=str(tmp_path / "no")))
    with pytest.raises(InvalidInputError, match=r"data.train .*/no: not found"):
        load_data(missing, tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    spec = DataSpec(source="image-folder", train=Location(path=str(tmp_path / "imgs")), test_fraction=0.34)
    data = load_data(spec, tmp_path)
    assert data.train.x.shape == (4, 3, 8, 8)
    assert data.test.x.shape == (2, 3, 8, 8)
    assert sorted(set(data.train.y.tolist()) | set(data.test.y.tolist())) == [0, 1]
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "small.png")
    with pytest.raises(InvalidInputError, match="images have different sizes"):
        load_data(spec, tmp_path)
