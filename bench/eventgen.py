"""A deterministic, realistic stream of weft events: agents register, then work flows in waves.

Each work item goes submitted -> assigned -> started -> progressed -> completed. Items move in waves
(submit a wave, assign it, start it, ...) so several items are live per agent at once, as in a real
fleet, while agent capacity always admits every assignment (the fold applies all of them).
Ids and timestamps derive from the index, so regenerating gives byte-identical events.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from projections.events import Event, format_ts
from weft.store.eventstore import append_headers

EVENTS_PER_ITEM = 5
AGENTS = 16
AGENT_CAPACITY = 8
WAVE = 64  # items in flight per wave; <= AGENTS * AGENT_CAPACITY
BASE_TS = datetime(2025, 1, 1, tzinfo=UTC)

_CAPS = ("python", "typescript", "rust", "go")


def agent_guid(i: int) -> str:
    return f"a9e47{i:027x}"


def work_id(i: int) -> str:
    return f"3f0c{i:028x}"


def total_events(items: int) -> int:
    return AGENTS + items * EVENTS_PER_ITEM


def items_for_events(events: int) -> int:
    return max(1, (events - AGENTS) // EVENTS_PER_ITEM)


def generate(project: str, items: int, *, first_item: int = 0, with_agents: bool = True) -> Iterator[Event]:
    """AGENTS registrations (unless `with_agents` is false), then work items first_item ..
    first_item+items-1, 5 events each, in stream order. Event ids are unique across calls that
    cover disjoint item ranges."""
    ev_no = first_item * EVENTS_PER_ITEM + (0 if with_agents else AGENTS)

    def eid() -> str:
        nonlocal ev_no
        ev_no += 1
        return f"e1{ev_no:030x}"

    t0 = format_ts(BASE_TS)
    for a in range(AGENTS if with_agents else 0):
        guid = agent_guid(a)
        yield Event(
            "agent.registered",
            guid,
            {
                "guid": guid,
                "handle": f"bench-agent-{a}",
                "agentType": "claude-code",
                "capabilities": list(_CAPS),
                "boundaries": ["personal", "corporate"],
                "maxConcurrentTasks": AGENT_CAPACITY,
                "hostname": f"host-{a % 4}",
                "username": "bench",
                "visibility": "project-only",
                "labels": {"pool": "bench"},
                "source": "weft",
                "spinUpId": None,
                "targetId": None,
                "spindownAfterIdleMs": 300_000,
            },
            project=project,
            id=eid(),
            ts=t0,
            actor=guid,
        )

    end = first_item + items
    for start in range(first_item, end, WAVE):
        wave = range(start, min(start + WAVE, end))
        base = BASE_TS + timedelta(seconds=start // WAVE)
        ts = [format_ts(base + timedelta(milliseconds=100 * k)) for k in range(5)]
        accept_by = format_ts(base + timedelta(seconds=30))
        for i in wave:
            wid = work_id(i)
            yield Event(
                "work.submitted",
                wid,
                {
                    "taskId": f"task-{i}",
                    "capability": _CAPS[i % len(_CAPS)],
                    "boundary": "personal",
                    "description": f"bench item {i}: refactor the parser module and add tests",
                    "priority": 5,
                    "preferredAgentType": None,
                    "requiredAgentType": None,
                    "deadline": None,
                    "contextData": {"repo": "github.com/example/app", "branch": f"bench/{i}"},
                    "maxAttempts": 3,
                },
                project=project,
                id=eid(),
                ts=ts[0],
                actor="bench-token",
                correlation_id=wid,
            )
        for i in wave:
            wid = work_id(i)
            yield Event(
                "work.assigned",
                wid,
                {"agentGuid": agent_guid(i % AGENTS), "attempt": 1, "acceptBy": accept_by},
                project=project,
                id=eid(),
                ts=ts[1],
                actor="scheduler",
                correlation_id=wid,
                epoch=1,
            )
        for i in wave:
            wid, guid = work_id(i), agent_guid(i % AGENTS)
            yield Event(
                "work.started", wid, {"agentGuid": guid},
                project=project, id=eid(), ts=ts[2], actor=guid, correlation_id=wid,
            )
        for i in wave:
            wid, guid = work_id(i), agent_guid(i % AGENTS)
            yield Event(
                "work.progressed",
                wid,
                {"agentGuid": guid, "progress": 50, "message": "tests written, fixing lint"},
                project=project,
                id=eid(),
                ts=ts[3],
                actor=guid,
                correlation_id=wid,
            )
        for i in wave:
            wid, guid = work_id(i), agent_guid(i % AGENTS)
            yield Event(
                "work.completed",
                wid,
                {
                    "agentGuid": guid,
                    "summary": "refactored parser, 12 tests added",
                    "output": {"filesChanged": 4, "linesAdded": 120, "linesRemoved": 35},
                    "artifacts": [],
                },
                project=project,
                id=eid(),
                ts=ts[4],
                actor=guid,
                correlation_id=wid,
            )


def messages(events: Iterator[Event], first_seq: int = 1) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(subject, payload, headers) exactly as `EventStore.append` publishes them (Msg-Id for dedupe,
    the entity's expected last subject sequence for OCC). Assumes the stream holds exactly
    first_seq-1 messages of other entities, so it is only for fresh streams and fresh items."""
    last: dict[str, int] = {}
    seq = first_seq
    for ev in events:
        subject = ev.subject
        yield subject, ev.encode(), append_headers(ev, last.get(subject, 0))
        last[subject] = seq
        seq += 1
