"""Work-item decisions (`weft.core.decisions.work`) on folded states, without NATS.

`History` (also used by the other test_decisions_* files) builds a project's stream as the store
would hold it, and `History.apply` folds a decision's draft back in: a test checks both what a
decision answers and that the fold does with its event what the command meant.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from projections import ProjectState, fold
from projections.events import Event, format_ts, parse_ts
from weft.core.decisions import Draft
from weft.core.decisions import work as d
from weft.core.decisions.work import RetryPolicy
from weft.core.errors import Conflict, NotFound

BASE = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)
ACCEPT_BY = "2026-01-01T01:00:00.000Z"


class History:
    """A project's events with stream sequences, deterministic ids and increasing timestamps."""

    def __init__(self, project: str = "p") -> None:
        self.project = project
        self.events: list[Event] = []

    def ev(self, type_: str, entity_id: str, *, key: str | None = None, epoch: int | None = None,
           **data: Any) -> History:
        seq = len(self.events) + 1
        self.events.append(Event(
            type=type_, entity_id=entity_id, data=data, project=self.project, id=f"ev-{seq}",
            ts=format_ts(BASE + timedelta(seconds=seq)), idempotency_key=key, epoch=epoch, seq=seq,
        ))
        return self

    @property
    def state(self) -> ProjectState:
        return fold(self.events, project=self.project)

    def apply(self, draft: Draft | None) -> ProjectState:
        """Fold `draft` (as the next event of the stream) and return the state after it."""
        assert draft is not None
        self.ev(draft.type, draft.entity_id, key=draft.idempotency_key, epoch=draft.epoch, **draft.data)
        return self.state

    # --- work ---

    def submit(self, wid: str, *, max_attempts: int = 3, capability: str = "code", boundary: str = "default",
               priority: int = 5) -> History:
        return self.ev("work.submitted", wid, taskId=f"task-{wid}", capability=capability, boundary=boundary,
                       description="do it", priority=priority, preferredAgentType=None, requiredAgentType=None,
                       deadline=None, contextData=None, maxAttempts=max_attempts)

    def assign(self, wid: str, guid: str, attempt: int = 1) -> History:
        return self.ev("work.assigned", wid, agentGuid=guid, attempt=attempt, acceptBy=ACCEPT_BY)

    def start(self, wid: str, guid: str) -> History:
        return self.ev("work.started", wid, agentGuid=guid)

    def complete(self, wid: str, guid: str) -> History:
        return self.ev("work.completed", wid, agentGuid=guid, summary="ok", output=None, artifacts=None)

    def fail(self, wid: str, guid: str, outcome: str = "dead-letter") -> History:
        return self.ev("work.failed", wid, agentGuid=guid, message="boom", code=None,
                       recoverable=outcome == "retry", outcome=outcome, retryAt=None)

    def cancel(self, wid: str) -> History:
        return self.ev("work.cancelled", wid, reason=None)

    def discard(self, wid: str) -> History:
        return self.ev("work.discarded", wid, reason=None)

    # --- agents ---

    def register(self, guid: str, *, capacity: int = 1, target_id: str | None = None,
                 spin_up_id: str | None = None, capabilities: tuple[str, ...] = ("code",),
                 agent_type: str = "developer") -> History:
        return self.ev("agent.registered", guid, guid=guid, handle=None, agentType=agent_type,
                       capabilities=list(capabilities), boundaries=["default"], maxConcurrentTasks=capacity,
                       hostname=None, username=None, visibility="project-only", labels={}, source="weft",
                       spinUpId=spin_up_id, targetId=target_id, spindownAfterIdleMs=None)

    def lost(self, guid: str) -> History:
        return self.ev("agent.lost", guid, lastHeartbeat=None)

    def shutdown(self, guid: str) -> History:
        return self.ev("agent.shutdown_requested", guid, graceful=True, reason="bye", gracePeriodMs=None)

    # --- targets ---

    def register_target(self, tid: str, *, name: str | None = None, **extra: Any) -> History:
        target = {"name": name or tid, "agentType": "developer", "mechanism": "local", "capabilities": ["code"],
                  "maxConcurrentAgents": 2, **extra}
        return self.ev("target.registered", tid, target=target)

    def spin_up(self, tid: str, sid: str, work_id: str | None = None) -> History:
        return self.ev("spinup.requested", tid, spinUpId=sid, workId=work_id, capability=None, boundary=None,
                       reason="demand")


