"""One leader tick as a pure plan (weft/core/plan.py): events folded into a state, then every
decision of the tick read off `plan(...)`. No NATS, no clock, no scheduler."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from projections import ProjectState, fold
from projections.events import Event, format_ts, parse_ts
from projections.state import state_hash
from projections.work import ACCEPT_TIMEOUT
from weft.core import retention
from weft.core.fleet_policy import FleetSnapshot, ScaleDown, SpinUpDecision
from weft.core.plan import (
    AGENT_OFFLINE,
    MIN_DEADLINE_S,
    Assignment,
    Heard,
    SchedulerConfig,
    TickPlan,
    heard_since,
    plan,
    silence,
)
from weft.core.routing import DEFAULT_POLICY

T0 = parse_ts("2026-01-01T00:00:00.000Z")
NOW = T0 + timedelta(minutes=10)
CONFIG = SchedulerConfig(heartbeat_ms=10_000, accept_timeout_ms=30_000, idle_tick_s=5.0)
FLEET = FleetSnapshot(idle_timeout_ms=300_000, mechanisms=frozenset({"local"}))
# Every agent was heard a moment ago unless a test says otherwise.
HEARD_NOW = Heard(never_heard_s=1.0)


def at(seconds: float) -> str:
    return format_ts(T0 + timedelta(seconds=seconds))


class Story:
    """Events with ids, stream sequences and timestamps (seconds after T0), folded on demand."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def ev(self, type_: str, entity_id: str, data: dict[str, Any], t: float = 0.0) -> Story:
        n = len(self.events) + 1
        self.events.append(Event(type_, entity_id, data, project="p", id=f"ev-{n}", ts=at(t), seq=n))
        return self

    def agent(self, guid: str, t: float = 0.0, **over: Any) -> Story:
        data = {"guid": guid, "handle": None, "agentType": "claude-code", "capabilities": ["python"],
                "boundaries": ["*"], "maxConcurrentTasks": 1, "hostname": None, "username": None,
                "visibility": "project-only", "labels": {}, "source": "weft", "spinUpId": None, "targetId": None,
                "spindownAfterIdleMs": None}
        data.update(over)
        return self.ev("agent.registered", guid, data, t)

    def work(self, work_id: str, t: float = 0.0, **over: Any) -> Story:
        data = {"taskId": work_id, "capability": "python", "boundary": "personal", "description": "d",
                "priority": 5, "preferredAgentType": None, "requiredAgentType": None, "deadline": None,
                "contextData": None, "maxAttempts": 3}
        data.update(over)
        return self.ev("work.submitted", work_id, data, t)

    def assign(self, work_id: str, guid: str, t: float = 0.0, accept_by: str | None = None, attempt: int = 1) -> Story:
        data = {"agentGuid": guid, "attempt": attempt, "acceptBy": accept_by or at(t + 30)}
        return self.ev("work.assigned", work_id, data, t)

    def target(self, name: str, t: float = 0.0, **over: Any) -> Story:
        body = {
            "name": name, "description": None, "agentType": "claude-code", "capabilities": ["python"],
            "boundaries": ["personal"], "mechanism": "local",
            "config": {"mechanism": "local", "local": {"command": "weft agent"}},
            "healthCheck": {"enabled": False, "intervalMs": 60_000, "timeoutMs": 10_000},
            "maxConcurrentAgents": 3, "cooldownMs": 0, "spinUpTimeoutMs": 60_000, "circuitBreakerThreshold": 3,
            "tags": [], "status": "available", "registeredBy": "api",
        }
        body.update(over)
        return self.ev("target.registered", f"t-{name}", {"target": body}, t)

    def spin_up(self, target: str, spin_up_id: str, work_id: str | None, t: float = 0.0) -> Story:
        data = {"spinUpId": spin_up_id, "workId": work_id, "capability": None, "boundary": None,
                "reason": "waiting work"}
        return self.ev("spinup.requested", f"t-{target}", data, t)

    def state(self) -> ProjectState:
        return fold(self.events, project="p")


def tick(state: ProjectState, now: datetime = NOW, heard: Heard = HEARD_NOW, config: SchedulerConfig = CONFIG,
         **kw: Any) -> TickPlan:
    return plan(state, now, config, DEFAULT_POLICY, heard, **kw)


# --- assignments -------------------------------------------------------------------------------------


