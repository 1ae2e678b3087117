"""Signs of life, pure: which events say an agent is alive (`lastSeen`), which mark it unresponsive
(`unresponsiveSince`), how routing treats it, and how the scheduler measures silence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from projections import ProjectState, apply
from projections.events import format_ts, parse_ts
from projections.work import ACCEPT_TIMEOUT
from tests.unit.test_projections import Stream
from tests.unit.test_routing import NOW, make_agent, make_state, make_work
from weft.core import plan
from weft.core.routing import DEFAULT_POLICY, eligible, is_unresponsive, plan_assignments


def requeue(s: Stream, work_id: str, guid: str, cause: str | None) -> None:
    s.ev("work.requeued", work_id, reason="withdrawn", retryAt=None, cause=cause, agentGuid=guid)


def assigned_stream(capacity: int = 1) -> Stream:
    s = Stream()
    s.register("a1", capacity=capacity)
    s.submit("w1")
    s.assign("w1", "a1")
    return s


def agent(s: Stream) -> dict[str, Any]:
    state: ProjectState = s.state()
    return state.agents["a1"]


# --- the fold ------------------------------------------------------------------------------------


def test_weft_assigning_or_withdrawing_work_is_no_sign_of_life() -> None:
    s = assigned_stream()
    registered = s.events[0].ts
    assert agent(s)["lastSeen"] == registered
    assert agent(s)["lastActivity"] == s.events[-1].ts  # idle scale-down still sees the assignment
    requeue(s, "w1", "a1", "agent-offline")
    s.assign("w1", "a1", attempt=2)
    s.ev("work.cancelled", "w1", reason="no")
    assert agent(s)["lastSeen"] == registered


def test_what_the_agent_itself_reports_is_a_sign_of_life() -> None:
    s = assigned_stream()
    s.ev("work.started", "w1", agentGuid="a1")
    assert agent(s)["lastSeen"] == s.events[-1].ts
    s.ev("work.progressed", "w1", agentGuid="a1", progress=10, message=None)
    assert agent(s)["lastSeen"] == s.events[-1].ts
    s.ev("work.completed", "w1", agentGuid="a1", summary=None, output=None, artifacts=None)
    assert agent(s)["lastSeen"] == s.events[-1].ts
    s.submit("w2")
    s.assign("w2", "a1")
    s.fail("w2", "retry", guid="a1", retry_at=None)
    assert agent(s)["lastSeen"] == s.events[-1].ts
    s.ev("agent.deregistered", "a1", reason="bye")
    assert agent(s)["lastSeen"] == s.events[-1].ts


def test_a_report_by_someone_other_than_the_holder_is_not_the_holders_sign_of_life() -> None:
    s = assigned_stream()
    s.register("a2")
    s.ev("work.progressed", "w1", agentGuid="a2", progress=10, message=None)
    assert agent(s)["lastSeen"] == s.events[0].ts


def test_an_accept_timeout_marks_the_agent_unresponsive_and_its_own_next_word_clears_it() -> None:
    s = assigned_stream(capacity=2)
    s.submit("w2")
    s.assign("w2", "a1")
    requeue(s, "w1", "a1", ACCEPT_TIMEOUT)
    assert agent(s)["unresponsiveSince"] == s.events[-1].ts
    s.ev("work.progressed", "w2", agentGuid="a1", progress=5, message=None)  # alive after all
    assert agent(s)["unresponsiveSince"] is None

    s.assign("w1", "a1", attempt=2)
    requeue(s, "w1", "a1", ACCEPT_TIMEOUT)
    assert agent(s)["unresponsiveSince"] is not None
    s.register("a1", capacity=2)  # re-registration (a restart) is a sign of life too
    assert agent(s)["unresponsiveSince"] is None


def test_a_dead_lettering_accept_timeout_marks_the_agent_too_but_other_withdrawals_do_not() -> None:
    s = assigned_stream()
    s.ev("work.dead_lettered", "w1", reason="gave up", cause=ACCEPT_TIMEOUT, agentGuid="a1")
    assert agent(s)["unresponsiveSince"] == s.events[-1].ts
    assert s.state().work["w1"]["status"] == "failed"

    s = assigned_stream()
    requeue(s, "w1", "a1", "agent-offline")
    s.submit("w2")
    s.assign("w2", "a1")
    s.ev("work.requeued", "w2", reason="operator", retryAt=None)  # an older event without a cause
    assert agent(s)["unresponsiveSince"] is None


def test_an_agent_record_from_before_these_fields_can_still_be_marked() -> None:
    s = assigned_stream()
    state = s.state()
    del state.agents["a1"]["lastSeen"], state.agents["a1"]["unresponsiveSince"]
    assert not is_unresponsive(state.agents["a1"])
    ev = s.ev("work.requeued", "w1", reason="late", retryAt=None, cause=ACCEPT_TIMEOUT, agentGuid="a1")
    apply(state, ev)
    assert state.agents["a1"]["unresponsiveSince"] == ev.ts


# --- routing -------------------------------------------------------------------------------------


def unresponsive_agent(guid: str) -> dict[str, Any]:
    a = make_agent(guid, caps=("python",))
    a["unresponsiveSince"] = format_ts(NOW - timedelta(seconds=5))
    return a


def test_an_unresponsive_agent_gets_no_work_and_the_item_says_why() -> None:
    item = make_work("w1", capability="python")
    p = plan_assignments(make_state([unresponsive_agent("dead")], [item]), DEFAULT_POLICY, NOW)
    assert p.assignments == []
    assert p.codes["w1"] == "capability"  # a replacement may be spun up
    assert "let an assignment time out" in p.waiting["w1"]
    # A responsive agent with the capability takes it instead.
    p = plan_assignments(make_state([unresponsive_agent("dead"), make_agent("live", caps=("python",))],
                                    [item]), DEFAULT_POLICY, NOW)
    assert p.assignments == [("w1", "live")]


def test_an_unresponsive_agent_heard_from_since_gets_work_again() -> None:
    item = make_work("w1", capability="python")
    state = make_state([unresponsive_agent("napper")], [item])
    assert plan_assignments(state, DEFAULT_POLICY, NOW, heard_from={"napper"}).assignments == [("w1", "napper")]
    assert eligible(state.agents["napper"], item, DEFAULT_POLICY) is not None
    assert eligible(state.agents["napper"], item, DEFAULT_POLICY, heard_from={"napper"}) is None


def test_an_agent_timing_out_in_this_very_pass_gets_nothing_in_it() -> None:
    a = make_agent("slow", caps=("python",), max_tasks=2, tasks=("w0",))
    state = make_state([a], [make_work("w0", capability="python", status="assigned"),
                             make_work("w1", capability="python")])
    assert plan_assignments(state, DEFAULT_POLICY, NOW).assignments == [("w1", "slow")]
    assert plan_assignments(state, DEFAULT_POLICY, NOW, timed_out={"slow"}).assignments == []
    # timed_out wins over an earlier heartbeat: this timeout is newer than anything heard.
    assert plan_assignments(state, DEFAULT_POLICY, NOW, heard_from={"slow"}, timed_out={"slow"}).assignments == []


# --- the scheduler's measure of silence ------------------------------------------------------------


def silent_for(agent_record: dict[str, Any], heard_s: float, now: datetime) -> float:
    return plan.silence(agent_record, heard_s, now)


def test_silence_ignores_what_weft_did_to_the_agent() -> None:
    s = assigned_stream()
    a = agent(s)  # registered at :01, assigned at :03 (lastActivity)
    now = parse_ts(s.events[-1].ts) + timedelta(seconds=1)
    assert parse_ts(a["lastActivity"]) > parse_ts(a["lastSeen"])
    assert silent_for(a, 3600.0, now) == (now - parse_ts(a["lastSeen"])).total_seconds()
    assert silent_for(a, 0.5, now) == 0.5  # a heartbeat heard recently


def test_silence_of_a_record_from_before_last_seen_counts_from_its_registration() -> None:
    s = assigned_stream()
    a = dict(agent(s))
    del a["lastSeen"]
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    assert silent_for(a, 3600.0, now) == (now - parse_ts(a["registeredAt"])).total_seconds()


def test_heard_since_compares_the_last_heartbeat_with_the_mark() -> None:
    heard = "2026-01-01T00:00:05.000Z"
    assert plan.heard_since(heard, "2026-01-01T00:00:04.000Z")
    assert not plan.heard_since(heard, "2026-01-01T00:00:06.000Z")
    assert not plan.heard_since(None, "2026-01-01T00:00:00.000Z")  # never heard
