"""The one place that turns failures into HTTP: `{error, message, details}` with the offending field.

What a status promises about a command's event: 503 (always with `Retry-After`) means it is not in
the stream, so any retry is safe; 504 `OutcomeUnknown` means weft could not find out (the body names
the event and entity, and how to look); a 2xx means it is in the stream (202 `folded: false` when
this replica has not folded it yet).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from aiohttp import web
from pydantic import ValidationError

from weft.api.common import SERVICES, json_response
from weft.core.errors import (
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    WeftError,
    invalid_field,
    validation_errors,
)

log = logging.getLogger("weft.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS = {InvalidInput: 400, Forbidden: 403, NotFound: 404, Conflict: 409, IdempotencyKeyReused: 422, Unavailable: 503,
          OutcomeUnknown: 504}
RETRY_AFTER_S = "1"

# The store could not be reached, so nothing was sent or stored: retry later. (An append that may
# have landed never gets here: the store resolves it or raises OutcomeUnknown.)
STORE_UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def json_error(status: int, error: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body = {"error": error, "message": message, "details": details or {}}
    resp = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
    if status == 503:
        resp.headers["Retry-After"] = RETRY_AFTER_S
    return resp


def http_error(err: web.HTTPException) -> web.Response:
    """An aiohttp 4xx exception as `{error, message, details}`, its own headers kept."""
    name = "".join(word.capitalize() for word in (err.reason or "Error").replace("-", " ").split())
    resp = json_error(err.status, name, (err.text or err.reason or "").strip()[:500] or name, {"field": None})
    for key, value in err.headers.items():
        if key.lower() not in ("content-type", "content-length"):
            resp.headers[key] = value
    return resp


def stored_not_folded(project: str, entity: str, entity_id: str, seq: int, *, replayed: bool = False) -> web.Response:
    """202 for a command whose event is in the stream at `seq` but not yet in this replica's view,
    so the usual body cannot be built: the entity id and `seq` to read it with (`min_seq`)."""
    body = {
        "id": entity_id,
        "entity": entity,
        "projectId": project,
        "seq": seq,
        "folded": False,
        "message": f"accepted: stored at seq {seq}; read {entity} {entity_id} with min_seq={seq}",
    }
    resp = json_response(body, 202, seq=seq)
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def validation_response(err: ValidationError) -> web.Response:
    name, message = invalid_field(err)
    return json_error(
        400, "ValidationError", f"{name}: {message}", {"field": name, "validationErrors": validation_errors(err)}
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
        if resp.status == 503 and not resp.prepared and "Retry-After" not in resp.headers:
            resp.headers["Retry-After"] = RETRY_AFTER_S  # /health when degraded, say
        return resp
    except WeftError as err:
        status = next((s for cls, s in STATUS.items() if isinstance(err, cls)), 500)
        return json_error(status, err.error, err.message, err.details)
    except ValidationError as err:
        return validation_response(err)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICES].settings.max_body_bytes
        return json_error(413, "PayloadTooLarge", f"request body exceeds {limit} bytes", {"field": "body", "limit": limit})
    except nats.errors.MaxPayloadError as err:  # refused before sending: nothing was stored
        return json_error(413, "PayloadTooLarge", f"the event would exceed the NATS max payload ({err})",
                          {"field": "body"})
    except web.HTTPNotFound:
        return json_error(404, "NotFound", f"Route not found: {request.method} {request.path}", {"field": "path"})
    except web.HTTPMethodNotAllowed as err:
        resp = json_error(
            405, "MethodNotAllowed", f"{request.method} not allowed on {request.path}",
            {"field": "method", "allowed": sorted(err.allowed_methods)},
        )
        resp.headers["Allow"] = ", ".join(sorted(err.allowed_methods))
        return resp
    except web.HTTPException as err:
        if 400 <= err.status < 500:  # aiohttp's own (a plain GET of /api/ws, say): the JSON error shape too
            return http_error(err)
        if err.status == 503:
            err.headers.setdefault("Retry-After", RETRY_AFTER_S)
        raise
    except STORE_UNREACHABLE as err:
        log.warning("store unavailable: %s", err)
        return json_error(503, "Unavailable", f"event store unavailable ({type(err).__name__}); retry",
                          {"field": None})
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return json_error(500, "InternalError", "internal error; see the server log", {})
