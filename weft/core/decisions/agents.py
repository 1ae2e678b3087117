"""Agent decisions: register, deregister, mark lost, shutdown requests and idle scale-down."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from projections.events import parse_ts
from projections.state import ProjectState, Record
from weft.core.decisions import Draft
from weft.core.errors import Conflict, NotFound


def _agent(state: ProjectState, guid: str) -> Record:
    agent = state.agents.get(guid)
    if agent is None:
        raise NotFound(f"agent {guid} not found", field="guid")
    return agent


def register_agent(decl: dict[str, Any]) -> Draft:
    """An agent joins, or re-joins (the fold refreshes its declaration and keeps its work): always
    accepted, whatever the state."""
    guid = decl["guid"]
    data = {
        "guid": guid,
        "handle": decl.get("handle"),
        "agentType": decl["agentType"],
        "capabilities": list(decl["capabilities"]),
        "boundaries": list(decl["boundaries"]),
        "maxConcurrentTasks": decl.get("maxConcurrentTasks", 1),
        "hostname": decl.get("hostname"),
        "username": decl.get("username"),
        "visibility": decl.get("visibility", "project-only"),
        "labels": dict(decl.get("labels") or {}),
        "source": decl.get("source", "weft"),
        "spinUpId": decl.get("spinUpId"),
        "targetId": decl.get("targetId"),
        "spindownAfterIdleMs": decl.get("spindownAfterIdleMs"),
    }
    return Draft("agent.registered", guid, data)


def deregister_agent(state: ProjectState, guid: str, reason: str | None) -> Draft | None:
    """The agent leaves on its own; leaving again is a no-op."""
    agent = _agent(state, guid)
    if agent["status"] == "offline":
        return None
    return Draft("agent.deregistered", guid, {"reason": reason})


def mark_agent_lost(state: ProjectState, guid: str, last_heartbeat: str | None, epoch: int) -> Draft | None:
    """Scheduler: no heartbeat for too long. Nothing to do for an agent unknown or already offline."""
    agent = state.agents.get(guid)
    if agent is None or agent["status"] == "offline":
        return None
    return Draft("agent.lost", guid, {"lastHeartbeat": last_heartbeat}, epoch=epoch)


def request_shutdown(
    state: ProjectState, guid: str, graceful: bool, reason: str, grace_period_ms: int | None
) -> Draft:
    agent = _agent(state, guid)
    if agent["status"] == "offline":
        raise Conflict(f"agent {guid} is offline", field="guid")
    data = {"graceful": graceful, "reason": reason, "gracePeriodMs": grace_period_ms}
    return Draft("agent.shutdown_requested", guid, data)


def scale_down_idle(state: ProjectState, guid: str, epoch: int) -> Draft | None:
    """Scheduler: ask an idle agent to stop, if it still holds nothing and was not asked yet."""
    agent = state.agents.get(guid)
    if agent is None or agent["status"] == "offline" or agent["currentTaskCount"] or agent["shutdownRequested"]:
        return None
    data = {"graceful": True, "reason": "idle-timeout", "gracePeriodMs": None}
    return Draft("agent.shutdown_requested", guid, data, epoch=epoch)


def matches_agent_filter(a: Record, flt: dict[str, Any], now: datetime) -> bool:
    if flt.get("status") and a["status"] != flt["status"]:
        return False
    if flt.get("agentType") and a["agentType"] != flt["agentType"]:
        return False
    if flt.get("capability") and flt["capability"] not in a["capabilities"]:
        return False
    if flt.get("boundary") and flt["boundary"] not in a["boundaries"]:
        return False
    idle = flt.get("idleTimeMs")
    if idle is not None:
        if a["currentTaskCount"] > 0:
            return False
        idle_for = (now - parse_ts(a["lastActivity"])).total_seconds() * 1000
        if idle_for < idle:
            return False
    return True


def select_agents(state: ProjectState, flt: dict[str, Any], now: datetime) -> list[str]:
    """Guids of the agents a shutdown-batch filter names (`idleTimeMs` measured at `now`)."""
    return [a["guid"] for a in state.agents.values() if matches_agent_filter(a, flt, now)]
