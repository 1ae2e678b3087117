"""/api/agents: list (across projects unless filtered), get, shutdown, shutdown-batch.

Warp's visibility rules decide what a request sees (`weft.core.routing.visible_in`): a request for a
project sees that project's project-only agents and every project's public agents; a request that
names no project sees every project's agents but the private and user-only ones, which no REST
client can see (a REST request is neither the agent itself nor a user). A Warp agent is shown with
the `lastHeartbeat` its registry entry holds, read when it is shown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from nats.js.kv import KeyValue

from projections.state import AGENT_STATUSES, Record
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
from weft.core.errors import InvalidInput, NotFound
from weft.core.routing import HIDDEN_VISIBILITIES, visible_in
from weft.runtime.warp_bridge import REGISTRY_BUCKET
from weft.store.readmodel import ProjectView

log = logging.getLogger("weft.api.agents")

HEARTBEAT_READ_TIMEOUT_S = 2.0


async def visible_agents(request: web.Request, *, foreign_public: bool = True) -> list[tuple[ProjectView, Record]]:
    """(view, agent) for every agent the request may see; with `foreign_public`, other projects'
    public agents are included for a request that names a project."""
    named = explicit_project(request)
    out: list[tuple[ProjectView, Record]] = []
    if named is None:
        for view in all_views(request):
            out += [(view, a) for a in view.state.agents.values() if a.get("visibility") not in HIDDEN_VISIBILITIES]
        return out
    own = await read_view(request, named)
    seen: set[str] = set()
    if own is not None:
        for a in own.state.agents.values():
            if visible_in(a, named):
                out.append((own, a))
                seen.add(a["guid"])
    if foreign_public:
        for view in all_views(request):
            if view.project == named:
                continue
            for a in view.state.agents.values():
                if a["guid"] not in seen and a.get("visibility") == "public":
                    out.append((view, a))
                    seen.add(a["guid"])
    return out


async def _warp_heartbeat(js: Any, guid: str) -> str | None:
    """The `lastHeartbeat` of a Warp agent's registry entry, or None when it cannot be read now."""
    kv = KeyValue(name=REGISTRY_BUCKET, stream=f"KV_{REGISTRY_BUCKET}", pre=f"$KV.{REGISTRY_BUCKET}.", js=js,
                  direct=False)
    try:
        entry = await asyncio.wait_for(kv.get(guid, validate_keys=False), HEARTBEAT_READ_TIMEOUT_S)
        body = orjson.loads(entry.value or b"{}")
    except Exception as err:  # gone, bucket absent, NATS busy, garbage: the agent is shown without it
        log.debug("warp heartbeat of %s not read: %s", guid, err)
        return None
    beat = body.get("lastHeartbeat") if isinstance(body, dict) else None
    return beat if isinstance(beat, str) else None


async def present_agents(request: web.Request, agents: list[Record]) -> list[dict[str, Any]]:
    """Agents as answered: Warp agents with their registry entry's own `lastHeartbeat`."""
    js = services(request).readmodel.store.js
    connected = bool(getattr(getattr(js, "_nc", None), "is_connected", False))
    # Without NATS the projection still answers, promptly: Warp agents then lack only the heartbeat.
    warp = [a for a in agents if a.get("source") == "warp"] if connected else []
    beats = await asyncio.gather(*(_warp_heartbeat(js, a["guid"]) for a in warp))
    by_guid = {a["guid"]: beat for a, beat in zip(warp, beats, strict=True)}
    out = []
    for a in agents:
        shown = dict(a)
        if a.get("source") == "warp":
            shown["lastHeartbeat"] = by_guid.get(a["guid"])
        out.append(shown)
    return out


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
    for _view, a in await visible_agents(request):
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
    body = page(agents, "agents", q.get("cursor"), q.get("limit"), filters)
    body["agents"] = await present_agents(request, body["agents"])
    return json_response(body)


async def find_agent(request: web.Request, guid: str, *, foreign_public: bool = True) -> tuple[ProjectView, Record]:
    """The agent as the request may see it (`visible_agents`); shutdown passes `foreign_public=False`:
    seeing another project's public agent does not make it this project's to stop."""
    for view, agent in await visible_agents(request, foreign_public=foreign_public):
        if agent["guid"] == guid:
            return view, agent
    raise NotFound(f"agent {guid} not found", field="guid")


async def get_agent(request: web.Request) -> web.Response:
    view, agent = await find_agent(request, request.match_info["guid"])
    [shown] = await present_agents(request, [agent])
    return json_response(shown, seq=view.state.seq)


async def shutdown(request: web.Request) -> web.Response:
    body = await parse_body(request, Shutdown)
    view, agent = await find_agent(request, request.match_info["guid"], foreign_public=False)
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
    services(request).settings.limits.check_items("agentGuids", body.agentGuids)
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