def held_by(guid: str = "a1", *, attempt: int = 1, started: bool = False, max_attempts: int = 3) -> History:
    """w1 assigned to `guid` (at `attempt`), accepted when `started`."""
    h = History().register(guid).submit("w1", max_attempts=max_attempts).assign("w1", guid, attempt)
    return h.start("w1", guid) if started else h


# --- submit ----------------------------------------------------------------------------------------


def test_submit_fills_defaults_and_keeps_the_key() -> None:
    spec = {"capability": "code", "boundary": "default", "description": "x"}
    draft = d.submit_work(spec, "w1", "fresh-task", "work:k1")
    assert draft == Draft("work.submitted", "w1", {
        "taskId": "fresh-task", "capability": "code", "boundary": "default", "description": "x", "priority": 5,
        "preferredAgentType": None, "requiredAgentType": None, "deadline": None, "contextData": None,
        "maxAttempts": 3,
    }, idempotency_key="work:k1")
    state = History().apply(draft)
    assert state.work["w1"]["status"] == "pending"
    assert state.idempotency == {"work:k1": "w1"}


def test_submit_uses_the_specs_task_id_and_fields() -> None:
    spec = {"capability": "test", "boundary": "b", "description": "x", "taskId": "t9", "priority": 9,
            "maxAttempts": 1, "requiredAgentType": "reviewer", "contextData": {"repo": "r"}}
    draft = d.submit_work(spec, "w1", "unused")
    assert draft.data["taskId"] == "t9"
    assert (draft.data["priority"], draft.data["maxAttempts"]) == (9, 1)
    assert draft.data["requiredAgentType"] == "reviewer"
    assert draft.data["contextData"] == {"repo": "r"}
    assert draft.idempotency_key is None and draft.epoch is None


# --- cancel and requeue ----------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True])
def test_cancel_a_pending_or_live_item(started: bool) -> None:
    h = History().submit("w1")
    assert d.cancel_work(h.state, "w1", "why") == Draft("work.cancelled", "w1", {"reason": "why"})
    h = held_by(started=started)
    state = h.apply(d.cancel_work(h.state, "w1", None))
    assert state.work["w1"]["status"] == "cancelled"
    assert state.agents["a1"]["currentTasks"] == []


def test_cancelling_a_cancelled_item_is_a_noop() -> None:
    assert d.cancel_work(History().submit("w1").cancel("w1").state, "w1", None) is None


@pytest.mark.parametrize("finish", ["complete", "fail"])
def test_cancelling_a_finished_item_is_a_conflict(finish: str) -> None:
    h = held_by(started=True)
    h = h.complete("w1", "a1") if finish == "complete" else h.fail("w1", "a1")
    status = h.state.work["w1"]["status"]
    with pytest.raises(Conflict) as err:
        d.cancel_work(h.state, "w1", None)
    assert err.value.field == "id"
    assert err.value.message == f"work item w1 is already {status}"


def test_unknown_items_are_not_found() -> None:
    state = History().state
    for call in (
        lambda: d.cancel_work(state, "nope", None),
        lambda: d.requeue_work(state, "nope", "r"),
        lambda: d.accept_work(state, "nope", "a1"),
        lambda: d.progress_work(state, "nope", "a1", 1, None),
        lambda: d.complete_work(state, "nope", "a1", None, None, None),
        lambda: d.fail_work(state, "nope", "a1", "m", None, True, RetryPolicy(), NOW),
        lambda: d.retry_dead_letter(state, "nope", None),
        lambda: d.discard_dead_letter(state, "nope", None),
    ):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.field == "id"
        assert err.value.message == "work item nope not found"


