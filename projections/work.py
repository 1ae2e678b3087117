"""Fold of `work.*` events into the work queue, keeping agent load in step with assignments.

Transition guards make the fold total: an event that cannot apply to the item's current status is
ignored (the command layer validated it against an older view and OCC should have stopped it; the
fold never lets such an event break an invariant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from projections.agents import mark_unresponsive, seen
from projections.events import Event
from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK, ProjectState, Record, pending_key

# `cause` of a `work.requeued` / `work.dead_lettered` that withdrew an assignment its agent did not
# accept in time: the agent is marked unresponsive (`projections.agents.mark_unresponsive`).
ACCEPT_TIMEOUT = "accept-timeout"


def new_work(ev: Event) -> Record:
    """A pending work item in the original Weft's REST shape, plus weft's lifecycle fields."""
    d = ev.data
    return {
        "id": ev.entity_id,
        "taskId": d["taskId"],
        "capability": d["capability"],
        "description": d["description"],
        "priority": d["priority"],
        "boundary": d["boundary"],
        "preferredAgentType": d.get("preferredAgentType"),
        "requiredAgentType": d.get("requiredAgentType"),
        "deadline": d.get("deadline"),
        "contextData": d.get("contextData"),
        "status": "pending",
        "offeredBy": ev.actor,
        "offeredAt": ev.ts,
        "attempts": 0,
        "maxAttempts": d.get("maxAttempts", 3),
        "assignedTo": None,
        "assignedAt": None,
        # The stream sequence of the live assignment's `work.assigned`: every (re)assignment of the
        # item gets a higher one (attempts do not: a DLQ retry resets them), so agents hand it to
        # their commands as the fencing token of the run.
        "assignedSeq": None,
        "acceptBy": None,
        "startedAt": None,
        "progress": 0,
        "progressMessage": None,
        "result": None,
        "error": None,
        "errors": [],
        "deadLetter": None,
        "retryAt": None,
        "completedAt": None,
        "cancelledAt": None,
        "updatedAt": ev.ts,
        "projectId": ev.project,
        "correlationId": ev.correlation_id,
    }


def set_status(state: ProjectState, item: Record, status: str) -> None:
    """The one place an item changes status: counts and the status index move with it."""
    old = item["status"]
    if state.pending_keys is not None and (old == "pending") != (status == "pending"):
        key = pending_key(item)
        n = state.pending_keys.get(key, 0) + (1 if status == "pending" else -1)
        if n > 0:
            state.pending_keys[key] = n
        else:
            state.pending_keys.pop(key, None)
    state.work_counts[old] -= 1
    state.work_counts[status] += 1
    state.work_by_status[old].pop(item["id"], None)
    state.work_by_status[status][item["id"]] = None
    item["status"] = status


def release_agent(state: ProjectState, item: Record, ts: str) -> None:
    """Free the agent slot an item held, if any."""
    guid = item.get("assignedTo")
    agent = state.agents.get(guid) if guid else None
    if agent is not None and item["id"] in agent["currentTasks"]:
        agent["currentTasks"].remove(item["id"])
        agent["currentTaskCount"] = len(agent["currentTasks"])
        agent["lastActivity"] = ts
        if agent["status"] == "busy":
            agent["status"] = "online"


def _submitted(state: ProjectState, item: Record | None, ev: Event) -> bool:
    if item is not None:
        return False
    state.work[ev.entity_id] = item = new_work(ev)
    if state.pending_keys is not None:
        key = pending_key(item)
        state.pending_keys[key] = state.pending_keys.get(key, 0) + 1
    state.work_counts["pending"] += 1
    state.work_by_status["pending"][ev.entity_id] = None
    return True


def _assigned(state: ProjectState, item: Record, ev: Event) -> bool:
    agent = state.agents.get(ev.data["agentGuid"])
    # An agent lost or deregistered after the decision (another subject, so OCC cannot catch it)
    # gets nothing: the item stays pending for the next decision.
    if item["status"] != "pending" or agent is None or agent["status"] == "offline":
        return False
    if len(agent["currentTasks"]) >= agent["maxConcurrentTasks"]:
        return False
    set_status(state, item, "assigned")
    item.update(
        assignedTo=agent["guid"],
        assignedAt=ev.ts,
        assignedSeq=ev.seq,
        acceptBy=ev.data.get("acceptBy"),
        attempts=ev.data.get("attempt", item["attempts"] + 1),
        retryAt=None,
        progress=0,
        progressMessage=None,
    )
    agent["currentTasks"].append(item["id"])
    agent["currentTaskCount"] = len(agent["currentTasks"])
    agent["lastActivity"] = ev.ts
    if agent["currentTaskCount"] >= agent["maxConcurrentTasks"]:
        agent["status"] = "busy"
    return True


def _holder_matches(item: Record, ev: Event) -> bool:
    guid = ev.data.get("agentGuid")
    return guid is None or guid == item["assignedTo"]


def _heard_from_holder(state: ProjectState, item: Record, ev: Event) -> None:
    """The holder itself reported on the item (accept, progress, result): a sign of life."""
    guid = ev.data.get("agentGuid")
    agent = state.agents.get(guid) if guid and guid == item["assignedTo"] else None
    if agent is not None:
        seen(agent, ev.ts)


def _started(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] != "assigned" or not _holder_matches(item, ev):
        return False
    set_status(state, item, "in-progress")
    item.update(startedAt=ev.ts, acceptBy=None)
    _heard_from_holder(state, item, ev)
    return True


def _progressed(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] not in LIVE_ASSIGNMENT or not _holder_matches(item, ev):
        return False
    if item["status"] == "assigned":
        set_status(state, item, "in-progress")
        item.update(startedAt=ev.ts, acceptBy=None)
    item.update(progress=max(0, min(100, int(ev.data["progress"]))), progressMessage=ev.data.get("message"))
    _touch_agent(state, item, ev.ts)
    _heard_from_holder(state, item, ev)
    return True


def _touch_agent(state: ProjectState, item: Record, ts: str) -> None:
    agent = state.agents.get(item["assignedTo"] or "")
    if agent is not None:
        agent["lastActivity"] = ts


def _completed(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] not in LIVE_ASSIGNMENT or not _holder_matches(item, ev):
        return False
    _heard_from_holder(state, item, ev)
    release_agent(state, item, ev.ts)
    set_status(state, item, "completed")
    agent = state.agents.get(item["assignedTo"] or "")
    target = state.targets.get(agent.get("targetId") or "") if agent else None
    if target is not None:
        target["crashes"] = 0  # its agents do work: whatever crashed before is behind us
    d = ev.data
    item.update(
        progress=100,
        acceptBy=None,
        completedAt=ev.ts,
        result={
            "summary": d.get("summary"),
            "output": d.get("output"),
            "artifacts": d.get("artifacts"),
            "completedAt": ev.ts,
        },
    )
    return True


def _failed(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] not in LIVE_ASSIGNMENT or not _holder_matches(item, ev):
        return False
    d = ev.data
    error = {
        "message": d["message"],
        "code": d.get("code"),
        "recoverable": d["recoverable"],
        "occurredAt": ev.ts,
        "attempt": item["attempts"],
        "agentGuid": item["assignedTo"],
    }
    _heard_from_holder(state, item, ev)
    release_agent(state, item, ev.ts)
    item["errors"].append(error)
    item["error"] = error
    if d["outcome"] == "retry":
        _to_pending(state, item, d.get("retryAt"))
    else:
        _to_dead_letter(state, item, ev, d["message"])
    return True


def _to_pending(state: ProjectState, item: Record, retry_at: str | None) -> None:
    set_status(state, item, "pending")
    item.update(assignedTo=None, assignedAt=None, assignedSeq=None, acceptBy=None, startedAt=None, retryAt=retry_at)


def _to_dead_letter(state: ProjectState, item: Record, ev: Event, reason: str) -> None:
    set_status(state, item, "failed")
    item.update(
        acceptBy=None,
        retryAt=None,
        completedAt=ev.ts,
        deadLetter={
            "reason": reason,
            "failedAt": ev.ts,
            "attempts": item["attempts"],
            "discarded": False,
        },
    )


def _withdrawn_from(state: ProjectState, item: Record, ev: Event) -> None:
    """A live assignment is being taken back: if its agent let it time out, mark the agent."""
    if ev.data.get("cause") != ACCEPT_TIMEOUT:
        return
    agent = state.agents.get(item["assignedTo"] or "")
    if agent is not None and ev.data.get("agentGuid", agent["guid"]) == agent["guid"]:
        mark_unresponsive(agent, ev.ts)


def _requeued(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] not in LIVE_ASSIGNMENT:
        return False
    _withdrawn_from(state, item, ev)
    release_agent(state, item, ev.ts)
    _to_pending(state, item, ev.data.get("retryAt"))
    item["lastRequeueReason"] = ev.data["reason"]
    return True


def _dead_lettered(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] in TERMINAL_WORK:
        return False
    if item["status"] in LIVE_ASSIGNMENT:
        _withdrawn_from(state, item, ev)
    release_agent(state, item, ev.ts)
    _to_dead_letter(state, item, ev, ev.data["reason"])
    return True


def _cancelled(state: ProjectState, item: Record, ev: Event) -> bool:
    if item["status"] in TERMINAL_WORK:
        return False
    release_agent(state, item, ev.ts)
    set_status(state, item, "cancelled")
    item.update(cancelledAt=ev.ts, acceptBy=None, retryAt=None, cancelReason=ev.data.get("reason"))
    return True


def _retried(state: ProjectState, item: Record, ev: Event) -> bool:
    dl = item.get("deadLetter")
    if item["status"] != "failed" or not dl or dl["discarded"]:
        return False
    _to_pending(state, item, None)
    item.update(attempts=0, deadLetter=None, completedAt=None, error=None)
    return True


def _discarded(state: ProjectState, item: Record, ev: Event) -> bool:
    dl = item.get("deadLetter")
    if item["status"] != "failed" or not dl or dl["discarded"]:
        return False
    dl["discarded"] = True
    dl["discardedAt"] = ev.ts
    return True


def purgeable(item: Record) -> bool:
    """Finished for good: completed, cancelled, or dead-lettered and then discarded. A live DLQ
    entry waits for an operator, so retention never takes it."""
    status = item["status"]
    if status == "failed":
        dl = item.get("deadLetter")
        return bool(dl and dl["discarded"])
    return status in ("completed", "cancelled")


def _purged(state: ProjectState, item: Record, ev: Event) -> bool:
    if not purgeable(item):
        return False
    status = item["status"]
    del state.work[item["id"]]
    state.work_by_status[status].pop(item["id"], None)
    state.work_counts[status] -= 1
    state.purged_counts[status] += 1
    # Nothing may be appended about the item any more; OCC then sees a stale expectation.
    state.entity_seq.pop("work." + item["id"], None)
    return True


# Each handler returns whether the event changed the item (False: its guard ignored the event).
HANDLERS: dict[str, Callable[[ProjectState, Any, Event], bool]] = {
    "work.submitted": _submitted,
    "work.assigned": _assigned,
    "work.started": _started,
    "work.progressed": _progressed,
    "work.completed": _completed,
    "work.failed": _failed,
    "work.requeued": _requeued,
    "work.dead_lettered": _dead_lettered,
    "work.cancelled": _cancelled,
    "work.retried": _retried,
    "work.discarded": _discarded,
    "work.purged": _purged,
}


def apply_work(state: ProjectState, ev: Event) -> None:
    """Fold one work event. `updatedAt` moves only when the event changed the item: an ignored
    event leaves a finished item as it was (snapshots rely on that, see `encode_state`)."""
    item = state.work.get(ev.entity_id)
    if item is None and ev.type != "work.submitted":
        return
    # A new item already carries it; a purged one is gone, so setting it on the dict is moot.
    if HANDLERS[ev.type](state, item, ev) and item is not None:
        item["updatedAt"] = ev.ts
