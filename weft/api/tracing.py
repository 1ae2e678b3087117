"""The HTTP middleware that opens a server span per request (weft.tracing), installed only when
tracing is on.

The span is named by method and route template (`POST /api/work`, `GET /api/work/{id}`), never by
the raw path; the command's `decide`, `append` and `fold` spans are its children. The project and
correlation id are those the handler settled on (`weft.api.common.project_of` and `ctx_of`), read
back from the logging context after it ran. A caller's W3C `traceparent` makes the span its child.
"""

from __future__ import annotations

from aiohttp import web

from weft.api.common import SERVICES
from weft.api.errors import Handler
from weft.api.metrics import route_template
from weft.logs import correlation_var, project_var
from weft.tracing import SpanKind, failed


@web.middleware
async def http_tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = route_template(request)
    # This request's own values, not those a previous request on the connection left behind.
    project_var.set(None)
    correlation_var.set(None)
    answer: web.HTTPException | None = None  # aiohttp's way to answer (a redirect, say): no failure
    with request.app[SERVICES].tracing.span(
        f"{request.method} {route}", {"http.request.method": request.method, "http.route": route},
        kind=SpanKind.SERVER, headers=request.headers,
    ) as span:
        status = 500  # anything else raised: recorded on the span as its error
        try:
            resp = await handler(request)
            status = resp.status
        except web.HTTPException as err:
            answer, status = err, err.status
        finally:
            span.set_attributes({
                "http.response.status_code": status,
                **{k: v for k, v in (("weft.project", project_var.get()),
                                     ("weft.correlation_id", correlation_var.get())) if v is not None},
            })
            if status >= 500:
                failed(span, f"HTTP {status}")
    if answer is not None:
        raise answer
    return resp