@pytest.mark.parametrize("started", [False, True])
def test_requeue_a_live_assignment(started: bool) -> None:
    h = held_by(started=started)
    draft = d.requeue_work(h.state, "w1", "reassign")
    assert draft == Draft("work.requeued", "w1", {"reason": "reassign", "retryAt": None})
    state = h.apply(draft)
    assert state.work["w1"]["status"] == "pending" and state.work["w1"]["assignedTo"] is None


def test_requeueing_an_unassigned_item_is_a_conflict() -> None:
    with pytest.raises(Conflict) as err:
        d.requeue_work(History().submit("w1").state, "w1", "r")
    assert (err.value.field, err.value.message) == ("id", "work item w1 is pending, not assigned")


# --- batches ---------------------------------------------------------------------------------------


def test_cancel_batch_skips_finished_requeues_live_only_when_reassigning() -> None:
    h = held_by().submit("w2").submit("w3").cancel("w3")
    state = h.state
    assert d.cancel_batch_action(state, "w3", reassign=True) == "skip"
    assert d.cancel_batch_action(state, "w1", reassign=True) == "requeue"
    assert d.cancel_batch_action(state, "w1", reassign=False) == "cancel"
    assert d.cancel_batch_action(state, "w2", reassign=True) == "cancel"
    assert d.cancel_batch_action(state, "unknown", reassign=True) == "cancel"  # answered NotFound by cancel


def test_select_work_applies_every_filter() -> None:
    h = History().register("a1").submit("w1", priority=2).submit("w2", priority=8, capability="test")
    h.submit("w3", priority=9, boundary="corp").assign("w1", "a1")
    state = h.state
    assert d.select_work(state, {}) == ["w1", "w2", "w3"]
    assert d.select_work(state, {"status": "pending"}) == ["w2", "w3"]
    assert d.select_work(state, {"status": "assigned", "assignedTo": "a1"}) == ["w1"]
    assert d.select_work(state, {"assignedTo": "a2"}) == []
    assert d.select_work(state, {"capability": "test"}) == ["w2"]
    assert d.select_work(state, {"boundary": "corp"}) == ["w3"]
    assert d.select_work(state, {"minPriority": 8}) == ["w2", "w3"]
    assert d.select_work(state, {"status": "bogus"}) == []


# --- assignment ------------------------------------------------------------------------------------


def test_assign_a_pending_item_to_a_free_agent() -> None:
    h = History().register("a1").submit("w1")
    draft = d.assign_work(h.state, "w1", "a1", 4, ACCEPT_BY)
    assert draft == Draft("work.assigned", "w1", {"agentGuid": "a1", "attempt": 1, "acceptBy": ACCEPT_BY}, epoch=4)
    state = h.apply(draft)
    assert state.work["w1"]["assignedTo"] == "a1" and state.agents["a1"]["currentTasks"] == ["w1"]


def test_assign_after_a_retry_counts_the_next_attempt() -> None:
    h = held_by(started=True).fail("w1", "a1", outcome="retry")
    draft = d.assign_work(h.state, "w1", "a1", 1, ACCEPT_BY)
    assert draft is not None and draft.data["attempt"] == 2


@pytest.mark.parametrize(
    "history",
    [
        pytest.param(History().register("a1").submit("w1").lost("a1"), id="agent-offline"),
        pytest.param(History().register("a1").submit("w1").shutdown("a1"), id="agent-shutting-down"),
        pytest.param(History().register("a1").submit("w0").submit("w1").assign("w0", "a1"), id="agent-full"),
        pytest.param(History().register("a1").register("a2").submit("w1").assign("w1", "a2"), id="item-assigned"),
        pytest.param(History().register("a1").submit("w1").cancel("w1"), id="item-cancelled"),
        pytest.param(History().register("a1"), id="item-unknown"),
        pytest.param(History().submit("w1"), id="agent-unknown"),
    ],
)
def test_a_stale_assignment_plan_is_a_noop(history: History) -> None:
    assert d.assign_work(history.state, "w1", "a1", 1, ACCEPT_BY) is None


