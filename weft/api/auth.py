"""Bearer-token auth on /api/*: API_TOKENS (full access, as the original) and the scoped token file
(WEFT_TOKENS_FILE: names, roles, projects; README: Security). /health*, and the API docs stay open;
/metrics takes a read token once tokens are configured.

The middleware puts the request's `Principal` on the request; `weft.api.common` consults it wherever
a project is chosen or listed, so no handler can forget the scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

from aiohttp import web

from weft.api.common import ACTOR, PRINCIPAL
from weft.api.errors import Handler, json_error
from weft.core.access import (
    ANONYMOUS,
    Principal,
    Role,
    TokenFile,
    TokenFileError,
    legacy_actor,
    required_role,
)
from weft.core.limits import RateLimiter
from weft.token_file import read_token_file
from weft.watched_file import WatchedFile

log = logging.getLogger("weft.auth")

METRICS_PATH = "/metrics"  # not under /api, yet a read token's once tokens are configured
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/api/openapi.json", "/api/docs"})
MAX_MISSES = 4096  # recently refused tokens remembered, so a repeated bad token costs no scrypt
MAX_TOKEN_CHARS = 512


class TokenRegistry:
    """Which principal a presented token stands for. A token is checked once with the file's slow
    hash (in a thread); then a keyed hash with a per-process key finds it in memory."""

    def __init__(self, legacy: tuple[str, ...] = (), path: Path | None = None):
        self._legacy = [(t.encode(), Principal(legacy_actor(t), Role.admin, None)) for t in legacy]
        self._path = path
        self._watched = WatchedFile(path, read_token_file, TokenFileError, "token file") if path else None
        self._file: TokenFile | None = self._watched.current() if self._watched is not None else None
        self._key = os.urandom(32)
        self._hits: dict[bytes, Principal] = {}
        self._misses: OrderedDict[bytes, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._legacy) or self._path is not None

    def _maybe_reload(self) -> None:
        file = self._watched.current() if self._watched is not None else None
        if file is not self._file:  # a new file: what was cached was checked against the old one
            self._file = file
            self._hits.clear()
            self._misses.clear()

    def force_reload_check(self) -> None:
        """Look at the file on the next request whatever the interval (tests, SIGHUP)."""
        if self._watched is not None:
            self._watched.force_check()

    async def principal(self, token: str) -> Principal | None:
        self._maybe_reload()
        raw = token.encode()
        found: Principal | None = None
        for secret, principal in self._legacy:
            if hmac.compare_digest(raw, secret):
                found = principal
        if found is not None or self._file is None:
            return found
        key = hmac.new(self._key, raw, hashlib.sha256).digest()
        if (hit := self._hits.get(key)) is not None:
            return hit
        if key in self._misses:
            return None
        tokens = self._file
        digest = await asyncio.to_thread(tokens.params.hash, token)
        found = tokens.match(digest)
        if tokens is not self._file:  # reloaded meanwhile: do not cache against the new file
            return found
        if found is not None:
            self._hits[key] = found
        else:
            self._misses[key] = None
            if len(self._misses) > MAX_MISSES:
                self._misses.popitem(last=False)
        return found


def make_auth_middleware(registry: TokenRegistry, limiter: RateLimiter | None = None) -> web.middleware:  # type: ignore[valid-type]
    limiter = limiter or RateLimiter(0.0)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not registry.enabled or request.path in OPEN_PATHS or not (
            request.path.startswith("/api") or request.path == METRICS_PATH
        ):
            request[PRINCIPAL] = ANONYMOUS
            request[ACTOR] = ANONYMOUS.name
            return await handler(request)
        token = _token_of(request)
        if token is None:
            return _unauthorized("missing bearer token (Authorization: Bearer <token>)")
        principal = await registry.principal(token) if len(token) <= MAX_TOKEN_CHARS else None
        if principal is None:
            return _unauthorized("invalid token")
        route = request.match_info.route.resource
        needed = required_role(request.method, route.canonical if route is not None else request.path)
        if not principal.may(needed):
            return json_error(403, "Forbidden", f"token {principal.name!r} has role {principal.role.name}; "
                              f"this needs {needed.name}", {"field": "Authorization", "required": needed.name})
        wait = limiter.retry_after(principal.name, time.monotonic(), principal.rate_per_s)
        if wait:
            rate = principal.rate_per_s if principal.rate_per_s is not None else limiter.rate
            resp = json_error(429, "TooManyRequests", f"token {principal.name!r} is over {rate:g} requests/s on "
                              f"this replica; retry in {wait} s", {"field": "Authorization", "retryAfter": wait})
            resp.headers["Retry-After"] = str(wait)
            return resp
        request[PRINCIPAL] = principal
        request[ACTOR] = principal.name
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
