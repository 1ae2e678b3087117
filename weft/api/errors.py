"""The one place that turns failures into HTTP: `{error, message, details}` with the offending field."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import orjson
from aiohttp import web
from pydantic import ValidationError

from weft.api.common import SERVICES
from weft.errors import Conflict, InvalidInput, NotFound, Unavailable, WeftError, field_of

log = logging.getLogger("weft.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS = {InvalidInput: 400, NotFound: 404, Conflict: 409, Unavailable: 503}


def json_error(status: int, error: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body = {"error": error, "message": message, "details": details or {}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def validation_response(err: ValidationError) -> web.Response:
    errors = []
    for e in err.errors(include_url=False):
        name = "body" if e["type"] == "json_invalid" else field_of(tuple(e["loc"]))
        errors.append({"field": name, "message": e["msg"], "code": e["type"]})
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    return json_error(
        400,
        "ValidationError",
        f"{first['field']}: {first['message']}",
        {"field": first["field"], "validationErrors": errors},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WeftError as err:
        status = next((s for cls, s in STATUS.items() if isinstance(err, cls)), 500)
        resp = json_error(status, err.error, err.message, err.details)
        if status == 503:
            resp.headers["Retry-After"] = "1"
        return resp
    except ValidationError as err:
        return validation_response(err)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICES].settings.max_body_bytes
        return json_error(413, "PayloadTooLarge", f"request body exceeds {limit} bytes", {"field": "body", "limit": limit})
    except web.HTTPNotFound:
        return json_error(404, "NotFound", f"Route not found: {request.method} {request.path}", {"field": "path"})
    except web.HTTPMethodNotAllowed as err:
        return json_error(
            405, "MethodNotAllowed", f"{request.method} not allowed on {request.path}",
            {"field": "method", "allowed": sorted(err.allowed_methods)},
        )
    except web.HTTPException:
        raise
    except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as err:
        log.warning("store unavailable: %s", err)
        return json_error(503, "Unavailable", "event store unavailable; retry", {"field": None})
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return json_error(500, "InternalError", "internal error; see the server log", {})