def test_an_idle_matching_agent_gets_the_pending_item_with_an_accept_deadline() -> None:
    state = Story().agent("a1", t=590).work("w1", t=595).state()
    out = tick(state)
    accept_by = format_ts(NOW + timedelta(milliseconds=CONFIG.accept_timeout_ms))
    assert out.assignments == [Assignment("w1", "a1", accept_by)]
    assert out.routing.assignments == [("w1", "a1")]
    assert out.withdrawals == [] and out.lost == []


def test_an_agent_without_the_capability_gets_nothing() -> None:
    state = Story().agent("a1", t=590, capabilities=["go"]).work("w1", t=595).state()
    out = tick(state)
    assert out.assignments == []
    assert out.routing.codes["w1"] == "capability"


@pytest.mark.parametrize("why", ["full", "offline", "shutdown"])
def test_a_full_offline_or_shutting_down_agent_gets_no_work(why: str) -> None:
    # An idle agent of another capability keeps the routing pass worth running (reasons are given).
    s = Story().agent("a1", t=590).agent("go", t=590, capabilities=["go"]).work("w1", t=595)
    if why == "full":
        s.work("w0", t=591).assign("w0", "a1", t=592, accept_by=at(3600)).ev("work.started", "w0", {"agentGuid": "a1"}, 593)
    elif why == "offline":
        s.ev("agent.deregistered", "a1", {"reason": "bye"}, 593)
    else:
        s.ev("agent.shutdown_requested", "a1", {"graceful": True, "reason": "idle", "gracePeriodMs": None}, 593)
    out = tick(s.state())
    assert [a.work_id for a in out.assignments if a.work_id == "w1"] == []
    assert out.routing.codes["w1"] == ("busy" if why == "full" else "capability")


def test_nothing_is_planned_when_nobody_could_take_anything() -> None:
    # No live agent and no fleet: the routing pass is skipped altogether (no waiting reasons either).
    state = Story().work("w1", t=595).state()
    assert tick(state).routing.waiting == {}
    # With a target that can launch, the pass runs (and the item gets a spin-up).
    state = Story().target("laptop").work("w1", t=595).state()
    assert "w1" in tick(state, fleet=FLEET).routing.waiting


# --- withdrawals and lost agents ------------------------------------------------------------------------


def test_an_accept_timeout_withdraws_and_the_agent_gets_no_more_work_in_that_pass() -> None:
    s = Story().agent("a1", t=500, maxConcurrentTasks=2).work("w1", t=501).work("w2", t=502)
    state = s.assign("w1", "a1", t=503, accept_by=at(533)).state()
    out = tick(state)
    assert [(w.work_id, w.guid, w.attempt, w.cause) for w in out.withdrawals] == [("w1", "a1", 1, ACCEPT_TIMEOUT)]
    assert out.withdrawals[0].reason == "not accepted by a1 in time"
    assert not out.withdrawals[0].dead_letter
    assert out.assignments == []  # a1 has a free slot but just let an assignment time out


def test_an_assignment_still_within_its_accept_time_is_left_alone_and_sets_the_deadline() -> None:
    state = Story().agent("a1", t=500).work("w1", t=501).assign("w1", "a1", t=598, accept_by=at(602)).state()
    out = tick(state)
    assert out.withdrawals == []
    assert out.deadline_s == pytest.approx(2.0)


def test_an_accepted_assignment_never_times_out() -> None:
    s = Story().agent("a1", t=500).work("w1", t=501).assign("w1", "a1", t=502, accept_by=at(532))
    state = s.ev("work.started", "w1", {"agentGuid": "a1"}, 503).state()
    assert tick(state).withdrawals == []


def test_a_silent_agent_is_marked_lost_then_its_items_are_withdrawn() -> None:
    s = Story().agent("a1", t=0).work("w1", t=1).assign("w1", "a1", t=2)
    s.ev("work.started", "w1", {"agentGuid": "a1"}, 3)  # lastSeen 00:00:03, ~10 minutes ago
    heard = Heard(silent_s={"a1": 500.0}, last_heard={"a1": at(100)})
    out = tick(s.state(), heard=heard)
    assert [(a.guid, a.last_heard) for a in out.lost] == [("a1", at(100))]
    assert out.withdrawals == []  # once the loss is folded (next tick)
    s.ev("agent.lost", "a1", {"lastHeartbeat": at(100)}, 600)
    out = tick(s.state(), heard=heard)
    assert out.lost == []
    assert [(w.work_id, w.cause, w.reason) for w in out.withdrawals] == [("w1", AGENT_OFFLINE, "agent a1 lost")]


