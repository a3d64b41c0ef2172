"""Rendering the chart with the built helm (no cluster needed for template and lint)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ControlPlaneError, build_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "unlearning-operator"
VALUES = Path(__file__).resolve().parent / "values"
VALUES_FILES = sorted(p.name for p in VALUES.glob("*.yaml"))
RELEASE = "unlearning"
NAMESPACE = "unlearning"

Helm = Callable[..., subprocess.CompletedProcess[str]]
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm that tests/cluster/build.sh built (seconds when cached)."""
    try:
        return build_binaries() / "helm"
    except ControlPlaneError as exc:
        pytest.fail(f"cluster binaries: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def offline_helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm with its state in a temp dir and no kubeconfig: only template, lint and show work."""
    home = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "KUBECONFIG": str(home / "no-cluster"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120, env=env, check=False)

    return run


def template_args(*values_files: str, namespace: str = NAMESPACE) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for name in values_files:
        args += ["--values", str(VALUES / name)]
    return args


@pytest.fixture(scope="session")
def render(offline_helm: Helm) -> Render:
    """``render(*values_files, *extra_args)`` -> the rendered objects; fails with helm's stderr."""

    def run(*values_files: str, extra: tuple[str, ...] = (), namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        done = offline_helm(*template_args(*values_files, namespace=namespace), *extra)
        assert done.returncode == 0, f"helm template {values_files} failed:\n{done.stderr}"
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    return run


def is_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, *, hook: bool = False) -> dict[str, Any]:
    """The one object of this kind (among the release's objects, or among its hooks)."""
    found = [o for o in by_kind(objects, kind) if is_hook(o) == hook]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
