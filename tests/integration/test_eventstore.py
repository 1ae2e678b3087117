"""The JetStream event store against a real nats-server: appends, OCC, dedupe, reads, snapshots.

The module runs on a nats-server of its own (see `nats_server` below), so no scheduler leads its
projects or adds events of its own to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from projections import fold, state_hash
from projections.events import Event, stream_name
from tests.servers import own_nats_server
from weft.stamps import stamp
from weft.store import connection
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import Appended, ConcurrencyConflict, EventStore
from weft.store.snapshots import SnapshotStore


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A server of this module's own (for `nc` and `store` too): these tests count every event of
    their streams, and the session replica's scheduler would announce its term in them."""
    async with own_nats_server(tmp_path_factory, "eventstore") as server:
        yield server


def target_registered(project: str, target_id: str = "t1", **kw: Any) -> Event:
    target = {"name": target_id, "agentType": "developer", "mechanism": "local", "capabilities": ["code"]}
    return stamp(Event(
        type="target.registered", entity_id=target_id, data={"target": target}, project=project, **kw
    ))


def target_updated(project: str, description: str, target_id: str = "t1", **kw: Any) -> Event:
    return stamp(Event(
        type="target.updated",
        entity_id=target_id,
        data={"changes": {"description": description}},
        project=project,
        **kw,
    ))


def work_submitted(project: str, work_id: str, **kw: Any) -> Event:
    data = {
        "taskId": work_id,
        "capability": "nobody-has-this",
        "boundary": "nowhere",
        "description": "d",
        "priority": 5,
        "preferredAgentType": None,
        "requiredAgentType": None,
        "deadline": None,
        "contextData": None,
        "maxAttempts": 3,
    }
    return stamp(Event(type="work.submitted", entity_id=work_id, data=data, project=project, **kw))


async def read_all(store: EventStore, project: str, start: int = 1, end: int | None = None) -> list[Event]:
    return [e async for e in store.read_range(project, start, end)]


# --- append and optimistic concurrency -------------------------------------------------------


async def test_append_returns_the_stream_sequence(store: EventStore, project: str) -> None:
    first = await store.append(target_registered(project, "t1"), 0)
    second = await store.append(target_registered(project, "t2"), 0)
    assert first == Appended(seq=1, duplicate=False)
    assert second == Appended(seq=2, duplicate=False)
    assert await store.last_seq(project) == 2


async def test_append_sets_the_seq_on_the_event(store: EventStore, project: str) -> None:
    ev = target_registered(project)
    appended = await store.append(ev, 0)
    assert ev.seq == appended.seq == 1


async def test_expected_seq_is_the_entitys_last_stream_sequence(store: EventStore, project: str) -> None:
    await store.append(target_registered(project, "t1"), 0)  # seq 1
    await store.append(target_registered(project, "t2"), 0)  # seq 2, another entity
    appended = await store.append(target_updated(project, "x", "t1"), 1)
    assert appended.seq == 3


async def test_stale_writer_is_rejected_not_applied(store: EventStore, project: str) -> None:
    await store.append(target_registered(project), 0)
    await store.append(target_updated(project, "first"), 1)
    late = target_updated(project, "late")
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append(late, 1)  # it saw seq 1; the entity is at seq 2 now
    assert info.value.expected == 1
    assert info.value.subject == late.subject
    stored = await read_all(store, project)
    assert [e.seq for e in stored] == [1, 2]
    assert late.id not in {e.id for e in stored}


async def test_a_second_create_of_the_same_entity_conflicts(store: EventStore, project: str) -> None:
    await store.append(target_registered(project), 0)
    with pytest.raises(ConcurrencyConflict):
        await store.append(target_registered(project), 0)


async def test_concurrent_writers_on_one_entity_exactly_one_wins(
    nats_server: EmbeddedNats, project: str
) -> None:
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    try:
        a, b = (EventStore(c.jetstream()) for c in conns)
        await a.append(target_registered(project), 0)
        for round_ in range(5):
            expected = await a.last_seq(project)
            evs = [target_updated(project, f"a{round_}"), target_updated(project, f"b{round_}")]
            results = await asyncio.gather(
                a.append(evs[0], expected), b.append(evs[1], expected), return_exceptions=True
            )
            winners = [ev for ev, r in zip(evs, results, strict=True) if isinstance(r, Appended)]
            losers = [ev for ev, r in zip(evs, results, strict=True) if isinstance(r, ConcurrencyConflict)]
            assert len(winners) == 1 and len(losers) == 1, results
            stored = {e.id for e in await read_all(a, project)}
            assert winners[0].id in stored
            assert losers[0].id not in stored
        assert await a.last_seq(project) == 6
    finally:
        for c in conns:
            await c.close()


