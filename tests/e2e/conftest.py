"""Fixtures of the end-to-end tier (marker ``e2e``): ``.venv/bin/python -m pytest tests/e2e -x -q``.

About 2-3 minutes on two busy cores once the binaries (tests/cluster/build.sh)
and the demo model are cached; the first run also trains the demo model.

* ``chart_images`` (session): the operator and job images by digest, built
  from this checkout and pushed to the session's registry (the ``images``
  fixture of tests/cluster/fixtures.py); None with
  ``UNLEARNING_TEST_VENV_FAST_PATH=1``, where pods run from the venv instead
  (inner loop only).
* ``demo_model`` (session): the digits demo model, from the cache that
  ``unlearn demo`` keeps (trained once per recipe and torch version, so a
  warm run copies a file instead of training for a minute or more).
* ``release`` (module): the chart installed with ``helm install`` in
  namespaced mode, watching a pool of namespaces made with it; uninstalled
  at the end of the module. Namespaced rather than cluster-wide so that
  requests of other tiers in the same session (whose namespaces may still
  be terminating) never reach this operator, and so that each test gets a
  namespace of its own (its own ``models`` claim and model lineage) and
  does not depend on the others or their order.
* ``workspace`` (function): the next namespace of the pool, with the
  ``models`` claim bound and populated with the demo model.
* Diagnostics: when a test fails, a fixture finaliser appends the operator's
  log and the objects, statuses and pod logs of the test's namespaces to
  the failure report.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import VENV_FAST_PATH, GpuNode
from tests.e2e.harness import (
    Api,
    ChartImages,
    E2EContext,
    Release,
    Workspace,
    create_namespace,
    diagnostics,
    models_workspace,
    new_release,
)

# Namespaces the module release watches; each test that runs requests takes one.
POOL_SIZE = 8


@pytest.fixture(scope="session")
def demo_model() -> Path:
    code = "from unlearn.demo import cache_dir, ensure_demo_model; print(ensure_demo_model(cache_dir()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        pytest.fail(f"could not prepare the demo model:\n{done.stderr[-2000:]}", pytrace=False)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def chart_images(request: pytest.FixtureRequest) -> ChartImages | None:
    if VENV_FAST_PATH:
        return None
    built = request.getfixturevalue("images")
    return ChartImages(operator=built["operator"].pushed, job=built["job"].pushed)


@pytest.fixture(scope="session")
def e2e_api(control_plane: ControlPlane) -> Api:
    return Api(control_plane)


@pytest.fixture(scope="module")
def release(
    control_plane: ControlPlane,
    gpu_node: GpuNode,
    e2e_api: Api,
    chart_images: ChartImages | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Release]:
    tag = uuid.uuid4().hex[:6]
    namespace = f"e2e-{tag}"
    pool = tuple(f"e2e-{tag}-w{i}" for i in range(POOL_SIZE))
    for ns in pool:
        create_namespace(e2e_api, ns)
    workdir = tmp_path_factory.mktemp("release")
    rel = new_release(
        control_plane, gpu_node, e2e_api, name="e2e", namespace=namespace, watched=pool, workdir=workdir,
        images=chart_images,
    )  # fmt: skip
    rel.pool = list(pool)
    try:
        rel.install()
        rel.wait_ready()
    except (subprocess.CalledProcessError, TimeoutError) as error:
        detail = getattr(error, "stderr", "") or ""
        rel.uninstall(check=False)
        pytest.fail(
            f"helm install of the chart failed: {error}\n{detail}\n{rel.operator_log()}\n"
            f"{diagnostics(control_plane, e2e_api, gpu_node, [namespace])}",
            pytrace=False,
        )
    try:
        yield rel
    finally:
        rel.uninstall(check=False)
        for ns in (namespace, *pool):
            e2e_api.core.delete_namespace(ns)


@pytest.fixture(autouse=True)
def e2e_context(
    request: pytest.FixtureRequest, control_plane: ControlPlane, gpu_node: GpuNode, e2e_api: Api
) -> Iterator[E2EContext]:
    ctx = E2EContext()
    yield ctx
    report: pytest.TestReport | None = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    releases = [*ctx.releases]
    module_release = request.node.funcargs.get("release")
    if isinstance(module_release, Release):
        releases.insert(0, module_release)
    namespaces = [*dict.fromkeys([*ctx.namespaces, *(r.namespace for r in releases)])]
    text = "\n".join(r.operator_log() for r in releases)
    text += "\n" + diagnostics(control_plane, e2e_api, gpu_node, namespaces)
    # The terminal summary prints the report's sections after teardown, so this still shows.
    report.sections.append(("e2e: operator log, objects and pod logs", text))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def workspace(
    release: Release, gpu_node: GpuNode, e2e_api: Api, demo_model: Path, e2e_context: E2EContext
) -> Workspace:
    ns = release.take_namespace()
    e2e_context.namespaces.append(ns)
    return models_workspace(e2e_api, gpu_node, ns, demo_model)
