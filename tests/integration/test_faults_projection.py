"""Projections and reads under faults (issue 9, faults 4, 8 and 11), against a real nats-server:
a snapshot is used only on the stream it was folded from, an event this weft cannot read halts
the project's projection instead of being skipped, no-op answers come from the latest state, and
reads never create a project (those through REST: `test_faults_reads.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from projections import encode_state, fold, state_hash
from projections.events import Event, stream_name
from tests.integration.test_eventstore import read_all, work_submitted
from tests.servers import own_nats_server
from weft.commands import Commands, Ctx
from weft.core.errors import Conflict, Unavailable
from weft.stamps import new_id
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore
from weft.store.readmodel import ReadModel
from weft.store.snapshots import SnapshotStore

WAIT = 10.0

ReplicaFactory = Callable[..., Awaitable[ReadModel]]


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A server of this module's own (it overrides the session's for `nc` and `store` too): a
    halted project must not halt the session's replica, nor its scheduler act in these projects."""
    async with own_nats_server(tmp_path_factory, "faults-projection") as server:
        yield server


@pytest.fixture
async def replicas(nats_server: EmbeddedNats) -> AsyncIterator[ReplicaFactory]:
    made: list[tuple[ReadModel, NATS]] = []

    async def make() -> ReadModel:
        conn = await nats.connect(nats_server.url)
        replica = ReadModel(EventStore(conn.jetstream()), snapshot_every=0)
        made.append((replica, conn))
        return replica

    yield make
    for replica, conn in made:
        await replica.stop()
        await conn.close()


@pytest.fixture
def snapshots(store: EventStore) -> SnapshotStore:
    return SnapshotStore(store.resources)


async def append_work(store: EventStore, project: str, ids: list[str]) -> int:
    seq = 0
    for wid in ids:
        seq = (await store.append(work_submitted(project, wid), 0)).seq
    return seq


# --- fault 4: a snapshot's origin -------------------------------------------------------------


