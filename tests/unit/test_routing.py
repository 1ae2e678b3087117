"""Routing policy and assignment planning (weft/core/routing.py): pure, so no server needed."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections.agents import new_agent
from projections.events import Event, format_ts
from projections.state import ProjectState, Record, encode_state
from projections.work import new_work
from projections.worktable import WorkTable
from weft.core.routing import (
    DEFAULT_POLICY,
    BoundaryRule,
    Plan,
    PolicyError,
    RoutingPolicy,
    accepts_boundary,
    effective_priority,
    eligible,
    is_live,
    load_policy,
    plan_assignments,
    spin_up_agent_types,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
COPILOT, CLAUDE = "copilot-cli", "claude-code"


def make_agent(
    guid: str,
    agent_type: str = CLAUDE,
    caps: tuple[str, ...] = ("general",),
    boundaries: tuple[str, ...] = (),
    max_tasks: int = 1,
    tasks: tuple[str, ...] = (),
    status: str = "online",
    shutdown: bool = False,
) -> Record:
    ev = Event(
        "agent.registered",
        guid,
        {"guid": guid, "agentType": agent_type, "capabilities": list(caps), "boundaries": list(boundaries),
         "maxConcurrentTasks": max_tasks},
        project="p",
        ts=format_ts(NOW - timedelta(hours=1)),
    )
    a = new_agent(ev)
    a["currentTasks"] = list(tasks)
    a["currentTaskCount"] = len(tasks)
    a["status"] = status
    if shutdown:
        a["shutdownRequested"] = {"graceful": True, "reason": "idle", "gracePeriodMs": None, "requestedAt": a["registeredAt"]}
    return a


def make_work(
    wid: str,
    capability: str = "general",
    boundary: str = "personal",
    priority: int = 5,
    waited: timedelta = timedelta(0),
    preferred: str | None = None,
    required: str | None = None,
    retry_at: datetime | None = None,
    status: str = "pending",
) -> Record:
    ev = Event(
        "work.submitted",
        wid,
        {"taskId": wid, "capability": capability, "boundary": boundary, "description": "d", "priority": priority,
         "preferredAgentType": preferred, "requiredAgentType": required},
        project="p",
        ts=format_ts(NOW - waited),
    )
    w = new_work(ev)
    w["status"] = status
    w["retryAt"] = format_ts(retry_at) if retry_at else None
    return w


def make_state(agents: list[Record], work: list[Record]) -> ProjectState:
    s = ProjectState(project="p")
    s.agents = {a["guid"]: a for a in agents}
    s.work = WorkTable({w["id"]: w for w in work})
    s.reindex_work()
    return s


def plan(agents: list[Record], work: list[Record], policy: RoutingPolicy = DEFAULT_POLICY, **kw: Any) -> Plan:
    return plan_assignments(make_state(agents, work), policy, kw.pop("now", NOW), **kw)


# --- hard constraints --------------------------------------------------------------------------


def test_corporate_work_never_reaches_claude_code_agent() -> None:
    idle_claude = make_agent("a1", CLAUDE, boundaries=("corporate",), max_tasks=4)
    busy_copilot = make_agent("a2", COPILOT, boundaries=("corporate",), tasks=("x",))
    item = make_work("w1", boundary="corporate", priority=10)
    p = plan([idle_claude, busy_copilot], [item])
    assert p.assignments == []
    assert p.waiting == {"w1": "all eligible agents busy"}

    p = plan([idle_claude], [item])
    assert p.assignments == []
    assert p.waiting == {"w1": "boundary corporate allows only copilot-cli"}
    assert p.codes == {"w1": "boundary-type"}
    assert eligible(idle_claude, item, DEFAULT_POLICY) == "boundary corporate allows only copilot-cli"

    # Not even when the item asks for claude-code.
    p = plan([idle_claude], [make_work("w2", boundary="corporate", required=CLAUDE)])
    assert p.waiting == {"w2": "boundary corporate allows only copilot-cli"}
    p = plan([idle_claude], [make_work("w3", boundary="corporate", preferred=CLAUDE)])
    assert p.assignments == []


def test_corporate_work_goes_to_copilot() -> None:
    p = plan([make_agent("a1", CLAUDE), make_agent("a2", COPILOT)], [make_work("w1", boundary="corporate")])
    assert p.assignments == [("w1", "a2")]


def test_waiting_reasons() -> None:
    policy = RoutingPolicy(rules={"secure": BoundaryRule("secure", [COPILOT, "codex"])})
    claude = make_agent("a1", CLAUDE, caps=("general",), boundaries=("personal",))
    copilot = make_agent("a2", COPILOT, caps=("general",), boundaries=("personal", "secure"))
    work = [
        make_work("cap", capability="rust"),
        make_work("rule", boundary="secure"),
        make_work("bound", boundary="elsewhere"),
        make_work("req", boundary="personal", required="codex"),
    ]
    p = plan([claude], work, policy)
    assert p.waiting == {
        "cap": "no agent with capability rust",
        "rule": "boundary secure allows only copilot-cli, codex",
        "bound": "no agent accepts boundary elsewhere",
        "req": "required agent type codex not available",
    }
    assert p.codes == {"cap": "capability", "rule": "boundary-type", "bound": "boundary", "req": "required-type"}
    p = plan([claude, copilot], [*work, make_work("w5"), make_work("w6"), make_work("w7")], policy)
    assert len(p.assignments) == 2  # both agents have one slot
    assert sorted(p.waiting.values()).count("all eligible agents busy") == 2


def test_offline_and_shutting_down_agents_are_not_used() -> None:
    off = make_agent("a1", status="offline")
    leaving = make_agent("a2", shutdown=True)
    p = plan([off, leaving], [make_work("w1")])
    assert p.waiting == {"w1": "no agent with capability general"}
    assert eligible(off, make_work("w"), DEFAULT_POLICY) == "agent is offline"
    assert eligible(leaving, make_work("w"), DEFAULT_POLICY) == "agent is shutting down"
    assert not is_live(off) and not is_live(leaving)


def test_agent_boundaries_wildcard_and_empty_accept_anything() -> None:
    assert accepts_boundary(make_agent("a", boundaries=()), "anything")
    assert accepts_boundary(make_agent("a", boundaries=("*",)), "anything")
    assert accepts_boundary(make_agent("a", boundaries=("x", "*")), "anything")
    assert not accepts_boundary(make_agent("a", boundaries=("x",)), "anything")
    assert eligible(make_agent("a", boundaries=("x",)), make_work("w", boundary="y"), DEFAULT_POLICY) == (
        "agent does not accept boundary y"
    )


def test_eligible_checks() -> None:
    a = make_agent("a", CLAUDE, caps=("general", "py"), max_tasks=2, tasks=("t1",))
    assert eligible(a, make_work("w"), DEFAULT_POLICY) is None
    assert eligible(a, make_work("w", capability="go"), DEFAULT_POLICY) == "agent lacks capability go"
    assert eligible(a, make_work("w", required=COPILOT), DEFAULT_POLICY) == "required agent type copilot-cli"
    assert eligible(a, make_work("w", preferred=COPILOT), DEFAULT_POLICY) is None  # soft
    full = make_agent("b", max_tasks=1, tasks=("t1",))
    assert eligible(full, make_work("w"), DEFAULT_POLICY) == "agent is at capacity (1/1)"


def test_unknown_boundary_accepts_any_type() -> None:
    p = plan([make_agent("a1", "some-new-agent")], [make_work("w1", boundary="team-x")])
    assert p.assignments == [("w1", "a1")]


# --- soft preferences and load ---------------------------------------------------------------


def test_least_loaded_agent_is_chosen() -> None:
    agents = [
        make_agent("a1", max_tasks=4, tasks=("x", "y")),  # load 0.5, 2 tasks
        make_agent("a2", max_tasks=2, tasks=("z",)),  # load 0.5, 1 task
        make_agent("a3", max_tasks=10, tasks=("u", "v", "w")),  # load 0.3, 3 tasks
    ]
    p = plan(agents, [make_work("w1")])
    assert p.assignments == [("w1", "a3")]
    # Equal ratio: fewer current tasks wins (a2 has 1 of 2, a1 has 2 of 4).
    p = plan(agents[:2], [make_work("w1")])
    assert p.assignments == [("w1", "a2")]
    # Equal everything: guid decides.
    p = plan([make_agent("b2"), make_agent("b1")], [make_work("w1")])
    assert p.assignments == [("w1", "b1")]


def test_load_spreads_as_capacity_is_consumed() -> None:
    agents = [make_agent("a1", max_tasks=2), make_agent("a2", max_tasks=2)]
    work = [make_work(f"w{i}", waited=timedelta(seconds=10 - i)) for i in range(5)]
    p = plan(agents, work)
    assert p.assignments == [("w0", "a1"), ("w1", "a2"), ("w2", "a1"), ("w3", "a2")]
    assert p.waiting == {"w4": "all eligible agents busy"}


def test_required_type_is_hard_preferred_type_is_soft() -> None:
    claude = make_agent("a1", CLAUDE, max_tasks=5)
    copilot = make_agent("a2", COPILOT, max_tasks=5, tasks=("x", "y", "z"))
    # Preferred wins over load ...
    assert plan([claude, copilot], [make_work("w", boundary="open-source", preferred=COPILOT)]).assignments == [
        ("w", "a2")
    ]
    # ... but falls back when no preferred agent has room.
    full_copilot = make_agent("a2", COPILOT, max_tasks=1, tasks=("x",))
    assert plan([claude, full_copilot], [make_work("w", boundary="open-source", preferred=COPILOT)]).assignments == [
        ("w", "a1")
    ]
    # Required never falls back.
    p = plan([claude, full_copilot], [make_work("w", boundary="open-source", required=COPILOT)])
    assert p.assignments == [] and p.waiting == {"w": "all eligible agents busy"}
    p = plan([claude], [make_work("w", boundary="open-source", required=COPILOT)])
    assert p.waiting == {"w": "required agent type copilot-cli not available"}


def test_rule_preference_order() -> None:
    claude = make_agent("a1", CLAUDE, max_tasks=5, tasks=("x", "y"))
    copilot = make_agent("a2", COPILOT, max_tasks=5)
    # personal prefers claude-code even though copilot is idler; corporate-adjacent prefers copilot.
    assert plan([claude, copilot], [make_work("w", boundary="personal")]).assignments == [("w", "a1")]
    assert plan([claude, copilot], [make_work("w", boundary="corporate-adjacent")]).assignments == [("w", "a2")]
    # open-source has no preference: least loaded.
    assert plan([claude, copilot], [make_work("w", boundary="open-source")]).assignments == [("w", "a2")]
    # The item's own preference beats the rule's.
    assert plan([claude, copilot], [make_work("w", boundary="personal", preferred=COPILOT)]).assignments == [
        ("w", "a2")
    ]


# --- ordering, aging, backoff ----------------------------------------------------------------


def test_higher_priority_first() -> None:
    work = [make_work("low", priority=2), make_work("high", priority=9), make_work("mid", priority=5)]
    p = plan([make_agent("a1")], work, RoutingPolicy(aging_per_minute=0))
    assert p.assignments == [("high", "a1")]


def test_aging_lets_old_low_priority_overtake() -> None:
    policy = RoutingPolicy(aging_per_minute=0.1)
    fresh_high = make_work("high", priority=10)
    old_low = make_work("low", priority=1, waited=timedelta(minutes=80))
    p = plan([make_agent("a1")], [fresh_high, old_low], policy)
    assert p.assignments == [("high", "a1")]  # 1 + 8 < 10
    # Ten minutes later the old item (1 + 10 = 11) overtakes a high-priority item that just arrived.
    later = NOW + timedelta(minutes=20)
    fresh_high = make_work("high", priority=10, waited=timedelta(minutes=-20))
    p = plan([make_agent("a1")], [fresh_high, old_low], policy, now=later)
    assert p.assignments == [("low", "a1")]
    assert effective_priority(old_low, later, 0.1) == pytest.approx(11.0)
    assert effective_priority(make_work("future", waited=timedelta(minutes=-5)), NOW, 1.0) == 5.0


def test_equal_priority_oldest_then_id() -> None:
    work = [make_work("b", waited=timedelta(seconds=5)), make_work("a", waited=timedelta(seconds=5)),
            make_work("c", waited=timedelta(seconds=9))]
    p = plan([make_agent("a1", max_tasks=3)], work, RoutingPolicy(aging_per_minute=0))
    assert [w for w, _ in p.assignments] == ["c", "a", "b"]


def test_retry_backoff_respected() -> None:
    until = NOW + timedelta(seconds=30)
    item = make_work("w1", retry_at=until)
    p = plan([make_agent("a1")], [item])
    assert p.assignments == []
    assert p.waiting == {"w1": f"retry backoff until {format_ts(until)}"}
    assert p.codes == {"w1": "backoff"}
    assert plan([make_agent("a1")], [item], now=until).assignments == [("w1", "a1")]
    assert plan([make_agent("a1")], [make_work("w2", retry_at=NOW - timedelta(seconds=1))]).assignments == [
        ("w2", "a1")
    ]


def test_only_pending_items_are_planned() -> None:
    work = [make_work(f"w-{s}", status=s) for s in ("assigned", "in-progress", "completed", "failed", "cancelled")]
    p = plan([make_agent("a1", max_tasks=10)], work)
    assert p.assignments == [] and p.waiting == {}


def test_spin_up_hook_overrides_reason_only_when_unassigned() -> None:
    work = [make_work("w1", capability="rust"), make_work("w2"), make_work("w3")]
    p = plan([make_agent("a1")], work, spinning_up={"w1", "w2", "w3"})
    assert len(p.assignments) == 1
    assert set(p.waiting.values()) == {"spin-up in progress"}
    assert set(p.codes.values()) == {"spin-up"}
    assert plan([make_agent("a1")], work, spinning_up=["w1"]).waiting["w1"] == "spin-up in progress"


def test_naive_now_is_taken_as_utc() -> None:
    item = make_work("w", retry_at=NOW + timedelta(seconds=1))
    assert plan([make_agent("a")], [item], now=NOW.replace(tzinfo=None)).assignments == []


def test_spin_up_agent_types() -> None:
    assert spin_up_agent_types(make_work("w", boundary="corporate"), DEFAULT_POLICY) == [COPILOT]
    assert spin_up_agent_types(make_work("w", boundary="corporate", required=CLAUDE), DEFAULT_POLICY) == []
    assert spin_up_agent_types(make_work("w", boundary="personal"), DEFAULT_POLICY) == [CLAUDE]
    assert spin_up_agent_types(make_work("w", boundary="personal", preferred=COPILOT), DEFAULT_POLICY) == [
        COPILOT, CLAUDE
    ]
    assert spin_up_agent_types(make_work("w", boundary="open-source"), DEFAULT_POLICY) is None
    assert spin_up_agent_types(make_work("w", boundary="x", required="codex"), DEFAULT_POLICY) == ["codex"]


# --- policy documents ------------------------------------------------------------------------


def test_default_policy() -> None:
    assert DEFAULT_POLICY.rule_for("corporate").allowedAgentTypes == [COPILOT]
    assert DEFAULT_POLICY.rule_for("corporate-adjacent").allowedAgentTypes is None
    assert DEFAULT_POLICY.rule_for("corporate-adjacent").preferredAgentTypes == [COPILOT]
    assert DEFAULT_POLICY.rule_for("personal").preferredAgentTypes == [CLAUDE]
    assert DEFAULT_POLICY.rule_for("open-source").allowedAgentTypes is None
    assert DEFAULT_POLICY.rule_for("whatever").allowedAgentTypes is None


def test_load_policy_merges_over_defaults() -> None:
    p = load_policy('{"agingPerMinute": 0.5}')
    assert p.aging_per_minute == 0.5
    assert p.rule_for("corporate").allowedAgentTypes == [COPILOT]  # a tuning-only document keeps the guard
    p = load_policy(orjson.dumps({"boundaries": {"lab": {"allowedAgentTypes": ["codex"], "preferredAgentTypes": []}}}))
    assert p.rule_for("lab").allowedAgentTypes == ["codex"]
    assert p.rule_for("corporate").allowedAgentTypes == [COPILOT]
    p = load_policy('{"boundaries": [{"name": "corporate", "allowedAgentTypes": null}]}')
    assert p.rule_for("corporate").allowedAgentTypes is None


def test_load_policy_replace_and_default_rule() -> None:
    p = load_policy('{"replaceDefaults": true, "default": {"allowedAgentTypes": ["copilot-cli"]}}')
    assert p.rules == {}
    assert p.rule_for("corporate").allowedAgentTypes == [COPILOT]
    p2 = plan([make_agent("a1", CLAUDE)], [make_work("w", boundary="team-x")], p)
    assert p2.waiting == {"w": "boundary team-x allows only copilot-cli"}


def test_policy_round_trips() -> None:
    assert load_policy(orjson.dumps(DEFAULT_POLICY.to_dict())) == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ("{not json", "policy"),
        ("[]", "policy"),
        ('{"agingPerMinut": 1}', "agingPerMinut"),
        ('{"agingPerMinute": -1}', "agingPerMinute"),
        ('{"agingPerMinute": "fast"}', "agingPerMinute"),
        ('{"agingPerMinute": true}', "agingPerMinute"),
        ('{"replaceDefaults": "yes"}', "replaceDefaults"),
        ('{"boundaries": 3}', "boundaries"),
        ('{"boundaries": {"corporate": []}}', "boundaries.corporate"),
        ('{"boundaries": {"corporate": {"allowedAgentType": ["copilot-cli"]}}}', "boundaries.corporate.allowedAgentType"),
        ('{"boundaries": {"corporate": {"allowedAgentTypes": []}}}', "boundaries.corporate.allowedAgentTypes"),
        ('{"boundaries": {"corporate": {"allowedAgentTypes": "copilot-cli"}}}', "boundaries.corporate.allowedAgentTypes"),
        ('{"boundaries": {"c": {"allowedAgentTypes": ["a", ""]}}}', "boundaries.c.allowedAgentTypes[1]"),
        ('{"boundaries": {"c": {"allowedAgentTypes": ["a", "a"]}}}', "boundaries.c.allowedAgentTypes[1]"),
        ('{"boundaries": {"c": {"allowedAgentTypes": ["a"], "preferredAgentTypes": ["b"]}}}',
         "boundaries.c.preferredAgentTypes[0]"),
        ('{"boundaries": {"c": {"preferredAgentTypes": [1]}}}', "boundaries.c.preferredAgentTypes[0]"),
        ('{"boundaries": {"*": {}}}', "boundaries.*"),
        ('{"boundaries": {"": {}}}', "boundaries."),
        ('{"boundaries": {"c": {"name": "d"}}}', "boundaries.c.name"),
        ('{"boundaries": [{"allowedAgentTypes": null}]}', "boundaries[0].name"),
        ('{"boundaries": ["corporate"]}', "boundaries[0]"),
        ('{"boundaries": [{"name": "a"}, {"name": "a"}]}', "boundaries[1]"),
        ('{"default": {"allowedAgentTypes": [3]}}', "default.allowedAgentTypes[0]"),
    ],
)
def test_load_policy_errors_name_the_field(doc: str, field: str) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(doc)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")


# --- properties over random states -----------------------------------------------------------

TYPES = [COPILOT, CLAUDE, "codex"]
CAPS = ["general", "py", "rust"]
BOUNDS = ["corporate", "corporate-adjacent", "personal", "open-source", "lab"]

agent_st = st.fixed_dictionaries(
    {
        "type": st.sampled_from(TYPES),
        "caps": st.lists(st.sampled_from(CAPS), max_size=3, unique=True),
        "bounds": st.one_of(st.just(()), st.just(("*",)), st.lists(st.sampled_from(BOUNDS), max_size=3, unique=True)),
        "max": st.integers(0, 4),
        "load": st.integers(0, 5),
        "status": st.sampled_from(["online", "online", "busy", "offline"]),
        "shutdown": st.booleans() | st.just(False),
    }
)
work_st = st.fixed_dictionaries(
    {
        "cap": st.sampled_from(CAPS),
        "bound": st.sampled_from(BOUNDS),
        "prio": st.integers(1, 10),
        "waited": st.integers(-5, 600),  # minutes; negative = offered "after" now (clock skew)
        "pref": st.none() | st.sampled_from(TYPES),
        "req": st.none() | st.sampled_from(TYPES),
        "retry": st.none() | st.integers(-60, 60),
        "status": st.sampled_from(["pending", "pending", "pending", "assigned"]),
    }
)
state_st = st.tuples(
    st.lists(agent_st, max_size=8),
    st.lists(work_st, max_size=30),
    st.floats(0, 2),
    st.randoms(use_true_random=False),
)


def build(spec: tuple[list[dict[str, Any]], list[dict[str, Any]], float, random.Random]) -> tuple[ProjectState, RoutingPolicy]:
    agents_spec, work_spec, aging, rnd = spec
    agents = [
        make_agent(f"a{i}", a["type"], tuple(a["caps"]), tuple(a["bounds"]), a["max"],
                   tuple(f"held-{i}-{j}" for j in range(min(a["load"], a["max"]))), a["status"], a["shutdown"])
        for i, a in enumerate(agents_spec)
    ]
    work = [
        make_work(f"w{i:02d}", w["cap"], w["bound"], w["prio"], timedelta(minutes=w["waited"]), w["pref"], w["req"],
                  None if w["retry"] is None else NOW + timedelta(seconds=w["retry"]), w["status"])
        for i, w in enumerate(work_spec)
    ]
    rnd.shuffle(agents)
    rnd.shuffle(work)
    policy = RoutingPolicy(rules=dict(DEFAULT_POLICY.rules), aging_per_minute=aging)
    return make_state(agents, work), policy


def reference_plan(state: ProjectState, policy: RoutingPolicy, now: datetime) -> Plan:
    """A slow, obviously-correct planner: every item scans every agent."""
    load = {g: len(a["currentTasks"]) for g, a in state.agents.items()}
    out = Plan()
    cands = []
    for wid, w in state.work.items():
        if w["status"] != "pending":
            continue
        if w["retryAt"] and datetime.fromisoformat(w["retryAt"].replace("Z", "+00:00")) > now:
            out.waiting[wid] = f"retry backoff until {w['retryAt']}"
            continue
        offered = datetime.fromisoformat(w["offeredAt"].replace("Z", "+00:00"))
        cands.append((-effective_priority(w, now, policy.aging_per_minute), offered, wid))
    for _p, _o, wid in sorted(cands):
        w = state.work[wid]
        rule = policy.rule_for(w["boundary"])
        options = []
        for g, a in state.agents.items():
            a2 = dict(a, currentTasks=[None] * load[g])
            if eligible(a2, w, policy) is None:
                prefs = rule.preferredAgentTypes
                t = a["agentType"]
                rank = 0 if t == w["preferredAgentType"] else (1 + prefs.index(t) if t in prefs else 1 + len(prefs))
                options.append((rank, load[g] / a["maxConcurrentTasks"], load[g], g))
        if options:
            g = min(options)[3]
            load[g] += 1
            out.assignments.append((wid, g))
            continue
        live = [a for a in state.agents.values() if is_live(a) and w["capability"] in a["capabilities"]]
        req = w["requiredAgentType"]
        if not live:
            reason = f"no agent with capability {w['capability']}"
        elif (req and not rule.allows(req)) or not any(rule.allows(a["agentType"]) for a in live):
            reason = rule.excluded_reason()
        elif not any(rule.allows(a["agentType"]) and accepts_boundary(a, w["boundary"]) for a in live):
            reason = f"no agent accepts boundary {w['boundary']}"
        elif not any(rule.allows(a["agentType"]) and accepts_boundary(a, w["boundary"])
                     and (not req or a["agentType"] == req) for a in live):
            reason = f"required agent type {req} not available"
        else:
            reason = "all eligible agents busy"
        out.waiting[wid] = reason
    return out


@settings(max_examples=300, deadline=None)
@given(state_st)
def test_plan_invariants(spec: Any) -> None:
    state, policy = build(spec)
    p = plan_assignments(state, policy, NOW)
    ids = [w for w, _ in p.assignments]
    assert len(ids) == len(set(ids)), "an item was planned twice"
    pending = {w for w, item in state.work.items() if item["status"] == "pending"}
    assert set(ids) | set(p.waiting) == pending
    assert not set(ids) & set(p.waiting)
    per_agent: dict[str, int] = {}
    for wid, guid in p.assignments:
        agent = state.agents[guid]
        item = state.work[wid]
        static = eligible(dict(agent, currentTasks=[]), item, policy) if agent["maxConcurrentTasks"] else "cap 0"
        assert static is None, static
        per_agent[guid] = per_agent.get(guid, 0) + 1
    for guid, n in per_agent.items():
        agent = state.agents[guid]
        assert len(agent["currentTasks"]) + n <= agent["maxConcurrentTasks"], "capacity exceeded"
    # Work-conserving: an item left busy-waiting has no eligible agent with a free slot after the plan.
    for wid, reason in p.waiting.items():
        if reason == "all eligible agents busy":
            for guid, agent in state.agents.items():
                left = agent["maxConcurrentTasks"] - len(agent["currentTasks"]) - per_agent.get(guid, 0)
                assert left <= 0 or eligible(agent, state.work[wid], policy) is not None


@settings(max_examples=300, deadline=None)
@given(state_st)
def test_plan_matches_reference_and_is_deterministic(spec: Any) -> None:
    state, policy = build(spec)
    p = plan_assignments(state, policy, NOW)
    ref = reference_plan(state, policy, NOW)
    assert p.assignments == ref.assignments
    assert p.waiting == ref.waiting
    # Same facts in another insertion order give the same plan.
    rnd = random.Random(7)
    agents, work = list(state.agents.values()), list(state.work.values())
    rnd.shuffle(agents)
    rnd.shuffle(work)
    again = plan_assignments(make_state(agents, work), policy, NOW)
    assert again.assignments == p.assignments
    assert again.waiting == p.waiting


def test_plan_does_not_mutate_state() -> None:
    agents = [make_agent("a1", max_tasks=3), make_agent("a2", COPILOT)]
    work = [make_work(f"w{i}") for i in range(5)]
    state = make_state(agents, work)
    before = encode_state(state)
    plan_assignments(state, DEFAULT_POLICY, NOW)
    assert encode_state(state) == before


def test_ten_thousand_items_fifty_agents_plan_fast() -> None:
    rnd = random.Random(42)
    agents = [
        make_agent(f"a{i:02d}", rnd.choice([COPILOT, CLAUDE]), tuple(rnd.sample(CAPS, 2)),
                   rnd.choice([(), ("*",), tuple(rnd.sample(BOUNDS, 2))]), rnd.randint(50, 300))
        for i in range(50)
    ]
    work = [
        make_work(f"w{i:05d}", rnd.choice(CAPS), rnd.choice(BOUNDS), rnd.randint(1, 10),
                  timedelta(seconds=rnd.randint(0, 7200)), rnd.choice([None, CLAUDE, COPILOT]))
        for i in range(10_000)
    ]
    state = make_state(agents, work)
    best = min(_timed(state) for _ in range(3))
    p = plan_assignments(state, DEFAULT_POLICY, NOW)
    assert len(p.assignments) + len(p.waiting) == 10_000
    assert len(p.assignments) > 1000
    assert best < 1.0, f"planning took {best:.3f}s"


def _timed(state: ProjectState) -> float:
    t = time.perf_counter()
    plan_assignments(state, DEFAULT_POLICY, NOW)
    return time.perf_counter() - t