def test_silence_is_judged_against_the_agents_own_last_event_and_its_source() -> None:
    s = Story().agent("fresh", t=595).agent("old", t=0).agent("warp", t=0, source="warp")
    heard = Heard(silent_s={"fresh": 3600.0, "old": 3600.0, "warp": 100.0})
    # fresh registered 5 s ago: not silent since the replica started; warp agents may be silent 180 s.
    assert [a.guid for a in tick(s.state(), heard=heard).lost] == ["old"]
    assert [a.guid for a in tick(s.state(), heard=Heard(silent_s={"old": 29.0}, never_heard_s=29.0)).lost] == []
    # Right after this replica's own loop stalled, nobody is judged.
    assert tick(s.state(), heard=Heard(silent_s={"old": 3600.0}, judge=False)).lost == []


def test_withdrawing_an_item_that_used_its_attempts_dead_letters_it() -> None:
    s = Story().agent("a1", t=500, maxConcurrentTasks=3)
    s.work("last", t=501, maxAttempts=2).assign("last", "a1", t=502, accept_by=at(503), attempt=2)
    s.work("more", t=501, maxAttempts=3).assign("more", "a1", t=502, accept_by=at(503), attempt=2)
    out = tick(s.state())
    assert {w.work_id: w.dead_letter for w in out.withdrawals} == {"last": True, "more": False}
    assert [w.work_id for w in out.dead_letters] == ["last"]
    # The scheduler's own limit counts too, when lower than the item's.
    strict = SchedulerConfig(max_withdrawals=2)
    assert {w.work_id for w in tick(s.state(), config=strict).dead_letters} == {"last", "more"}


def test_an_agent_heard_since_it_was_marked_unresponsive_gets_work_again() -> None:
    s = Story().agent("a1", t=500, maxConcurrentTasks=2).work("w1", t=501).work("w2", t=502)
    s.assign("w1", "a1", t=503, accept_by=at(504))
    s.ev("work.requeued", "w1", {"reason": "late", "retryAt": None, "cause": ACCEPT_TIMEOUT, "agentGuid": "a1"}, 505)
    state = s.state()
    assert state.agents["a1"]["unresponsiveSince"]
    assert tick(state).assignments == []
    heard = Heard(last_heard={"a1": at(506)}, never_heard_s=1.0)
    assert sorted(a.work_id for a in tick(state, heard=heard).assignments) == ["w1", "w2"]


def test_silence_and_heard_since_helpers() -> None:
    a = Story().agent("a1", t=0).state().agents["a1"]
    assert silence(a, 3600.0, NOW) == 600.0
    assert silence(a, 2.0, NOW) == 2.0
    assert heard_since(at(5), at(4)) and not heard_since(at(5), at(6)) and not heard_since(None, at(0))


# --- the fleet ---------------------------------------------------------------------------------------------


def test_a_target_is_spun_up_when_no_agent_can_take_the_work() -> None:
    state = Story().target("laptop").work("w1", t=595).state()
    assert tick(state, fleet=FLEET).spin_ups == [SpinUpDecision("t-laptop", "w1")]
    assert tick(state).spin_ups == []  # no fleet on this leader


def test_no_spin_up_while_an_idle_agent_can_take_the_work() -> None:
    state = Story().target("laptop").agent("a1", t=590).work("w1", t=595).state()
    out = tick(state, fleet=FLEET)
    assert out.spin_ups == [] and [a.work_id for a in out.assignments] == ["w1"]


def test_no_spin_up_during_cooldown_and_the_cooldown_end_is_a_deadline() -> None:
    s = Story().target("laptop", cooldownMs=60_000).spin_up("laptop", "s0", None, t=580)
    s.ev("spinup.failed", "t-laptop", {"spinUpId": "s0", "error": "boom", "durationMs": 1.0}, 580)
    state = s.work("w1", t=595).state()
    out = tick(state, fleet=FLEET)
    assert out.spin_ups == [] and out.routing.waiting == {}  # nothing could launch: no pass at all
    with_other = s.agent("go", t=590, capabilities=["go"]).state()
    assert "cooling down" in tick(with_other, fleet=FLEET).spin_up_blocked["w1"]
    # One failure doubles the cooldown: 580 s + 120 s, 100 s from now.
    relaxed = SchedulerConfig(heartbeat_ms=1_000_000, idle_tick_s=1000.0)
    assert tick(state, fleet=FLEET, config=relaxed).deadline_s == pytest.approx(100.0)
    assert tick(state, now=T0 + timedelta(seconds=701), fleet=FLEET).spin_ups == [SpinUpDecision("t-laptop", "w1")]


