"""/api/dlq: dead-lettered work items (failed after their retries), retry and discard."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from projections.state import Record
from weft.api.common import ctx_of, json_response, parse_body, project_of, read_view, services
from weft.api.pagination import page
from weft.api.schemas import Reason
from weft.api.work import find_item, present


def dlq_item(state: Any, item: Record) -> dict[str, Any]:
    """The original's DLQItem shape: {id, workItem, reason, attempts, failedAt, errors[]}."""
    dl = item["deadLetter"]
    return {
        "id": item["id"],
        "workItem": present(state, item),
        "reason": dl["reason"],
        "attempts": dl["attempts"],
        "failedAt": dl["failedAt"],
        "errors": item["errors"],
    }


async def list_dlq(request: web.Request) -> web.Response:
    project = project_of(request)
    view = await read_view(request, project)
    filters = {"capability": request.query.get("capability"), "boundary": request.query.get("boundary")}
    items = []
    if view is not None:
        for w in view.state.work_in("failed"):
            dl = w["deadLetter"]
            if not dl or dl["discarded"]:
                continue
            if any(v is not None and w[k] != v for k, v in filters.items()):
                continue
            items.append(w)
    items.sort(key=lambda w: (w["deadLetter"]["failedAt"], w["id"]))
    body = page(items, "items", request.query.get("cursor"), request.query.get("limit"), filters)
    body["items"] = [dlq_item(view.state, w) for w in body["items"]] if view else []
    body["projectId"] = project
    return json_response(body, seq=view.state.seq if view else 0)


async def retry(request: web.Request) -> web.Response:
    body = await parse_body(request, Reason)
    view, item = await find_item(request, request.match_info["id"])
    outcome = await services(request).commands.retry_dead_letter(ctx_of(request, view.project), item["id"], body.reason)
    msg = f"work item {item['id']} is pending again"
    return json_response({"success": True, "message": msg, "seq": outcome.seq}, seq=outcome.seq)


async def discard(request: web.Request) -> web.Response:
    body = await parse_body(request, Reason)
    view, item = await find_item(request, request.match_info["id"])
    outcome = await services(request).commands.discard_dead_letter(
        ctx_of(request, view.project), item["id"], body.reason
    )
    msg = f"work item {item['id']} discarded from the dead-letter queue"
    return json_response({"success": True, "message": msg, "seq": outcome.seq}, seq=outcome.seq)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/dlq", list_dlq),
        web.post("/api/dlq/{id}/retry", retry),
        web.post("/api/dlq/{id}/discard", discard),
    ]
