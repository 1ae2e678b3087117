"""/api/work: submit, list, get, cancel, cancel-batch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from projections.state import WORK_STATUSES, ProjectState, Record
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
from weft.api.errors import stored_not_folded
from weft.api.pagination import page
from weft.api.schemas import CancelBatch, Reason, WorkSubmit
from weft.commands import Ctx
from weft.core import protocol
from weft.core.errors import InvalidInput, NotFound
from weft.core.fleet_policy import plan_spin_ups, spinning_up
from weft.core.limits import ENV as LIMIT_ENV
from weft.core.routing import plan_assignments, reason_for_new_item, reported_agent_type
from weft.stamps import utc_now
from weft.store.readmodel import ProjectView


def agent_summary(state: ProjectState, guid: str | None) -> dict[str, Any] | None:
    agent = state.agents.get(guid) if guid else None
    if agent is None:
        return None
    return {"guid": agent["guid"], "handle": agent["handle"], "agentType": agent["agentType"], "hostname": agent["hostname"]}


def present(state: ProjectState, item: Record, waiting: dict[str, str] | None = None) -> dict[str, Any]:
    out = dict(item)
    out["assignedToAgent"] = agent_summary(state, item["assignedTo"])
    out["waitingReason"] = (waiting or {}).get(item["id"]) if item["status"] == "pending" else None
    return out


def waiting_reasons(request: web.Request, view: ProjectView | None) -> dict[str, str]:
    """Why each pending item waits: the routing plan of the current state (cached per seq and second)."""
    if view is None:
        return {}
    svc = services(request)
    now = datetime.now(UTC)
    key = (view.state.seq, int(now.timestamp()))
    hit = svc.plan_cache.get(view.project)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = plan_assignments(view.state, svc.policy, now, spinning_up(view.state))
    reasons = dict(plan.waiting)
    for work_id, why_not in plan_spin_ups(view.state, plan, svc.policy, now).blocked.items():
        reasons[work_id] = f"{reasons[work_id]}; no spin-up: {why_not}"
    svc.plan_cache[view.project] = (key, reasons)
    return reasons


async def submit(request: web.Request) -> web.Response:
    project = project_of(request)
    spec = await parse_body(request, WorkSubmit)
    ctx = ctx_of(request, project)
    limits = services(request).settings.limits
    limits.check_chars("description", spec.description, limits.description_chars, LIMIT_ENV["description_chars"])
    limits.check_chars("taskId", spec.taskId, limits.id_chars, LIMIT_ENV["id_chars"])
    limits.check_context(spec.contextData)
    policy = services(request).policy
    rule = policy.rule_for(spec.boundary)
    if spec.requiredAgentType and not rule.allows(spec.requiredAgentType):
        raise InvalidInput(
            f"requiredAgentType {spec.requiredAgentType} can never run: {rule.excluded_reason()}",
            field="requiredAgentType",
        )
    data = spec.model_dump(mode="json")
    outcome = await services(request).commands.submit_work(ctx, data)
    if not outcome.folded:
        return stored_not_folded(project, "work", outcome.entity_id, outcome.seq, replayed=not outcome.created)
    view = services(request).readmodel.views[project]
    item = view.state.work[outcome.entity_id]
    reason = reason_for_new_item(view.state, item, policy, datetime.now(UTC)) if item["status"] == "pending" else None
    body = {
        "id": item["id"],
        "workItemId": item["id"],
        "taskId": item["taskId"],
        "status": item["status"],
        "projectId": project,
        "targetAgentType": reported_agent_type(view.state, item, policy),
        "spinUpTriggered": False,
        "estimatedWaitSeconds": 5 if reason is None or reason == "all eligible agents busy" else None,
        "waitingReason": reason,
        "seq": outcome.seq,
    }
    resp = json_response(body, 201 if outcome.created else 200, outcome.seq)
    if not outcome.created:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _work_filters(request: web.Request) -> dict[str, Any]:
    q = request.query
    status = q.get("status")
    if status is not None and status not in WORK_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(WORK_STATUSES)}", field="status")
    return {
        "status": status,
        "boundary": q.get("boundary") or q.get("classification"),
        "capability": q.get("capability"),
        "assignedTo": q.get("assignedTo"),
    }


async def list_work(request: web.Request) -> web.Response:
    project = project_of(request)
    filters = _work_filters(request)
    view = await read_view(request, project)
    state = view.state if view else ProjectState(project=project)
    work = state.work
    # One status's items through the fold's index. The order comes from keys the table holds
    # without decoding, so a page of a long list decodes only the page; the other filters must
    # look at each candidate.
    ids = list(state.work_by_status[filters["status"]]) if filters["status"] else list(work)
    others = [(k, v) for k, v in filters.items() if k != "status" and v is not None]
    if others:
        ids = [wid for wid in ids if all(work[wid][k] == v for k, v in others)]
    body = page(ids, "workItems", request.query.get("cursor"), request.query.get("limit"), filters, order=work.list_key)
    waiting = waiting_reasons(request, view)
    body["workItems"] = [present(state, work.peek(wid), waiting) for wid in body["workItems"]]
    body["projectId"] = project
    resp = json_response(body, seq=state.seq)
    if "classification" in request.query:
        resp.headers["X-Deprecated-Param"] = "classification: use boundary"
    return resp


async def find_item(request: web.Request, work_id: str) -> tuple[ProjectView, Record]:
    """The item in the named project; without one named, search every project (as the original)."""
    named = explicit_project(request)
    if named is not None:
        view = await read_view(request, named)
        if view is not None and work_id in view.state.work:
            return view, view.state.work[work_id]
    else:
        default_view = await read_view(request, project_of(request))
        candidates = [default_view] if default_view else []
        candidates += [v for v in all_views(request) if v is not default_view]
        for view in candidates:
            if work_id in view.state.work:
                return view, view.state.work[work_id]
    raise NotFound(f"work item {work_id} not found", field="id")


async def get_work(request: web.Request) -> web.Response:
    view, item = await find_item(request, request.match_info["id"])
    return json_response(present(view.state, item, waiting_reasons(request, view)), seq=view.state.seq)


async def cancel(request: web.Request) -> web.Response:
    """200 with the item; again 200 (no event) if it was cancelled already; 409 if it completed or
    failed (it was not cancelled: answering success would be a lie)."""
    body = await parse_body(request, Reason)
    view, item = await find_item(request, request.match_info["id"])
    ctx = ctx_of(request, view.project)
    outcome = await services(request).commands.cancel_work(ctx, item["id"], body.reason)
    fresh = view.state.work.get(item["id"]) or item
    msg = f"work item {item['id']} {'was already ' if outcome.noop else ''}cancelled"
    return json_response(
        {"success": True, "message": msg, "id": item["id"], "alreadyCancelled": outcome.noop,
         "workItem": present(view.state, fresh), "seq": outcome.seq},
        seq=outcome.seq,
    )


def batch_body(outcome: Any, extra: dict[str, Any]) -> dict[str, Any]:
    processed = len(outcome.succeeded) + len(outcome.failed) + len(outcome.skipped)
    return {
        "success": outcome.succeeded,
        "failed": outcome.failed,
        "count": len(outcome.succeeded),
        "errors": outcome.errors,
        "completedAt": utc_now(),
        "totalProcessed": processed,
        "successRate": (len(outcome.succeeded) / processed) if processed else 1.0,
        "seq": outcome.seq,
        **extra,
    }


async def cancel_batch(request: web.Request) -> web.Response:
    project = project_of(request)
    body = await parse_body(request, CancelBatch)
    services(request).settings.limits.check_items("workItemIds", body.workItemIds)
    ctx = ctx_of(request, project)
    flt = body.filter.model_dump() if body.filter else None
    outcome = await services(request).commands.cancel_batch(ctx, body.workItemIds, flt, body.reason, body.reassign)
    cancelled = [i for i in outcome.succeeded if i not in outcome.moved]
    extra = {"cancelledItems": cancelled, "reassignedItems": outcome.moved, "notCancellable": outcome.skipped}
    return json_response(batch_body(outcome, extra), seq=outcome.seq)


async def accept(request: web.Request) -> web.Response:
    body = await parse_body(request, protocol.RestAccept)
    view, item = await find_item(request, request.match_info["id"])
    outcome = await services(request).commands.accept_work(
        _agent_ctx(request, view, body.guid), item["id"], body.guid, attempt=body.attempt
    )
    return json_response({"success": True, "seq": outcome.seq}, seq=outcome.seq)


async def progress(request: web.Request) -> web.Response:
    body = await parse_body(request, protocol.RestProgress)
    view, item = await find_item(request, request.match_info["id"])
    outcome = await services(request).commands.progress_work(
        _agent_ctx(request, view, body.guid), item["id"], body.guid, body.progress, body.message, attempt=body.attempt
    )
    return json_response({"success": True, "seq": outcome.seq}, seq=outcome.seq)


async def complete(request: web.Request) -> web.Response:
    body = await parse_body(request, protocol.RestComplete)
    view, item = await find_item(request, request.match_info["id"])
    outcome = await services(request).commands.complete_work(
        _agent_ctx(request, view, body.guid),
        item["id"],
        body.guid,
        body.summary,
        body.output,
        body.artifacts,
        attempt=body.attempt,
    )
    return json_response({"success": True, "seq": outcome.seq}, seq=outcome.seq)


async def fail(request: web.Request) -> web.Response:
    body = await parse_body(request, protocol.RestFail)
    view, item = await find_item(request, request.match_info["id"])
    svc = services(request)
    outcome = await svc.commands.fail_work(
        _agent_ctx(request, view, body.guid),
        item["id"],
        body.guid,
        body.message,
        body.code,
        body.recoverable,
        svc.retry,
        attempt=body.attempt,
    )
    if not outcome.folded:
        return stored_not_folded(view.project, "work", item["id"], outcome.seq)
    fresh = view.state.work[item["id"]]
    result = "retry" if fresh["status"] == "pending" else "dead-letter"
    return json_response({"success": True, "outcome": result, "retryAt": fresh["retryAt"], "seq": outcome.seq},
                         seq=outcome.seq)


def _agent_ctx(request: web.Request, view: ProjectView, guid: str) -> Ctx:
    ctx = ctx_of(request, view.project)
    return Ctx(project=ctx.project, actor=f"agent:{guid}", correlation_id=ctx.correlation_id)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/work/{id}/accept", accept),
        web.post("/api/work/{id}/progress", progress),
        web.post("/api/work/{id}/complete", complete),
        web.post("/api/work/{id}/fail", fail),
        web.get("/api/work", list_work),
        web.post("/api/work", submit),
        web.post("/api/work/cancel-batch", cancel_batch),
        web.get("/api/work/{id}", get_work),
        web.post("/api/work/{id}/cancel", cancel),
    ]
