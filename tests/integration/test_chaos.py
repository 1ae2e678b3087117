"""The reduced chaos run inside `make test` (the long one is `make chaos`, tests/chaos): nginx in
front of 3 real replicas on a 3-node NATS cluster (R3), reference agents, submits, cancels and
WebSocket subscribers under five fault rounds, one of each kind (kill -9 of the scheduling leader,
of a NATS node, of an agent, a cut of the proxied NATS connections, kill -9 of a random replica),
with a fixed seed; then every invariant of tests/chaos/invariants.py must hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Config
from tests.chaos.run import run_chaos
from tests.lb import available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available("nginx"), reason="needs nginx (Debian package `nginx`; `make test` installs "
                                                      "it when run as root with apt)"),
]

SEED = 20261203
SCHEDULE = ("leader", "nats", "agent", "cut", "replica")


@pytest.mark.timeout(240)
async def test_reduced_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    config = Config(rounds=len(SCHEDULE), seed=SEED, schedule=SCHEDULE, workdir=tmp_path / "chaos")
    report = await run_chaos(config)
    print("\n" + report.table())
    assert report.rounds == len(SCHEDULE)
    assert all(report.faults[kind] >= 1 for kind in SCHEDULE), report.faults
    assert report.submits_acked > 0 and report.items >= report.submits_acked
    assert not report.violations(), "\n".join(report.violations()) + "\n" + report.table()


# --- the checker itself: each invariant flags a violation made up for it (fast, no processes) ---

from projections.events import Event  # noqa: E402
from tests.chaos.clients import CancelRecord, Seen, SubmitRecord, WsSubscriber  # noqa: E402
from tests.chaos.invariants import Report, check_commands, check_holders, check_ws  # noqa: E402

SUBMIT: dict[str, Any] = {"taskId": "t", "capability": "python", "boundary": "personal", "priority": 5}


def _ev(seq: int, type_: str, wid: str, epoch: int | None = None, key: str | None = None,
        cid: str | None = None, **data: object) -> Event:
    return Event(type_, wid, dict(data), project="p", seq=seq, epoch=epoch, idempotency_key=key, correlation_id=cid)


def _registered(seq: int, guid: str) -> Event:
    return _ev(seq, "agent.registered", guid, guid=guid, handle=None, agentType="claude-code",
               capabilities=["python"], boundaries=["*"], maxConcurrentTasks=1, hostname=None, username=None,
               visibility="project", labels={}, source="weft", spinUpId=None, targetId=None,
               spindownAfterIdleMs=None)


def test_the_holder_check_flags_a_second_agent_s_assignment_and_a_non_holder_s_report() -> None:
    events = [
        _ev(1, "work.submitted", "w1", description="a", **SUBMIT),
        _registered(2, "A"),
        _registered(3, "B"),
        _ev(4, "work.assigned", "w1", epoch=2, agentGuid="A"),
        _ev(5, "work.assigned", "w1", epoch=1, agentGuid="B"),  # a deposed leader's: fenced, never applied
        _ev(6, "work.started", "w1", agentGuid="A"),
        _ev(7, "work.requeued", "w1", epoch=2, reason="lost"),
        _ev(8, "work.assigned", "w1", epoch=2, agentGuid="B"),
        _ev(9, "work.completed", "w1", agentGuid="B"),
    ]
    clean = Report()
    check_holders(clean, "p", events)
    assert clean.double_held == {} and clean.reassigned_to_holder == []
    twice = Report()
    check_holders(twice, "p", [*events[:6], _ev(7, "work.assigned", "w1", epoch=2, agentGuid="B")])
    assert "assigned to B while held by A" in twice.double_held["w1"]
    stale = Report()
    check_holders(stale, "p", [*events[:8], _ev(9, "work.completed", "w1", agentGuid="A")])
    assert "work.completed from A while held by B" in stale.double_held["w1"]
    again = Report()
    check_holders(again, "p", [*events[:4], _ev(5, "work.assigned", "w1", epoch=2, agentGuid="A")])
    assert again.double_held == {} and len(again.reassigned_to_holder) == 1


def test_the_command_check_flags_lost_and_duplicated_commands() -> None:
    acked = SubmitRecord("k1", "c1", "one", [201], "w1", 1)
    unacked = SubmitRecord("k2", "c2", "two", [504, 0])
    events = [_ev(1, "work.submitted", "w1", cid="c1", description="one", **SUBMIT),
              _ev(2, "work.submitted", "w2", cid="c2", description="two", **SUBMIT),
              _ev(3, "work.submitted", "w3", cid="c2", description="two", **SUBMIT)]
    report = Report()
    check_commands(report, events, [acked, unacked], [])
    assert not report.lost and len(report.duplicated) == 1 and "k2" in report.duplicated[0]
    report = Report()
    cancel = CancelRecord("w1", "x1", [200], 200, False, 9)
    check_commands(report, events[:1], [acked, SubmitRecord("k3", "c3", "three", [202], "w9", 5)], [cancel])
    assert len(report.lost) == 2 and report.acked == 3  # the 202'd submit and the cancel are not there


def test_the_websocket_check_flags_missed_duplicated_and_unordered_events() -> None:
    expected = [Seen(1, "work:submitted", "w1"), Seen(2, "work:assigned", "w1"), Seen(4, "work:started", "w1")]
    sub = WsSubscriber("http://127.0.0.1:1", "p", "ws")
    sub.seen = [expected[0], expected[2], expected[2], expected[0]]
    report = Report()
    check_ws(report, expected, [sub])
    assert report.ws["ws"] == {"seen": 4, "connections": 0, "missed": 1, "duplicated": 2, "out_of_order": 2,
                               "unexpected": 0}
