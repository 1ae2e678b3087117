"""The pure fold: determinism, snapshots, invariants over random sequences, and every transition."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import ProjectState, apply, decode_state, encode_state, fold, state_hash
from projections.events import Event
from projections.state import LIVE_ASSIGNMENT, SETTLED_WORK, STATE_SCHEMA, WORK_STATUSES
from tests.strategies import PROJECT, event_sequences

# 75 random histories per property keep `make test` fast; WEFT_PROPERTY_EXAMPLES=2000 for a deep run.
PROPERTY = settings(
    max_examples=int(os.environ.get("WEFT_PROPERTY_EXAMPLES", "75")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# The work lifecycle's edges: (status before, status after) for an event that changed the status.
ALLOWED_MOVES = {
    ("pending", "assigned"),
    ("pending", "failed"),  # dead-lettered without an attempt
    ("pending", "cancelled"),
    ("assigned", "in-progress"),
    ("assigned", "completed"),
    ("assigned", "failed"),
    ("assigned", "pending"),
    ("assigned", "cancelled"),
    ("in-progress", "completed"),
    ("in-progress", "failed"),
    ("in-progress", "pending"),
    ("in-progress", "cancelled"),
    ("failed", "pending"),  # a DLQ retry
}


# --- helpers ---------------------------------------------------------------------------------


class Stream:
    """Builds a project's events with stream sequences and increasing timestamps."""

    def __init__(self, project: str = "p") -> None:
        self.project = project
        self.seq = 0
        self.events: list[Event] = []

    def ev(self, type_: str, entity_id: str, idempotency_key: str | None = None, **data: Any) -> Event:
        self.seq += 1
        e = Event(
            type=type_,
            entity_id=entity_id,
            data=data,
            project=self.project,
            ts=f"2026-01-01T00:00:{self.seq:02d}.000Z",
            idempotency_key=idempotency_key,
            seq=self.seq,
            id=f"ev-{self.seq}",  # the state keeps the last one's (`last_event_id`)
        )
        self.events.append(e)
        return e

    def submit(self, work_id: str, key: str | None = None, max_attempts: int = 3) -> Event:
        return self.ev(
            "work.submitted",
            work_id,
            key,
            taskId=f"task-{work_id}",
            capability="code",
            boundary="default",
            description="do it",
            priority=5,
            preferredAgentType=None,
            requiredAgentType=None,
            deadline=None,
            contextData=None,
            maxAttempts=max_attempts,
        )

    def register(self, guid: str, capacity: int = 1, agent_type: str = "developer") -> Event:
        return self.ev(
            "agent.registered",
            guid,
            guid=guid,
            handle=None,
            agentType=agent_type,
            capabilities=["code"],
            boundaries=["default"],
            maxConcurrentTasks=capacity,
            hostname=None,
            username=None,
            visibility="project-only",
            labels={},
            source="weft",
            spinUpId=None,
            targetId=None,
            spindownAfterIdleMs=None,
        )

    def assign(self, work_id: str, guid: str, attempt: int = 1) -> Event:
        return self.ev(
            "work.assigned", work_id, agentGuid=guid, attempt=attempt, acceptBy="2026-01-01T01:00:00.000Z"
        )

    def fail(self, work_id: str, outcome: str, guid: str | None = None, retry_at: str | None = None) -> Event:
        return self.ev(
            "work.failed",
            work_id,
            agentGuid=guid,
            message="boom",
            code="E1",
            recoverable=outcome == "retry",
            outcome=outcome,
            retryAt=retry_at,
        )

    def register_target(self, target_id: str, **extra: Any) -> Event:
        target = {"name": target_id, "agentType": "developer", "mechanism": "local", "capabilities": ["code"]}
        return self.ev("target.registered", target_id, target={**target, **extra})

    def spinup_failed(self, target_id: str, spin_id: str) -> Event:
        return self.ev("spinup.failed", target_id, spinUpId=spin_id, error="no agent", durationMs=10.0)

    def state(self) -> ProjectState:
        return fold(self.events, project=self.project)


