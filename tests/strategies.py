"""Hypothesis strategies: random, valid-ish event sequences for one project.

`event_sequences()` folds as it generates: four events in five are drawn from those the current
state accepts (so items really get assigned, progress, fail, retry, land in the DLQ, finish), the
fifth is blind and often invalid for the state (assign before submit, complete after cancel, an
offline agent, an unknown spin-up), which the fold must ignore. Decision events sometimes carry a
scheduler epoch, lower ones included. Ids come from small pools so entities collide. Every event
is well-formed (the shape its type declares); only its fit to the state is random.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from projections import ProjectState, apply
from projections.events import Event, format_ts
from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK
from projections.work import purgeable

PROJECT = "prop"
WORK_IDS = ("w0", "w1", "w2", "w3", "w4")
# Each agent always declares the same capacity, so `len(currentTasks) <= maxConcurrentTasks`
# is an invariant of every generated sequence (lowering capacity on re-registration is tested
# separately, by example).
AGENT_CAPACITY = {"a0": 1, "a1": 2, "a2": 3}
AGENT_IDS = tuple(AGENT_CAPACITY)
TARGET_IDS = ("t0", "t1")
SPINUP_IDS = ("s0", "s1", "s2")
IDEMPOTENCY_KEYS = ("k0", "k1", "k2")
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)

WORK_TYPES = (
    "work.submitted",
    "work.assigned",
    "work.started",
    "work.progressed",
    "work.completed",
    "work.failed",
    "work.requeued",
    "work.dead_lettered",
    "work.cancelled",
    "work.retried",
    "work.discarded",
    "work.purged",
)
AGENT_TYPES = ("agent.registered", "agent.shutdown_requested", "agent.deregistered", "agent.lost")
TARGET_TYPES = (
    "target.registered",
    "target.updated",
    "target.enabled",
    "target.disabled",
    "target.removed",
    "target.health_changed",
    "spinup.requested",
    "spinup.started",
    "spinup.completed",
    "spinup.failed",
)

maybe_agent = st.one_of(st.none(), st.sampled_from(AGENT_IDS))
short_text = st.sampled_from(["", "abc", "x y"])
reason = st.one_of(st.none(), short_text)
iso = st.integers(0, 10_000).map(lambda ms: format_ts(BASE_TIME + timedelta(milliseconds=ms)))


def _work_data(t: str) -> st.SearchStrategy[dict[str, Any]]:
    if t == "work.submitted":
        return st.fixed_dictionaries(
            {
                "taskId": short_text,
                "capability": st.sampled_from(["code", "test"]),
                "boundary": st.sampled_from(["default", "corporate"]),
                "description": short_text,
                "priority": st.integers(1, 10),
                "preferredAgentType": st.none(),
                "requiredAgentType": st.none(),
                "deadline": st.none(),
                "contextData": st.one_of(st.none(), st.fixed_dictionaries({"repo": short_text})),
                "maxAttempts": st.integers(1, 3),
            }
        )
    if t == "work.assigned":
        return st.fixed_dictionaries(
            {"agentGuid": st.sampled_from(AGENT_IDS), "attempt": st.integers(1, 4), "acceptBy": iso}
        )
    if t == "work.started":
        return st.fixed_dictionaries({"agentGuid": maybe_agent})
    if t == "work.progressed":
        return st.fixed_dictionaries(
            {"agentGuid": maybe_agent, "progress": st.integers(-20, 150), "message": reason}
        )
    if t == "work.completed":
        return st.fixed_dictionaries(
            {
                "agentGuid": maybe_agent,
                "summary": reason,
                "output": st.one_of(st.none(), st.integers(-9, 9), st.lists(st.integers(-9, 9), max_size=2)),
                "artifacts": st.none(),
            }
        )
    if t == "work.failed":
        return st.fixed_dictionaries(
            {
                "agentGuid": maybe_agent,
                "message": short_text,
                "code": st.none(),
                "recoverable": st.booleans(),
                "outcome": st.sampled_from(["retry", "dead-letter"]),
                "retryAt": st.one_of(st.none(), iso),
            }
        )
    if t == "work.requeued":
        return st.fixed_dictionaries({"reason": short_text, "retryAt": st.one_of(st.none(), iso)})
    if t == "work.dead_lettered":
        return st.fixed_dictionaries({"reason": short_text})
    return st.fixed_dictionaries({"reason": reason})  # cancelled, retried, discarded, purged


def _agent_data(t: str, guid: str) -> st.SearchStrategy[dict[str, Any]]:
    if t == "agent.registered":
        return st.fixed_dictionaries(
            {
                "guid": st.just(guid),
                "handle": st.none(),
                "agentType": st.sampled_from(["developer", "reviewer"]),
                "capabilities": st.lists(st.sampled_from(["code", "test"]), max_size=2, unique=True),
                "boundaries": st.just(["default"]),
                "maxConcurrentTasks": st.just(AGENT_CAPACITY[guid]),
                "hostname": st.none(),
                "username": st.none(),
                "visibility": st.just("project-only"),
                "labels": st.dictionaries(st.sampled_from(["gpu", "os"]), short_text, max_size=2),
                "source": st.sampled_from(["weft", "warp"]),
                "spinUpId": st.one_of(st.none(), st.sampled_from(SPINUP_IDS)),
                "targetId": st.none(),
                "spindownAfterIdleMs": st.none(),
            }
        )
    if t == "agent.shutdown_requested":
        return st.fixed_dictionaries(
            {"graceful": st.booleans(), "reason": short_text, "gracePeriodMs": st.none()}
        )
    if t == "agent.deregistered":
        return st.fixed_dictionaries({"reason": reason})
    return st.fixed_dictionaries({"lastHeartbeat": st.one_of(st.none(), iso)})


# A target.updated may (wrongly) name fields weft maintains itself: the fold must ignore those.
_target_changes = st.fixed_dictionaries(
    {},
    optional={
        "description": short_text,
        "circuitBreakerThreshold": st.integers(1, 4),
        "status": st.sampled_from(["available", "error", "bogus"]),
        "activeSpinUps": st.just({}),
        "consecutiveFailures": st.integers(0, 5),
        "useCount": st.integers(0, 5),
    },
)


def _target_data(t: str) -> st.SearchStrategy[dict[str, Any]]:
    spin = st.sampled_from(SPINUP_IDS)
    if t == "target.registered":
        return st.fixed_dictionaries(
            {
                "target": st.fixed_dictionaries(
                    {
                        "name": short_text,
                        "agentType": st.just("developer"),
                        "mechanism": st.just("local"),
                        "capabilities": st.just(["code"]),
                        "status": st.sampled_from(["available", "disabled"]),
                        "config": st.fixed_dictionaries(
                            {"local": st.fixed_dictionaries({"command": short_text})}
                        ),
                    },
                    optional={"circuitBreakerThreshold": st.integers(1, 4)},
                )
            }
        )
    if t == "target.updated":
        return st.fixed_dictionaries({"changes": _target_changes})
    if t in ("target.enabled", "target.disabled", "target.removed"):
        return st.fixed_dictionaries({"reason": reason})
    if t == "target.health_changed":
        return st.fixed_dictionaries(
            {
                "healthStatus": st.sampled_from(["healthy", "unhealthy", "unknown"]),
                "latencyMs": st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)),
                "error": reason,
            }
        )
    if t == "spinup.requested":
        return st.fixed_dictionaries(
            {
                "spinUpId": spin,
                "workId": st.one_of(st.none(), st.sampled_from(WORK_IDS)),
                "capability": st.none(),
                "boundary": st.none(),
                "reason": short_text,
            }
        )
    if t == "spinup.started":
        return st.fixed_dictionaries({"spinUpId": spin, "mechanismResult": st.none()})
    if t == "spinup.completed":
        return st.fixed_dictionaries(
            {"spinUpId": spin, "agentGuid": st.sampled_from(AGENT_IDS), "durationMs": st.floats(0, 1e4)}
        )
    return st.fixed_dictionaries({"spinUpId": spin, "error": short_text, "durationMs": st.floats(0, 1e4)})


Payload = tuple[str, str, dict[str, Any], str | None]

# Strategies are built once: building them per draw dominates generation time otherwise.
WORK_DATA = {t: _work_data(t) for t in WORK_TYPES}
AGENT_DATA = {(t, g): _agent_data(t, g) for t in AGENT_TYPES for g in AGENT_IDS}
TARGET_DATA = {t: _target_data(t) for t in TARGET_TYPES}
MAYBE_KEY = st.one_of(st.none(), st.sampled_from(IDEMPOTENCY_KEYS))
MAYBE_EPOCH = st.one_of(st.none(), st.integers(1, 3))
ONE_IN_FIVE = st.integers(0, 4)


@functools.cache
def _index(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


# Scheduler decisions carry the leader's epoch; a lower epoch than one already seen is fenced.
DECISIONS = frozenset(
    {"work.assigned", "work.requeued", "work.dead_lettered", "work.purged", "agent.lost", "spinup.requested"}
)


@st.composite
def random_payload(draw: st.DrawFn) -> Payload:
    """(type, entity id, data, idempotency key) of one event, blind to the state."""
    kind = draw(st.sampled_from(["work", "work", "work", "agent", "target"]))
    if kind == "work":
        t = draw(st.sampled_from(WORK_TYPES))
        entity_id = draw(st.sampled_from(WORK_IDS))
        data = draw(WORK_DATA[t])
        key = draw(MAYBE_KEY) if t == "work.submitted" else None
        return t, entity_id, data, key
    if kind == "agent":
        t = draw(st.sampled_from(AGENT_TYPES))
        guid = draw(st.sampled_from(AGENT_IDS))
        return t, guid, draw(AGENT_DATA[t, guid]), None
    t = draw(st.sampled_from(TARGET_TYPES))
    return t, draw(st.sampled_from(TARGET_IDS)), draw(TARGET_DATA[t]), None


RANDOM_PAYLOAD = random_payload()


def _applicable(state: ProjectState) -> list[tuple[str, str, str | None]]:
    """(type, entity id, acting agent) of events that the current state would accept."""
    out: list[tuple[str, str, str | None]] = []
    free = [
        g
        for g, a in state.agents.items()
        if a["status"] != "offline" and len(a["currentTasks"]) < a["maxConcurrentTasks"]
    ]
    out += [("work.submitted", w, None) for w in WORK_IDS if w not in state.work]
    for wid, item in state.work.items():
        status = item["status"]
        if status == "pending":
            out += [("work.assigned", wid, g) for g in free]
        if status == "assigned":
            out.append(("work.started", wid, item["assignedTo"]))
        if status in LIVE_ASSIGNMENT:
            holder = item["assignedTo"]
            out += [
                (t, wid, holder) for t in ("work.progressed", "work.completed", "work.failed", "work.failed")
            ]
            out.append(("work.requeued", wid, None))
        if status not in TERMINAL_WORK:
            out += [("work.cancelled", wid, None), ("work.dead_lettered", wid, None)]
        if status == "failed" and item["deadLetter"] and not item["deadLetter"]["discarded"]:
            out += [("work.retried", wid, None), ("work.discarded", wid, None)]
        if purgeable(item):
            out.append(("work.purged", wid, None))
    out += [
        ("agent.registered", g, None) for g in AGENT_IDS if state.agents.get(g, {}).get("status") != "online"
    ]
    for g, a in state.agents.items():
        if a["status"] != "offline":
            out += [(t, g, None) for t in ("agent.shutdown_requested", "agent.deregistered", "agent.lost")]
    out += [("target.registered", t, None) for t in TARGET_IDS if t not in state.targets]
    for tid in state.targets:
        out += [(t, tid, None) for t in TARGET_TYPES if t != "target.registered"]
        out += [("spinup.failed", tid, None)] * 3  # enough in a row to trip the breaker
    return out


@st.composite
def event_sequences(draw: st.DrawFn, max_size: int = 60) -> list[Event]:
    """Mostly events the state accepts (so items really get assigned, fail, retry, finish), mixed
    with blind ones that are often invalid for the state and must be ignored."""
    state = ProjectState(project=PROJECT)
    events: list[Event] = []
    for seq in range(1, draw(st.integers(0, max_size)) + 1):
        candidates = _applicable(state)
        if candidates and draw(ONE_IN_FIVE) > 0:
            t, entity_id, actor = candidates[draw(_index(len(candidates)))]
            if t.startswith("work."):
                data = draw(WORK_DATA[t])
                if "agentGuid" in data and actor is not None:
                    data["agentGuid"] = actor
                key = draw(MAYBE_KEY) if t == "work.submitted" else None
            elif t.startswith("agent."):
                data, key = draw(AGENT_DATA[t, entity_id]), None
            else:
                data, key = draw(TARGET_DATA[t]), None
            payload: Payload = (t, entity_id, data, key)
        else:
            payload = draw(RANDOM_PAYLOAD)
        ev = make_event(seq, payload)
        if ev.type in DECISIONS:
            ev.epoch = draw(MAYBE_EPOCH)
        apply(state, ev)
        events.append(ev)
    return events


def make_event(seq: int, payload: Payload) -> Event:
    """An envelope as the stream would hold it: sequence `seq`, timestamps increasing with it."""
    t, entity_id, data, key = payload
    return Event(
        type=t,
        entity_id=entity_id,
        data=data,
        project=PROJECT,
        id=f"e{seq}",
        ts=format_ts(BASE_TIME + timedelta(seconds=seq)),
        actor="scheduler",
        idempotency_key=key,
        seq=seq,
    )
