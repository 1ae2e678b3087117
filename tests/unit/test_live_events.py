"""weft.core.live_events: each of the original's 19 WebSocket events from weft events + folded state."""

from __future__ import annotations

from typing import Any

import pytest

from projections import ProjectState, apply
from projections.events import Event
from weft.core.live_events import (
    ALL_EVENTS,
    FILTER_KEYS,
    LiveEvent,
    Translator,
    filter_errors,
    matches,
    stats_message,
)

P = "proj"


class World:
    """Folds events like a ProjectView and translates each with the state after the fold."""

    def __init__(self) -> None:
        self.state = ProjectState(project=P)
        self.tr = Translator(P)
        self.seq = 0
        self.emitted: list[LiveEvent] = []

    def ev(self, type_: str, entity_id: str, **data: Any) -> list[LiveEvent]:
        self.seq += 1
        ev = Event(type_, entity_id, data, project=P, id=f"e{self.seq}", ts=f"2026-01-01T00:00:{self.seq:02d}.000Z",
                   seq=self.seq)
        apply(self.state, ev)
        out = self.tr.translate(ev, self.state)
        self.emitted += out
        return out

    def submit(self, wid: str = "w1", **kw: Any) -> list[LiveEvent]:
        d = {"taskId": f"task-{wid}", "capability": "python", "boundary": "acme", "description": "do it",
             "priority": 5, "preferredAgentType": None, "requiredAgentType": None, "deadline": None,
             "contextData": None, "maxAttempts": 3, **kw}
        return self.ev("work.submitted", wid, **d)

    def register(self, guid: str = "a1", agent_type: str = "codex", capacity: int = 1) -> list[LiveEvent]:
        return self.ev("agent.registered", guid, guid=guid, handle="h-" + guid, agentType=agent_type,
                       capabilities=["python"], boundaries=["acme"], maxConcurrentTasks=capacity,
                       hostname="box", username=None, visibility="project-only", labels={}, source="weft",
                       spinUpId=None, targetId=None, spindownAfterIdleMs=None)

    def assign(self, wid: str = "w1", guid: str = "a1") -> list[LiveEvent]:
        return self.ev("work.assigned", wid, agentGuid=guid, attempt=1, acceptBy="2026-01-01T01:00:00.000Z")

    def target(self, tid: str = "t1") -> list[LiveEvent]:
        return self.ev("target.registered", tid, target={"name": "local-1", "agentType": "codex",
                                                          "capabilities": ["python"], "boundaries": ["acme"],
                                                          "mechanism": "local"})


def only(events: list[LiveEvent], name: str) -> LiveEvent:
    found = [e for e in events if e.event == name]
    assert len(found) == 1, [e.event for e in events]
    return found[0]


def envelope_ok(le: LiveEvent, topic: str) -> None:
    assert le.topic == topic
    assert le.data["type"] == le.event
    assert le.data["projectId"] == P
    assert le.data["timestamp"] == le.timestamp
    msg = le.message()
    assert msg == {"type": "event", "topic": topic, "event": le.event, "data": le.data, "timestamp": le.timestamp,
                   "projectId": P, "seq": le.seq}


# --- work ------------------------------------------------------------------------------------------


def test_work_submitted() -> None:
    w = World()
    le = only(w.submit(), "work:submitted")
    envelope_ok(le, "work")
    assert le.seq == 1 and le.timestamp == "2026-01-01T00:00:01.000Z"
    assert {k: le.data[k] for k in ("workId", "taskId", "capability", "boundary", "priority", "description")} == {
        "workId": "w1", "taskId": "task-w1", "capability": "python", "boundary": "acme", "priority": 5,
        "description": "do it"}
    assert le.facets["status"] == "pending"


def test_work_assigned_carries_the_agent_summary_and_an_agent_update() -> None:
    w = World()
    w.register()
    w.submit()
    out = w.assign()
    le = only(out, "work:assigned")
    envelope_ok(le, "work")
    assert le.data["assignedTo"] == "a1"
    assert le.data["assignedToAgent"] == {"guid": "a1", "handle": "h-a1", "agentType": "codex", "hostname": "box"}
    assert le.data["capability"] == "python" and le.data["boundary"] == "acme"
    up = only(out, "agent:updated")
    assert up.data["previousStatus"] == "online" and up.data["newStatus"] == "busy"
    assert up.data["currentTaskCount"] == 1


