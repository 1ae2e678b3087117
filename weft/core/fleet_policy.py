"""Pure elastic-fleet policy: when to spin agents up, on which target, whom to scale down, which
spin-ups are overdue and which targets are due for a health probe.

No I/O and no clock reads (`now` is a parameter), so the scheduler's decisions are testable as
plain functions; what the leader's `FleetManager` holds in memory (launches running, probes
running, when it last probed) comes in as a `FleetSnapshot`. Demand is counted per waiting item: one live spin-up covers one waiting item, so
20 submits never cause 20 launches, and a target never has more than `maxConcurrentAgents` agents
alive or starting.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from projections.events import parse_ts
from projections.state import ProjectState, Record
from weft.core.routing import Plan, RoutingPolicy, effective_priority, spin_up_agent_types

# Plan codes that mean "an agent could take this if one existed or were free".
NEEDS_AGENT = frozenset({"capability", "boundary-type", "boundary", "required-type", "busy"})
DEFAULT_MAX_CRASHES = 5
MAX_BACKOFF_FACTOR = 64


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """The fleet's rules and what the leader's FleetManager knows that is not in the state."""

    idle_timeout_ms: int = 300_000
    max_crashes: int = DEFAULT_MAX_CRASHES
    health_checks: bool = True
    launching: frozenset[str] = frozenset()  # spin-up ids whose launch runs on this leader
    probing: frozenset[str] = frozenset()  # target ids whose probe runs on this leader
    probed_at: Mapping[str, datetime] = field(default_factory=dict)  # target id -> when this leader last probed it
    mechanisms: frozenset[str] = frozenset()  # mechanisms this replica has (a target of another is never probed)


def spinning_up(state: ProjectState) -> set[str]:
    """Work ids that a spin-up in flight was requested for."""
    return {op["workId"] for t in state.targets.values() for op in t["activeSpinUps"].values() if op.get("workId")}


@dataclass(slots=True)
class SpinUpDecision:
    target_id: str
    work_id: str


@dataclass(slots=True)
class ElasticPlan:
    spin_ups: list[SpinUpDecision] = field(default_factory=list)
    # Why waiting items get no spin-up (no target, cooldown, limit, gave up...): feeds waitingReason.
    blocked: dict[str, str] = field(default_factory=dict)


def target_load(state: ProjectState, t: Record) -> int:
    """Agents of this target alive, plus spin-ups whose agent has not registered yet."""
    live = [a for a in state.agents.values() if a.get("targetId") == t["id"] and a["status"] != "offline"]
    registered = {a.get("spinUpId") for a in live}
    return len(live) + sum(1 for op in t["activeSpinUps"] if op not in registered)


def cooldown_until(t: Record) -> datetime | None:
    """Cooldown after the last spin-up, doubled per consecutive failure or crash (capped)."""
    last = t.get("lastSpinUp")
    if not last:
        return None
    factor = min(MAX_BACKOFF_FACTOR, 2 ** (t["consecutiveFailures"] + t.get("crashes", 0)))
    return parse_ts(last["time"]) + timedelta(milliseconds=t["cooldownMs"] * factor)


def serves(t: Record, item: Record, policy: RoutingPolicy) -> bool:
    """Could an agent of this target take this item at all (capability, boundary, allowed type)?"""
    if item["capability"] not in t["capabilities"]:
        return False
    if item["boundary"] not in t["boundaries"] and "*" not in t["boundaries"]:
        return False
    types = spin_up_agent_types(item, policy)
    return types is None or t["agentType"] in types


def target_refusal(t: Record, now: datetime, max_crashes: int) -> str | None:
    """None if `t` may launch an agent now, else why not (for people). Assumes `serves` holds."""
    if t["status"] != "available":
        return f"target {t['name']} is {t['status']}"
    if t["healthStatus"] == "unhealthy":
        return f"target {t['name']} is unhealthy: {t.get('lastError') or 'health check failed'}"
    if t.get("crashes", 0) >= max_crashes:
        return (f"target {t['name']}: its agents were lost {t['crashes']} times in a row; not spinning up "
                f"again until it is re-enabled (last: {t.get('lastError')})")
    until = cooldown_until(t)
    if until is not None and until > now:
        return f"target {t['name']} cooling down until {until.isoformat()}"
    return None


def _preference(t: Record, item: Record, policy: RoutingPolicy) -> tuple[int, str, str]:
    types = spin_up_agent_types(item, policy) or []
    rank = types.index(t["agentType"]) if t["agentType"] in types else len(types)
    # Least recently used first: a never-used target sorts before any timestamp.
    return (rank, t.get("lastUsedAt") or "", t["name"])


def plan_spin_ups(
    state: ProjectState, plan: Plan, policy: RoutingPolicy, now: datetime, max_crashes: int = DEFAULT_MAX_CRASHES
) -> ElasticPlan:
    out = ElasticPlan()
    if not state.targets:
        return out
    waiting = [state.work[w] for w, code in plan.codes.items() if code in NEEDS_AGENT and w in state.work]
    waiting.sort(key=lambda w: (-effective_priority(w, now, policy.aging_per_minute), w["offeredAt"], w["id"]))
    # In-flight spin-ups cover waiting items: first the item each was launched for, then any other
    # waiting item its target could serve (the original item may have found an agent meanwhile).
    spare: list[Record] = []
    covered: set[str] = set()
    waiting_ids = {w["id"] for w in waiting}
    for t in state.targets.values():
        for op in t["activeSpinUps"].values():
            if op.get("workId") in waiting_ids and op["workId"] not in covered:
                covered.add(op["workId"])
            else:
                spare.append(t)
    load = {t["id"]: target_load(state, t) for t in state.targets.values()}
    for item in waiting:
        if item["id"] in covered:
            continue
        reusable = next((t for t in spare if serves(t, item, policy)), None)
        if reusable is not None:
            spare.remove(reusable)
            continue
        chosen, reasons = _choose(state, item, policy, now, max_crashes, load)
        if chosen is None:
            if reasons:
                out.blocked[item["id"]] = "; ".join(reasons)
            continue
        load[chosen["id"]] += 1
        out.spin_ups.append(SpinUpDecision(chosen["id"], item["id"]))
    return out


def any_target_can_launch(state: ProjectState, now: datetime, max_crashes: int = DEFAULT_MAX_CRASHES) -> bool:
    """Cheap pre-check (O(targets + agents)) so a scheduler tick can skip spin-up planning."""
    return any(
        target_refusal(t, now, max_crashes) is None and target_load(state, t) < t["maxConcurrentAgents"]
        for t in state.targets.values()
    )


def _choose(
    state: ProjectState, item: Record, policy: RoutingPolicy, now: datetime, max_crashes: int, load: dict[str, int]
) -> tuple[Record | None, list[str]]:
    candidates: list[Record] = []
    reasons: list[str] = []
    for t in state.targets.values():
        if not serves(t, item, policy):
            continue
        refusal = target_refusal(t, now, max_crashes)
        if refusal is None and load[t["id"]] >= t["maxConcurrentAgents"]:
            refusal = f"target {t['name']} is at its limit of {t['maxConcurrentAgents']} agents"
        if refusal is None:
            candidates.append(t)
        else:
            reasons.append(refusal)
    if not candidates:
        return None, reasons
    return min(candidates, key=lambda t: _preference(t, item, policy)), reasons


@dataclass(frozen=True, slots=True)
class ScaleDown:
    guid: str
    idle_ms: float


def idle_agents(state: ProjectState, now: datetime, default_idle_ms: int) -> list[ScaleDown]:
    """Agents to ask to stop: online, holding nothing, no pending shutdown, idle past their limit.

    Only agents weft launched (they carry a spin-up id) or that declared `spindownAfterIdleMs`
    are scaled down; someone's own long-running agent is never stopped for being idle."""
    out = []
    for a in state.agents.values():
        if a["status"] == "offline" or a["currentTaskCount"] or a["shutdownRequested"]:
            continue
        limit = a.get("spindownAfterIdleMs")
        if limit is None:
            if not a.get("spinUpId"):
                continue
            limit = default_idle_ms
        idle_ms = (now - parse_ts(a["lastActivity"])).total_seconds() * 1000
        if idle_ms >= limit:
            out.append(ScaleDown(a["guid"], idle_ms))
    return out


