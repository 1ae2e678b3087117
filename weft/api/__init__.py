"""The aiohttp application: REST (and later WebSocket) served from the projections."""

from __future__ import annotations

import time

from aiohttp import web

from weft.api import agents, channels, dlq, openapi, stats, targets, work
from weft.api.auth import make_auth_middleware
from weft.api.common import SERVICES, Services, json_response, services
from weft.api.errors import error_middleware
from weft.stamps import utc_now


async def health(request: web.Request) -> web.Response:
    svc = services(request)
    nc = svc.readmodel.store.js._nc
    connected = bool(nc.is_connected)
    ready = svc.readmodel.ready
    halted = svc.readmodel.halted()
    body = {
        "status": "ok" if connected and ready else ("starting" if connected else "degraded"),
        "timestamp": utc_now(),
        "documentation": "/api/docs",
        "websocket": {"connections": 0, "status": "disabled"},
        "ready": ready,
        # Projects stopped before an event this weft cannot read (a newer weft wrote it): upgrade.
        **({"halted": halted} if halted else {}),
        "nats": {"connected": connected},
        "replica": svc.settings.replica_name,
        "projects": len(svc.readmodel.views),
        "leading": svc.leading(),
        "uptimeSeconds": round(time.monotonic() - svc.readmodel.started_at, 3),
    }
    return json_response(body, 200 if connected and ready else 503)


def create_app(svc: Services) -> web.Application:
    app = web.Application(
        client_max_size=svc.settings.max_body_bytes,
        middlewares=[error_middleware, make_auth_middleware(svc.settings.api_tokens)],
    )
    app[SERVICES] = svc
    app.router.add_get("/health", health)
    for module in (work, agents, targets, stats, channels, dlq, openapi):
        app.router.add_routes(module.routes())
    return app