def test_work_started_and_progress() -> None:
    w = World()
    w.register()
    w.submit()
    w.assign()
    le = only(w.ev("work.started", "w1", agentGuid="a1"), "work:started")
    envelope_ok(le, "work")
    assert le.data["assignedTo"] == "a1" and le.data["assignedToAgent"]["agentType"] == "codex"
    assert le.facets["status"] == "in-progress"
    pr = only(w.ev("work.progressed", "w1", agentGuid="a1", progress=40, message=None), "work:progress")
    envelope_ok(pr, "work")
    assert pr.data["progress"] == 40 and pr.data["assignedToAgent"]["guid"] == "a1"
    assert pr.facets["status"] == "in-progress" and pr.facets["capability"] == "python"


def test_work_completed_frees_the_agent() -> None:
    w = World()
    w.register()
    w.submit()
    w.assign()
    out = w.ev("work.completed", "w1", agentGuid="a1", summary="done", output=None, artifacts=None)
    le = only(out, "work:completed")
    envelope_ok(le, "work")
    assert le.data["summary"] == "done" and le.data["assignedTo"] == "a1"
    up = only(out, "agent:updated")
    assert up.data["newStatus"] == "online" and up.data["currentTaskCount"] == 0


def test_work_failed_retry_keeps_the_holder() -> None:
    w = World()
    w.register()
    w.submit()
    w.assign()
    out = w.ev("work.failed", "w1", agentGuid="a1", message="boom", code=None, recoverable=True, outcome="retry",
               retryAt=None)
    le = only(out, "work:failed")
    envelope_ok(le, "work")
    assert le.data["errorMessage"] == "boom" and le.data["recoverable"] is True
    assert le.data["assignedTo"] == "a1" and le.data["assignedToAgent"]["agentType"] == "codex"
    assert le.facets["status"] == "failed"


def test_work_dead_lettered_is_a_failure() -> None:
    w = World()
    w.submit()
    le = only(w.ev("work.dead_lettered", "w1", reason="gave up"), "work:failed")
    assert le.data["errorMessage"] == "gave up" and le.data["recoverable"] is False


def test_work_cancelled() -> None:
    w = World()
    w.submit()
    le = only(w.ev("work.cancelled", "w1", reason="nope"), "work:cancelled")
    envelope_ok(le, "work")
    assert le.data["workId"] == "w1" and le.data["taskId"] == "task-w1" and le.data["assignedTo"] is None
    assert le.data["assignedToAgent"] is None


def test_an_event_the_fold_ignored_gives_nothing_live() -> None:
    w = World()
    w.submit()
    w.ev("work.cancelled", "w1", reason=None)
    assert w.ev("work.cancelled", "w1", reason="again") == []  # a terminal item's guard ignores it
    assert w.ev("work.started", "nope", agentGuid="a1") == []  # unknown item


def test_requeue_and_purge_have_no_event_of_the_original() -> None:
    w = World()
    w.submit()
    assert [e.event for e in w.ev("work.retried", "w1", reason=None)] == []


# --- agents ----------------------------------------------------------------------------------------


def test_agent_registered() -> None:
    w = World()
    le = only(w.register(), "agent:registered")
    envelope_ok(le, "agents")
    assert le.data["agent"] == {"guid": "a1", "handle": "h-a1", "agentType": "codex", "hostname": "box"}
    assert le.data["capabilities"] == ["python"] and le.data["boundaries"] == ["acme"]
    assert le.data["status"] == "online"
    assert le.facets["agentType"] == "codex" and le.facets["guid"] == "a1"


def test_agent_updated_when_lost() -> None:
    w = World()
    w.register()
    le = only(w.ev("agent.lost", "a1", lastHeartbeat=None), "agent:updated")
    envelope_ok(le, "agents")
    assert le.data["previousStatus"] == "online" and le.data["newStatus"] == "offline"
    assert le.data["currentTaskCount"] == 0


def test_agent_shutdown_requested_and_deregistered() -> None:
    w = World()
    w.register()
    le = only(w.ev("agent.shutdown_requested", "a1", graceful=False, reason="scale down", gracePeriodMs=None),
              "agent:shutdown")
    envelope_ok(le, "agents")
    assert le.data["reason"] == "scale down" and le.data["graceful"] is False
    assert le.data["agent"]["guid"] == "a1"
    le2 = only(w.ev("agent.deregistered", "a1", reason="bye"), "agent:shutdown")
    assert le2.data["reason"] == "bye" and le2.data["graceful"] is True


# --- targets and spin-ups --------------------------------------------------------------------------

BASE = {"targetId": "t1", "targetName": "local-1", "agentType": "codex", "capabilities": ["python"],
        "boundaries": ["acme"], "mechanism": "local"}


