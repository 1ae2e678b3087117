"""Hypothesis strategies: random, valid-ish event sequences for one project.

`event_sequences()` folds as it generates: four events in five are drawn from those the current
state accepts (so items really get assigned, progress, fail, retry, land in the DLQ, finish), the
fifth is blind and often invalid for the state (assign before submit, complete after cancel, an
offline agent, an unknown spin-up), which the fold must ignore. Decision events sometimes carry a
scheduler epoch, lower ones included. Ids come from small pools so entities collide. Every event
is well-formed (the shape its type declares in the catalogue, from which `payload` derives it); only
its fit to the state is random.
"""

from __future__ import annotations

import functools
import types
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Union, get_args, get_origin

from hypothesis import strategies as st

from projections import ProjectState, apply
from projections.events import CATALOGUE, Event, FieldSpec, fields_of, format_ts
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

short_text = st.sampled_from(["", "abc", "x y"])
iso = st.integers(0, 10_000).map(lambda ms: format_ts(BASE_TIME + timedelta(milliseconds=ms)))
small_json = st.one_of(st.none(), st.integers(-9, 9), st.lists(st.integers(-9, 9), max_size=2))


# --- payloads, derived from the catalogue's TypedDicts (projections.events) ----------------------
# Each key of a type's data gets, in this order: the type's own override (`TYPE_VALUES`), the
# domain values of its name (`FIELD_VALUES`, made nullable where the key is), or a strategy for its
# declared type (`for_type`). A key added to a TypedDict is generated without a change here.


def for_type(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a catalogue annotation: small, JSON-able, of exactly the declared type."""
    if tp is Any:
        return small_json
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        return st.one_of(*(for_type(a) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(for_type(args[0]), max_size=2)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["a", "b"]), for_type(args[1]), max_size=2)
    scalars: dict[Any, st.SearchStrategy[Any]] = {
        str: short_text,
        int: st.integers(0, 10),
        float: st.floats(0, 1e4, allow_nan=False),
        bool: st.booleans(),
        type(None): st.none(),
    }
    return scalars[tp]


# Domain values by key name, for every type with such a key: ids from the pools, so entities meet.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "agentGuid": st.sampled_from(AGENT_IDS),
    "workId": st.sampled_from(WORK_IDS),
    "spinUpId": st.sampled_from(SPINUP_IDS),
    "capability": st.sampled_from(["code", "test"]),
    "boundary": st.sampled_from(["default", "corporate"]),
    "capabilities": st.lists(st.sampled_from(["code", "test"]), max_size=2, unique=True),
    "boundaries": st.just(["default"]),
    "agentType": st.sampled_from(["developer", "reviewer"]),
    "acceptBy": iso,
    "retryAt": iso,
    "lastHeartbeat": iso,
    "cause": st.sampled_from(["accept-timeout", "agent-offline"]),
    "priority": st.integers(1, 10),
    "maxAttempts": st.integers(1, 3),
    "attempt": st.integers(1, 4),
    "progress": st.integers(-20, 150),  # out of range too: the fold clamps
    "contextData": st.fixed_dictionaries({"repo": short_text}),
    "labels": st.dictionaries(st.sampled_from(["gpu", "os"]), short_text, max_size=2),
    "visibility": st.just("project-only"),
    "latencyMs": st.floats(0, 1000, allow_nan=False),
}

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

# Per type, taken as they are: what a key holds there (nulls where the routing is not under test).
TYPE_VALUES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "work.submitted": {"preferredAgentType": st.none(), "requiredAgentType": st.none(), "deadline": st.none()},
    "work.completed": {"artifacts": st.none()},
    "work.failed": {"code": st.none()},
    "agent.registered": {
        "handle": st.none(),
        "hostname": st.none(),
        "username": st.none(),
        "targetId": st.none(),
        "spindownAfterIdleMs": st.none(),
        "spinUpId": st.one_of(st.none(), st.sampled_from(SPINUP_IDS)),
    },
    "agent.shutdown_requested": {"gracePeriodMs": st.none()},
    "target.registered": {
        "target": st.fixed_dictionaries(
            {
                "name": short_text,
                "agentType": st.just("developer"),
                "mechanism": st.just("local"),
                "capabilities": st.just(["code"]),
                "status": st.sampled_from(["available", "disabled"]),
                "config": st.fixed_dictionaries({"local": st.fixed_dictionaries({"command": short_text})}),
            },
            optional={"circuitBreakerThreshold": st.integers(1, 4)},
        )
    },
    "target.updated": {"changes": _target_changes},
    "spinup.requested": {"capability": st.none(), "boundary": st.none()},
    "spinup.started": {"mechanismResult": st.none()},
}


def _nullable(tp: Any) -> bool:
    origin = get_origin(tp)
    return (origin is Union or origin is types.UnionType) and type(None) in get_args(tp)


def _key_values(f: FieldSpec, fixed: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    if f.name in fixed:
        return fixed[f.name]
    by_name = FIELD_VALUES.get(f.name)
    if by_name is None:
        return for_type(f.type)
    return st.one_of(st.none(), by_name) if _nullable(f.type) else by_name


def payload(type_: str, **fixed: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Data of a `type_` event as its catalogue TypedDict declares it: every required key, each
    NotRequired key now and then. `fixed` overrides keys for this call (an agent's own guid...)."""
    fields = fields_of(CATALOGUE[type_].data)
    values = {**TYPE_VALUES.get(type_, {}), **fixed}
    return st.fixed_dictionaries(
        {n: _key_values(f, values) for n, f in fields.items() if f.required},
        optional={n: _key_values(f, values) for n, f in fields.items() if not f.required},
    )


Payload = tuple[str, str, dict[str, Any], str | None]

# Strategies are built once: building them per draw dominates generation time otherwise.
WORK_DATA = {t: payload(t) for t in WORK_TYPES}
# Each agent always declares its own guid and capacity (see AGENT_CAPACITY).
AGENT_DATA = {
    (t, g): payload(t, guid=st.just(g), maxConcurrentTasks=st.just(AGENT_CAPACITY[g])) if t == "agent.registered"
    else payload(t)
    for t in AGENT_TYPES
    for g in AGENT_IDS
}
TARGET_DATA = {t: payload(t) for t in TARGET_TYPES}
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
