"""Elastic-fleet policy as pure functions: which target, how many spin-ups, whom to scale down."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from projections import ProjectState, fold
from projections.events import Event, format_ts, parse_ts
from weft.core import fleet_policy
from weft.core.routing import DEFAULT_POLICY, plan_assignments

T0 = "2026-01-01T00:00:00.000Z"
NOW = parse_ts("2026-01-01T00:01:00.000Z")


def ev(type_: str, entity_id: str, data: dict[str, Any], ts: str = T0, seq: int = 0) -> Event:
    return Event(type_, entity_id, data, project="p", ts=ts, seq=seq)


def target(name: str, **over: Any) -> Event:
    body = {
        "name": name, "description": None, "agentType": "claude-code", "capabilities": ["python"],
        "boundaries": ["personal", "open-source"], "mechanism": "local",
        "config": {"mechanism": "local", "local": {"command": "weft agent"}},
        "healthCheck": {"enabled": True, "intervalMs": 300000, "timeoutMs": 10000},
        "maxConcurrentAgents": 3, "cooldownMs": 0, "spinUpTimeoutMs": 60000, "circuitBreakerThreshold": 3,
        "tags": [], "status": "available", "registeredBy": "api",
    }
    body.update(over)
    return ev("target.registered", f"t-{name}", {"target": body})


def work(work_id: str, **over: Any) -> Event:
    data = {"taskId": work_id, "capability": "python", "boundary": "personal", "description": "d", "priority": 5,
            "preferredAgentType": None, "requiredAgentType": None, "deadline": None, "contextData": None,
            "maxAttempts": 3}
    data.update(over)
    return ev("work.submitted", work_id, data)


def agent(guid: str, **over: Any) -> Event:
    data = {"guid": guid, "handle": None, "agentType": "claude-code", "capabilities": ["python"],
            "boundaries": ["*"], "maxConcurrentTasks": 1, "hostname": None, "username": None,
            "visibility": "project-only", "labels": {}, "source": "weft", "spinUpId": None, "targetId": None,
            "spindownAfterIdleMs": None}
    data.update(over)
    return ev("agent.registered", guid, data)


def state_of(*events: Event) -> ProjectState:
    return fold([Event(e.type, e.entity_id, e.data, project="p", ts=e.ts, seq=i + 1) for i, e in enumerate(events)],
                project="p")


def decide(state: ProjectState) -> fleet_policy.ElasticPlan:
    plan = plan_assignments(state, DEFAULT_POLICY, NOW)
    return fleet_policy.plan_spin_ups(state, plan, DEFAULT_POLICY, NOW)


def test_one_spin_up_per_waiting_item_not_per_event() -> None:
    state = state_of(target("laptop"), work("w1"), work("w2"))
    out = decide(state)
    assert [(d.target_id, d.work_id) for d in out.spin_ups] == [("t-laptop", "w1"), ("t-laptop", "w2")]


def test_twenty_waiting_items_never_exceed_max_concurrent_agents() -> None:
    state = state_of(target("laptop", maxConcurrentAgents=3), *(work(f"w{i:02d}") for i in range(20)))
    out = decide(state)
    assert len(out.spin_ups) == 3
    assert "at its limit of 3 agents" in out.blocked["w19"]


def test_in_flight_spin_ups_cover_demand_and_count_against_the_limit() -> None:
    events = [target("laptop", maxConcurrentAgents=3), *(work(f"w{i}") for i in range(5))]
    for i in range(2):
        events.append(ev("spinup.requested", "t-laptop",
                         {"spinUpId": f"s{i}", "workId": f"w{i}", "capability": "python", "boundary": "personal",
                          "reason": "waiting work"}))
    out = decide(state_of(*events))
    assert [d.work_id for d in out.spin_ups] == ["w2"]  # 2 in flight + 1 new = limit


def test_a_spin_up_whose_item_found_an_agent_covers_another_item() -> None:
    events = [target("laptop"), work("w0"), work("w1"), agent("a1"),
              ev("spinup.requested", "t-laptop", {"spinUpId": "s0", "workId": "w0", "capability": "python",
                                                  "boundary": "personal", "reason": "waiting work"}),
              ev("work.assigned", "w0", {"agentGuid": "a1", "attempt": 1, "acceptBy": T0})]
    out = decide(state_of(*events))
    assert out.spin_ups == []  # s0 now covers w1


def test_corporate_work_spins_up_only_copilot_targets() -> None:
    state = state_of(target("claude", boundaries=["corporate"]),
                     target("copilot", agentType="copilot-cli", boundaries=["corporate"]),
                     work("w1", boundary="corporate"))
    out = decide(state)
    assert [d.target_id for d in out.spin_ups] == ["t-copilot"]


def test_disabled_unhealthy_and_cooling_targets_are_skipped_with_reasons() -> None:
    cool = ts_plus(30)
    events = [
        target("off", status="disabled"),
        target("sick"),
        ev("target.health_changed", "t-sick", {"healthStatus": "unhealthy", "latencyMs": None, "error": "no route"}),
        target("cool", cooldownMs=60_000),
        ev("spinup.requested", "t-cool", {"spinUpId": "s", "workId": None, "capability": None, "boundary": None,
                                          "reason": "manual"}, ts=cool),
        ev("spinup.failed", "t-cool", {"spinUpId": "s", "error": "boom", "durationMs": 5.0}, ts=cool),
        work("w1"),
    ]
    out = decide(state_of(*events))
    assert out.spin_ups == []
    reason = out.blocked["w1"]
    assert "target off is disabled" in reason and "no route" in reason and "cooling down" in reason


def test_least_recently_used_target_first() -> None:
    events = [target("a"), target("b"),
              ev("spinup.requested", "t-a", {"spinUpId": "s", "workId": None, "capability": None, "boundary": None,
                                             "reason": "manual"}),
              ev("spinup.completed", "t-a", {"spinUpId": "s", "agentGuid": "x", "durationMs": 1.0}),
              work("w1")]
    out = decide(state_of(*events))
    assert [d.target_id for d in out.spin_ups] == ["t-b"]


def test_crashing_agents_back_off_then_give_up_with_a_reason() -> None:
    events: list[Event] = [target("laptop", cooldownMs=1000), work("w1")]
    for i in range(5):
        events += [
            ev("spinup.requested", "t-laptop", {"spinUpId": f"s{i}", "workId": "w1", "capability": "python",
                                                "boundary": "personal", "reason": "waiting work"}),
            agent(f"a{i}", spinUpId=f"s{i}", targetId="t-laptop", capabilities=["go"]),
            ev("spinup.completed", "t-laptop", {"spinUpId": f"s{i}", "agentGuid": f"a{i}", "durationMs": 1.0}),
            ev("agent.lost", f"a{i}", {"lastHeartbeat": None}),
        ]
    state = state_of(*events)
    assert state.targets["t-laptop"]["crashes"] == 5
    out = decide(state)
    assert out.spin_ups == []
    assert "lost 5 times in a row" in out.blocked["w1"]


def test_backoff_grows_with_failures() -> None:
    events: list[Event] = [target("laptop", cooldownMs=1000, circuitBreakerThreshold=10)]
    for i in range(3):
        events += [
            ev("spinup.requested", "t-laptop", {"spinUpId": f"s{i}", "workId": None, "capability": None,
                                                "boundary": None, "reason": "manual"}),
            ev("spinup.failed", "t-laptop", {"spinUpId": f"s{i}", "error": "x", "durationMs": 1.0}),
        ]
    t = state_of(*events).targets["t-laptop"]
    until = fleet_policy.cooldown_until(t)
    assert until is not None and until - parse_ts(T0) == timedelta(seconds=8)


def test_idle_spun_up_agents_are_scaled_down_but_not_own_or_busy_ones() -> None:
    events = [
        agent("spun", spinUpId="s1", targetId="t"),
        agent("mine"),
        agent("declared", spindownAfterIdleMs=1000),
        agent("busy", spinUpId="s2", targetId="t"),
        work("w1"),
        ev("work.assigned", "w1", {"agentGuid": "busy", "attempt": 1, "acceptBy": T0}),
    ]
    state = state_of(*events)
    downs = {d.guid for d in fleet_policy.idle_agents(state, NOW, default_idle_ms=30_000)}
    assert downs == {"spun", "declared"}
    assert fleet_policy.idle_agents(state, NOW, default_idle_ms=120_000) == [
        fleet_policy.ScaleDown("declared", 60_000.0)
    ]


def test_overdue_spin_ups_are_reported() -> None:
    events = [target("laptop", spinUpTimeoutMs=10_000),
              ev("spinup.requested", "t-laptop", {"spinUpId": "s", "workId": None, "capability": None,
                                                  "boundary": None, "reason": "manual"})]
    state = state_of(*events)
    assert [s for _, s, _ in fleet_policy.overdue_spin_ups(state, NOW)] == ["s"]
    assert fleet_policy.overdue_spin_ups(state, parse_ts(T0)) == []


def ts_plus(seconds: int) -> str:
    return format_ts(parse_ts(T0) + timedelta(seconds=seconds))