def test_no_spin_up_for_an_item_in_retry_backoff_which_wakes_the_tick() -> None:
    s = Story().target("laptop").agent("a1", t=500).work("w1", t=501).assign("w1", "a1", t=502)
    s.ev("work.failed", "w1", {"agentGuid": "a1", "message": "x", "code": None, "recoverable": True,
                               "outcome": "retry", "retryAt": at(603)}, 503)
    s.ev("agent.deregistered", "a1", {"reason": "bye"}, 504)
    out = tick(s.state(), fleet=FLEET)
    assert out.routing.codes == {"w1": "backoff"}
    assert out.spin_ups == []
    assert out.deadline_s == pytest.approx(3.0)


def test_idle_spun_up_agents_are_scaled_down_but_not_one_this_tick_gives_work() -> None:
    s = Story().agent("spun", t=0, spinUpId="s1", targetId="t").agent("mine", t=0)
    s.agent("other", t=0, spinUpId="s2", targetId="t", capabilities=["go"])
    assert tick(s.state(), fleet=FLEET).scale_downs == [ScaleDown("spun", 600_000.0), ScaleDown("other", 600_000.0)]
    assert tick(s.state()).scale_downs == []  # no fleet: nobody is scaled down
    s.ev("agent.deregistered", "mine", {"reason": "bye"}, 598).work("w1", t=599)
    out = tick(s.state(), fleet=FLEET)
    assert [(a.work_id, a.guid) for a in out.assignments] == [("w1", "spun")]
    assert [d.guid for d in out.scale_downs] == ["other"]


def test_an_idle_agent_is_not_scaled_down_before_its_limit_and_the_limit_is_a_deadline() -> None:
    state = Story().agent("spun", t=590, spinUpId="s1", targetId="t").state()
    fleet = FleetSnapshot(idle_timeout_ms=12_000)
    out = tick(state, fleet=fleet)
    assert out.scale_downs == []
    assert out.deadline_s == pytest.approx(2.0)


def test_overdue_spin_ups_fail_unless_their_launch_still_runs_here() -> None:
    s = Story().target("laptop", spinUpTimeoutMs=10_000).spin_up("laptop", "s0", None, t=500)
    s.ev("spinup.started", "t-laptop", {"spinUpId": "s0", "mechanismResult": {"pid": 42}}, 501)
    state = s.state()
    out = tick(state, fleet=FLEET)
    [f] = out.spin_up_failures
    assert (f.target_id, f.spin_up_id, f.handle) == ("t-laptop", "s0", {"pid": 42})
    assert "within 10000 ms" in f.error and f.duration_ms == 100_000.0
    assert tick(state, fleet=FleetSnapshot(launching=frozenset({"s0"}))).spin_up_failures == []
    assert tick(state, now=T0 + timedelta(seconds=505), fleet=FLEET).spin_up_failures == []


def test_health_probes_are_due_per_interval_for_available_mechanisms_only() -> None:
    hc = {"enabled": True, "intervalMs": 60_000, "timeoutMs": 1000}
    s = Story().target("laptop", healthCheck=hc).target("far", healthCheck=hc, mechanism="ssh")
    s.target("off", healthCheck=hc, status="disabled").target("quiet")
    state = s.state()
    out = tick(state, fleet=FLEET)
    assert out.probes == ["t-laptop"]
    # Probed now: the next probe is due an interval later, and it bounds the wake-up.
    relaxed = SchedulerConfig(heartbeat_ms=1_000_000, idle_tick_s=1000.0)
    assert tick(state, fleet=FLEET, config=relaxed).deadline_s == pytest.approx(60.0)
    recently = FleetSnapshot(mechanisms=frozenset({"local"}), probed_at={"t-laptop": NOW - timedelta(seconds=10)})
    assert tick(state, fleet=recently).probes == []
    assert tick(state, fleet=FleetSnapshot(mechanisms=frozenset({"local"}), probing=frozenset({"t-laptop"}))).probes == []
    assert tick(state, fleet=FleetSnapshot(mechanisms=frozenset({"local"}), health_checks=False)).probes == []