async def test_many_concurrent_writers_one_winner_per_expected_seq(store: EventStore, project: str) -> None:
    await store.append(target_registered(project), 0)
    evs = [target_updated(project, f"w{i}") for i in range(8)]
    results = await asyncio.gather(*(store.append(e, 1) for e in evs), return_exceptions=True)
    assert sum(isinstance(r, Appended) for r in results) == 1
    assert all(isinstance(r, Appended | ConcurrencyConflict) for r in results), results
    assert await store.last_seq(project) == 2


async def test_writers_on_different_entities_do_not_conflict(store: EventStore, project: str) -> None:
    results = await asyncio.gather(*(store.append(work_submitted(project, f"w{i}"), 0) for i in range(10)))
    assert sorted(r.seq for r in results) == list(range(1, 11))


async def test_retried_append_after_it_landed_returns_the_original_seq(
    store: EventStore, project: str
) -> None:
    """A lost ack: the writer retries the same event with the same expected seq after it landed."""
    await store.append(target_registered(project), 0)
    ev = target_updated(project, "once")
    first = await store.append(ev, 1)
    retry = await store.append(target_updated(project, "once", id=ev.id), 1)
    assert retry == Appended(seq=first.seq, duplicate=True)
    stored = await read_all(store, project)
    assert [e.id for e in stored].count(ev.id) == 1
    assert await store.last_seq(project) == 2


async def test_a_retry_after_the_entity_moved_on_still_finds_its_event(
    store: EventStore, project: str
) -> None:
    """Our append landed (ack lost), then another writer appended to the entity: the retry must
    report our event as a duplicate, not a conflict (which would make the caller redo its work)."""
    await store.append(target_registered(project), 0)  # seq 1
    ev = target_updated(project, "ours")
    ours = await store.append(ev, 1)  # seq 2
    await store.append(target_updated(project, "theirs"), 2)  # seq 3
    retry = await store.append(target_updated(project, "ours", id=ev.id), 1)
    assert retry == Appended(seq=ours.seq, duplicate=True)
    assert await store.last_seq(project) == 3


async def test_a_stale_append_whose_slot_another_writer_took_conflicts(
    store: EventStore, project: str
) -> None:
    await store.append(target_registered(project), 0)  # seq 1
    await store.append(target_updated(project, "theirs"), 1)  # seq 2 took the slot after 1
    await store.append(target_updated(project, "theirs again"), 2)  # seq 3
    with pytest.raises(ConcurrencyConflict):
        await store.append(target_updated(project, "ours"), 1)


async def test_retried_create_after_it_landed_is_a_duplicate(store: EventStore, project: str) -> None:
    ev = work_submitted(project, "w1")
    first = await store.append(ev, 0)
    retry = await store.append(work_submitted(project, "w1", id=ev.id), 0)
    assert retry == Appended(seq=first.seq, duplicate=True)
    assert await store.last_seq(project) == 1


async def test_concurrent_retries_of_one_event_store_it_once(store: EventStore, project: str) -> None:
    await store.append(target_registered(project), 0)
    ev = target_updated(project, "x")
    copies = [target_updated(project, "x", id=ev.id) for _ in range(5)]
    results = await asyncio.gather(*(store.append(c, 1) for c in copies))
    assert {r.seq for r in results} == {2}
    assert sum(not r.duplicate for r in results) == 1
    assert await store.last_seq(project) == 2


async def test_msg_id_dedupe_without_expected_seq(store: EventStore, project: str) -> None:
    ev = work_submitted(project, "w1")
    first = await store.append(ev, None)
    again = await store.append(work_submitted(project, "w1", id=ev.id), None)
    assert first == Appended(seq=1, duplicate=False)
    assert again == Appended(seq=1, duplicate=True)
    assert len(await read_all(store, project)) == 1


async def test_without_expected_seq_distinct_events_both_land(store: EventStore, project: str) -> None:
    await store.append(target_registered(project), None)
    await store.append(target_updated(project, "a"), None)
    await store.append(target_updated(project, "b"), None)
    assert await store.last_seq(project) == 3


