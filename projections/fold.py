"""`apply(state, event) -> state`: the one entry point of every projection. Pure and deterministic."""

from __future__ import annotations

from collections.abc import Iterable

from projections.agents import apply_agent
from projections.events import ENTITY_OF, Event
from projections.state import ProjectState, Record
from projections.targets import apply_target
from projections.work import apply_work


def apply_project(state: ProjectState, ev: Event) -> None:
    if ev.type == "leader.elected":  # its epoch was checked and taken by `apply`
        leader: Record = {**ev.data, "epoch": ev.epoch, "electedAt": ev.ts, "seq": ev.seq}
        state.leader = leader


_BY_ENTITY = {"work": apply_work, "agent": apply_agent, "target": apply_target, "project": apply_project}


def apply(state: ProjectState, ev: Event) -> ProjectState:
    """Fold one event in place and return the state. Sequences at or below `state.seq` are no-ops
    (a tail that overlaps a snapshot), and so are repeats of a client's Idempotency-Key."""
    if ev.seq and ev.seq <= state.seq:
        return state
    entity = ENTITY_OF[ev.type]
    if ev.seq:
        state.seq = ev.seq
        state.last_event_id = ev.id
        state.entity_seq[entity + "." + ev.entity_id] = ev.seq
    key = ev.idempotency_key
    if key is not None:
        if key in state.idempotency:
            return state
        state.idempotency[key] = ev.entity_id
    if ev.epoch is not None:
        if ev.epoch < state.epoch:
            return state  # a deposed leader's late decision: in the stream, never applied
        state.epoch = ev.epoch
    handler = _BY_ENTITY.get(entity)
    if handler is not None:
        handler(state, ev)
    state.events_applied += 1
    state.last_activity = ev.ts
    return state


def fold(events: Iterable[Event], state: ProjectState | None = None, project: str = "") -> ProjectState:
    st = state if state is not None else ProjectState(project=project)
    for ev in events:
        apply(st, ev)
    return st