def check_invariants(state: ProjectState) -> None:
    holders: dict[str, str] = {}
    for guid, agent in state.agents.items():
        assert agent["guid"] == guid
        assert agent["currentTaskCount"] == len(agent["currentTasks"])
        assert len(agent["currentTasks"]) <= agent["maxConcurrentTasks"]
        assert len(set(agent["currentTasks"])) == len(agent["currentTasks"])
        for work_id in agent["currentTasks"]:
            assert work_id not in holders, f"{work_id} held by {holders.get(work_id)} and {guid}"
            holders[work_id] = guid
    for work_id, item in state.work.items():
        if item["status"] in LIVE_ASSIGNMENT:
            # A live item has exactly one holder, and the holder lists it.
            assert item["assignedTo"] is not None
            assert holders.get(work_id) == item["assignedTo"]
        else:
            # Pending or finished: no agent counts it against its capacity.
            assert work_id not in holders
        if item["status"] == "pending":
            assert item["assignedTo"] is None
        assert (item["status"] == "failed") == (item["deadLetter"] is not None)
        assert 0 <= item["progress"] <= 100
    for work_id in holders:
        assert work_id in state.work
    recount = Counter(item["status"] for item in state.work.values())
    assert state.work_counts == {s: recount.get(s, 0) for s in WORK_STATUSES}
    # The status index the fold keeps holds exactly the items in each status.
    by_status = {s: sorted(wid for wid, item in state.work.items() if item["status"] == s) for s in WORK_STATUSES}
    assert {s: sorted(ids) for s, ids in state.work_by_status.items()} == by_status
    for target in state.targets.values():
        assert target["status"] in ("available", "disabled", "error")


def without_repeated_keys(events: list[Event]) -> list[Event]:
    seen: set[str] = set()
    kept = []
    for e in events:
        if e.idempotency_key is not None:
            if e.idempotency_key in seen:
                continue
            seen.add(e.idempotency_key)
        kept.append(e)
    return kept


def content(state: ProjectState) -> dict[str, Any]:
    """The folded entities, without bookkeeping of stream positions."""
    decoded = decode_state(encode_state(state))
    d = {**decoded.to_dict(), "work": dict(decoded.work.items())}
    return {k: d[k] for k in ("work", "agents", "targets", "work_counts", "idempotency", "events_applied")}


# --- properties over random sequences --------------------------------------------------------


@PROPERTY
@given(event_sequences())
def test_folding_the_same_sequence_twice_gives_the_same_state_hash(events: list[Event]) -> None:
    first = fold(events, project=PROJECT)
    second = fold(events, project=PROJECT)
    assert state_hash(first) == state_hash(second)
    assert first.seq == (events[-1].seq if events else 0)


@PROPERTY
@given(event_sequences(), st.data())
def test_snapshot_at_any_cut_plus_tail_equals_the_full_fold(events: list[Event], data: st.DataObject) -> None:
    """The snapshot goes through its byte encoding; the tail may overlap it (a consumer started
    before the snapshot's sequence), and the overlap must change nothing."""
    cut = data.draw(st.integers(0, len(events)), label="cut")
    tail_from = data.draw(st.one_of(st.just(cut), st.integers(0, cut)), label="tail_from")
    restored = decode_state(encode_state(fold(events[:cut], project=PROJECT)))
    fold(events[tail_from:], state=restored)
    full = fold(events, project=PROJECT)
    assert state_hash(restored) == state_hash(full)
    # The snapshot carries the status index, so even its order is the full fold's.
    assert {k: list(v) for k, v in restored.work_by_status.items()} == {
        k: list(v) for k, v in full.work_by_status.items()
    }
    assert encode_state(restored) == encode_state(full)


@PROPERTY
@given(event_sequences())
def test_invariants_hold_after_every_event(events: list[Event]) -> None:
    state = ProjectState(project=PROJECT)
    for e in events:
        before = {wid: item["status"] for wid, item in state.work.items()}
        apply(state, e)
        check_invariants(state)
        for wid, item in state.work.items():
            if wid in before and before[wid] != item["status"]:
                assert (before[wid], item["status"]) in ALLOWED_MOVES, e.type
                assert wid == e.entity_id, "an event changed another entity's status"


@PROPERTY
@given(event_sequences())
def test_a_repeated_idempotency_key_is_ignored(events: list[Event]) -> None:
    everything = fold(events, project=PROJECT)
    firsts_only = fold(without_repeated_keys(events), project=PROJECT)
    assert content(everything) == content(firsts_only)


