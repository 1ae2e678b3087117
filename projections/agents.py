"""Fold of `agent.*` events into the agent registry.

Heartbeats are not events, so `lastHeartbeat` is not here; the API merges live liveness in.

Two fields say whether the agent is alive, and only the agent's own words move them:
`lastSeen` is the time of the last event the agent itself caused (registration, accept, progress,
completion, failure, deregistration; see `seen`), unlike `lastActivity`, which also moves when weft
assigns or withdraws work (idle scale-down wants that; loss detection must not, or a dead agent
that keeps being offered work never falls silent). `unresponsiveSince` is set when one of its
assignments was withdrawn for not being accepted in time (`mark_unresponsive`); routing offers
such an agent nothing until it shows life again (its own event clears the flag; a heartbeat heard
by the scheduler after that time counts too, see `weft.core.routing.plan_assignments`).
Records folded before these fields existed lack them: readers use `.get`.
"""

from __future__ import annotations

from projections.events import Event
from projections.state import ProjectState, Record


def new_agent(ev: Event) -> Record:
    """An agent in the original's RegisteredAgent shape, plus load and provenance fields."""
    d = ev.data
    return {
        "guid": ev.entity_id,  # the subject token; a differing data["guid"] must not split the record
        "handle": d.get("handle"),
        "agentType": d["agentType"],
        "status": "online",
        "capabilities": list(d["capabilities"]),
        "boundaries": list(d["boundaries"]),
        "visibility": d.get("visibility", "project-only"),
        "hostname": d.get("hostname"),
        "username": d.get("username"),
        "projectId": ev.project,
        "maxConcurrentTasks": d["maxConcurrentTasks"],
        "currentTasks": [],
        "currentTaskCount": 0,
        "spindownAfterIdleMs": d.get("spindownAfterIdleMs"),
        "labels": dict(d.get("labels") or {}),
        "source": d.get("source", "weft"),
        "spinUpId": d.get("spinUpId"),
        "targetId": d.get("targetId"),
        "registeredAt": ev.ts,
        "lastActivity": ev.ts,
        "lastSeen": ev.ts,
        "unresponsiveSince": None,
        "shutdownRequested": None,
        "offlineReason": None,
        "offlineAt": None,
        "launch": None,
    }


def _registered(state: ProjectState, agent: Record | None, ev: Event) -> None:
    fresh = new_agent(ev)
    if agent is None:
        state.agents[ev.entity_id] = fresh
        return
    # Re-registration (reconnect, restart): keep held work and history, refresh the declaration.
    for key in ("handle", "agentType", "capabilities", "boundaries", "visibility", "hostname", "username",
                "maxConcurrentTasks", "spindownAfterIdleMs", "labels", "source", "spinUpId", "targetId"):
        agent[key] = fresh[key]
    agent.update(lastActivity=ev.ts, shutdownRequested=None, offlineReason=None, offlineAt=None)
    seen(agent, ev.ts)
    agent["status"] = "busy" if agent["currentTaskCount"] >= agent["maxConcurrentTasks"] else "online"


def seen(agent: Record, ts: str) -> None:
    """The agent itself just said something (an event it caused): it is alive and responsive."""
    agent["lastSeen"] = ts
    agent["unresponsiveSince"] = None


def mark_unresponsive(agent: Record, ts: str) -> None:
    """An assignment to the agent was withdrawn at `ts` because it did not accept it in time."""
    if agent["status"] != "offline":
        agent["unresponsiveSince"] = ts


def _shutdown_requested(state: ProjectState, agent: Record, ev: Event) -> None:
    if agent["status"] == "offline":
        return
    agent["shutdownRequested"] = {
        "graceful": ev.data["graceful"],
        "reason": ev.data["reason"],
        "gracePeriodMs": ev.data.get("gracePeriodMs"),
        "requestedAt": ev.ts,
    }


def _offline(agent: Record, ev: Event, reason: str) -> None:
    agent.update(status="offline", offlineReason=reason, offlineAt=ev.ts)


def apply_agent(state: ProjectState, ev: Event) -> None:
    agent = state.agents.get(ev.entity_id)
    if ev.type == "agent.registered":
        _registered(state, agent, ev)
    elif agent is None:
        return
    elif ev.type == "agent.shutdown_requested":
        _shutdown_requested(state, agent, ev)
    elif ev.type == "agent.deregistered":
        seen(agent, ev.ts)
        _offline(agent, ev, ev.data.get("reason") or "deregistered")
    elif ev.type == "agent.lost":
        _offline(agent, ev, "lost")
        target = state.targets.get(agent.get("targetId") or "")
        if target is not None and agent.get("spinUpId"):
            # A spun-up agent died: the target backs off and eventually gives up (weft.core.fleet_policy).
            target["crashes"] = target.get("crashes", 0) + 1
            target["lastError"] = f"spun-up agent {agent['guid']} was lost"