# --- retention --------------------------------------------------------------------------------------------


def retained() -> Story:
    s = Story().agent("a1", t=0, maxConcurrentTasks=5)
    for wid, t in (("old", 10), ("recent", 590)):
        s.work(wid, t=t).assign(wid, "a1", t=t).ev("work.started", wid, {"agentGuid": "a1"}, t)
        s.ev("work.completed", wid, {"agentGuid": "a1", "summary": None, "output": None, "artifacts": None}, t)
    return s.work("live", t=20)


def test_purges_respect_the_retention_period() -> None:
    state = retained().state()
    keep_a_minute = SchedulerConfig(retain_done_s=60.0, purge_every_s=60.0)
    out = tick(state, config=keep_a_minute)
    assert out.purges.work_ids == ("old",)
    assert out.purges.before == format_ts(NOW - timedelta(seconds=60))
    assert out.purges.next_at == NOW + timedelta(seconds=1)  # found some: look again soon
    assert tick(state).purges.work_ids == ()  # retention off: kept forever
    assert tick(state, config=SchedulerConfig(retain_done_s=3600.0)).purges.work_ids == ()


def test_purges_wait_for_their_next_pass_and_leave_the_cursor_alone() -> None:
    state = retained().state()
    cfg = SchedulerConfig(retain_done_s=60.0, purge_every_s=60.0)
    cursor = retention.Cursor()
    out = tick(state, config=cfg, next_purge=NOW + timedelta(seconds=2), purge_cursor=cursor)
    assert out.purges.before is None and out.purges.work_ids == ()
    assert out.purges.next_at == NOW + timedelta(seconds=2)
    assert out.deadline_s == pytest.approx(2.0)
    out = tick(state, config=cfg, next_purge=NOW, purge_cursor=cursor)
    assert out.purges.work_ids == ("old",)
    assert cursor.at == retention.Cursor().at and out.purges.cursor is not cursor


# --- the next deadline and purity ----------------------------------------------------------------------------


def test_the_next_deadline_is_the_earliest_due_and_never_zero() -> None:
    s = Story().target("laptop", spinUpTimeoutMs=60_000).spin_up("laptop", "s0", None, t=596)  # due in 56 s
    s.agent("a1", t=500, spinUpId="sx", targetId="t-laptop")  # idle limit at 500 + 300 s: in 200 s
    relaxed = SchedulerConfig(heartbeat_ms=1_000_000, idle_tick_s=1000.0)
    assert tick(s.state(), fleet=FLEET, config=relaxed).deadline_s == pytest.approx(56.0)
    s.work("w1", t=501).assign("w1", "a1", t=502, accept_by=at(640))  # accept timeout in 40 s
    assert tick(s.state(), fleet=FLEET, config=relaxed).deadline_s == pytest.approx(40.0)
    assert tick(s.state(), fleet=FLEET).deadline_s == pytest.approx(5.0)  # the idle tick
    overdue = Story().target("laptop", spinUpTimeoutMs=1_000).spin_up("laptop", "s0", None, t=0).state()
    launching = FleetSnapshot(launching=frozenset({"s0"}))
    assert tick(overdue, fleet=launching).deadline_s == MIN_DEADLINE_S


def test_plan_changes_nothing_it_is_given() -> None:
    hc = {"enabled": True, "intervalMs": 60_000, "timeoutMs": 1000}
    state = retained().target("laptop", healthCheck=hc).work("w9", t=599, capability="rust").state()
    before = state_hash(state)
    probed: dict[str, datetime] = {}
    fleet = FleetSnapshot(mechanisms=frozenset({"local"}), probed_at=probed)
    first = tick(state, config=SchedulerConfig(retain_done_s=60.0), fleet=fleet)
    assert first.probes == ["t-laptop"] and first.purges.work_ids == ("old",)
    assert state_hash(state) == before and probed == {}
    again = tick(state, config=SchedulerConfig(retain_done_s=60.0), fleet=fleet)
    assert (again.assignments, again.spin_ups, again.purges.work_ids) == (
        first.assignments, first.spin_ups, first.purges.work_ids)
