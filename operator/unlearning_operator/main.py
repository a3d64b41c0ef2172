"""kopf wiring and start-up; nothing here decides (see controller.py and the pure modules).

Run with ``unlearning-operator`` or ``python -m unlearning_operator``.

* ``standalone=True``: no kopf peering objects. Several replicas are safe
  through leader election instead (leader.py): kopf starts only in the
  replica that holds the Lease, so exactly one reconciles; a standby serves
  /healthz, /readyz and /metrics and waits.
* Liveness and readiness are this process's own endpoints (health.py), not
  kopf's, which would not exist in a standby.
* Watches are server-side filtered to objects this operator labels, so a
  large cluster's Jobs never reach the operator.
* With explicit namespaces, kopf's cluster-wide scanning (CRDs and namespace
  lists) is disabled: the operator then needs no cluster-scoped permission.
* No handler here makes kopf add a finalizer (only ``on.event`` and indexes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from unlearning_contracts.api import API_GROUP, API_VERSION, CALIBRATION, REQUEST

from .controller import Controller
from .health import Health
from .k8s import Kube
from .labels import LABEL_CALIBRATION, LABEL_MANAGED_BY, LABEL_REQUEST, MANAGED_BY
from .leader import Elector, Timing
from .metrics import Metrics, build_registry, serve
from .settings import OperatorSettings, SettingsError, load_settings
from .views import calibration_view, job_view, request_view

# A request's Job carries unlearn.dev/request, a calibration's unlearn.dev/calibration (labels.py).
REQUEST_JOBS: dict[str, Any] = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_REQUEST: kopf.PRESENT}
CALIBRATION_JOBS: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY,
    LABEL_CALIBRATION: kopf.PRESENT,
}

log = logging.getLogger("unlearning_operator")
# Exit status of a leader that lost its Lease: the kubelet restarts it as a standby.
EXIT_LOST_LEADERSHIP = 3

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
    metrics: Metrics = memo["metrics"]
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


@kopf.index("batch", "v1", "jobs", labels=REQUEST_JOBS)
async def job_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    view = job_view(body)
    return {(view.namespace, view.request): view}


@kopf.index(API_GROUP, API_VERSION, CALIBRATION.plural)
async def calibration_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    view = calibration_view(body)
    return {view.key: view}


@kopf.index("batch", "v1", "jobs", labels=CALIBRATION_JOBS)
async def calibration_job_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    view = job_view(body)
    return {(view.namespace, view.request): view}


def _bound(memo: kopf.Memo, kwargs: dict[str, Any]) -> Controller:
    controller: Controller = memo["controller"]
    controller.bind(
        kwargs["request_index"], kwargs["job_index"], kwargs["calibration_index"], kwargs["calibration_job_index"]
    )
    return controller


@kopf.on.event(API_GROUP, API_VERSION, REQUEST.plural)
async def request_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller = _bound(memo, kwargs)
    try:
        await controller.on_request(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="request").inc()
        raise


@kopf.on.event("batch", "v1", "jobs", labels=REQUEST_JOBS)
async def job_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller = _bound(memo, kwargs)
    try:
        await controller.on_job(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="job").inc()
        raise


@kopf.on.event(API_GROUP, API_VERSION, CALIBRATION.plural)
async def calibration_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller = _bound(memo, kwargs)
    try:
        await controller.on_calibration(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="calibration").inc()
        raise


@kopf.on.event("batch", "v1", "jobs", labels=CALIBRATION_JOBS)
async def calibration_job_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    controller = _bound(memo, kwargs)
    try:
        await controller.on_calibration_job(event.get("type"), body)
    except Exception:
        controller.metrics.handler_errors.labels(handler="calibration-job").inc()
        raise


async def _stopped() -> None:
    """Until SIGTERM or SIGINT (before kopf runs; kopf installs its own handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_operator(operator: OperatorSettings) -> int:
    """Metrics and probes first, then (as leader, or always without election) kopf; the exit status."""
    metrics = build_registry()
    serve(metrics, operator.metrics_port)
    health = Health(elected=operator.leader_election)
    runner = await health.start(operator.health_port)
    elector: Elector | None = None
    holding: asyncio.Task[None] | None = None
    try:
        if operator.leader_election:
            # The pod's name (the kubelet sets HOSTNAME to it) plus a random part, so that
            # a restarted container is a new candidate that waits like any standby.
            pod = os.environ.get("HOSTNAME") or socket.gethostname()
            identity = f"{pod}_{uuid.uuid4().hex[:8]}"

            def changed(leading: bool) -> None:
                health.leading = leading
                metrics.leader.set(1 if leading else 0)

            elector = Elector(
                Kube(_api_client()),
                operator.lease_namespace,
                operator.lease_name,
                identity,
                Timing(
                    float(operator.lease_duration_seconds),
                    float(operator.lease_renew_deadline_seconds),
                    float(operator.lease_retry_period_seconds),
                ),
                on_change=changed,
            )
            health.contacted = lambda: elector is not None and elector.contacted
            log.info("leader election on Lease %s/%s as %s", operator.lease_namespace, operator.lease_name, identity)
            acquiring = asyncio.create_task(elector.acquire())
            stopping = asyncio.create_task(_stopped())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                log.info("stopped while standby")
                return 0
            stopping.cancel()

            def lost(task: asyncio.Task[None]) -> None:
                if not task.cancelled():
                    # At once, not through kopf's graceful stop: after the renew
                    # deadline a standby may take over any moment, and two
                    # reconciling operators are worse than a restart.
                    log.error("exiting: this replica no longer holds the Lease")
                    os._exit(EXIT_LOST_LEADERSHIP)

            # Created before kopf starts: kopf leaves tasks it did not make alone.
            holding = asyncio.create_task(elector.hold())
            holding.add_done_callback(lost)
        else:
            metrics.leader.set(1)
        await kopf.operator(
            standalone=True,
            clusterwide=operator.clusterwide,
            namespaces=list(operator.watch_namespaces),
            ready_flag=health.kopf_ready,
            memo=kopf.Memo(operator_settings=operator, metrics=metrics),
        )
        return 0
    finally:
        if holding is not None:
            holding.cancel()
        if elector is not None:
            await elector.release()
        await runner.cleanup()


def run() -> None:
    """Console entry point: read settings (one-line error on bad ones), then serve."""
    try:
        operator = load_settings(os.environ)
    except SettingsError as error:
        print(f"unlearning-operator: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("settings: %s", operator)
    sys.exit(asyncio.run(serve_operator(operator)))