# --- the holder's reports --------------------------------------------------------------------------


def test_accept_starts_an_assigned_item() -> None:
    h = held_by()
    draft = d.accept_work(h.state, "w1", "a1", attempt=1)
    assert draft == Draft("work.started", "w1", {"agentGuid": "a1"})
    assert h.apply(draft).work["w1"]["status"] == "in-progress"


def test_accepting_twice_is_a_noop() -> None:
    assert d.accept_work(held_by(started=True).state, "w1", "a1") is None


def test_another_agents_report_is_a_conflict_on_guid() -> None:
    state = held_by().state
    for call in (
        lambda: d.accept_work(state, "w1", "a2"),
        lambda: d.progress_work(state, "w1", "a2", 5, None),
        lambda: d.complete_work(state, "w1", "a2", None, None, None),
        lambda: d.fail_work(state, "w1", "a2", "m", None, True, RetryPolicy(), NOW),
    ):
        with pytest.raises(Conflict) as err:
            call()
        assert (err.value.field, err.value.message) == ("guid", "work item w1 is not held by agent a2")


def test_a_report_on_an_earlier_attempt_is_a_conflict_on_attempt() -> None:
    state = held_by(attempt=2).state
    for call in (
        lambda: d.accept_work(state, "w1", "a1", attempt=1),
        lambda: d.progress_work(state, "w1", "a1", 5, None, attempt=1),
        lambda: d.complete_work(state, "w1", "a1", None, None, None, attempt=1),
        lambda: d.fail_work(state, "w1", "a1", "m", None, True, RetryPolicy(), NOW, attempt=1),
    ):
        with pytest.raises(Conflict) as err:
            call()
        assert (err.value.field, err.value.message) == ("attempt", "work item w1 is at attempt 2, not 1")
    assert d.accept_work(state, "w1", "a1", attempt=2) is not None


def test_accepting_a_finished_item_is_a_conflict_on_work_id() -> None:
    state = held_by(started=True).complete("w1", "a1").state
    with pytest.raises(Conflict) as err:
        d.accept_work(state, "w1", "a1")
    assert (err.value.field, err.value.message) == ("workId", "work item w1 is completed")


def test_progress_on_a_live_item() -> None:
    h = held_by()
    draft = d.progress_work(h.state, "w1", "a1", 40, "half", attempt=1)
    assert draft == Draft("work.progressed", "w1", {"agentGuid": "a1", "progress": 40, "message": "half"})
    assert h.apply(draft).work["w1"]["progress"] == 40


def test_progress_on_a_finished_item_is_a_conflict() -> None:
    state = held_by(started=True).complete("w1", "a1").state
    with pytest.raises(Conflict) as err:
        d.progress_work(state, "w1", "a1", 50, None)
    assert (err.value.field, err.value.message) == ("workId", "work item w1 is completed")


def test_complete_a_live_item() -> None:
    h = held_by(started=True)
    draft = d.complete_work(h.state, "w1", "a1", "done", {"n": 1}, ["a.txt"])
    assert draft == Draft("work.completed", "w1", {"agentGuid": "a1", "summary": "done", "output": {"n": 1},
                                                     "artifacts": ["a.txt"]})
    state = h.apply(draft)
    assert state.work["w1"]["status"] == "completed" and state.agents["a1"]["currentTasks"] == []


def test_completing_twice_is_a_noop_but_completing_a_dead_letter_is_a_conflict() -> None:
    assert d.complete_work(held_by(started=True).complete("w1", "a1").state, "w1", "a1", None, None, None) is None
    with pytest.raises(Conflict) as err:
        d.complete_work(held_by(started=True).fail("w1", "a1").state, "w1", "a1", None, None, None)
    assert (err.value.field, err.value.message) == ("workId", "work item w1 is failed")


