"""The three parts and what each may load: contracts <- operator, contracts <- job, never across.

Each check imports every module of one package in a fresh interpreter and
reads ``sys.modules``: a module-level import anywhere in the package (even one
a test never calls) shows up. The packaging checks keep the development
install (the root pyproject.toml) in step with what each image installs.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# package -> the top-level modules it must never load
FORBIDDEN = {
    "unlearning_contracts": {"torch", "kopf", "kubernetes", "prometheus_client", "unlearn", "unlearning_operator"},
    "unlearning_operator": {"torch", "torchvision", "sklearn", "unlearn"},
    "unlearn": {"kopf", "kubernetes", "prometheus_client", "unlearning_operator"},
}

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@functools.cache
def loaded_by(package: str) -> tuple[list[str], frozenset[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    return found["modules"], frozenset(found["loaded"])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_part_loads_nothing_it_must_not(package: str) -> None:
    modules, loaded = loaded_by(package)
    assert len(modules) >= 3, f"{package}: found only {modules}"
    assert not loaded & FORBIDDEN[package], f"importing {package} loaded {sorted(loaded & FORBIDDEN[package])}"


def test_operator_and_job_use_the_contracts() -> None:
    for package in ("unlearning_operator", "unlearn"):
        assert "unlearning_contracts" in loaded_by(package)[1]


def project(path: Path) -> dict[str, Any]:
    return dict(tomllib.loads(path.read_text())["project"])


@pytest.mark.parametrize(
    ("part", "extra"),
    [("contracts", None), ("operator", "operator"), ("job_image", "job")],
)
def test_development_install_repeats_each_parts_requirements(part: str, extra: str | None) -> None:
    """The root pyproject.toml installs all three parts; its lists must match the parts' own."""
    own = [r for r in project(ROOT / part / "pyproject.toml")["dependencies"] if r != "unlearning-contracts"]
    root = project(ROOT / "pyproject.toml")
    listed = root["dependencies"] if extra is None else root["optional-dependencies"][extra]
    assert sorted(own) == sorted(listed), f"{part}/pyproject.toml and the root pyproject.toml disagree"


@pytest.mark.parametrize("part", ["operator", "job_image"])
def test_images_install_the_contracts_beside_their_part(part: str) -> None:
    assert "unlearning-contracts" in project(ROOT / part / "pyproject.toml")["dependencies"]
    # The image's definition (images/build.py) carries both folders, whole; no files picked by hand.
    definition = tomllib.loads((ROOT / part / "image.toml").read_text())
    assert definition["parts"] == ["contracts", part]
    assert "files" not in definition


def test_collecting_the_operators_unit_tests_loads_no_torch() -> None:
    """The operator's unit tier stays a matter of seconds: nothing on its import path pulls torch in."""
    probe = (
        "import sys, pytest\n"
        "code = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/operator', 'tests/contracts'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.stdout.strip().splitlines()[-1] == "NO-TORCH 0", done.stdout[-2000:] + done.stderr[-2000:]
