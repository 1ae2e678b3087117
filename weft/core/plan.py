"""One tick of a project's leader as data: every decision the scheduler then carries out.

`plan(state, now, config, policy, heard, ...)` is pure (no I/O, no clock, no randomness): what is
not in the folded `ProjectState` comes in as plain data: the config, what this replica heard of
the agents (`Heard`: heartbeats are not events), the fleet's memory (`FleetSnapshot`) and where
retention left off. It returns a `TickPlan`:

- agents to mark lost (silent for longer than their source allows) and, for the others,
  assignments to withdraw (their agent is offline, or did not accept in time); a withdrawal of an
  item that used its attempts dead-letters it (`Withdrawal.dead_letter`);
- the routing plan (`routing.plan_assignments`) and its assignments with their accept deadline;
- the fleet's decisions: spin-ups to request, overdue spin-ups to fail, idle agents to scale down
  (never one this tick gives work), targets to probe;
- the retention pass (finished items to purge);
- the next wake-up: seconds until the earliest time-based decision is due.

The scheduler (`weft.runtime.scheduler`) appends each decision with its epoch; the commands
re-validate each against the newest state, so a plan that went stale meanwhile changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from projections.events import format_ts, parse_ts
from projections.state import ProjectState, Record
from projections.work import ACCEPT_TIMEOUT
from weft.core import fleet_policy, retention
from weft.core.decisions.work import withdrawal_limit
from weft.core.fleet_policy import FleetSnapshot, ScaleDown, SpinUpDecision, SpinUpFailure
from weft.core.routing import Plan, RoutingPolicy, plan_assignments

AGENT_OFFLINE = "agent-offline"
MIN_DEADLINE_S = 0.005  # never wake in a tight loop, even for something overdue


@dataclass(frozen=True)
class SchedulerConfig:
    heartbeat_ms: int = 10_000
    lost_after_heartbeats: int = 3
    accept_timeout_ms: int = 30_000
    # An item whose assignments keep being withdrawn (agents dying under it, accept timeouts) is
    # dead-lettered once it used its own `maxAttempts`, or this many attempts if that is lower.
    max_withdrawals: int = 10
    # Warp agents heartbeat into their KV entry every 60 s; Warp's own GC calls 3 minutes silence offline.
    warp_lost_after_s: float = 180.0
    idle_tick_s: float = 5.0
    # Finished items leave the projection this long after their last change (0: kept forever);
    # the scheduler looks for them every `purge_every_s`, at most `purge_batch` at a time.
    retain_done_s: float = 0.0
    purge_every_s: float = 60.0
    purge_batch: int = 500

    def lost_after_s(self, source: str = "weft") -> float:
        """Silence after which an agent of this source (`weft`, `warp`) is lost."""
        if source == "warp":
            return self.warp_lost_after_s
        return self.heartbeat_ms * self.lost_after_heartbeats / 1000


@dataclass(frozen=True, slots=True)
class Heard:
    """What this replica heard of the project's agents (heartbeats, memory only).

    `silent_s`: seconds since it last heard each agent (an agent it never heard: since it started
    listening; one missing here counts as `never_heard_s`). `last_heard`: the wall time of that
    heartbeat. `judge` is False right after this replica's own loop stalled: heartbeats that
    arrived meanwhile may still be unread, so no agent is judged silent then."""

    silent_s: Mapping[str, float] = field(default_factory=dict)
    last_heard: Mapping[str, str] = field(default_factory=dict)
    judge: bool = True
    never_heard_s: float = math.inf


@dataclass(frozen=True, slots=True)
class LostAgent:
    guid: str
    last_heard: str | None  # the last heartbeat this replica heard, for the event
    silent_s: float


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """Take an assignment back; `guid` and `attempt` are what this decision saw."""

    work_id: str
    guid: str | None
    attempt: int
    reason: str
    cause: str  # AGENT_OFFLINE or projections.work.ACCEPT_TIMEOUT
    dead_letter: bool  # the item used its attempts: the withdrawal dead-letters it


@dataclass(frozen=True, slots=True)
class Assignment:
    work_id: str
    guid: str
    accept_by: str


@dataclass(slots=True)
class TickPlan:
    lost: list[LostAgent] = field(default_factory=list)
    withdrawals: list[Withdrawal] = field(default_factory=list)
    routing: Plan = field(default_factory=Plan)
    assignments: list[Assignment] = field(default_factory=list)
    spin_ups: list[SpinUpDecision] = field(default_factory=list)
    # Why waiting items get no spin-up (no target, cooldown, limit...), by work id.
    spin_up_blocked: dict[str, str] = field(default_factory=dict)
    spin_up_failures: list[SpinUpFailure] = field(default_factory=list)
    scale_downs: list[ScaleDown] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)  # target ids
    purges: retention.PurgePass = field(default_factory=lambda: retention.PurgePass(None, (), None, retention.Cursor()))
    deadline_s: float = 0.0  # seconds until the next tick is due even if no event arrives

    @property
    def dead_letters(self) -> list[Withdrawal]:
        return [w for w in self.withdrawals if w.dead_letter]


def silence(agent: Record, heard_s: float, now: datetime) -> float:
    """Seconds without a sign of life from the agent itself: since the last heartbeat this replica
    heard (`heard_s`), but never longer than since the last event the agent itself caused
    (`lastSeen`: its registration, an accept, progress, a result), so an agent that joined a
    long-running replica a moment ago is not 'silent since the replica started'. What weft says
    about the agent (an assignment, a withdrawal) is no sign of life: a dead agent that keeps
    being offered work must still fall silent."""
    # A record folded before `lastSeen` existed: its registration is the last word known of it.
    seen = agent.get("lastSeen") or agent["registeredAt"]
    active = (now - parse_ts(seen)).total_seconds()
    return min(heard_s, max(0.0, active))


def heard_since(last_heard: str | None, ts: str) -> bool:
    """Was the agent heard (a heartbeat, a registration, a sync) after `ts`?"""
    return last_heard is not None and parse_ts(last_heard) > parse_ts(ts)


def worth_planning(state: ProjectState, now: datetime, fleet: FleetSnapshot | None) -> bool:
    """Could any pending item be assigned or spun up for? If not, an O(pending) plan would change nothing."""
    if state.work_counts["pending"] == 0:
        return False
    for a in state.agents.values():
        if a["status"] != "offline" and not a["shutdownRequested"] and a["currentTaskCount"] < a["maxConcurrentTasks"]:
            return True
    return fleet is not None and fleet_policy.any_target_can_launch(state, now, fleet.max_crashes)


def plan(
    state: ProjectState,
    now: datetime,
    config: SchedulerConfig,
    policy: RoutingPolicy,
    heard: Heard,
    *,
    fleet: FleetSnapshot | None = None,
    next_purge: datetime | None = None,
    purge_cursor: retention.Cursor | None = None,
) -> TickPlan:
    """Every decision of one leader tick at `now` (see the module docstring). `fleet` None: this
    leader runs no fleet (no spin-ups, scale-downs or probes). `next_purge` and `purge_cursor` are
    the previous tick's `purges.next_at` and `purges.cursor` (None: look at once, from the start)."""
    out = TickPlan()
    accept_deadline: datetime | None = None
    # Agents that let an assignment time out get no work (routing) until they show life:
    # `heard_from` those marked so that this replica heard since; `timed_out` those about to be.
    heard_from: set[str] = set()
    timed_out: set[str] = set()
    for agent in state.agents.values():
        guid = agent["guid"]
        offline = agent["status"] == "offline"
        if not offline and heard.judge:
            silent = silence(agent, heard.silent_s.get(guid, heard.never_heard_s), now)
            if silent > config.lost_after_s(agent["source"]):
                out.lost.append(LostAgent(guid, heard.last_heard.get(guid), silent))
                continue  # its work is withdrawn once the loss is folded (next tick)
        if not offline and agent.get("unresponsiveSince") and heard_since(
            heard.last_heard.get(guid), agent["unresponsiveSince"]
        ):
            heard_from.add(guid)
        for work_id in agent["currentTasks"]:
            item = state.work[work_id]
            if offline:
                reason = f"agent {guid} {agent['offlineReason'] or 'offline'}"
                out.withdrawals.append(_withdrawal(item, reason, AGENT_OFFLINE, config))
            elif item["status"] == "assigned" and item["acceptBy"]:
                accept_by = parse_ts(item["acceptBy"])
                if accept_by <= now:
                    timed_out.add(guid)
                    out.withdrawals.append(_withdrawal(item, f"not accepted by {guid} in time", ACCEPT_TIMEOUT, config))
                elif accept_deadline is None or accept_by < accept_deadline:
                    accept_deadline = accept_by

    if worth_planning(state, now, fleet):
        out.routing = plan_assignments(
            state, policy, now, fleet_policy.spinning_up(state), heard_from=heard_from, timed_out=timed_out
        )
    accept_by_ts = format_ts(now + timedelta(milliseconds=config.accept_timeout_ms))
    out.assignments = [Assignment(wid, guid, accept_by_ts) for wid, guid in out.routing.assignments]

    probed_at: Mapping[str, datetime] = {}
    if fleet is not None:
        spin = fleet_policy.plan_spin_ups(state, out.routing, policy, now, fleet.max_crashes)
        out.spin_ups, out.spin_up_blocked = spin.spin_ups, spin.blocked
        out.spin_up_failures = fleet_policy.overdue_failures(state, now, fleet.launching)
        getting_work = {guid for _, guid in out.routing.assignments}
        out.scale_downs = [
            d for d in fleet_policy.idle_agents(state, now, fleet.idle_timeout_ms) if d.guid not in getting_work
        ]
        if fleet.health_checks:
            out.probes = fleet_policy.probes_due(state, now, fleet.probing, fleet.probed_at, fleet.mechanisms)
        probed_at = {**fleet.probed_at, **dict.fromkeys(out.probes, now)}

    out.purges = retention.plan_purges(
        state, now, config.retain_done_s, config.purge_every_s, config.purge_batch,
        next_purge, purge_cursor if purge_cursor is not None else retention.Cursor(),
    )
    out.deadline_s = _next_deadline(state, now, config, out, fleet, probed_at, accept_deadline)
    return out