def next_idle_deadline(state: ProjectState, now: datetime, default_idle_ms: int) -> float | None:
    """Seconds until the next idle agent crosses its limit (so the scheduler wakes on time)."""
    best: float | None = None
    for a in state.agents.values():
        if a["status"] == "offline" or a["currentTaskCount"] or a["shutdownRequested"]:
            continue
        limit = a.get("spindownAfterIdleMs")
        if limit is None and not a.get("spinUpId"):
            continue
        remaining = (parse_ts(a["lastActivity"]) + timedelta(milliseconds=limit or default_idle_ms) - now)
        secs = remaining.total_seconds()
        best = secs if best is None else min(best, secs)
    return best


def overdue_spin_ups(state: ProjectState, now: datetime) -> list[tuple[str, str, dict[str, Any]]]:
    """(target id, spin-up id, op) of spin-ups with no registered agent within the target's timeout."""
    out = []
    for t in state.targets.values():
        for op in t["activeSpinUps"].values():
            started = parse_ts(op.get("startedAt") or op["requestedAt"])
            if now - started >= timedelta(milliseconds=t["spinUpTimeoutMs"]):
                out.append((t["id"], op["spinUpId"], op))
    return out


@dataclass(frozen=True, slots=True)
class SpinUpFailure:
    """An overdue spin-up to record as failed; `handle` (what its launch returned) is stopped."""

    target_id: str
    spin_up_id: str
    error: str
    duration_ms: float
    handle: Any = None