# --- failure ---------------------------------------------------------------------------------------


def test_a_recoverable_failure_with_attempts_left_is_retried_after_the_backoff() -> None:
    h = held_by(started=True)
    draft = d.fail_work(h.state, "w1", "a1", "boom", "E1", True, RetryPolicy(base_ms=2_000), NOW)
    assert draft == Draft("work.failed", "w1", {
        "agentGuid": "a1", "message": "boom", "code": "E1", "recoverable": True, "outcome": "retry",
        "retryAt": format_ts(NOW + timedelta(seconds=2)),
    })
    state = h.apply(draft)
    assert state.work["w1"]["status"] == "pending"
    assert state.work["w1"]["retryAt"] == "2026-01-02T12:00:02.000Z"


def test_the_backoff_doubles_per_attempt_up_to_its_cap() -> None:
    h = History().register("a1").submit("w1", max_attempts=5).assign("w1", "a1", attempt=3)
    draft = d.fail_work(h.state, "w1", "a1", "m", None, True, RetryPolicy(base_ms=1_000), NOW)
    assert parse_ts(draft.data["retryAt"]) - NOW == timedelta(seconds=4)
    capped = d.fail_work(h.state, "w1", "a1", "m", None, True, RetryPolicy(base_ms=1_000, max_ms=1_500), NOW)
    assert parse_ts(capped.data["retryAt"]) - NOW == timedelta(milliseconds=1_500)
    assert RetryPolicy(base_ms=100).delay(0) == timedelta(milliseconds=100)


@pytest.mark.parametrize(("recoverable", "attempt", "max_attempts"), [(False, 1, 3), (True, 3, 3)])
def test_an_unrecoverable_or_last_failure_is_dead_lettered(recoverable: bool, attempt: int, max_attempts: int) -> None:
    h = held_by(attempt=attempt, started=True, max_attempts=max_attempts)
    draft = d.fail_work(h.state, "w1", "a1", "boom", None, recoverable, RetryPolicy(), NOW)
    assert (draft.data["outcome"], draft.data["retryAt"]) == ("dead-letter", None)
    state = h.apply(draft)
    assert state.work["w1"]["status"] == "failed" and state.work["w1"]["deadLetter"]["discarded"] is False


def test_failing_a_finished_item_is_a_conflict() -> None:
    state = held_by(started=True).complete("w1", "a1").state
    with pytest.raises(Conflict) as err:
        d.fail_work(state, "w1", "a1", "m", None, True, RetryPolicy(), NOW)
    assert (err.value.field, err.value.message) == ("workId", "work item w1 is completed")


# --- withdrawal ------------------------------------------------------------------------------------


def test_withdraw_requeues_with_cause_holder_and_epoch() -> None:
    h = held_by()
    draft = d.withdraw_assignment(h.state, "w1", "agent lost", 7, 5, guid="a1", attempt=1, cause="agent-offline")
    assert draft == Draft("work.requeued", "w1", {"reason": "agent lost", "cause": "agent-offline",
                                                   "agentGuid": "a1", "retryAt": None}, epoch=7)
    assert h.apply(draft).work["w1"]["status"] == "pending"


def test_an_accept_timeout_withdrawal_marks_the_agent_unresponsive() -> None:
    h = held_by()
    state = h.apply(d.withdraw_assignment(h.state, "w1", "late", 1, 5, cause="accept-timeout"))
    assert state.agents["a1"]["unresponsiveSince"] is not None


@pytest.mark.parametrize(("attempt", "max_attempts", "max_withdrawals"), [(3, 3, 5), (2, 3, 2)])
def test_withdrawing_the_last_attempt_dead_letters(attempt: int, max_attempts: int, max_withdrawals: int) -> None:
    h = held_by(attempt=attempt, max_attempts=max_attempts)
    draft = d.withdraw_assignment(h.state, "w1", "lost", 2, max_withdrawals)
    assert draft == Draft("work.dead_lettered", "w1", {
        "reason": f"lost; gave up after {attempt} attempts", "cause": None, "agentGuid": "a1"}, epoch=2)
    assert h.apply(draft).work["w1"]["status"] == "failed"


