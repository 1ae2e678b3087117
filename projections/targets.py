"""Fold of `target.*` and `spinup.*` events into the spin-up target registry."""

from __future__ import annotations

from typing import Any

from projections.events import Event
from projections.state import ProjectState, Record

DEFAULT_BREAKER_THRESHOLD = 3
# Fields the fold maintains from lifecycle events: `target.updated` never overwrites them (status
# changes only through enabled/disabled/breaker/health, spin-up bookkeeping only through spinup.*).
MAINTAINED = frozenset(
    {
        "id",
        "status",
        "disabledReason",
        "healthStatus",
        "lastHealthCheck",
        "lastHealthLatencyMs",
        "lastError",
        "registeredAt",
        "updatedAt",
        "lastUsedAt",
        "useCount",
        "lastSpinUp",
        "activeSpinUps",
        "consecutiveFailures",
        "crashes",
    }
)


def new_target(ev: Event) -> Record:
    """A SpinUpTarget in the original's shape; status/health/use counters are weft-maintained."""
    t: dict[str, Any] = dict(ev.data["target"])
    t.update(
        id=ev.entity_id,
        status="disabled" if t.get("status") == "disabled" else "available",
        healthStatus="unknown",
        lastHealthCheck=None,
        lastError=None,
        registeredAt=ev.ts,
        updatedAt=ev.ts,
        lastUsedAt=None,
        useCount=0,
        lastSpinUp=None,
        activeSpinUps={},
        consecutiveFailures=0,
        crashes=0,  # spun-up agents lost in a row (reset when one completes work, or on enable)
    )
    return t


def _spinup_requested(t: Record, ev: Event) -> None:
    d = ev.data
    t["activeSpinUps"][d["spinUpId"]] = {
        "spinUpId": d["spinUpId"],
        "workId": d.get("workId"),
        "capability": d.get("capability"),
        "boundary": d.get("boundary"),
        "status": "requested",
        "requestedAt": ev.ts,
    }
    t["useCount"] += 1
    t["lastUsedAt"] = ev.ts


def _spinup_started(t: Record, ev: Event) -> None:
    op = t["activeSpinUps"].get(ev.data["spinUpId"])
    if op is not None:
        op.update(status="started", startedAt=ev.ts, mechanismResult=ev.data.get("mechanismResult"))


def _spinup_finished(state: ProjectState, t: Record, ev: Event, ok: bool) -> None:
    op = t["activeSpinUps"].pop(ev.data["spinUpId"], None)
    agent = state.agents.get(ev.data.get("agentGuid") or "")
    if ok and agent is not None:
        # What scale-down needs to clean up after this agent (a pid, a Job name...).
        agent["launch"] = {
            "targetId": t["id"],
            "spinUpId": ev.data["spinUpId"],
            "handle": op.get("mechanismResult") if op else None,
        }
    t["lastSpinUp"] = {
        "spinUpId": ev.data["spinUpId"],
        "time": ev.ts,
        "workItemId": op.get("workId") if op else None,
        "agent": ev.data.get("agentGuid"),
        "outcome": "success" if ok else "failed",
        "error": None if ok else ev.data.get("error"),
        "durationMs": ev.data.get("durationMs"),
    }
    if ok:
        t["consecutiveFailures"] = 0
        return
    t["consecutiveFailures"] += 1
    t["lastError"] = ev.data.get("error")
    threshold = t.get("circuitBreakerThreshold") or DEFAULT_BREAKER_THRESHOLD
    if t["consecutiveFailures"] >= threshold and t["status"] == "available":
        t["status"] = "error"


def _health_changed(t: Record, ev: Event) -> None:
    t.update(
        healthStatus=ev.data["healthStatus"],
        lastHealthCheck=ev.ts,
        lastError=ev.data.get("error") or t["lastError"],
        lastHealthLatencyMs=ev.data.get("latencyMs"),
    )
    if ev.data["healthStatus"] == "healthy" and t["status"] == "error":
        t.update(status="available", consecutiveFailures=0)


def apply_target(state: ProjectState, ev: Event) -> None:
    t = state.targets.get(ev.entity_id)
    if ev.type == "target.registered":
        if t is None:
            state.targets[ev.entity_id] = new_target(ev)
        return
    if t is None:
        return
    if ev.type == "target.updated":
        t.update({k: v for k, v in ev.data["changes"].items() if k not in MAINTAINED})
    elif ev.type == "target.enabled":
        t.update(status="available", consecutiveFailures=0, crashes=0)
    elif ev.type == "target.disabled":
        t.update(status="disabled", disabledReason=ev.data.get("reason"))
    elif ev.type == "target.removed":
        del state.targets[ev.entity_id]
        return
    elif ev.type == "target.health_changed":
        _health_changed(t, ev)
    elif ev.type == "spinup.requested":
        _spinup_requested(t, ev)
    elif ev.type == "spinup.started":
        _spinup_started(t, ev)
    elif ev.type in ("spinup.completed", "spinup.failed"):
        _spinup_finished(state, t, ev, ok=ev.type == "spinup.completed")
    t["updatedAt"] = ev.ts