async def test_each_project_is_its_own_stream(store: EventStore, project: str) -> None:
    other = project + "x"
    await store.append(work_submitted(project, "w1"), 0)
    await store.append(work_submitted(other, "w1"), 0)
    assert [e.project for e in await read_all(store, project)] == [project]
    assert [e.project for e in await read_all(store, other)] == [other]


# --- streams --------------------------------------------------------------------------------


async def test_stream_is_created_with_dedupe_window_and_direct_get(
    store: EventStore, project: str, nc: NATS
) -> None:
    assert not await store.stream_exists(project)
    await store.ensure_stream(project)
    assert await store.stream_exists(project)
    info = await nc.jetstream().stream_info(stream_name(project))
    assert info.config.subjects == [f"weft.{project}.ev.>"]
    assert info.config.duplicate_window == store.duplicate_window_s
    assert info.config.allow_direct
    assert project in await store.list_projects()


async def test_two_stores_creating_one_stream_concurrently_both_succeed(
    nats_server: EmbeddedNats, project: str
) -> None:
    conns = [await nats.connect(nats_server.url) for _ in range(3)]
    try:
        stores = [EventStore(c.jetstream()) for c in conns]
        await asyncio.gather(*(s.ensure_stream(project) for s in stores))
        assert all([await s.stream_exists(project) for s in stores])
    finally:
        for c in conns:
            await c.close()


async def test_last_seq_of_a_missing_project_is_zero(store: EventStore, project: str) -> None:
    assert await store.last_seq(project) == 0
    assert await read_all(store, project) == []


# --- reading --------------------------------------------------------------------------------


async def test_read_range_bounds(store: EventStore, project: str) -> None:
    for i in range(1, 6):
        await store.append(work_submitted(project, f"w{i}"), 0)
    assert [e.seq for e in await read_all(store, project)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in await read_all(store, project, 2, 4)] == [2, 3, 4]
    assert [e.seq for e in await read_all(store, project, 3, 3)] == [3]
    assert [e.seq for e in await read_all(store, project, 4, 99)] == [4, 5]
    assert [e.seq for e in await read_all(store, project, 0, 1)] == [1]
    assert await read_all(store, project, 6) == []
    assert await read_all(store, project, 4, 3) == []
    assert [e.entity_id for e in await read_all(store, project, 5)] == ["w5"]


async def test_read_range_end_defaults_to_the_last_seq_at_the_call(store: EventStore, project: str) -> None:
    for i in range(3):
        await store.append(work_submitted(project, f"w{i}"), 0)
    seen = []
    async for e in store.read_range(project):
        seen.append(e.seq)
        if e.seq == 1:
            await store.append(work_submitted(project, "late"), 0)  # seq 4, after the call
    assert seen == [1, 2, 3]


async def test_read_range_decodes_the_envelope(store: EventStore, project: str) -> None:
    ev = work_submitted(project, "w1", actor="tok", correlation_id="c1", idempotency_key="work:k")
    await store.append(ev, 0)
    [back] = await read_all(store, project)
    assert (back.id, back.type, back.actor, back.correlation_id, back.idempotency_key, back.seq) == (
        ev.id,
        "work.submitted",
        "tok",
        "c1",
        "work:k",
        1,
    )
    assert back.data == ev.data


async def test_tail_delivers_in_order_from_a_start_seq(store: EventStore, project: str) -> None:
    for i in range(1, 6):
        await store.append(work_submitted(project, f"w{i}"), 0)
    got: list[int] = []
    done = asyncio.Event()

    def on_event(e: Event) -> None:
        got.append(e.seq)
        if e.seq == 8:
            done.set()

    tail = await store.tail(project, 3, on_event)
    try:
        for i in range(6, 9):  # appended while the tail runs
            await store.append(work_submitted(project, f"w{i}"), 0)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await tail.stop()
    assert got == [3, 4, 5, 6, 7, 8]


async def test_tail_awaits_an_async_callback_before_the_next_event(store: EventStore, project: str) -> None:
    for i in range(1, 4):
        await store.append(work_submitted(project, f"w{i}"), 0)
    active = 0
    got: list[int] = []
    done = asyncio.Event()

    async def on_event(e: Event) -> None:
        nonlocal active
        active += 1
        assert active == 1, "callbacks overlap"
        await asyncio.sleep(0)  # yield to the loop inside the callback, not for synchronisation
        got.append(e.seq)
        active -= 1
        if e.seq == 3:
            done.set()

    tail = await store.tail(project, 1, on_event)
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await tail.stop()
    assert got == [1, 2, 3]