@pytest.mark.parametrize(
    ("history", "kw"),
    [
        pytest.param(History().submit("w1"), {}, id="pending"),
        pytest.param(History(), {}, id="unknown"),
        pytest.param(held_by(), {"guid": "a2"}, id="other-holder"),
        pytest.param(held_by(attempt=2), {"attempt": 1}, id="other-attempt"),
        pytest.param(held_by(started=True), {"cause": "accept-timeout"}, id="accepted-just-in-time"),
    ],
)
def test_a_stale_withdrawal_is_a_noop(history: History, kw: dict[str, Any]) -> None:
    assert d.withdraw_assignment(history.state, "w1", "r", 1, 5, **kw) is None


# --- the dead-letter queue -------------------------------------------------------------------------


def test_retry_and_discard_a_dead_letter() -> None:
    h = held_by(started=True).fail("w1", "a1")
    assert d.discard_dead_letter(h.state, "w1", "junk") == Draft("work.discarded", "w1", {"reason": "junk"})
    draft = d.retry_dead_letter(h.state, "w1", "again")
    assert draft == Draft("work.retried", "w1", {"reason": "again"})
    state = h.apply(draft)
    assert state.work["w1"]["status"] == "pending" and state.work["w1"]["attempts"] == 0


@pytest.mark.parametrize(
    "history",
    [
        pytest.param(History().submit("w1"), id="pending"),
        pytest.param(held_by(started=True).complete("w1", "a1"), id="completed"),
        pytest.param(held_by(started=True).fail("w1", "a1").discard("w1"), id="discarded"),
    ],
)
def test_retry_or_discard_outside_the_dlq_is_a_conflict(history: History) -> None:
    for decide in (d.retry_dead_letter, d.discard_dead_letter):
        with pytest.raises(Conflict) as err:
            decide(history.state, "w1", None)
        assert (err.value.field, err.value.message) == ("id", "work item w1 is not in the dead-letter queue")


# --- retention -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: held_by(started=True).complete("w1", "a1"), id="completed"),
        pytest.param(lambda: History().submit("w1").cancel("w1"), id="cancelled"),
        pytest.param(lambda: held_by(started=True).fail("w1", "a1").discard("w1"), id="discarded"),
    ],
)
def test_purge_an_item_finished_before_the_horizon(make: Callable[[], History]) -> None:
    history = make()
    draft = d.purge_work(history.state, "w1", "2026-01-02T00:00:00.000Z", 3)
    assert draft == Draft("work.purged", "w1", {"reason": "retention"}, epoch=3)
    assert "w1" not in history.apply(draft).work


def test_purge_keeps_recent_live_and_dead_lettered_items() -> None:
    done = held_by(started=True).complete("w1", "a1").state
    assert d.purge_work(done, "w1", done.work["w1"]["updatedAt"], 1) is None  # finished at the horizon
    assert d.purge_work(held_by(started=True).fail("w1", "a1").state, "w1", "2027-01-01", 1) is None
    assert d.purge_work(History().submit("w1").state, "w1", "2027-01-01", 1) is None
    assert d.purge_work(History().state, "w1", "2027-01-01", 1) is None


def test_decisions_do_not_touch_the_state() -> None:
    h = held_by(started=True)
    state = h.state
    before = (dict(state.work["w1"]), dict(state.agents["a1"]), state.seq)
    d.fail_work(state, "w1", "a1", "m", None, True, RetryPolicy(), NOW)
    d.withdraw_assignment(state, "w1", "r", 1, 1)
    d.cancel_work(state, "w1", None)
    assert (dict(state.work["w1"]), dict(state.agents["a1"]), state.seq) == before