@PROPERTY
@given(event_sequences())
def test_a_settled_item_never_changes_again(events: list[Event]) -> None:
    """`encode_state(settle=True)` relies on it: such items are held encoded, and a caller holding
    one of their dicts keeps a correct copy. Only a purge removes them."""
    state = ProjectState(project=PROJECT)
    finished: dict[str, Any] = {}
    for e in events:
        apply(state, e)
        for wid, then in list(finished.items()):
            if wid not in state.work:
                del finished[wid]  # purged
            else:
                assert state.work[wid] == then, e.type
        for wid in [wid for status in SETTLED_WORK for wid in state.work_by_status[status]]:
            finished.setdefault(wid, orjson.loads(orjson.dumps(state.work[wid])))


# --- sequences and snapshots, by example ------------------------------------------------------


def test_events_at_or_below_the_folded_sequence_are_no_ops() -> None:
    s = Stream()
    s.submit("w1")
    state = s.state()
    before = state_hash(state)
    apply(state, s.events[0])
    assert state_hash(state) == before
    assert state.events_applied == 1


def test_entity_seq_records_the_last_stream_sequence_per_entity() -> None:
    s = Stream()
    s.submit("w1")
    s.register("a1")
    s.assign("w1", "a1")
    state = s.state()
    assert state.entity_seq == {"work.w1": 3, "agent.a1": 2}
    assert state.seq == 3


def test_an_ignored_event_still_advances_the_sequences() -> None:
    """OCC needs the subject's real last sequence even when the fold rejected the event."""
    s = Stream()
    s.submit("w1")
    s.ev("work.started", "w1", agentGuid=None)  # not assigned: ignored
    state = s.state()
    assert state.work["w1"]["status"] == "pending"
    assert state.entity_seq["work.w1"] == 2
    assert state.seq == 2


def test_snapshot_of_another_schema_is_rejected() -> None:
    raw = orjson.dumps({**ProjectState(project="p").to_dict(), "schema": STATE_SCHEMA - 1})
    with pytest.raises(ValueError, match="schema"):
        decode_state(raw)


def test_equal_folds_of_different_projects_hash_differently() -> None:
    assert state_hash(ProjectState(project="a")) != state_hash(ProjectState(project="b"))


def golden_stream() -> Stream:
    """One of everything: a fixed history whose folded bytes stand for the state's shape."""
    s = Stream("golden")
    s.register("a1", capacity=2)
    s.register_target("t1")
    s.submit("w1", key="work:k1")
    s.submit("w2")
    s.submit("w3")
    s.ev("leader.elected", "golden", holder="r1", leaseRevision=1).epoch = 1
    s.ev("spinup.requested", "t1", spinUpId="s1", workId="w1", capability="code", boundary=None, reason="r")
    s.ev("spinup.started", "t1", spinUpId="s1", mechanismResult={"pid": 1})
    s.ev("spinup.completed", "t1", spinUpId="s1", agentGuid="a1", durationMs=5.0)
    s.spinup_failed("t1", "s2")
    s.assign("w1", "a1").epoch = 1
    s.ev("work.started", "w1", agentGuid="a1")
    s.ev("work.progressed", "w1", agentGuid="a1", progress=50, message="half")
    s.ev("work.completed", "w1", agentGuid="a1", summary="ok", output=None, artifacts=None)
    s.assign("w2", "a1").epoch = 1
    s.fail("w2", "retry", guid="a1", retry_at="2026-01-01T00:10:00.000Z")
    s.assign("w2", "a1", attempt=2).epoch = 1
    s.fail("w2", "dead-letter", guid="a1")
    s.ev("work.discarded", "w2", reason=None)
    s.ev("work.cancelled", "w3", reason="no")
    s.ev("work.purged", "w3", reason="retention").epoch = 1
    s.ev("target.health_changed", "t1", healthStatus="healthy", latencyMs=1.0, error=None)
    s.ev("agent.shutdown_requested", "a1", graceful=True, reason="idle-timeout", gracePeriodMs=None)
    s.ev("agent.lost", "a1", lastHeartbeat=None).epoch = 2
    return s


# The folded state of a fixed history, pinned per schema version. A snapshot is interchangeable with
# a replay only if the fold that wrote it folds like today's: when this test fails, the state's shape
# or a fold rule changed, so bump STATE_SCHEMA (older snapshots are then ignored and rebuilt) and pin
# the new hash under the new version.
GOLDEN_HASHES = {
    2: "eacf387439458ba552e6b61a5981fd72e2a7d29a7ce7f81a45c6ed13c2666048",
    3: "169f77d112fd0d59854eeda4f7beafaae325eb6f6f164a50794e90742b69bb5c",  # purged_counts, work.purged
    4: "1d096ca3a35f86fbd2811270fa8439e852755fa3823dc1f3bebdb6eea3eebddf",  # items array + footer line
    # last_event_id, leader (leader.elected); agents' lastSeen and unresponsiveSince
    5: "2dbae4611acc716375f43ad25a221a6ec9fad0a39289f9648108e5eb598e1db5",
}


