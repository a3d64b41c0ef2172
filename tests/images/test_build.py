"""images/build.py: the definitions say what the images must be, and a rebuild gives the same digest."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tests.cluster.registry import BUILD, build_images

ROOT = Path(__file__).resolve().parents[2]


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imagebuild", BUILD)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagebuild"] = module
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.mark.unit
@pytest.mark.parametrize("image", sorted(build.DEFINITIONS))
def test_definition_runs_as_nonroot_with_a_pinned_closure_and_a_real_entrypoint(image: str) -> None:
    defn = build.Definition.load(image)
    assert defn.config["user"] == "65532:65532"
    # The entrypoint is a console script of pyproject.toml that the code layer writes.
    script = Path(defn.config["entrypoint"][0]).name
    assert script in build.project_scripts(defn.parts)
    assert defn.config["env"]["PATH"].startswith(f"{build.VENV}/bin:")
    pins = build.pinned(defn.constraints)
    names = {pin.split("==")[0].lower() for pin in pins}
    assert {"pydantic", "pyyaml"} <= names
    if image == "job":
        # CUDA torch from the pinned wheels: the wheels' CUDA libraries are needed even to import torch.
        assert {"torch", "torchvision", "nvidia-cublas", "nvidia-cudnn-cu13"} <= names
    else:
        assert not {n for n in names if n.startswith(("torch", "nvidia", "triton"))}


@pytest.mark.unit
def test_code_layer_carries_whole_packages_of_the_parts_and_no_caches() -> None:
    defn = build.Definition.load("operator")
    files = dict((path, source) for source, path in build.code_files(defn))
    site = f"{build.VENV.lstrip('/')}/lib/python3.11/site-packages"
    package = ROOT / "operator" / "unlearning_operator"
    expected = {f"{site}/unlearning_operator/{p.name}" for p in package.glob("*.py")}
    assert expected <= set(files)
    assert f"{site}/unlearning_contracts/spec.py" in files
    # The job's code (torch) stays out of the operator image; no byte code is copied.
    assert not [p for p in files if p.startswith(f"{site}/unlearn/")]
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]


@pytest.mark.unit
def test_loose_pins_are_refused_with_the_line(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# comment\nkopf==1.45.2\nkubernetes>=31\n")
    with pytest.raises(build.BuildError, match=r"constraints.txt:3: 'kubernetes>=31' is not an exact pin"):
        build.pinned(constraints)


@pytest.mark.images
def test_rebuild_from_scratch_gives_the_same_digest(tmp_path: Path) -> None:
    """The operator image rebuilt in an empty cache (only the Debian base layer and the downloaded
    wheels carried over, so that a Debian archive update in between cannot count) has the digest of
    the cached build: the venv install, the code layer, the tars, zstd and the JSON are deterministic.
    docs/container-images.md records the same for both images built from nothing."""
    (cached,) = build_images(("operator",)).values()
    record = json.loads((cached.oci / "build.json").read_text())
    debian = next(layer for layer in record["layers"] if layer["step"] == "debian")
    source = build.cache_root()
    fresh = tmp_path / "cache" / "unlearning-operator" / "images"
    (fresh / "layers").mkdir(parents=True)
    shutil.copytree(source / "layers" / debian["key"], fresh / "layers" / debian["key"], copy_function=os.link)
    shutil.copytree(source / "wheels", fresh / "wheels", copy_function=os.link)
    done = subprocess.run(
        [sys.executable, str(BUILD), "--json", "operator"],
        capture_output=True, text=True, check=False, timeout=1800,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rebuilt = json.loads(done.stdout)
    steps = {layer["step"]: layer for layer in rebuilt["layers"]}
    assert "building layer debian" not in done.stderr
    assert "installing into /opt/venv" in done.stderr, done.stderr
    assert [layer["digest"] for layer in rebuilt["layers"]] == [layer["digest"] for layer in record["layers"]]
    assert steps["python"]["diff_id"] == next(x for x in record["layers"] if x["step"] == "python")["diff_id"]
    assert rebuilt["digest"] == cached.digest


@pytest.mark.unit
def test_chart_defaults_name_the_images_the_definitions_build() -> None:
    values = (ROOT / "charts" / "unlearning-operator" / "values.yaml").read_text()
    for image in ("operator", "job"):
        name = tomllib.loads(build.DEFINITIONS[image].read_text())["name"]
        assert f"ghcr.io/unlearning-operator/{name}\n" in values
