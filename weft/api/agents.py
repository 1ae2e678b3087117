"""/api/agents: list (across projects unless filtered), get, shutdown, shutdown-batch."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from projections.state import Record
from weft.api.common import (
    all_views,
    ctx_of,
    explicit_project,
    json_response,
    parse_body,
    project_of,
    read_view,
    services,
)
from weft.api.pagination import page
from weft.api.schemas import Shutdown, ShutdownBatch
from weft.api.work import batch_body
from weft.errors import InvalidInput, NotFound
from weft.replica import ProjectView

AGENT_STATUSES = ("online", "busy", "offline")


async def _views(request: web.Request) -> list[ProjectView]:
    named = explicit_project(request)
    if named is None:
        return await all_views(request)
    view = await read_view(request, named)
    return [view] if view else []


async def list_agents(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status")
    if status is not None and status not in AGENT_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(AGENT_STATUSES)}", field="status")
    filters = {
        "type": q.get("type") or q.get("agentType"),
        "status": status,
        "capability": q.get("capability"),
        "boundary": q.get("boundary"),
        "projectId": explicit_project(request),
    }
    agents: list[Record] = []
    for view in await _views(request):
        for a in view.state.agents.values():
            if filters["type"] and a["agentType"] != filters["type"]:
                continue
            if status and a["status"] != status:
                continue
            if filters["capability"] and (filters["capability"] not in a["capabilities"] or a["status"] == "offline"):
                continue
            if filters["boundary"] and filters["boundary"] not in a["boundaries"]:
                continue
            agents.append(a)
    agents.sort(key=lambda a: (a["projectId"], a["registeredAt"], a["guid"]))
    return json_response(page(agents, "agents", q.get("cursor"), q.get("limit"), filters))


async def find_agent(request: web.Request, guid: str) -> tuple[ProjectView, Record]:
    for view in await _views(request):
        agent = view.state.agents.get(guid)
        if agent is not None:
            return view, agent
    raise NotFound(f"agent {guid} not found", field="guid")


async def get_agent(request: web.Request) -> web.Response:
    view, agent = await find_agent(request, request.match_info["guid"])
    return json_response(agent, seq=view.state.seq)


async def shutdown(request: web.Request) -> web.Response:
    body = await parse_body(request, Shutdown)
    view, agent = await find_agent(request, request.match_info["guid"])
    ctx = ctx_of(request, view.project)
    outcome = await services(request).commands.request_shutdown(
        ctx, agent["guid"], body.graceful, body.reason, body.gracePeriodMs
    )
    kind = "graceful" if body.graceful else "forced"
    return json_response(
        {"success": True, "message": f"{kind} shutdown requested for {agent['guid']}", "graceful": body.graceful,
         "seq": outcome.seq},
        seq=outcome.seq,
    )


async def shutdown_batch(request: web.Request) -> web.Response:
    project = project_of(request)
    body = await parse_body(request, ShutdownBatch)
    ctx = ctx_of(request, project)
    flt = body.filter.model_dump() if body.filter else None
    outcome = await services(request).commands.shutdown_batch(
        ctx, body.agentGuids, flt, body.graceful, body.reason, body.gracePeriodMs
    )
    extra: dict[str, Any] = {"shutdownAgents": outcome.succeeded, "graceful": body.graceful}
    return json_response(batch_body(outcome, extra), seq=outcome.seq)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/agents", list_agents),
        web.post("/api/agents/shutdown-batch", shutdown_batch),
        web.get("/api/agents/{guid}", get_agent),
        web.post("/api/agents/{guid}/shutdown", shutdown),
    ]