def test_the_folded_shape_is_pinned_to_the_state_schema_version() -> None:
    got = state_hash(golden_stream().state())
    assert STATE_SCHEMA in GOLDEN_HASHES, f"pin STATE_SCHEMA {STATE_SCHEMA}: {got}"
    assert got == GOLDEN_HASHES[STATE_SCHEMA], (
        f"the fold's output changed without a STATE_SCHEMA bump; bump it and pin {got}"
    )


# --- work transitions -----------------------------------------------------------------------


def test_submitted_work_is_pending_and_counted() -> None:
    s = Stream()
    s.submit("w1")
    state = s.state()
    item = state.work["w1"]
    assert item["status"] == "pending"
    assert item["attempts"] == 0 and item["assignedTo"] is None
    assert item["offeredAt"] == s.events[0].ts
    assert state.work_counts["pending"] == 1


def test_a_second_submit_of_the_same_id_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.progressed", "w1", agentGuid=None, progress=10, message=None)
    first = s.state().work["w1"]
    s.submit("w1")
    assert s.state().work["w1"]["taskId"] == first["taskId"]
    assert s.state().work_counts["pending"] == 1


def test_assignment_takes_a_slot_and_marks_a_full_agent_busy() -> None:
    s = Stream()
    s.register("a1", capacity=1)
    s.submit("w1")
    s.assign("w1", "a1")
    state = s.state()
    assert state.work["w1"]["status"] == "assigned"
    assert state.work["w1"]["assignedTo"] == "a1"
    assert state.work["w1"]["attempts"] == 1
    assert state.agents["a1"]["currentTasks"] == ["w1"]
    assert state.agents["a1"]["status"] == "busy"


def test_assignment_beyond_capacity_is_ignored() -> None:
    s = Stream()
    s.register("a1", capacity=1)
    s.submit("w1")
    s.submit("w2")
    s.assign("w1", "a1")
    s.assign("w2", "a1")
    state = s.state()
    assert state.work["w2"]["status"] == "pending"
    assert state.agents["a1"]["currentTasks"] == ["w1"]
    check_invariants(state)


def test_assignment_to_an_unknown_agent_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.assign("w1", "ghost")
    assert s.state().work["w1"]["status"] == "pending"


def test_assignment_to_an_offline_agent_is_ignored() -> None:
    """The agent was lost between the scheduler's decision and its append (different subjects,
    so OCC cannot catch it): the work must stay pending, not go to an agent that is gone."""
    s = Stream()
    s.register("a1", capacity=1)
    s.submit("w1")
    s.ev("agent.lost", "a1", lastHeartbeat=None)
    s.assign("w1", "a1")
    state = s.state()
    assert state.work["w1"]["status"] == "pending"
    assert state.agents["a1"]["status"] == "offline"
    assert state.agents["a1"]["currentTasks"] == []


def test_assignment_of_work_that_is_not_pending_is_ignored() -> None:
    s = Stream()
    s.register("a1", capacity=2)
    s.register("a2", capacity=2)
    s.submit("w1")
    s.assign("w1", "a1")
    s.assign("w1", "a2")
    state = s.state()
    assert state.work["w1"]["assignedTo"] == "a1"
    assert state.agents["a2"]["currentTasks"] == []


def test_a_decision_of_an_older_epoch_is_in_the_stream_but_never_applied() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1").epoch = 2
    s.ev("work.requeued", "w1", reason="deposed leader", retryAt=None).epoch = 1
    state = s.state()
    assert state.work["w1"]["status"] == "assigned"
    assert state.entity_seq["work.w1"] == 4, "OCC still sees the subject's last sequence"
    s.ev("work.requeued", "w1", reason="current leader", retryAt=None).epoch = 2
    assert s.state().work["w1"]["status"] == "pending"


def test_start_by_another_agent_is_ignored() -> None:
    s = Stream()
    s.register("a1")
    s.register("a2")
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.started", "w1", agentGuid="a2")
    assert s.state().work["w1"]["status"] == "assigned"
    s.ev("work.started", "w1", agentGuid="a1")
    state = s.state()
    assert state.work["w1"]["status"] == "in-progress"
    assert state.work["w1"]["acceptBy"] is None


def test_progress_is_clamped_and_implies_start() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.progressed", "w1", agentGuid="a1", progress=250, message="almost")
    item = s.state().work["w1"]
    assert item["status"] == "in-progress"
    assert item["progress"] == 100 and item["progressMessage"] == "almost"
    s.ev("work.progressed", "w1", agentGuid="a1", progress=-5, message=None)
    assert s.state().work["w1"]["progress"] == 0


def test_completion_frees_the_agent_and_records_the_result() -> None:
    s = Stream()
    s.register("a1", capacity=1)
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.started", "w1", agentGuid="a1")
    s.ev("work.completed", "w1", agentGuid="a1", summary="done", output={"x": 1}, artifacts=None)
    state = s.state()
    item = state.work["w1"]
    assert item["status"] == "completed" and item["progress"] == 100
    assert item["result"]["summary"] == "done" and item["result"]["output"] == {"x": 1}
    assert state.agents["a1"]["currentTasks"] == [] and state.agents["a1"]["status"] == "online"
    check_invariants(state)


def test_completion_of_pending_work_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.completed", "w1", agentGuid=None, summary=None, output=None, artifacts=None)
    assert s.state().work["w1"]["status"] == "pending"


def test_failed_with_outcome_retry_goes_back_to_pending_with_retry_at() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1")
    s.fail("w1", "retry", guid="a1", retry_at="2026-01-01T00:05:00.000Z")
    state = s.state()
    item = state.work["w1"]
    assert item["status"] == "pending"
    assert item["retryAt"] == "2026-01-01T00:05:00.000Z"
    assert item["assignedTo"] is None
    assert item["attempts"] == 1
    assert item["error"]["message"] == "boom" and item["error"]["agentGuid"] == "a1"
    assert len(item["errors"]) == 1
    assert item["deadLetter"] is None
    assert state.agents["a1"]["currentTasks"] == []
    check_invariants(state)


def test_failed_with_outcome_dead_letter_sets_dead_letter() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1")
    s.fail("w1", "dead-letter", guid="a1")
    state = s.state()
    item = state.work["w1"]
    assert item["status"] == "failed"
    assert item["deadLetter"] == {
        "reason": "boom",
        "failedAt": s.events[-1].ts,
        "attempts": 1,
        "discarded": False,
    }
    assert state.agents["a1"]["currentTasks"] == []
    assert state.work_counts["failed"] == 1
    check_invariants(state)


def test_failure_reported_by_another_agent_is_ignored() -> None:
    s = Stream()
    s.register("a1")
    s.register("a2")
    s.submit("w1")
    s.assign("w1", "a1")
    s.fail("w1", "dead-letter", guid="a2")
    assert s.state().work["w1"]["status"] == "assigned"


def test_requeue_withdraws_a_live_assignment() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.requeued", "w1", reason="agent lost", retryAt=None)
    state = s.state()
    assert state.work["w1"]["status"] == "pending"
    assert state.work["w1"]["lastRequeueReason"] == "agent lost"
    assert state.agents["a1"]["currentTasks"] == []


def test_requeue_of_pending_work_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.requeued", "w1", reason="x", retryAt="2026-02-01T00:00:00.000Z")
    assert s.state().work["w1"]["retryAt"] is None


def test_dead_lettered_without_an_attempt() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.dead_lettered", "w1", reason="deadline passed")
    item = s.state().work["w1"]
    assert item["status"] == "failed"
    assert item["deadLetter"]["reason"] == "deadline passed"


def test_cancel_of_pending_and_of_live_work() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.submit("w2")
    s.assign("w2", "a1")
    s.ev("work.cancelled", "w1", reason="not needed")
    s.ev("work.cancelled", "w2", reason=None)
    state = s.state()
    assert state.work["w1"]["status"] == "cancelled"
    assert state.work["w1"]["cancelReason"] == "not needed"
    assert state.work["w2"]["status"] == "cancelled"
    assert state.agents["a1"]["currentTasks"] == []
    assert state.work_counts["cancelled"] == 2
    check_invariants(state)


def test_cancel_of_terminal_work_is_ignored() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.completed", "w1", agentGuid="a1", summary=None, output=None, artifacts=None)
    s.submit("w2")
    s.ev("work.dead_lettered", "w2", reason="x")
    before = s.state()
    s.ev("work.cancelled", "w1", reason=None)
    s.ev("work.cancelled", "w2", reason=None)
    after = s.state()
    assert after.work["w1"]["status"] == "completed"
    assert after.work["w2"]["status"] == "failed"
    assert after.work_counts == before.work_counts


def test_dlq_retry_resets_attempts_and_returns_to_pending() -> None:
    s = Stream()
    s.register("a1")
    s.submit("w1", max_attempts=1)
    s.assign("w1", "a1")
    s.fail("w1", "dead-letter")
    s.ev("work.retried", "w1", reason="fixed the repo")
    state = s.state()
    item = state.work["w1"]
    assert item["status"] == "pending"
    assert item["attempts"] == 0
    assert item["deadLetter"] is None and item["error"] is None and item["completedAt"] is None
    assert len(item["errors"]) == 1, "the failure history is kept"
    assert state.work_counts["failed"] == 0 and state.work_counts["pending"] == 1
    s.assign("w1", "a1", attempt=1)
    assert s.state().work["w1"]["status"] == "assigned"


def test_retry_of_work_that_is_not_dead_lettered_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.cancelled", "w1", reason=None)
    s.ev("work.retried", "w1", reason=None)
    assert s.state().work["w1"]["status"] == "cancelled"


def test_discard_marks_the_dead_letter_and_blocks_a_later_retry() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.dead_lettered", "w1", reason="x")
    s.ev("work.discarded", "w1", reason=None)
    item = s.state().work["w1"]
    assert item["status"] == "failed"
    assert item["deadLetter"]["discarded"] is True
    assert item["deadLetter"]["discardedAt"] == s.events[-1].ts
    s.ev("work.retried", "w1", reason=None)
    assert s.state().work["w1"]["status"] == "failed"


def test_discard_of_work_that_is_not_dead_lettered_is_ignored() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.discarded", "w1", reason=None)
    assert s.state().work["w1"]["deadLetter"] is None


def test_events_for_unknown_work_are_ignored() -> None:
    s = Stream()
    s.ev("work.cancelled", "nope", reason=None)
    state = s.state()
    assert state.work == {}
    assert state.work_counts == dict.fromkeys(WORK_STATUSES, 0)


def test_a_repeated_idempotency_key_does_not_create_a_second_item() -> None:
    s = Stream()
    s.submit("w1", key="work:k")
    s.submit("w2", key="work:k")
    state = s.state()
    assert list(state.work) == ["w1"]
    assert state.idempotency == {"work:k": "w1"}
    assert state.entity_seq["work.w2"] == 2


# --- agents ---------------------------------------------------------------------------------


def test_agent_re_registration_keeps_current_tasks() -> None:
    s = Stream()
    s.register("a1", capacity=2)
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("agent.lost", "a1", lastHeartbeat=None)
    s.register("a1", capacity=2, agent_type="reviewer")
    state = s.state()
    agent = state.agents["a1"]
    assert agent["currentTasks"] == ["w1"] and agent["currentTaskCount"] == 1
    assert agent["status"] == "online" and agent["offlineReason"] is None
    assert agent["agentType"] == "reviewer"
    assert agent["registeredAt"] == s.events[0].ts
    check_invariants(state)


def test_re_registration_with_lower_capacity_keeps_held_work_and_blocks_new_work() -> None:
    """The agent really holds the work, so the fold records it; it takes nothing new until below."""
    s = Stream()
    s.register("a1", capacity=2)
    s.submit("w1")
    s.submit("w2")
    s.submit("w3")
    s.assign("w1", "a1")
    s.assign("w2", "a1")
    s.register("a1", capacity=1)
    s.assign("w3", "a1")
    state = s.state()
    assert state.agents["a1"]["currentTasks"] == ["w1", "w2"]
    assert state.agents["a1"]["status"] == "busy"
    assert state.work["w3"]["status"] == "pending"


def test_the_agent_guid_is_the_entity_id() -> None:
    s = Stream()
    s.ev(
        "agent.registered",
        "a1",
        guid="something-else",
        handle=None,
        agentType="developer",
        capabilities=[],
        boundaries=["default"],
        maxConcurrentTasks=1,
        hostname=None,
        username=None,
        visibility="project-only",
        labels={},
        source="weft",
        spinUpId=None,
        targetId=None,
        spindownAfterIdleMs=None,
    )
    s.submit("w1")
    s.assign("w1", "a1")
    s.ev("work.completed", "w1", agentGuid=None, summary=None, output=None, artifacts=None)
    state = s.state()
    assert state.agents["a1"]["guid"] == "a1"
    assert state.agents["a1"]["currentTasks"] == []
    check_invariants(state)


def test_lost_and_deregistered_agents_go_offline_but_keep_their_record() -> None:
    s = Stream()
    s.register("a1")
    s.register("a2")
    s.ev("agent.lost", "a1", lastHeartbeat="2026-01-01T00:00:00.000Z")
    s.ev("agent.deregistered", "a2", reason=None)
    state = s.state()
    assert state.agents["a1"]["status"] == "offline" and state.agents["a1"]["offlineReason"] == "lost"
    assert state.agents["a2"]["status"] == "offline" and state.agents["a2"]["offlineReason"] == "deregistered"


def test_shutdown_request_is_recorded_and_cleared_by_re_registration() -> None:
    s = Stream()
    s.register("a1")
    s.ev("agent.shutdown_requested", "a1", graceful=True, reason="idle-timeout", gracePeriodMs=30000)
    assert s.state().agents["a1"]["shutdownRequested"]["reason"] == "idle-timeout"
    s.register("a1")
    assert s.state().agents["a1"]["shutdownRequested"] is None


def test_shutdown_request_for_an_offline_agent_is_ignored() -> None:
    s = Stream()
    s.register("a1")
    s.ev("agent.deregistered", "a1", reason="bye")
    s.ev("agent.shutdown_requested", "a1", graceful=True, reason="manual", gracePeriodMs=None)
    assert s.state().agents["a1"]["shutdownRequested"] is None


def test_events_for_unknown_agents_are_ignored() -> None:
    s = Stream()
    s.ev("agent.lost", "ghost", lastHeartbeat=None)
    assert s.state().agents == {}


# --- targets --------------------------------------------------------------------------------


def test_target_registration_and_status_changes() -> None:
    s = Stream()
    s.register_target("t1")
    assert s.state().targets["t1"]["status"] == "available"
    s.ev("target.disabled", "t1", reason="maintenance")
    t = s.state().targets["t1"]
    assert t["status"] == "disabled" and t["disabledReason"] == "maintenance"
    s.ev("target.enabled", "t1", reason=None)
    assert s.state().targets["t1"]["status"] == "available"
    s.ev("target.updated", "t1", changes={"description": "big box"})
    assert s.state().targets["t1"]["description"] == "big box"
    s.ev("target.removed", "t1", reason=None)
    assert s.state().targets == {}


def test_target_registered_disabled_stays_disabled() -> None:
    s = Stream()
    s.register_target("t1", status="disabled")
    assert s.state().targets["t1"]["status"] == "disabled"


def test_target_update_cannot_overwrite_fields_weft_maintains() -> None:
    s = Stream()
    s.register_target("t1")
    s.ev("spinup.requested", "t1", spinUpId="s1", workId=None, capability=None, boundary=None, reason="r")
    s.ev(
        "target.updated",
        "t1",
        changes={"id": "t2", "status": "error", "activeSpinUps": {}, "useCount": 0, "cooldownMs": 5},
    )
    t = s.state().targets["t1"]
    assert t["id"] == "t1" and t["status"] == "available"
    assert list(t["activeSpinUps"]) == ["s1"] and t["useCount"] == 1
    assert t["cooldownMs"] == 5


def test_spin_up_lifecycle_is_tracked() -> None:
    s = Stream()
    s.register_target("t1")
    s.ev("leader.elected", "golden", holder="r1", leaseRevision=1).epoch = 1
    s.ev("spinup.requested", "t1", spinUpId="s1", workId="w1", capability="code", boundary=None, reason="r")
    s.ev("spinup.started", "t1", spinUpId="s1", mechanismResult={"pid": 42})
    t = s.state().targets["t1"]
    assert t["activeSpinUps"]["s1"]["status"] == "started"
    assert t["useCount"] == 1
    s.ev("spinup.completed", "t1", spinUpId="s1", agentGuid="a1", durationMs=1200.0)
    t = s.state().targets["t1"]
    assert t["activeSpinUps"] == {}
    assert t["lastSpinUp"]["outcome"] == "success"
    assert t["lastSpinUp"]["workItemId"] == "w1" and t["lastSpinUp"]["agent"] == "a1"