def test_target_registered() -> None:
    w = World()
    le = only(w.target(), "target:registered")
    envelope_ok(le, "targets")
    assert {k: le.data[k] for k in BASE} == BASE
    assert le.facets["mechanism"] == "local" and le.facets["status"] == "available"


def test_target_updated_by_enable() -> None:
    w = World()
    w.target()
    w.ev("target.disabled", "t1", reason="maintenance")
    le = only(w.ev("target.enabled", "t1", reason=None), "target:updated")
    envelope_ok(le, "targets")
    assert le.data["previousStatus"] == "disabled" and le.data["newStatus"] == "available"
    up = only(w.ev("target.updated", "t1", changes={"capabilities": ["python", "go"]}), "target:updated")
    assert up.data["capabilities"] == ["python", "go"]


def test_target_disabled() -> None:
    w = World()
    w.target()
    le = only(w.ev("target.disabled", "t1", reason="maintenance"), "target:disabled")
    envelope_ok(le, "targets")
    assert le.data["reason"] == "maintenance" and le.data["targetName"] == "local-1"
    assert le.facets["status"] == "disabled"


def test_target_removed_from_memory() -> None:
    w = World()
    w.target()
    le = only(w.ev("target.removed", "t1", reason=None), "target:removed")
    envelope_ok(le, "targets")
    assert {k: le.data[k] for k in BASE} == BASE


def test_target_health_changed() -> None:
    w = World()
    w.target()
    le = only(w.ev("target.health_changed", "t1", healthStatus="unhealthy", latencyMs=None, error="down"),
              "target:health-changed")
    envelope_ok(le, "targets")
    assert le.data["previousHealth"] == "unknown" and le.data["newHealth"] == "unhealthy"
    assert le.data["error"] == "down"


def spin(w: World) -> None:
    w.target()
    w.submit()
    w.ev("spinup.requested", "t1", spinUpId="s1", workId="w1", capability="python", boundary="acme", reason="need")


def test_spin_up_triggered() -> None:
    w = World()
    w.target()
    le = only(w.ev("spinup.requested", "t1", spinUpId="s1", workId="w1", capability="python", boundary="acme",
                   reason="need"), "spin-up:triggered")
    envelope_ok(le, "targets")
    assert {k: le.data[k] for k in ("targetAgentType", "capability", "boundary", "workId")} == {
        "targetAgentType": "codex", "capability": "python", "boundary": "acme", "workId": "w1"}


def test_spin_up_started() -> None:
    w = World()
    spin(w)
    le = only(w.ev("spinup.started", "t1", spinUpId="s1", mechanismResult=None), "spin-up:started")
    envelope_ok(le, "targets")
    assert {k: le.data[k] for k in ("targetId", "targetName", "agentType", "capability", "workId")} == {
        "targetId": "t1", "targetName": "local-1", "agentType": "codex", "capability": "python", "workId": "w1"}


def test_spin_up_completed_remembers_what_the_fold_forgot() -> None:
    w = World()
    spin(w)
    le = only(w.ev("spinup.completed", "t1", spinUpId="s1", agentGuid="a9", durationMs=1200.0), "spin-up:completed")
    envelope_ok(le, "targets")
    assert le.data["capability"] == "python" and le.data["workId"] == "w1"  # popped from the state
    assert le.data["agentGuid"] == "a9" and le.data["durationMs"] == 1200.0


def test_spin_up_failed_and_the_breaker_update() -> None:
    w = World()
    spin(w)
    out: list[LiveEvent] = []
    for i in range(3):
        sid = f"f{i}"
        w.ev("spinup.requested", "t1", spinUpId=sid, workId="w1", capability="python", boundary="acme", reason="x")
        out = w.ev("spinup.failed", "t1", spinUpId=sid, error="no luck", durationMs=5.0)
    le = only(out, "spin-up:failed")
    envelope_ok(le, "targets")
    assert le.data["errorMessage"] == "no luck" and le.data["workId"] == "w1" and le.data["targetId"] == "t1"
    assert only(out, "target:updated").data["newStatus"] == "error"