async def test_a_snapshot_of_another_project_is_ignored(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    other = f"{project}x"
    await append_work(store, other, ["o1", "o2"])
    foreign = fold(await read_all(store, other), project=other)
    seq = await append_work(store, project, ["w1", "w2", "w3"])
    await snapshots.save_snapshot(project, encode_state(foreign))  # seq 2 <= 3: it used to load
    view = await (await replicas()).attach(project)
    assert await view.wait_for(seq, WAIT)
    assert sorted(view.state.work) == ["w1", "w2", "w3"]
    assert state_hash(view.state) == state_hash(fold(await read_all(store, project), project=project))
    await snapshots.delete_snapshot(project)


async def test_a_snapshot_of_an_earlier_stream_of_the_same_name_is_ignored(
    store: EventStore, snapshots: SnapshotStore, nc: NATS, project: str, replicas: ReplicaFactory
) -> None:
    """Deleted and refilled: the snapshot's seq is behind the new stream's last, so the old check
    (`seq > last_seq`) let it through and the state was the old stream's plus the new tail."""
    await append_work(store, project, ["old1", "old2"])
    old = fold(await read_all(store, project), project=project)
    await snapshots.save_snapshot(project, encode_state(old))
    await nc.jetstream().delete_stream(stream_name(project))
    store.resources.forget_stream(stream_name(project))
    seq = await append_work(store, project, ["new1", "new2", "new3"])
    view = await (await replicas()).attach(project)
    assert await view.wait_for(seq, WAIT)
    assert sorted(view.state.work) == ["new1", "new2", "new3"]
    assert state_hash(view.state) == state_hash(fold(await read_all(store, project), project=project))
    await snapshots.delete_snapshot(project)


async def test_a_snapshot_of_this_stream_is_used(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    await append_work(store, project, ["w1", "w2"])
    await snapshots.save_snapshot(project, encode_state(fold(await read_all(store, project), project=project)))
    seq = await append_work(store, project, ["w3"])
    view = await (await replicas()).attach(project)
    assert await view.wait_for(seq, WAIT)
    assert view.tail is not None and view.tail.from_seq == 3, "resumed after the snapshot"
    assert state_hash(view.state) == state_hash(fold(await read_all(store, project), project=project))
    await snapshots.delete_snapshot(project)


# --- fault 8: an event this weft cannot read --------------------------------------------------


def foreign_event(project: str, type_: str, v: int = 1) -> bytes:
    """A well-formed envelope as a newer weft would write it."""
    return orjson.dumps({
        "id": new_id(), "type": type_, "v": v, "ts": "2026-12-01T00:00:00.000Z", "actor": "api",
        "project": project, "entityId": "w9", "data": {"taskId": "w9", "capability": "x", "boundary": "y"},
    })


@pytest.mark.parametrize("type_, v", [("work.teleported", 1), ("work.submitted", 99)])
async def test_an_event_of_a_newer_weft_halts_the_projection_before_it(
    store: EventStore, nc: NATS, project: str, replicas: ReplicaFactory, type_: str, v: int
) -> None:
    before = await append_work(store, project, ["w1"])
    ack = await nc.jetstream().publish(
        f"weft.{project}.ev.work.w9", foreign_event(project, type_, v), stream=stream_name(project),
        headers={"Nats-Msg-Id": new_id()},
    )
    later = await append_work(store, project, ["w2"])
    replica = await replicas()
    view = await replica.attach(project)
    await asyncio.wait_for(view.caught_up.wait(), WAIT)  # start-up does not wait for what cannot come
    assert not await view.wait_for(later, WAIT), "it never reads past the event"
    assert view.state.seq == before and sorted(view.state.work) == ["w1"]
    assert view.halted is not None and view.halted[0] == ack.seq
    assert not replica.ready
    assert replica.halted()[project]["seq"] == ack.seq
    commands = Commands(replica, replica.store)
    with pytest.raises(Unavailable, match="cannot be served"):
        await commands.cancel_work(Ctx(project=project), "w1")


async def test_a_corrupt_message_is_skipped_alike_everywhere(
    store: EventStore, nc: NATS, project: str, replicas: ReplicaFactory
) -> None:
    """Not an event at all (no version of weft can fold it): its sequence counts, nothing halts."""
    await append_work(store, project, ["w1"])
    await nc.jetstream().publish(f"weft.{project}.ev.work.junk", b"{not json", stream=stream_name(project))
    later = await append_work(store, project, ["w2"])
    replica = await replicas()
    view = await replica.attach(project)
    assert await view.wait_for(later, WAIT)
    assert view.halted is None and replica.ready


# --- fault 8 (b): no-op answers come from the latest state -------------------------------------


async def test_a_no_op_answer_is_checked_against_the_latest_state(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    """ReadModel R's view lags (events held back until someone catches up). The item it shows in
    progress with agent a1 was meanwhile given back and reassigned to a2: a1's repeated accept is
    a 409 from the stream's latest state, not a stale 'already accepted'."""
    replica = await replicas()
    view = await replica.attach(project)

    async def emit(type_: str, entity: str, data: dict[str, Any], **kw: Any) -> int:
        ev = Event(type=type_, entity_id=entity, data=data, project=project, **kw)
        return (await store.append(ev, None)).seq  # the test is the only writer

    for guid in ("a1", "a2"):
        await emit("agent.registered", guid, {
            "guid": guid, "handle": None, "agentType": "claude-code", "capabilities": ["no-work-needs-this"],
            "boundaries": ["*"], "maxConcurrentTasks": 1, "hostname": None, "username": None,
            "visibility": "project-only", "labels": {}, "source": "weft", "spinUpId": None, "targetId": None,
            "spindownAfterIdleMs": None})
    await append_work(store, project, ["w1"])
    seq = await emit("work.assigned", "w1", {"agentGuid": "a1", "attempt": 1, "acceptBy": "2099-01-01T00:00:00.000Z"})
    seq = await emit("work.started", "w1", {"agentGuid": "a1"})
    assert await view.wait_for(seq, WAIT)

    held: list[Event] = []
    assert view.tail is not None
    live = view.tail.on_event
    view.tail.on_event = held.append  # from here on the view lags
    original_catch_up = replica.catch_up

    async def catch_up(p: str, timeout: float) -> bool:
        for ev in held:
            live(ev)
        held.clear()
        view.tail.on_event = live  # type: ignore[union-attr]
        return await original_catch_up(p, timeout)

    replica.catch_up = catch_up  # type: ignore[method-assign]
    await store.append(Event(type="work.requeued", entity_id="w1", project=project,
                             data={"reason": "agent went quiet", "retryAt": None}), None)
    await store.append(Event(type="work.assigned", entity_id="w1", project=project,
                             data={"agentGuid": "a2", "attempt": 2, "acceptBy": "2099-01-01T00:00:00.000Z"}), None)
    assert view.state.work["w1"]["assignedTo"] == "a1", "the view lags"

    commands = Commands(replica, replica.store)
    with pytest.raises(Conflict, match="not held by agent a1"):
        await commands.accept_work(Ctx(project=project, actor="agent:a1"), "w1", "a1")
