"""The operator's own liveness and readiness endpoints (one port, two paths).

kopf's liveness endpoint exists only once kopf runs, and with leader election
a standby replica never starts kopf, yet the kubelet must see it alive and
ready to take over. So this process serves both paths itself, on the kopf
event loop (a wedged loop stops answering, which is what liveness is for):

* ``/healthz`` (liveness): the event loop answers. Nothing downstream is
  checked: an API server outage must not make the kubelet restart every
  replica at once.
* ``/readyz`` (readiness): booted. A standby is ready once it has read the
  Lease (it knows who leads and can take over); the leader, or a replica
  without leader election, once kopf has started (its watches are being set
  up). Different from liveness on purpose: a leader that is still starting is
  alive but not yet serving.

Both replicas are normally Ready: a PodDisruptionBudget counts ready pods,
and a standby that never became Ready would keep a node drain waiting for
ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Health:
    elected: bool
    """Leader election on (two replicas) or off (one process that always leads)."""
    contacted: Callable[[], bool] = lambda: True
    """Whether the elector has completed a round trip to the API server."""
    leading: bool = False
    kopf_ready: asyncio.Event = field(default_factory=asyncio.Event)

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz."""
        if self.leading or not self.elected:
            if self.kopf_ready.is_set():
                return True, "leading: reconciling" if self.elected else "reconciling"
            return False, "starting: kopf is not running yet"
        if self.contacted():
            return True, "standby: ready to take over"
        return False, "starting: the Lease has not been read yet"

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        ready, why = self.readiness()
        return web.Response(text=why + "\n", status=200 if ready else 503)

    async def start(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # Every address: the kubelet probes the pod IP, a person port-forwards to localhost.
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner
