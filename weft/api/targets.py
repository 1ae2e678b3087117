"""/api/targets: register, list, get/update/remove, test, spin-up, enable/disable, disable-batch.

A target is answered with `config` in the shape it was registered in (flat, as the Shuttle CLI
sends it, or nested, as the original's clients do) and the normalised nested form weft's
mechanisms run in `normalizedConfig`. Both hold only references for secrets (a literal secret
is refused at registration).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from projections.state import Record
from weft.api.common import ctx_of, json_response, parse_body, project_of, read_json, read_view, services
from weft.api.errors import stored_not_folded
from weft.api.pagination import page
from weft.api.schemas import DisableBatch, Reason, SpinUpRequest
from weft.api.work import batch_body
from weft.commands import find_target
from weft.core.credentials import redact_credentials
from weft.core.errors import Conflict, NotFound
from weft.core.limits import ENV as LIMIT_ENV
from weft.runtime.probes import probe_target
from weft.stamps import utc_now


def present(t: Record) -> dict[str, Any]:
    """A target as answered. Literal credentials are refused at registration; a stream written
    before that rule may still hold some, so they are masked here too."""
    out = dict(t)
    out["activeSpinUps"] = list(t["activeSpinUps"].values())
    registered = out.pop("registeredConfig", None)  # absent on targets registered before it was kept
    out["normalizedConfig"] = t["config"]
    out["config"] = registered if isinstance(registered, dict) else t["config"]
    for name in ("config", "normalizedConfig", "healthCheck", "description", "tags", "lastError"):
        if name in out:
            out[name] = redact_credentials(out[name])
    return out


async def _target(request: web.Request) -> tuple[str, Record]:
    project = project_of(request)
    view = await read_view(request, project)
    key = request.match_info["idOrName"]
    t = find_target(view.state, key) if view else None
    if t is None:
        raise NotFound(f"target {key} not found", field="idOrName")
    return project, t


def check_limits(request: web.Request, body: Any) -> None:
    limits = services(request).settings.limits
    if not isinstance(body, dict):
        return  # the target validation names what is wrong with it
    for name in ("capabilities", "boundaries", "tags"):
        if isinstance(body.get(name), list):
            limits.check_items(name, body[name])
    if isinstance(body.get("description"), str):
        limits.check_chars("description", body["description"], limits.description_chars,
                           LIMIT_ENV["description_chars"])


async def register(request: web.Request) -> web.Response:
    project = project_of(request)
    body = await read_json(request)
    check_limits(request, body)
    ctx = ctx_of(request, project)
    limit = services(request).settings.limits.targets_per_project
    view = await services(request).readmodel.view(project)
    if view is not None and len(view.state.targets) >= limit and not (
            isinstance(body, dict) and find_target(view.state, str(body.get("name"))) is not None):
        # Checked against this replica's projection: two replicas registering at once may pass one more.
        raise Conflict(f"project {project} has {len(view.state.targets)} targets; at most {limit} "
                       f"(limit {LIMIT_ENV['targets_per_project']})", field="name",
                       details={"limit": limit, "setting": LIMIT_ENV["targets_per_project"]})
    outcome = await services(request).commands.register_target(ctx, body)
    if not outcome.folded:
        return stored_not_folded(project, "target", outcome.entity_id, outcome.seq, replayed=not outcome.created)
    t = services(request).readmodel.views[project].state.targets[outcome.entity_id]
    return json_response(present(t), 201 if outcome.created else 200, outcome.seq)


async def list_targets(request: web.Request) -> web.Response:
    project = project_of(request)
    q = request.query
    filters = {
        "type": q.get("type") or q.get("agentType"),
        "status": q.get("status"),
        "capability": q.get("capability"),
        "boundary": q.get("boundary") or q.get("classification"),
        "mechanism": q.get("mechanism"),
    }
    view = await read_view(request, project)
    targets = []
    for t in (view.state.targets.values() if view else []):
        if filters["type"] and t["agentType"] != filters["type"]:
            continue
        if filters["status"] and t["status"] != filters["status"]:
            continue
        if filters["mechanism"] and t["mechanism"] != filters["mechanism"]:
            continue
        if filters["capability"] and filters["capability"] not in t["capabilities"]:
            continue
        if filters["boundary"] and filters["boundary"] not in t["boundaries"]:
            continue
        targets.append(present(t))
    targets.sort(key=lambda t: (t["name"], t["id"]))
    body = page(targets, "targets", q.get("cursor"), q.get("limit"), filters)
    return json_response(body, seq=view.state.seq if view else 0)


async def get_target(request: web.Request) -> web.Response:
    _, t = await _target(request)
    return json_response(present(t))


async def update(request: web.Request) -> web.Response:
    project, t = await _target(request)
    body = await read_json(request)
    check_limits(request, body)
    outcome = await services(request).commands.update_target(ctx_of(request, project), t["id"], body)
    if not outcome.folded:
        return stored_not_folded(project, "target", t["id"], outcome.seq)
    fresh = services(request).readmodel.views[project].state.targets[t["id"]]
    return json_response(present(fresh), seq=outcome.seq)


async def remove(request: web.Request) -> web.Response:
    project, t = await _target(request)
    outcome = await services(request).commands.remove_target(ctx_of(request, project), t["id"])
    msg = f"target {t['name']} removed"
    return json_response({"success": True, "message": msg, "seq": outcome.seq}, seq=outcome.seq)


async def set_enabled(request: web.Request, enabled: bool) -> web.Response:
    project, t = await _target(request)
    body = await parse_body(request, Reason)
    outcome = await services(request).commands.set_target_enabled(ctx_of(request, project), t["id"], enabled, body.reason)
    word = "enabled" if enabled else "disabled"
    msg = f"target {t['name']} {'was already ' if outcome.noop else ''}{word}"
    return json_response({"success": True, "message": msg, "seq": outcome.seq}, seq=outcome.seq)


async def enable(request: web.Request) -> web.Response:
    return await set_enabled(request, True)


async def disable(request: web.Request) -> web.Response:
    return await set_enabled(request, False)


async def test(request: web.Request) -> web.Response:
    """Run the mechanism's real probe now and record a health change as an event."""
    project, t = await _target(request)
    svc = services(request)
    result = await probe_target(t, svc.mechanisms, project, svc.commands.spinup_policy.current())
    outcome = await services(request).commands.record_health(
        ctx_of(request, project), t["id"], result.status, result.latency_ms, result.error
    )
    return json_response(
        {
            "targetId": t["id"],
            "targetName": t["name"],
            "healthy": result.status == "healthy",
            "healthStatus": result.status,
            "latencyMs": result.latency_ms,
            "error": result.error,
            "checkedAt": result.checked_at,
            "seq": outcome.seq,
        },
        seq=outcome.seq,
    )


async def spin_up(request: web.Request) -> web.Response:
    """The original's SpinUpResult (`success`, `targetId`, `targetName`, `timestamp`) plus the
    tracked operation (`operationId`, `status: in-progress`) and weft's spin-up id and `seq`. The
    launch runs on the project's scheduler; the spin-up succeeds when the agent registers
    (`GET /api/targets/{idOrName}`: `activeSpinUps`, then `lastSpinUp`). A refused one is a 4xx:
    404 unknown target, 409 target not available or at its `maxConcurrentAgents`."""
    project, t = await _target(request)
    body = await parse_body(request, SpinUpRequest)
    outcome, spin_up_id = await services(request).commands.request_spin_up(
        ctx_of(request, project), t["id"], body.workItemId, "manual"
    )
    return json_response(
        {"success": True, "triggered": True, "status": "in-progress", "operationId": spin_up_id,
         "spinUpId": spin_up_id, "targetId": t["id"], "targetName": t["name"], "workItemId": body.workItemId,
         "timestamp": utc_now(), "seq": outcome.seq},
        200,
        outcome.seq,
    )


async def disable_batch(request: web.Request) -> web.Response:
    project = project_of(request)
    body = await parse_body(request, DisableBatch)
    services(request).settings.limits.check_items("targetIds", body.targetIds)
    ctx = ctx_of(request, project)
    flt = body.filter.model_dump() if body.filter else None
    outcome = await services(request).commands.disable_batch(ctx, body.targetIds, flt, body.reason)
    extra = {"disabledTargets": outcome.succeeded, "alreadyDisabled": outcome.skipped}
    return json_response(batch_body(outcome, extra), seq=outcome.seq)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/targets", list_targets),
        web.post("/api/targets", register),
        web.post("/api/targets/disable-batch", disable_batch),
        web.get("/api/targets/{idOrName}", get_target),
        web.put("/api/targets/{idOrName}", update),
        web.delete("/api/targets/{idOrName}", remove),
        web.post("/api/targets/{idOrName}/test", test),
        web.post("/api/targets/{idOrName}/spin-up", spin_up),
        web.post("/api/targets/{idOrName}/enable", enable),
        web.post("/api/targets/{idOrName}/disable", disable),
    ]
