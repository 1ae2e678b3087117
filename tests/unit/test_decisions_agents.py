"""Agent decisions (`weft.core.decisions.agents`) on folded states, without NATS.

Heartbeats are not events (they feed liveness only), so there is no heartbeat decision; the
scheduler's verdict on a silent agent is `mark_agent_lost`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from projections.events import parse_ts
from tests.unit.test_decisions_work import History
from weft.core.decisions import Draft
from weft.core.decisions import agents as d
from weft.core.errors import Conflict, NotFound

DECL = {"guid": "a1", "agentType": "developer", "capabilities": ("code",), "boundaries": ["default"]}


def test_register_fills_the_declaration_defaults() -> None:
    draft = d.register_agent(DECL)
    assert draft == Draft("agent.registered", "a1", {
        "guid": "a1", "handle": None, "agentType": "developer", "capabilities": ["code"],
        "boundaries": ["default"], "maxConcurrentTasks": 1, "hostname": None, "username": None,
        "visibility": "project-only", "labels": {}, "source": "weft", "spinUpId": None, "targetId": None,
        "spindownAfterIdleMs": None,
    })
    assert draft.epoch is None
    assert History().apply(draft).agents["a1"]["status"] == "online"


def test_register_copies_what_the_agent_declares() -> None:
    decl = {**DECL, "maxConcurrentTasks": 3, "labels": {"gpu": "1"}, "source": "warp", "spinUpId": "s1",
            "targetId": "t1", "spindownAfterIdleMs": 500, "handle": "h", "visibility": "public"}
    data = d.register_agent(decl).data
    assert (data["maxConcurrentTasks"], data["labels"], data["source"]) == (3, {"gpu": "1"}, "warp")
    assert (data["spinUpId"], data["targetId"], data["spindownAfterIdleMs"]) == ("s1", "t1", 500)
    assert (data["handle"], data["visibility"]) == ("h", "public")
    assert data["labels"] is not decl["labels"]  # a copy: the event never aliases the caller's dict


def test_a_lost_agent_rejoins_by_registering_again_and_keeps_its_work() -> None:
    h = History().register("a1", capacity=2).submit("w1").assign("w1", "a1").lost("a1")
    state = h.apply(d.register_agent({**DECL, "maxConcurrentTasks": 2}))
    assert state.agents["a1"]["status"] == "online" and state.agents["a1"]["offlineReason"] is None


def test_deregister() -> None:
    h = History().register("a1")
    draft = d.deregister_agent(h.state, "a1", "done")
    assert draft == Draft("agent.deregistered", "a1", {"reason": "done"})
    assert h.apply(draft).agents["a1"]["status"] == "offline"
    assert d.deregister_agent(h.state, "a1", "again") is None  # already offline


def test_deregister_and_shutdown_of_an_unknown_agent_are_not_found() -> None:
    for call in (lambda: d.deregister_agent(History().state, "a9", None),
                 lambda: d.request_shutdown(History().state, "a9", True, "r", None)):
        with pytest.raises(NotFound) as err:
            call()
        assert (err.value.field, err.value.message) == ("guid", "agent a9 not found")


def test_mark_lost_carries_the_epoch_and_the_last_heartbeat() -> None:
    h = History().register("a1")
    draft = d.mark_agent_lost(h.state, "a1", "2026-01-01T00:00:09.000Z", 5)
    assert draft == Draft("agent.lost", "a1", {"lastHeartbeat": "2026-01-01T00:00:09.000Z"}, epoch=5)
    state = h.apply(draft)
    assert (state.agents["a1"]["status"], state.agents["a1"]["offlineReason"]) == ("offline", "lost")
    assert d.mark_agent_lost(state, "a1", None, 5) is None  # already offline
    assert d.mark_agent_lost(state, "a9", None, 5) is None  # unknown: nothing to mark


def test_request_shutdown() -> None:
    h = History().register("a1")
    draft = d.request_shutdown(h.state, "a1", False, "maintenance", 3_000)
    assert draft == Draft("agent.shutdown_requested", "a1",
                          {"graceful": False, "reason": "maintenance", "gracePeriodMs": 3_000})
    assert draft.epoch is None  # an operator's request, not a scheduler decision
    assert h.apply(draft).agents["a1"]["shutdownRequested"]["reason"] == "maintenance"


def test_shutting_down_an_offline_agent_is_a_conflict() -> None:
    with pytest.raises(Conflict) as err:
        d.request_shutdown(History().register("a1").lost("a1").state, "a1", True, "r", None)
    assert (err.value.field, err.value.message) == ("guid", "agent a1 is offline")


def test_scale_down_an_idle_agent() -> None:
    h = History().register("a1")
    draft = d.scale_down_idle(h.state, "a1", 2)
    assert draft == Draft("agent.shutdown_requested", "a1",
                          {"graceful": True, "reason": "idle-timeout", "gracePeriodMs": None}, epoch=2)


@pytest.mark.parametrize(
    "history",
    [
        pytest.param(History().register("a1").submit("w1").assign("w1", "a1"), id="busy"),
        pytest.param(History().register("a1").shutdown("a1"), id="already-asked"),
        pytest.param(History().register("a1").lost("a1"), id="offline"),
        pytest.param(History(), id="unknown"),
    ],
)
def test_scale_down_of_an_agent_that_is_not_idle_is_a_noop(history: History) -> None:
    assert d.scale_down_idle(history.state, "a1", 1) is None


def test_select_agents_by_filter_and_idle_time() -> None:
    h = History().register("a1").register("a2", capabilities=("test",), agent_type="reviewer")
    h.register("a3").submit("w1").assign("w1", "a3").lost("a1")
    state = h.state
    assert d.select_agents(state, {}, parse_ts("2026-01-01T00:00:00Z")) == ["a1", "a2", "a3"]
    assert d.select_agents(state, {"status": "offline"}, parse_ts("2026-01-01T00:00:00Z")) == ["a1"]
    assert d.select_agents(state, {"agentType": "reviewer"}, parse_ts("2026-01-01T00:00:00Z")) == ["a2"]
    assert d.select_agents(state, {"capability": "code"}, parse_ts("2026-01-01T00:00:00Z")) == ["a1", "a3"]
    assert d.select_agents(state, {"boundary": "other"}, parse_ts("2026-01-01T00:00:00Z")) == []
    # a2 was last active when it registered: idle for 10 s ten seconds later, not nine.
    active = parse_ts(state.agents["a2"]["lastActivity"])
    idle = {"idleTimeMs": 10_000, "status": "online"}
    assert d.select_agents(state, idle, active + timedelta(seconds=10)) == ["a2"]
    assert d.select_agents(state, idle, active + timedelta(seconds=9)) == []
    # a3 holds work: never idle, however long ago it was active.
    assert d.select_agents(state, {"idleTimeMs": 0}, active + timedelta(days=1)) == ["a1", "a2"]