async def test_tail_keeps_running_after_a_failing_callback(store: EventStore, project: str) -> None:
    for i in range(1, 4):
        await store.append(work_submitted(project, f"w{i}"), 0)
    got: list[int] = []
    done = asyncio.Event()

    def on_event(e: Event) -> None:
        if e.seq == 2:
            raise RuntimeError("listener bug")
        got.append(e.seq)
        if e.seq == 3:
            done.set()

    tail = await store.tail(project, 1, on_event)
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await tail.stop()
    assert got == [1, 3]


async def test_tail_skips_an_undecodable_message(store: EventStore, project: str, nc: NATS) -> None:
    await store.append(work_submitted(project, "w1"), 0)
    await nc.jetstream().publish(f"weft.{project}.ev.work.junk", b"not json", stream=stream_name(project))
    await store.append(work_submitted(project, "w3"), 0)
    got: list[int] = []
    done = asyncio.Event()

    def on_event(e: Event) -> None:
        got.append(e.seq)
        if e.seq == 3:
            done.set()

    tail = await store.tail(project, 1, on_event)
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await tail.stop()
    assert got == [1, 3]


# --- snapshots ------------------------------------------------------------------------------


@pytest.fixture
def snapshots(store: EventStore) -> SnapshotStore:
    return SnapshotStore(store.resources)


async def test_snapshot_save_load_overwrite_delete(snapshots: SnapshotStore, project: str) -> None:
    assert await snapshots.load_snapshot(project) is None
    await snapshots.save_snapshot(project, b"one")
    assert await snapshots.load_snapshot(project) == b"one"
    await snapshots.save_snapshot(project, b"two" * 100_000)  # larger than one chunk
    assert await snapshots.load_snapshot(project) == b"two" * 100_000
    await snapshots.delete_snapshot(project)
    assert await snapshots.load_snapshot(project) is None
    await snapshots.delete_snapshot(project)  # deleting what is not there is fine
    await snapshots.save_snapshot(project, b"three")
    assert await snapshots.load_snapshot(project) == b"three"
    await snapshots.save_snapshot(project, bytearray(b"four") * 70_000)  # what encode_state gives
    assert await snapshots.load_snapshot(project) == b"four" * 70_000
    await snapshots.delete_snapshot(project)


async def test_snapshots_are_per_project(snapshots: SnapshotStore, project: str) -> None:
    await snapshots.save_snapshot(project, b"mine")
    assert await snapshots.load_snapshot(project + "other") is None
    await snapshots.delete_snapshot(project)


async def test_a_replay_of_the_stream_equals_the_fold_of_what_was_appended(
    store: EventStore, project: str
) -> None:
    appended = [
        target_registered(project, "t1"),
        work_submitted(project, "w1"),
        target_updated(project, "d", "t1"),
    ]
    for e, expected in zip(appended, [0, 0, 1], strict=True):
        await store.append(e, expected)
    replayed = fold(await read_all(store, project), project=project)
    assert state_hash(replayed) == state_hash(fold(appended, project=project))
    assert replayed.entity_seq == {"target.t1": 3, "work.w1": 2}


async def test_the_event_id_is_the_nats_msg_id(store: EventStore, project: str, nc: NATS) -> None:
    ev = work_submitted(project, "w1")
    await store.append(ev, 0)
    raw = await nc.jetstream().get_last_msg(stream_name(project), ev.subject)
    assert (raw.headers or {}).get(api.Header.MSG_ID) == ev.id


# --- group commit (JetStream atomic batches under load) -----------------------------------------


@pytest.fixture
def batching(nc: NATS) -> EventStore:
    """A store that batches as soon as one append is in flight, so concurrent appends share batches."""
    return EventStore(nc.jetstream(), group_commit_after=1)


async def test_concurrent_appends_share_batches_and_each_lands_once_at_its_reported_seq(
    batching: EventStore, project: str
) -> None:
    events = [work_submitted(project, f"w{i}") for i in range(300)]
    results = await asyncio.gather(*(batching.append(ev, 0) for ev in events))
    group = batching._groups[stream_name(project)]
    assert group is not None and group.batches > 0 and group.batched > 1, "no batch was committed"
    assert not any(r.duplicate for r in results)
    assert sorted(r.seq for r in results) == list(range(1, 301))
    stored = {e.seq: e for e in await read_all(batching, project)}
    for ev, r in zip(events, results, strict=True):
        assert ev.seq == r.seq and stored[r.seq].id == ev.id, "reported seq must be the stored one"