def test_three_consecutive_spin_up_failures_open_the_circuit_breaker() -> None:
    s = Stream()
    s.register_target("t1")
    s.spinup_failed("t1", "s1")
    s.spinup_failed("t1", "s2")
    assert s.state().targets["t1"]["status"] == "available"
    s.spinup_failed("t1", "s3")
    t = s.state().targets["t1"]
    assert t["status"] == "error"
    assert t["consecutiveFailures"] == 3
    assert t["lastError"] == "no agent"


def test_a_success_resets_the_consecutive_failure_count() -> None:
    s = Stream()
    s.register_target("t1")
    s.spinup_failed("t1", "s1")
    s.spinup_failed("t1", "s2")
    s.ev("spinup.completed", "t1", spinUpId="s3", agentGuid="a1", durationMs=1.0)
    s.spinup_failed("t1", "s4")
    t = s.state().targets["t1"]
    assert t["status"] == "available" and t["consecutiveFailures"] == 1


def test_the_breaker_threshold_comes_from_the_target() -> None:
    s = Stream()
    s.register_target("t1", circuitBreakerThreshold=1)
    s.spinup_failed("t1", "s1")
    assert s.state().targets["t1"]["status"] == "error"


def test_a_healthy_probe_closes_the_circuit_breaker() -> None:
    s = Stream()
    s.register_target("t1")
    for i in range(3):
        s.spinup_failed("t1", f"s{i}")
    s.ev("target.health_changed", "t1", healthStatus="unhealthy", latencyMs=None, error="refused")
    assert s.state().targets["t1"]["status"] == "error"
    s.ev("target.health_changed", "t1", healthStatus="healthy", latencyMs=3.5, error=None)
    t = s.state().targets["t1"]
    assert t["status"] == "available" and t["consecutiveFailures"] == 0
    assert t["healthStatus"] == "healthy" and t["lastHealthLatencyMs"] == 3.5


def test_a_healthy_probe_does_not_enable_a_disabled_target() -> None:
    s = Stream()
    s.register_target("t1")
    s.ev("target.disabled", "t1", reason=None)
    for i in range(3):
        s.spinup_failed("t1", f"s{i}")
    s.ev("target.health_changed", "t1", healthStatus="healthy", latencyMs=None, error=None)
    assert s.state().targets["t1"]["status"] == "disabled"


def test_events_for_a_removed_target_are_ignored() -> None:
    s = Stream()
    s.register_target("t1")
    s.ev("target.removed", "t1", reason=None)
    s.ev("target.enabled", "t1", reason=None)
    s.spinup_failed("t1", "s1")
    assert s.state().targets == {}


# --- retention ----------------------------------------------------------------------------------


def test_purge_removes_only_finished_items_and_counts_them() -> None:
    s = Stream()
    s.register("a1", capacity=2)
    for w in ("done", "gone", "live", "waiting", "dlq", "dropped"):
        s.submit(w, max_attempts=1)
    s.assign("done", "a1")
    s.ev("work.completed", "done", agentGuid="a1", summary="ok", output=None, artifacts=None)
    s.ev("work.cancelled", "gone", reason=None)
    s.assign("live", "a1")
    s.assign("dlq", "a1")
    s.fail("dlq", "dead-letter", guid="a1")
    s.ev("work.dead_lettered", "dropped", reason="bad")
    s.ev("work.discarded", "dropped", reason=None)
    for w in ("done", "gone", "live", "waiting", "dlq", "dropped"):
        s.ev("work.purged", w, reason="retention")
    state = s.state()
    assert sorted(state.work) == ["dlq", "live", "waiting"], "live, pending and live-DLQ items stay"
    assert state.purged_counts == {"completed": 1, "cancelled": 1, "failed": 1}
    assert state.work_counts["completed"] == state.work_counts["cancelled"] == 0
    assert state.work_counts["failed"] == 1 and state.work_counts["pending"] == 1
    assert "work.done" not in state.entity_seq and "work.live" in state.entity_seq
    check_invariants(state)


def test_a_purge_survives_a_snapshot() -> None:
    s = Stream()
    s.submit("w1")
    s.ev("work.cancelled", "w1", reason=None)
    s.ev("work.purged", "w1", reason="retention")
    restored = decode_state(encode_state(s.state()))
    assert restored.work == {} and restored.purged_counts["cancelled"] == 1
    assert restored.work_by_status["cancelled"] == {}