def _withdrawal(item: Record, reason: str, cause: str, config: SchedulerConfig) -> Withdrawal:
    dead = item["attempts"] >= withdrawal_limit(item, config.max_withdrawals)
    return Withdrawal(item["id"], item["assignedTo"], item["attempts"], reason, cause, dead)


def _next_deadline(
    state: ProjectState,
    now: datetime,
    config: SchedulerConfig,
    out: TickPlan,
    fleet: FleetSnapshot | None,
    probed_at: Mapping[str, datetime],
    accept_deadline: datetime | None,
) -> float:
    """Seconds until something time-based is due: a heartbeat judgement, an accept timeout, a
    retry backoff, a retention pass, a fleet decision (never less than MIN_DEADLINE_S)."""
    due = [config.idle_tick_s, config.heartbeat_ms / 1000]
    if config.retain_done_s > 0 and out.purges.next_at is not None:
        due.append((out.purges.next_at - now).total_seconds())
    if fleet is not None:
        fleet_due = fleet_policy.next_fleet_deadline(state, now, fleet.idle_timeout_ms, probed_at)
        if fleet_due is not None:
            due.append(fleet_due)
    if accept_deadline is not None:
        due.append((accept_deadline - now).total_seconds())
    for work_id, code in out.routing.codes.items():
        if code == "backoff":
            retry_at = state.work[work_id]["retryAt"]
            if retry_at:
                due.append((parse_ts(retry_at) - now).total_seconds())
    return max(MIN_DEADLINE_S, min(due))
