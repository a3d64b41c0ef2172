"""kopf wiring and start-up; nothing here decides (see controller.py and the pure modules).

Run with ``unlearning-operator`` or ``python -m unlearning_operator``.

* ``standalone=True``: one replica, no peering objects (the chart runs one
  Deployment replica with the Recreate strategy; a second operator would race
  on scheduling, which is in memory).
* Watches are server-side filtered to objects this operator labels, so a
  large cluster's Jobs never reach the operator.
* With explicit namespaces, kopf's cluster-wide scanning (CRDs and namespace
  lists) is disabled: the operator then needs no cluster-scoped permission.
* No handler here makes kopf add a finalizer (only ``on.event`` and indexes).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from unlearning_contracts.api import API_GROUP, API_VERSION, REQUEST

from .controller import Controller
from .k8s import Kube
from .labels import LABEL_MANAGED_BY, MANAGED_BY
from .metrics import build_registry, serve
from .settings import OperatorSettings, SettingsError, load_settings
from .views import job_view, request_view

MANAGED = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    # Enough connections for both thread pools (runtime.API_THREADS + LAUNCH_THREADS, 20) plus kopf's own.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator: OperatorSettings = memo["operator_settings"]
    settings.watching.label_selectors["batch", "jobs"] = MANAGED
    settings.scanning.disabled = not operator.clusterwide
    # Events for kopf's own log lines only from warnings up; ours are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    metrics = build_registry()
    serve(metrics, operator.metrics_port)
    controller = Controller(settings=operator, kube=Kube(_api_client()), metrics=metrics)
    controller.start()
    memo["controller"] = controller


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.stop()


@kopf.index(API_GROUP, API_VERSION, REQUEST.plural)
async def request_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    view = request_view(body)
    return {view.key: view}


@kopf.index("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    view = job_view(body)
    return {(view.namespace, view.request): view}


@kopf.on.event(API_GROUP, API_VERSION, REQUEST.plural)
async def request_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller: Controller = memo["controller"]
    controller.bind(kwargs["request_index"], kwargs["job_index"])
    try:
        await controller.on_request(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="request").inc()
        raise


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller: Controller = memo["controller"]
    controller.bind(kwargs["request_index"], kwargs["job_index"])
    try:
        await controller.on_job(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="job").inc()
        raise


def run() -> None:
    """Console entry point: read settings (one-line error on bad ones), then run kopf."""
    try:
        operator = load_settings(os.environ)
    except SettingsError as error:
        print(f"unlearning-operator: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("unlearning_operator").info("settings: %s", operator)
    kopf.run(
        standalone=True,
        clusterwide=operator.clusterwide,
        namespaces=list(operator.watch_namespaces),
        liveness_endpoint=f"http://0.0.0.0:{operator.health_port}/healthz",
        memo=kopf.Memo(operator_settings=operator),
    )
