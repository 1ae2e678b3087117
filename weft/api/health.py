"""Health endpoints for load balancers and orchestrators (open without a token, see weft.api.auth).

- `GET /health/live`: the process is up and serving. Always 200 while it answers.
- `GET /health/ready`: whether this replica should get traffic. 200 when NATS is connected, every
  attached project's projection has caught up and the replica is not draining; else 503
  `{"status": "not-ready", "reasons": [...]}` naming each reason. A halted project (one holding an
  event this weft cannot read) is listed under `halted` but does not fail readiness: the replica
  still serves every other project, and replicas of one version all halt alike, so failing them
  would take every project out of the load balancer for one.
- `GET /health`: the summary (its shape predates the two above).

`Lifecycle` is what the service flips when it shuts down: from SIGTERM on, readiness answers 503
"draining" while requests are still served, so the load balancer stops routing here first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from weft.api import ws
from weft.api.common import Services, json_response, services
from weft.stamps import utc_now


@dataclass
class Lifecycle:
    """The replica's place in its lifecycle, as the health endpoints report it."""

    draining: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


def lifecycle(request: web.Request) -> Lifecycle:
    return request.app[LIFECYCLE]


def _nats_connected(svc: Services) -> bool:
    return bool(svc.readmodel.store.js._nc.is_connected)


def not_ready_reasons(svc: Services, life: Lifecycle) -> list[str]:
    """Why this replica should not get traffic now; empty when it should."""
    reasons = []
    if life.draining:
        reasons.append("draining")
    if not _nats_connected(svc):
        reasons.append("nats disconnected")
    for project, view in sorted(svc.readmodel.views.items()):
        if view.halted is None and not view.caught_up.is_set():
            reasons.append(f"project {project} catching up")
    return reasons


def _uptime(svc: Services) -> float:
    return round(time.monotonic() - svc.readmodel.started_at, 3)


async def live(request: web.Request) -> web.Response:
    svc = services(request)
    return json_response({"status": "alive", "replica": svc.settings.replica_name, "uptimeSeconds": _uptime(svc)})


async def ready(request: web.Request) -> web.Response:
    svc = services(request)
    reasons = not_ready_reasons(svc, lifecycle(request))
    body: dict[str, Any] = {
        "status": "not-ready" if reasons else "ready", "reasons": reasons, "replica": svc.settings.replica_name
    }
    halted = svc.readmodel.halted()
    if halted:
        body["halted"] = halted
    return json_response(body, 503 if reasons else 200)


async def health(request: web.Request) -> web.Response:
    svc = services(request)
    connected = _nats_connected(svc)
    ready = svc.readmodel.ready
    halted = svc.readmodel.halted()
    draining = lifecycle(request).draining
    ok = connected and ready and not draining
    body = {
        "status": "draining" if draining else "ok" if ok else ("starting" if connected else "degraded"),
        "timestamp": utc_now(),
        "documentation": "/api/docs",
        "websocket": ws.health(request.app),
        "ready": ready,
        # Projects stopped before an event this weft cannot read (a newer weft wrote it): upgrade.
        **({"halted": halted} if halted else {}),
        "nats": {"connected": connected},
        "replica": svc.settings.replica_name,
        "projects": len(svc.readmodel.views),
        "leading": svc.leading(),
        "uptimeSeconds": _uptime(svc),
    }
    return json_response(body, 200 if ok else 503)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/health", health),
        web.get("/health/live", live),
        web.get("/health/ready", ready),
    ]