def overdue_failures(state: ProjectState, now: datetime, launching: Collection[str] = frozenset()) -> list[SpinUpFailure]:
    """Overdue spin-ups to fail, except those whose launch still runs here (the launch is bounded by
    the same timeout and records its own outcome)."""
    out = []
    for target_id, spin_up_id, op in overdue_spin_ups(state, now):
        if spin_up_id in launching:
            continue
        t = state.targets[target_id]
        error = f"no agent registered with spin-up id {spin_up_id} within {t['spinUpTimeoutMs']} ms"
        took = (now - parse_ts(op["requestedAt"])).total_seconds() * 1000
        out.append(SpinUpFailure(target_id, spin_up_id, error, round(took, 3), op.get("mechanismResult") or None))
    return out


def probes_due(
    state: ProjectState,
    now: datetime,
    probing: Collection[str],
    probed_at: Mapping[str, datetime],
    mechanisms: Collection[str],
) -> list[str]:
    """Ids of the targets to probe now: health checks enabled, not disabled, no probe running, a
    mechanism this replica has, never probed by this leader or last probed an interval ago."""
    out = []
    for t in state.targets.values():
        hc = t["healthCheck"]
        if not hc["enabled"] or t["status"] == "disabled" or t["id"] in probing:
            continue
        last = probed_at.get(t["id"])
        if last is not None and last + timedelta(milliseconds=hc["intervalMs"]) > now:
            continue
        if t["mechanism"] not in mechanisms:
            continue
        out.append(t["id"])
    return out


def next_fleet_deadline(
    state: ProjectState, now: datetime, default_idle_ms: int, probed_at: Mapping[str, datetime]
) -> float | None:
    """Seconds until the next time-based fleet decision is due: an idle agent's limit, a spin-up's
    timeout, a cooldown's end, a probe's interval."""
    due: list[float] = []
    idle = next_idle_deadline(state, now, default_idle_ms)
    if idle is not None:
        due.append(idle)
    for t in state.targets.values():
        for op in t["activeSpinUps"].values():
            started = parse_ts(op.get("startedAt") or op["requestedAt"])
            due.append((started + timedelta(milliseconds=t["spinUpTimeoutMs"]) - now).total_seconds())
        until = cooldown_until(t)
        if until is not None and until > now:
            due.append((until - now).total_seconds())
        hc = t["healthCheck"]
        probed = probed_at.get(t["id"])
        if hc["enabled"] and t["status"] != "disabled" and probed is not None:
            due.append((probed + timedelta(milliseconds=hc["intervalMs"]) - now).total_seconds())
    return min(due) if due else None
