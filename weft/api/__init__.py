"""The aiohttp application: REST and the WebSocket API, served from the projections."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from weft.api import agents, channels, dlq, health, history, metrics, openapi, stats, targets, work, ws
from weft.api.auth import TokenRegistry, make_auth_middleware
from weft.api.common import SERVICES, TOKENS, Services
from weft.api.errors import error_middleware
from weft.api.health import LIFECYCLE, Lifecycle
from weft.api.tracing import http_tracing_middleware
from weft.core.limits import RateLimiter


def create_app(
    svc: Services, lifecycle: Lifecycle | None = None, *, ws_options: dict[str, Any] | None = None,
    tokens: TokenRegistry | None = None,
) -> web.Application:
    """The app over `svc`; `lifecycle` is what the service flips on shutdown (draining);
    `ws_options` tunes the WebSocket API (`weft.api.ws.setup`: heartbeat, stats interval, queue);
    `tokens` decides who may call (default: from the settings' API_TOKENS and WEFT_TOKENS_FILE)."""
    if tokens is None:
        tokens = TokenRegistry(svc.settings.api_tokens, svc.settings.tokens_file)
    middlewares = [error_middleware, make_auth_middleware(
        tokens, RateLimiter(svc.settings.limits.requests_per_s, svc.settings.limits.burst))]
    if svc.metrics.enabled:
        middlewares.insert(0, metrics.http_metrics_middleware)
    if svc.tracing.enabled:  # off: not a single call per request
        middlewares.insert(0, http_tracing_middleware)
    app = web.Application(client_max_size=svc.settings.max_body_bytes, middlewares=middlewares)
    app[TOKENS] = tokens
    app[SERVICES] = svc
    replica = svc.settings.replica_name

    async def name_the_replica(_request: web.Request, resp: web.StreamResponse) -> None:
        # Every answer (errors and the WebSocket upgrade included) says which replica gave it, so a
        # client behind a balancer can tell replicas apart without asking /health.
        resp.headers["X-Weft-Replica"] = replica

    app.on_response_prepare.append(name_the_replica)
    app[LIFECYCLE] = lifecycle if lifecycle is not None else Lifecycle()
    for module in (health, metrics, work, agents, targets, stats, channels, dlq, history, openapi):
        app.router.add_routes(module.routes())
    ws.setup(app, **(ws_options or {}))
    return app