async def test_a_stale_append_in_a_batch_conflicts_alone(batching: EventStore, project: str) -> None:
    """A batch is all or nothing; its appends then go one by one, so only the stale one fails."""
    await batching.append(work_submitted(project, "taken"), 0)
    fresh = [work_submitted(project, f"w{i}") for i in range(40)]
    stale = work_submitted(project, "taken")  # expects a new entity; the subject already has one
    results = await asyncio.gather(
        *(batching.append(ev, 0) for ev in fresh[:20]),
        batching.append(stale, 0),
        *(batching.append(ev, 0) for ev in fresh[20:]),
        return_exceptions=True,
    )
    assert isinstance(results[20], ConcurrencyConflict)
    assert all(isinstance(r, Appended) and not r.duplicate for i, r in enumerate(results) if i != 20)
    assert await batching.last_seq(project) == 41
    assert sorted(e.entity_id for e in await read_all(batching, project)) == sorted(["taken"] + [f"w{i}" for i in range(40)])


async def test_a_retry_of_a_landed_append_among_a_batch_is_a_duplicate(batching: EventStore, project: str) -> None:
    landed = work_submitted(project, "once")
    first = await batching.append(landed, 0)
    retry = work_submitted(project, "once", id=landed.id)  # same event id: a client's retry
    results = await asyncio.gather(
        batching.append(retry, 0), *(batching.append(work_submitted(project, f"w{i}"), 0) for i in range(30))
    )
    assert results[0] == Appended(seq=first.seq, duplicate=True)
    assert await batching.last_seq(project) == 31


async def test_a_stream_created_without_atomic_batches_is_upgraded(nc: NATS, project: str) -> None:
    """Streams made by an earlier weft lack `allow_atomic`: the store turns it on before batching."""
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name=stream_name(project), subjects=[f"weft.{project}.ev.>"]))
    store = EventStore(js, group_commit_after=1)
    results = await asyncio.gather(*(store.append(work_submitted(project, f"w{i}"), 0) for i in range(50)))
    assert sorted(r.seq for r in results) == list(range(1, 51))
    assert (await js.stream_info(stream_name(project))).config.allow_atomic is True
    group = store._groups[stream_name(project)]
    assert group is not None and group.batches > 0


async def test_group_commit_off_never_batches(nc: NATS, project: str) -> None:
    store = EventStore(nc.jetstream(), group_commit_after=0)
    await asyncio.gather(*(store.append(work_submitted(project, f"w{i}"), 0) for i in range(50)))
    assert store._groups == {} and await store.last_seq(project) == 50


async def test_batches_from_two_writers_interleave_without_mixing(
    batching: EventStore, nats_server: EmbeddedNats, project: str
) -> None:
    """Two replicas (two connections) batching into one stream at once: a batch is stored in one
    piece, so each writer's reported sequences are exactly where its events are."""
    other_nc = await connection.connect(nats_server.url)
    try:
        other = EventStore(other_nc.jetstream(), group_commit_after=1)
        mine = [work_submitted(project, f"a{i}") for i in range(150)]
        theirs = [work_submitted(project, f"b{i}") for i in range(150)]
        results = await asyncio.gather(
            *(batching.append(ev, 0) for ev in mine), *(other.append(ev, 0) for ev in theirs)
        )
        assert sorted(r.seq for r in results) == list(range(1, 301))
        stored = {e.seq: e.id for e in await read_all(batching, project)}
        assert all(stored[ev.seq] == ev.id for ev in mine + theirs)
        groups = [s._groups[stream_name(project)] for s in (batching, other)]
        assert all(g is not None and g.batches > 0 for g in groups)
    finally:
        await other_nc.close()


async def test_too_few_waiting_appends_go_one_by_one(batching: EventStore, project: str) -> None:
    """Below `min_batch` waiting appends a commit costs more than it saves: queued appends take
    single slots as they free up, and every one lands."""
    await batching.append(work_submitted(project, "first"), 0)  # stream and batcher exist
    results = await asyncio.gather(*(batching.append(work_submitted(project, f"w{i}"), 0) for i in range(5)))
    group = batching._groups[stream_name(project)]
    assert group is not None and group.batches == 0 and group.inflight == 0
    assert sorted(r.seq for r in results) == [2, 3, 4, 5, 6]