def test_all_nineteen_types_are_covered() -> None:
    w = World()
    w.register()
    w.target()
    w.submit()
    w.assign()
    w.ev("work.started", "w1", agentGuid="a1")
    w.ev("work.progressed", "w1", agentGuid="a1", progress=10, message=None)
    w.ev("work.completed", "w1", agentGuid="a1", summary=None, output=None, artifacts=None)
    w.submit("w2")
    w.ev("work.dead_lettered", "w2", reason="x")
    w.submit("w3")
    w.ev("work.cancelled", "w3", reason=None)
    w.ev("agent.shutdown_requested", "a1", graceful=True, reason="r", gracePeriodMs=None)
    w.ev("target.disabled", "t1", reason=None)
    w.ev("target.enabled", "t1", reason=None)
    w.ev("target.health_changed", "t1", healthStatus="healthy", latencyMs=1.0, error=None)
    w.ev("spinup.requested", "t1", spinUpId="s1", workId=None, capability="python", boundary=None, reason="r")
    w.ev("spinup.started", "t1", spinUpId="s1", mechanismResult=None)
    w.ev("spinup.completed", "t1", spinUpId="s1", agentGuid="a1", durationMs=1.0)
    w.ev("spinup.requested", "t1", spinUpId="s2", workId=None, capability="python", boundary=None, reason="r")
    w.ev("spinup.failed", "t1", spinUpId="s2", error="e", durationMs=1.0)
    w.ev("target.removed", "t1", reason=None)
    assert {e.event for e in w.emitted} == set(ALL_EVENTS)
    assert len(ALL_EVENTS) == 19
    seqs = [e.seq for e in w.emitted]
    assert seqs == sorted(seqs)


def test_seed_gives_previous_values_of_the_state_it_starts_from() -> None:
    w = World()
    w.register()
    fresh = Translator(P)
    fresh.seed(w.state)
    w.tr = fresh
    le = only(w.ev("agent.lost", "a1", lastHeartbeat=None), "agent:updated")
    assert le.data["previousStatus"] == "online"


# --- filters ---------------------------------------------------------------------------------------


def test_work_filters() -> None:
    w = World()
    w.register()
    w.submit()
    le = only(w.assign(), "work:assigned")
    assert matches(None, le.facets) and matches({}, le.facets)
    assert matches({"status": "assigned", "capability": "python", "boundary": "acme", "taskId": "task-w1",
                    "assignedTo": "a1"}, le.facets)
    assert matches({"status": ["pending", "assigned"]}, le.facets)
    assert not matches({"status": "pending"}, le.facets)
    assert not matches({"capability": "go"}, le.facets)
    assert not matches({"boundary": "other"}, le.facets)
    assert not matches({"taskId": "x"}, le.facets)
    assert not matches({"assignedTo": "a2"}, le.facets)
    sub = only(w.emitted, "work:submitted")
    assert matches({"status": "pending"}, sub.facets)


def test_agent_filters() -> None:
    w = World()
    le = only(w.register(), "agent:registered")
    assert matches({"agentType": "codex", "status": "online", "capability": "python", "boundary": "acme",
                    "guid": "a1"}, le.facets)
    for bad in ({"agentType": "claude-code"}, {"status": "busy"}, {"capability": "go"}, {"boundary": "x"},
                {"guid": "a2"}):
        assert not matches(bad, le.facets), bad


def test_target_filters() -> None:
    w = World()
    le = only(w.target(), "target:registered")
    assert matches({"agentType": "codex", "status": "available", "capability": "python", "boundary": "acme",
                    "mechanism": "local", "targetId": "t1"}, le.facets)
    for bad in ({"agentType": "x"}, {"status": "disabled"}, {"capability": "go"}, {"boundary": "x"},
                {"mechanism": "ssh"}, {"targetId": "t2"}):
        assert not matches(bad, le.facets), bad


def test_a_wildcard_boundary_matches_any() -> None:
    assert matches({"boundary": "acme"}, {"boundary": ["*"]})


@pytest.mark.parametrize("topic", sorted(FILTER_KEYS))
def test_filter_validation(topic: str) -> None:
    assert filter_errors(topic, None) == []
    assert filter_errors(topic, "x") == ["filter must be an object"]
    assert filter_errors(topic, {"nope": 1}) == [f"unknown filter key for topic {topic}: nope"]
    for key in FILTER_KEYS[topic]:
        assert filter_errors(topic, {key: "v"}) == []
        assert filter_errors(topic, {key: {"a": 1}}) != []


def test_stats_message_shape() -> None:
    w = World()
    w.register()
    w.target()
    w.submit()
    w.submit("w2")
    w.assign()
    msg = stats_message(P, w.state, 3, 5, "2026-01-01T00:00:00.000Z")
    assert msg == {
        "type": "stats",
        "data": {
            "agents": {"total": 1, "byType": {"codex": 1}, "byStatus": {"busy": 1}},
            "work": {"pending": 1, "active": 1, "completed": 0, "failed": 0},
            "targets": {"total": 1, "available": 1, "inUse": 0, "disabled": 0},
            "websocket": {"connections": 3, "subscriptions": 5},
        },
        "timestamp": "2026-01-01T00:00:00.000Z",
        "projectId": P,
    }
