"""Bearer-token auth on /api/* when API_TOKENS is set. /health, /health/live, /health/ready and the API docs stay open."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from weft.api.common import ACTOR
from weft.api.errors import Handler, json_error

OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/api/openapi.json", "/api/docs"})


def actor_for(token: str) -> str:
    """A stable, non-secret name for a token: events record who acted without holding the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def make_auth_middleware(tokens: tuple[str, ...]) -> web.middleware:  # type: ignore[valid-type]
    encoded = [t.encode() for t in tokens]

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not encoded or request.path in OPEN_PATHS or not request.path.startswith("/api"):
            request[ACTOR] = "api"
            return await handler(request)
        token = _token_of(request)
        if token is None:
            return _unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if not any(hmac.compare_digest(token.encode(), t) for t in encoded):
            return _unauthorized("invalid token")
        request[ACTOR] = actor_for(token)
        return await handler(request)

    return auth_middleware


def _token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    # Browsers cannot set headers on a WebSocket: the original takes ?token= (first), then the
    # subprotocols `bearer, <token>`.
    if request.path == "/api/ws":
        protos = offered_protocols(request)
        subprotocol = protos[1] if len(protos) >= 2 and protos[0].lower() == BEARER else None
        return request.query.get("token") or subprotocol
    return None


BEARER = "bearer"


def offered_protocols(request: web.BaseRequest) -> list[str]:
    """The WebSocket subprotocols a client offers (`Sec-WebSocket-Protocol`), in its order."""
    raw = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _unauthorized(message: str) -> web.Response:
    resp = json_error(401, "Unauthorized", message, {"field": "Authorization"})
    resp.headers["WWW-Authenticate"] = 'Bearer realm="weft"'
    return resp
