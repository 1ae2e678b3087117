"""weft events (plus the folded state) -> the original Weft's WebSocket event messages. Pure.

`Translator.translate(ev, state)` turns one stream event into the live events it means for
`/api/ws` subscribers (§4 of the protocol reference): none, one, or several (a `work.assigned` is
a `work:assigned` and, when the agent's load or status moved, an `agent:updated`). The state is the
one *after* folding `ev` (what `ProjectView` listeners see); what the fold forgets (a removed
target, a finished spin-up's capability, an agent's previous status) the translator remembers
itself, seeded from the state it starts at (`seed`). Timestamps are the events' own `ts`.

An event the fold ignored (a stale decision, a repeat) gives nothing. A replay of history folds
the stream as it goes and translates each event against the state right after it, exactly as it
was translated live (weft.runtime.live_hub), so replayed and live messages are the same.
Every live event carries `facets`: the values the subscription filters of its topic match against
(the real boundary, capability, status of the entity, not only what the payload shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from projections.events import Event
from projections.state import ProjectState, Record

TOPICS: Final = ("work", "agents", "targets", "stats")

# The 19 event names of the original, by topic.
WORK_EVENTS: Final = ("work:submitted", "work:assigned", "work:started", "work:progress", "work:completed",
                      "work:failed", "work:cancelled")
AGENT_EVENTS: Final = ("agent:registered", "agent:updated", "agent:shutdown")
TARGET_EVENTS: Final = ("target:registered", "target:updated", "target:disabled", "target:removed",
                        "target:health-changed", "spin-up:triggered", "spin-up:started", "spin-up:completed",
                        "spin-up:failed")
ALL_EVENTS: Final = WORK_EVENTS + AGENT_EVENTS + TARGET_EVENTS

# The filter keys each topic accepts (§4 "Filters"); `stats` takes none.
FILTER_KEYS: Final[dict[str, frozenset[str]]] = {
    "work": frozenset({"status", "capability", "boundary", "taskId", "assignedTo"}),
    "agents": frozenset({"agentType", "status", "capability", "boundary", "guid"}),
    "targets": frozenset({"agentType", "status", "capability", "boundary", "mechanism", "targetId"}),
    "stats": frozenset(),
}

# The work status an event means for a `work` filter: submitted -> pending, started/progress -> in-progress.
_WORK_STATUS: Final = {
    "work:submitted": "pending",
    "work:assigned": "assigned",
    "work:started": "in-progress",
    "work:progress": "in-progress",
    "work:completed": "completed",
    "work:failed": "failed",
    "work:cancelled": "cancelled",
}


@dataclass(frozen=True, slots=True)
class LiveEvent:
    topic: str
    event: str
    data: dict[str, Any]
    seq: int
    timestamp: str
    project: str
    facets: Mapping[str, Any] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        """The server -> client message: `{type:"event", topic, event, data, timestamp, projectId, seq}`."""
        return {"type": "event", "topic": self.topic, "event": self.event, "data": self.data,
                "timestamp": self.timestamp, "projectId": self.project, "seq": self.seq}


def matches(filter_: Mapping[str, Any] | None, facets: Mapping[str, Any]) -> bool:
    """Whether an event with `facets` passes a subscription filter. A filter value may be one value or
    a list (any of them); a facet may be a list (an agent's capabilities: one of them must match). A
    `*` boundary of an entity matches any boundary asked for. Empty/None filter values are ignored."""
    if not filter_:
        return True
    for key, wanted in filter_.items():
        if wanted is None or wanted == "" or wanted == []:
            continue
        wanted_set = {str(w) for w in wanted} if isinstance(wanted, list) else {str(wanted)}
        have = facets.get(key)
        have_set = {str(h) for h in have} if isinstance(have, list) else ({str(have)} if have is not None else set())
        if key == "boundary" and "*" in have_set:
            continue
        if not wanted_set & have_set:
            return False
    return True


def filter_errors(topic: str, filter_: object) -> list[str]:
    """What is wrong with a subscription filter (empty when it is fine)."""
    if filter_ is None:
        return []
    if not isinstance(filter_, Mapping):
        return ["filter must be an object"]
    allowed = FILTER_KEYS.get(topic, frozenset())
    out = [f"unknown filter key for topic {topic}: {k}" for k in filter_ if k not in allowed]
    for k, v in filter_.items():
        values = v if isinstance(v, list) else [v]
        if any(not isinstance(x, str | int) or isinstance(x, bool) for x in values if x is not None):
            out.append(f"filter.{k} must be a string or a list of strings")
    return out


def agent_summary(guid: str | None, agent: Record | None) -> dict[str, Any] | None:
    """AgentSummary `{guid, handle?, agentType, hostname?}` of an agent record (None without a guid)."""
    if not guid:
        return None
    if agent is None:
        return {"guid": guid, "agentType": None}
    out: dict[str, Any] = {"guid": guid, "agentType": agent.get("agentType")}
    if agent.get("handle"):
        out["handle"] = agent["handle"]
    if agent.get("hostname"):
        out["hostname"] = agent["hostname"]
    return out


def _target_base(target_id: str, t: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "targetId": target_id,
        "targetName": t.get("name"),
        "agentType": t.get("agentType"),
        "capabilities": list(t.get("capabilities") or []),
        "boundaries": list(t.get("boundaries") or []),
        "mechanism": t.get("mechanism"),
    }


def _target_facets(base: Mapping[str, Any], status: str | None, capability: str | None = None) -> dict[str, Any]:
    return {
        "targetId": base["targetId"],
        "agentType": base["agentType"],
        "mechanism": base["mechanism"],
        "status": status,
        "capability": [capability] if capability else base["capabilities"],
        "boundary": base["boundaries"],
    }


@dataclass(slots=True)
class Translator:
    """Translates the events of one project, in stream order. Its memory is bounded by the number of
    agents and targets and of spin-ups in flight."""

    project: str
    agent_status: dict[str, tuple[str, int]] = field(default_factory=dict)  # guid -> (status, task count)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> base info
    target_status: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # id -> (status, health)
    spinups: dict[str, dict[str, Any]] = field(default_factory=dict)  # spinUpId -> {capability, boundary, workId}

    def seed(self, state: ProjectState) -> None:
        """Start from `state` (the events up to its `seq` are not going to be translated)."""
        for guid, a in state.agents.items():
            self.agent_status[guid] = (a["status"], a["currentTaskCount"])
        for tid, t in state.targets.items():
            self.targets[tid] = _target_base(tid, t)
            self.target_status[tid] = (t.get("status"), t.get("healthStatus"))
            for op in (t.get("activeSpinUps") or {}).values():
                self.spinups[op["spinUpId"]] = {"capability": op.get("capability"),
                                                "boundary": op.get("boundary"), "workId": op.get("workId")}

    def translate(self, ev: Event, state: ProjectState) -> list[LiveEvent]:
        if ev.type.startswith("work."):
            out = self._work(ev, state)
            return out + self._agent_load(ev, state)
        if ev.type.startswith("agent."):
            return self._agent(ev, state)
        if ev.type.startswith("target.") or ev.type.startswith("spinup."):
            return self._target(ev, state)
        return []

    def _live(self, topic: str, name: str, ev: Event, body: dict[str, Any], facets: dict[str, Any]) -> LiveEvent:
        data = {"type": name, "timestamp": ev.ts, "projectId": self.project, **body}
        return LiveEvent(topic, name, data, ev.seq, ev.ts, self.project, facets)

    # --- work --------------------------------------------------------------------------------

    def _work(self, ev: Event, state: ProjectState) -> list[LiveEvent]:
        item = state.work.get(ev.entity_id)
        d = ev.data
        if item is None and ev.type != "work.submitted":
            return []  # unknown (or purged) item: nothing the fold applied
        if item is not None and item.get("updatedAt") != ev.ts:
            return []  # the fold's guard ignored it (stale, repeated, fenced)
        rec: Mapping[str, Any] = item if item is not None else {}
        if ev.type == "work.submitted":
            rec = {**rec, **{k: d.get(k) for k in ("taskId", "capability", "boundary", "priority", "description")}}
        task_id = rec.get("taskId")
        base: dict[str, Any] = {"workId": ev.entity_id, "taskId": task_id}
        holder = d.get("agentGuid") or rec.get("assignedTo")
        if ev.type == "work.failed":
            holder = d.get("agentGuid") or ((rec.get("error") or {}).get("agentGuid"))
        summary = agent_summary(holder, state.agents.get(holder) if holder else None)
        name: str
        if ev.type == "work.submitted":
            name = "work:submitted"
            body = {**base, "capability": rec.get("capability"), "boundary": rec.get("boundary"),
                    "priority": rec.get("priority"), "description": rec.get("description")}
        elif ev.type == "work.assigned":
            name = "work:assigned"
            body = {**base, "assignedTo": holder, "assignedToAgent": summary,
                    "capability": rec.get("capability"), "boundary": rec.get("boundary")}
        elif ev.type == "work.started":
            name = "work:started"
            body = {**base, "assignedTo": holder, "assignedToAgent": summary}
        elif ev.type == "work.progressed":
            name = "work:progress"
            body = {**base, "assignedTo": holder, "assignedToAgent": summary, "progress": d.get("progress")}
        elif ev.type == "work.completed":
            name = "work:completed"
            body = {**base, "assignedTo": holder, "assignedToAgent": summary, "summary": d.get("summary")}
        elif ev.type in ("work.failed", "work.dead_lettered"):
            name = "work:failed"
            message = d.get("message") if ev.type == "work.failed" else d.get("reason")
            body = {**base, "assignedTo": holder, "assignedToAgent": summary, "errorMessage": message,
                    "recoverable": bool(d.get("recoverable")) if ev.type == "work.failed" else False}
        elif ev.type == "work.cancelled":
            name = "work:cancelled"
            body = {**base, "assignedTo": holder, "assignedToAgent": summary}
        else:
            return []  # requeued, retried, discarded, purged: no event of the original
        facets = {"status": _WORK_STATUS[name], "capability": rec.get("capability"), "boundary": rec.get("boundary"),
                  "taskId": task_id, "assignedTo": holder}
        return [self._live("work", name, ev, body, facets)]

    def _agent_load(self, ev: Event, state: ProjectState) -> list[LiveEvent]:
        """`agent:updated` for an agent whose status or task count a work event moved."""
        out: list[LiveEvent] = []
        guids = {g for g in (ev.data.get("agentGuid"), (state.work.get(ev.entity_id) or {}).get("assignedTo")) if g}
        err = (state.work.get(ev.entity_id) or {}).get("error") or {}
        if err.get("agentGuid"):
            guids.add(err["agentGuid"])
        for guid in sorted(guids):
            agent = state.agents.get(guid)
            if agent is not None:
                out += self._agent_updated(ev, guid, agent)
        return out

    # --- agents --------------------------------------------------------------------------------

    def _agent_facets(self, agent: Record) -> dict[str, Any]:
        return {"agentType": agent.get("agentType"), "status": agent.get("status"), "guid": agent.get("guid"),
                "capability": list(agent.get("capabilities") or []), "boundary": list(agent.get("boundaries") or [])}

    def _agent_updated(self, ev: Event, guid: str, agent: Record) -> list[LiveEvent]:
        now = (agent["status"], agent["currentTaskCount"])
        before = self.agent_status.get(guid)
        self.agent_status[guid] = now
        if before == now:
            return []
        body: dict[str, Any] = {"agent": agent_summary(guid, agent)}
        if before is not None:
            body["previousStatus"] = before[0]
        body.update(newStatus=now[0], currentTaskCount=now[1])
        return [self._live("agents", "agent:updated", ev, body, self._agent_facets(agent))]

    def _agent(self, ev: Event, state: ProjectState) -> list[LiveEvent]:
        guid = ev.entity_id
        agent = state.agents.get(guid)
        if agent is None:
            return []
        facets = self._agent_facets(agent)
        if ev.type == "agent.registered":
            self.agent_status[guid] = (agent["status"], agent["currentTaskCount"])
            body = {"agent": agent_summary(guid, agent), "capabilities": list(agent.get("capabilities") or []),
                    "boundaries": list(agent.get("boundaries") or []), "status": agent["status"]}
            return [self._live("agents", "agent:registered", ev, body, facets)]
        if ev.type in ("agent.shutdown_requested", "agent.deregistered"):
            if ev.type == "agent.deregistered":
                self.agent_status[guid] = (agent["status"], agent["currentTaskCount"])
                reason, graceful = ev.data.get("reason") or "deregistered", True
            else:
                reason, graceful = ev.data.get("reason"), bool(ev.data.get("graceful"))
            body = {"agent": agent_summary(guid, agent), "reason": reason, "graceful": graceful}
            return [self._live("agents", "agent:shutdown", ev, body, facets)]
        if ev.type == "agent.lost":
            return self._agent_updated(ev, guid, agent)
        return []

    # --- targets and spin-ups ----------------------------------------------------------------

    def _target(self, ev: Event, state: ProjectState) -> list[LiveEvent]:
        tid = ev.entity_id
        t = state.targets.get(tid)
        if t is not None:
            self.targets[tid] = _target_base(tid, t)
        base = self.targets.get(tid)
        if base is None:
            return []
        if ev.type == "target.removed":
            self.targets.pop(tid, None)
            before = self.target_status.pop(tid, (None, None))
            if t is not None:
                return []  # not removed after all
            return [self._live("targets", "target:removed", ev, dict(base), _target_facets(base, before[0]))]
        if t is None:
            return []
        status, health = t.get("status"), t.get("healthStatus")
        prev_status, prev_health = self.target_status.get(tid, (None, None))
        self.target_status[tid] = (status, health)
        facets = _target_facets(base, status)
        d = ev.data
        if ev.type == "target.registered":
            return [self._live("targets", "target:registered", ev, dict(base), facets)]
        if ev.type == "target.disabled":
            return [self._live("targets", "target:disabled", ev, {**base, "reason": d.get("reason")}, facets)]
        if ev.type in ("target.updated", "target.enabled"):
            return [self._status_update(ev, base, prev_status, status, facets)]
        if ev.type == "target.health_changed":
            body: dict[str, Any] = {**base}
            if prev_health is not None:
                body["previousHealth"] = prev_health
            body.update(newHealth=d.get("healthStatus"), error=d.get("error"))
            out = [self._live("targets", "target:health-changed", ev, body, facets)]
            if prev_status is not None and prev_status != status:
                out.append(self._status_update(ev, base, prev_status, status, facets))
            return out
        return self._spinup(ev, t, base, prev_status, status, facets)

    def _status_update(self, ev: Event, base: dict[str, Any], prev: str | None, status: str | None,
                       facets: dict[str, Any]) -> LiveEvent:
        body: dict[str, Any] = {**base}
        if prev is not None:
            body["previousStatus"] = prev
        body["newStatus"] = status
        return self._live("targets", "target:updated", ev, body, facets)

    def _spinup(self, ev: Event, t: Record, base: dict[str, Any], prev_status: str | None, status: str | None,
                facets: dict[str, Any]) -> list[LiveEvent]:
        d = ev.data
        sid = d.get("spinUpId") or ""
        if ev.type == "spinup.requested":
            op = {"capability": d.get("capability"), "boundary": d.get("boundary"), "workId": d.get("workId")}
            self.spinups[sid] = op
        else:
            active = (t.get("activeSpinUps") or {}).get(sid) or {}
            op = self.spinups.get(sid) or {"capability": active.get("capability"), "boundary": active.get("boundary"),
                                           "workId": active.get("workId")}
        capability = op.get("capability")
        sfacets = {**facets, "capability": [capability] if capability else base["capabilities"]}
        if op.get("boundary"):
            sfacets["boundary"] = [op["boundary"]]
        common = {"targetId": base["targetId"], "targetName": base["targetName"], "agentType": base["agentType"],
                  "capability": capability, "workId": op.get("workId"), "spinUpId": sid}
        if ev.type == "spinup.requested":
            body = {"targetAgentType": base["agentType"], "capability": capability, "boundary": op.get("boundary"),
                    "workId": op.get("workId"), "targetId": base["targetId"], "spinUpId": sid}
            return [self._live("targets", "spin-up:triggered", ev, body, sfacets)]
        if ev.type == "spinup.started":
            return [self._live("targets", "spin-up:started", ev, common, sfacets)]
        self.spinups.pop(sid, None)
        if ev.type == "spinup.completed":
            body = {**common, "agentGuid": d.get("agentGuid"), "durationMs": d.get("durationMs")}
            return [self._live("targets", "spin-up:completed", ev, body, sfacets)]
        if ev.type == "spinup.failed":
            body = {**common, "errorMessage": d.get("error"), "durationMs": d.get("durationMs")}
            out = [self._live("targets", "spin-up:failed", ev, body, sfacets)]
            if prev_status is not None and prev_status != status:  # the circuit breaker opened
                out.append(self._status_update(ev, base, prev_status, status, facets))
            return out
        return []


def stats_data(state: ProjectState | None, connections: int, subscriptions: int) -> dict[str, Any]:
    """The `data` of a `stats` message (§4): agents, work, targets of the project, websocket counts."""
    by_type: dict[str, int] = {}
    by_status: dict[str, int] = {}
    agents = state.agents.values() if state is not None else []
    for a in agents:
        by_type[a["agentType"]] = by_type.get(a["agentType"], 0) + 1
        by_status[a["status"]] = by_status.get(a["status"], 0) + 1
    counts = state.work_counts if state is not None else {}
    targets = list(state.targets.values()) if state is not None else []
    return {
        "agents": {"total": sum(by_type.values()), "byType": by_type, "byStatus": by_status},
        "work": {
            "pending": counts.get("pending", 0),
            "active": counts.get("assigned", 0) + counts.get("in-progress", 0),
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
        },
        "targets": {
            "total": len(targets),
            "available": sum(1 for t in targets if t.get("status") == "available" and not t.get("activeSpinUps")),
            "inUse": sum(1 for t in targets if t.get("activeSpinUps")),
            "disabled": sum(1 for t in targets if t.get("status") == "disabled"),
        },
        "websocket": {"connections": connections, "subscriptions": subscriptions},
    }


def stats_message(project: str, state: ProjectState | None, connections: int, subscriptions: int,
                  timestamp: str) -> dict[str, Any]:
    return {"type": "stats", "data": stats_data(state, connections, subscriptions), "timestamp": timestamp,
            "projectId": project}
