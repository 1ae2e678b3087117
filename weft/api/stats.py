"""/api/stats and /api/stats/projects: the multi-project shape existing clients read, plus extras.

`/api/stats` also carries the flat fields older clients (Shuttle's `stats` table) read, for the
request's project (named, else the default project): `pending`, `active` (assigned + in-progress),
`completed`, `failed` (cancelled included, as the original counts it) and `total`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import web

from projections import ProjectState, state_hash
from projections.state import WORK_STATUSES
from weft.api.common import json_response, project_of, read_view, views_of
from weft.core.routing import visible_in
from weft.stamps import utc_now
from weft.store.readmodel import ProjectView


def project_stats(view: ProjectView) -> dict[str, Any]:
    s = view.state
    c = s.work_counts
    dead = sum(1 for w in s.work_in("failed") if w["deadLetter"] and not w["deadLetter"]["discarded"])
    return {
        "agents": sum(1 for a in s.agents.values() if a["status"] != "offline" and visible_in(a, s.project)),
        "pendingWork": c["pending"],
        "activeWork": c["assigned"] + c["in-progress"],
        "completedWork": c["completed"],
        # The original counts cancelled items as failed; keep that, and add the split.
        "failedWork": c["failed"] + c["cancelled"],
        "cancelledWork": c["cancelled"],
        "deadLetteredWork": dead,
        # Finished items retention took out of the projection (their events stay in the stream).
        "purgedWork": sum(s.purged_counts.values()),
        "targets": len(s.targets),
        "lastActivity": s.last_activity,
        "seq": s.seq,
    }


def _cached(request: web.Request, body: dict[str, Any]) -> web.Response:
    # The ETag covers content, not the timestamp, so an unchanged fleet answers 304.
    content = {k: v for k, v in body.items() if k != "timestamp"}
    etag = '"' + hashlib.md5(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest() + '"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    resp = json_response(body)
    resp.headers.update({"ETag": etag, "Cache-Control": "no-cache"})
    return resp


async def stats(request: web.Request) -> web.Response:
    by_project = {v.project: project_stats(v) for v in await views_of(request)}
    keys = ("agents", "pendingWork", "activeWork", "completedWork", "failedWork", "targets")
    totals = {k: sum(p[k] for p in by_project.values()) for k in keys}
    for extra in ("cancelledWork", "deadLetteredWork", "purgedWork"):  # fields the original lacks
        totals[extra] = sum(p[extra] for p in by_project.values())
    body = {"timestamp": utc_now(), "totalProjects": len(by_project), "totals": totals, "byProject": by_project,
            **await flat_stats(request)}
    return _cached(request, body)


async def flat_stats(request: web.Request) -> dict[str, Any]:
    """The single-project fields of older clients, for the request's project (zeros if unknown)."""
    project = project_of(request)
    view = await read_view(request, project)
    c = view.state.work_counts if view else dict.fromkeys(WORK_STATUSES, 0)
    return {
        "projectId": project,
        "pending": c["pending"],
        "active": c["assigned"] + c["in-progress"],
        "completed": c["completed"],
        "failed": c["failed"] + c["cancelled"],
        "total": sum(c.values()),
    }


async def projects(request: web.Request) -> web.Response:
    views = await views_of(request)
    body = {
        "timestamp": utc_now(),
        "projects": [v.project for v in views],
        "count": len(views),
        "details": [{"projectId": v.project, **project_stats(v)} for v in views],
    }
    return _cached(request, body)


async def projection(request: web.Request) -> web.Response:
    """The fold's identity on this replica: equal `stateHash` at equal `seq` on every replica."""
    project = project_of(request)
    view = await read_view(request, project)
    state = view.state if view else ProjectState(project=project)
    return json_response(
        {"projectId": project, "seq": state.seq, "stateHash": state_hash(state), "eventsApplied": state.events_applied,
         "epoch": state.epoch, "leader": state.leader}
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/stats", stats),
        web.get("/api/stats/projects", projects),
        web.get("/api/stats/projection", projection),
    ]
