"""Replicas against a real nats-server: live views, snapshots, convergence, lazy attach, waiting.

The module runs on a nats-server of its own: these tests count and hash every event of their
streams, and a scheduler of another suite's replica would lead their projects and announce its
term (`leader.elected`) in them.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from projections import ProjectState, decode_state, encode_state, fold, state_hash
from projections.events import Event, stream_name
from projections.state import STATE_SCHEMA
from tests.integration.test_eventstore import read_all, target_registered, target_updated, work_submitted
from tests.servers import own_nats_server
from tests.support import own_replica
from weft.store import readmodel as readmodel_module
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import ConcurrencyConflict, EventStore
from weft.store.readmodel import ProjectView, ReadModel
from weft.store.snapshots import SNAPSHOT_BUCKET, SnapshotStore

WAIT = 10.0  # upper bound for a wait that should end long before; never a synchronisation sleep

ReplicaFactory = Callable[..., Awaitable[ReadModel]]


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """Overrides the session's server for this module (and the `nc`, `store` fixtures built on it)."""
    async with own_nats_server(tmp_path_factory, "replica") as server:
        yield server


@pytest.fixture
async def replicas(nats_server: EmbeddedNats) -> AsyncIterator[ReplicaFactory]:
    """Makes replicas, each on its own connection (as separate processes would be); stops them all."""
    made: list[tuple[ReadModel, NATS]] = []

    async def make(*, snapshot_every: int = 0, start: bool = False, encode: str = "loop") -> ReadModel:
        """`encode`: "loop" (the default here) takes each snapshot at exactly every Nth event."""
        conn = await nats.connect(nats_server.url)
        replica = ReadModel(EventStore(conn.jetstream()), snapshot_every=snapshot_every, snapshot_encode=encode)
        made.append((replica, conn))
        if start:
            await replica.start()
        return replica

    yield make
    for replica, conn in made:
        await replica.stop()
        await conn.close()


@pytest.fixture
def snapshots(store: EventStore) -> SnapshotStore:
    return SnapshotStore(store.resources)


async def append_work(store: EventStore, project: str, n: int, prefix: str = "w") -> int:
    seq = 0
    for i in range(n):
        seq = (await store.append(work_submitted(project, f"{prefix}{i}"), 0)).seq
    return seq


async def attached(readmodel: ReadModel, project: str, seq: int) -> ProjectView:
    view = await readmodel.attach(project)
    assert await view.wait_for(seq, WAIT)
    return view


async def full_replay(store: EventStore, project: str) -> ProjectState:
    return fold(await read_all(store, project), project=project)


# --- the live view ------------------------------------------------------------------------


async def test_view_folds_what_is_appended(store: EventStore, project: str, replicas: ReplicaFactory) -> None:
    replica = await replicas()
    view = await replica.attach(project)
    seq = await append_work(store, project, 3)
    assert await view.wait_for(seq, WAIT)
    assert sorted(view.state.work) == ["w0", "w1", "w2"]
    assert view.state.seq == seq
    assert state_hash(view.state) == state_hash(await full_replay(store, project))


async def test_attach_catches_up_with_existing_events(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    seq = await append_work(store, project, 5)
    replica = await replicas()
    view = await replica.attach(project)
    assert view.target_seq == seq
    await asyncio.wait_for(view.caught_up.wait(), WAIT)
    assert view.state.seq == seq
    assert await replica.attach(project) is view, "one view (one ordered consumer) per project"


async def test_wait_for_returns_false_after_its_timeout_when_the_seq_never_comes(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    seq = await append_work(store, project, 1)
    view = await attached(await replicas(), project, seq)
    assert await view.wait_for(seq + 1, 0.05) is False
    assert view._waiters == [], "a timed-out waiter is forgotten"
    assert await view.wait_for(seq, 0.05) is True


async def test_wait_for_wakes_when_the_seq_is_folded(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    seq = await append_work(store, project, 1)
    view = await attached(await replicas(), project, seq)
    waiters = [asyncio.create_task(view.wait_for(seq + k, WAIT)) for k in (2, 1, 3)]
    await append_work(store, project, 3, prefix="late")
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert view.state.seq == seq + 3


async def test_catch_up_reaches_the_streams_last_seq(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    replica = await replicas()
    view = await replica.attach(project)
    seq = await append_work(store, project, 4)
    assert await replica.catch_up(project, WAIT)
    assert view.state.seq >= seq


async def test_listeners_see_every_event_in_order(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    replica = await replicas()
    view = await replica.attach(project)
    seen: list[int] = []
    view.listeners.append(lambda ev, state: seen.append(state.seq))

    def failing(ev: Event, state: ProjectState) -> None:
        raise RuntimeError("listener bug")

    view.listeners.insert(0, failing)  # a failing listener harms no one
    seq = await append_work(store, project, 4)
    assert await view.wait_for(seq, WAIT)
    assert seen == [1, 2, 3, 4]


async def test_the_view_survives_an_event_it_cannot_decode(
    store: EventStore, project: str, nc: NATS, replicas: ReplicaFactory
) -> None:
    """Corrupt or from a newer weft: skipped, but its sequence counts, so nobody waits forever."""
    view = await (await replicas()).attach(project)
    await append_work(store, project, 1)
    ack = await nc.jetstream().publish(
        f"weft.{project}.ev.work.w0", b"{not json", stream=stream_name(project)
    )
    assert await view.wait_for(ack.seq, WAIT)
    assert view.state.entity_seq["work.w0"] == ack.seq, "OCC sees the subject's real last sequence"
    later = await store.append(target_registered(project), 0)
    assert await view.wait_for(later.seq, WAIT)
    assert "t1" in view.state.targets


@pytest.mark.malformed_events
async def test_the_view_survives_an_event_it_cannot_fold(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    view = await (await replicas()).attach(project)
    bad = Event(
        type="work.submitted", entity_id="w-bad", data={"capability": "x"}, project=project
    )  # no taskId
    first = await store.append(bad, 0)
    assert await view.wait_for(first.seq, WAIT)
    seq = await append_work(store, project, 1)
    assert await view.wait_for(seq, WAIT)
    assert "w0" in view.state.work


async def test_a_replica_attached_when_ready_is_caught_up(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    seq = await append_work(store, project, 3)
    replica = await replicas(start=True)
    await replica.wait_ready(WAIT)
    view = replica.views[project]
    assert view.state.seq >= seq


async def test_a_replica_is_ready_when_the_streams_last_messages_were_deleted(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    """An operator's `nats stream rmm` of the last message, or a purge, leaves the stream's last_seq
    on a message that is never delivered: start-up waited for it forever."""
    seq = await append_work(store, project, 3)
    await store.js.delete_msg(stream_name(project), seq)
    purged = f"{project}p"
    await append_work(store, purged, 2)
    await store.js.purge_stream(stream_name(purged))
    replica = await replicas(start=True)
    await replica.wait_ready(WAIT)
    assert replica.ready
    assert replica.views[project].state.seq == seq - 1 and set(replica.views[project].state.work) == {"w0", "w1"}
    assert [ev.seq for ev in await read_all(store, project)] == [1, 2]
    assert await read_all(store, purged) == []


async def test_while_waiting_for_the_backlog_start_up_says_where_each_project_is(
    store: EventStore, project: str, replicas: ReplicaFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(readmodel_module, "CATCH_UP_REPORT_S", 0.05)
    await append_work(store, project, 2)
    replica = await replicas(start=True)
    await replica.wait_ready(WAIT)
    view = replica.views[project]
    view.caught_up.clear()  # as if the tail had stopped short of the stream's end
    view.target_seq = 99
    with pytest.raises(TimeoutError):
        await replica.wait_ready(0.3)
    reports = [r for r in caplog.records if r.name == "weft.store.readmodel" and r.getMessage().startswith("still")]
    assert reports and all(getattr(r, "project", None) == project for r in reports)
    assert reports[0].getMessage() == "still catching up: at seq 2 of 99 (1 projects behind)"


# --- optimistic concurrency through the view ----------------------------------------------


async def test_a_writer_using_its_views_entity_seq_wins_and_a_stale_one_loses(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    view = await (await replicas()).attach(project)
    created = await store.append(target_registered(project), 0)
    assert await view.wait_for(created.seq, WAIT)
    stale = view.state.entity_seq["target.t1"]
    moved = await store.append(target_updated(project, "first"), stale)
    with pytest.raises(ConcurrencyConflict):
        await store.append(target_updated(project, "second"), stale)
    assert await view.wait_for(moved.seq, WAIT)
    fresh = view.state.entity_seq["target.t1"]
    assert fresh == moved.seq
    await store.append(target_updated(project, "second"), fresh)


# --- snapshots ----------------------------------------------------------------------------


async def test_attach_from_snapshot_plus_tail_equals_a_full_replay(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    first = await replicas()
    seq = await append_work(store, project, 5)
    await attached(first, project, seq)
    assert await first.snapshot_now(project) == seq
    seq = await append_work(store, project, 3, prefix="after")

    second = await replicas()
    view = await second.attach(project)
    assert view.tail is not None and view.tail.from_seq == 6, "resumed after the snapshot"
    assert await view.wait_for(seq, WAIT)
    assert state_hash(view.state) == state_hash(await full_replay(store, project))
    await snapshots.delete_snapshot(project)


async def test_deleting_all_snapshots_yields_the_same_state_hash(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    writer = await replicas(snapshot_every=4)
    view = await writer.attach(project)
    seq = await append_work(store, project, 10)
    await store.append(target_registered(project), 0)
    seq = (await store.append(target_updated(project, "x"), seq + 1)).seq
    assert await view.wait_for(seq, WAIT)
    await writer.stop()  # waits for the snapshot writes it started
    assert await snapshots.load_snapshot(project) is not None

    with_snapshot = await attached(await replicas(), project, seq)
    await snapshots.delete_snapshot(project)
    without = await attached(await replicas(), project, seq)
    assert with_snapshot.tail is not None and with_snapshot.tail.from_seq > 1
    assert without.tail is not None and without.tail.from_seq == 1
    assert state_hash(with_snapshot.state) == state_hash(without.state) == state_hash(view.state)


async def test_snapshots_settle_finished_items_and_a_restart_from_one_matches_a_replay(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    """A replica's snapshot turns its cancelled items back into slices of the bytes it wrote; later
    events (a purge of a settled item, new work) fold as in a full replay, and a new replica that
    loads the snapshot holds its items encoded and reaches the same state."""
    writer = await replicas(snapshot_every=5)
    view = await writer.attach(project)

    async def append(ev: Event) -> int:
        seq = (await store.append(ev, view.state.entity_seq.get(f"work.{ev.entity_id}", 0))).seq
        assert await view.wait_for(seq, WAIT)
        return seq

    await append_work(store, project, 6)  # seq 1-6: a snapshot at 5
    for i in range(4):  # seq 7-10: a snapshot at 10, when w0-w3 are cancelled
        await append(Event(type="work.cancelled", entity_id=f"w{i}", data={"reason": None}, project=project))
    await append(Event(type="work.purged", entity_id="w1", data={"reason": "retention"}, project=project))
    seq = await append(work_submitted(project, "w6"))
    assert seq == 12
    assert view.state.work.encoded_count() == 3, "w0, w2, w3 settled; w1 purged; pending items stay dicts"
    assert state_hash(view.state) == state_hash(await full_replay(store, project))
    await writer.stop()  # waits for the snapshot writes it started

    restarted = await attached(await replicas(), project, seq)
    assert restarted.tail is not None and restarted.tail.from_seq == 11
    assert restarted.state.work.encoded_count() == 5, "w0, w2-w5 untouched since the snapshot"
    assert state_hash(restarted.state) == state_hash(await full_replay(store, project))
    assert list(restarted.state.work_by_status["cancelled"]) == ["w0", "w2", "w3"]
    await snapshots.delete_snapshot(project)


async def test_a_snapshot_encoded_in_a_child_settles_items_and_a_restart_from_it_matches_a_replay(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    """As above, with the encoding in a forked child while the fold goes on: a snapshot that falls
    due while one is encoded is taken when it ends, so the last one has w0, w2, w3 cancelled."""
    writer = await replicas(snapshot_every=5, encode="fork")
    view = await writer.attach(project)

    async def append(ev: Event) -> int:
        seq = (await store.append(ev, view.state.entity_seq.get(f"work.{ev.entity_id}", 0))).seq
        assert await view.wait_for(seq, WAIT)
        return seq

    await append_work(store, project, 6)
    for i in range(4):
        await append(Event(type="work.cancelled", entity_id=f"w{i}", data={"reason": None}, project=project))
    await append(Event(type="work.purged", entity_id="w1", data={"reason": "retention"}, project=project))
    seq = await append(work_submitted(project, "w6"))
    await writer.stop()  # waits for the children, their adoption and the writes
    assert view.snapshot_child is None and not view.snapshot_deferred
    assert view.state.work.encoded_count() == 3, "w0, w2, w3 settled; w1 purged; pending items stay dicts"
    assert state_hash(view.state) == state_hash(await full_replay(store, project))

    raw = await snapshots.load_snapshot(project)
    assert raw is not None and 10 <= decode_state(raw).seq <= seq
    restarted = await attached(await replicas(), project, seq)
    assert restarted.tail is not None and restarted.tail.from_seq == decode_state(raw).seq + 1
    assert state_hash(restarted.state) == state_hash(await full_replay(store, project))
    await snapshots.delete_snapshot(project)


async def test_a_killed_snapshot_child_skips_that_snapshot_and_the_replica_goes_on(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A real child process, stuck in its encoder, killed with SIGKILL: the parent logs the
    snapshot as skipped, keeps folding, and the next snapshot is written."""
    real = readmodel_module.ForkedEncoder

    def stuck(state: ProjectState) -> tuple[bytearray, int, bytes]:
        signal.pause()  # in the child; only a signal ends it
        raise AssertionError("unreachable")

    monkeypatch.setattr(readmodel_module, "ForkedEncoder", lambda state: real(state, stuck))
    writer = await replicas(snapshot_every=3, encode="fork")
    view = await writer.attach(project)
    assert await view.wait_for(await append_work(store, project, 3), WAIT)
    child = view.snapshot_child
    assert child is not None and child.pid > 0
    monkeypatch.setattr(readmodel_module, "ForkedEncoder", real)
    os.kill(child.pid, signal.SIGKILL)
    seq = await append_work(store, project, 3, prefix="more")  # falls due while the dead one is reaped
    assert await view.wait_for(seq, WAIT)
    await writer.stop()
    assert "snapshot skipped: snapshot child exited with -9" in caplog.text
    raw = await snapshots.load_snapshot(project)
    assert raw is not None and decode_state(raw).seq == seq
    assert state_hash(decode_state(raw)) == state_hash(await full_replay(store, project))
    await snapshots.delete_snapshot(project)


async def test_snapshots_are_written_every_n_events(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    replica = await replicas(snapshot_every=3)
    view = await replica.attach(project)
    seq = await append_work(store, project, 7)
    assert await view.wait_for(seq, WAIT)
    await replica.stop()
    raw = await snapshots.load_snapshot(project)
    assert raw is not None
    assert decode_state(raw).seq in (3, 6), "a snapshot exactly at a multiple of N"
    await snapshots.delete_snapshot(project)


async def test_an_unreadable_snapshot_means_a_full_replay(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    seq = await append_work(store, project, 3)
    await snapshots.save_snapshot(project, b"garbage")
    view = await attached(await replicas(), project, seq)
    assert state_hash(view.state) == state_hash(await full_replay(store, project))
    old_schema = ProjectState(project=project, seq=seq).to_dict()
    old_schema.update(schema=STATE_SCHEMA - 1)  # a complete, current-looking state of another schema
    await snapshots.save_snapshot(project, orjson.dumps(old_schema))
    view = await attached(await replicas(), project, seq)
    assert view.tail is not None and view.tail.from_seq == 1
    assert state_hash(view.state) == state_hash(await full_replay(store, project))
    await snapshots.delete_snapshot(project)


async def test_a_snapshot_whose_chunks_do_not_match_its_record_is_ignored(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory, nc: NATS
) -> None:
    """The object's size and SHA-256 guard the snapshot: an extra chunk (more bytes than recorded)
    or a chunk rewritten in place (same size, other bytes) means a full replay, never a wrong state."""
    seq = await append_work(store, project, 4)
    truth = await full_replay(store, project)
    js = nc.jetstream()
    for tamper in ("extra", "rewrite"):
        await snapshots.save_snapshot(project, encode_state(truth))
        info = await (await js.object_store(SNAPSHOT_BUCKET)).get_info(project)
        chunks = f"$O.{SNAPSHOT_BUCKET}.C.{info.nuid}"
        stream = f"OBJ_{SNAPSHOT_BUCKET}"
        if tamper == "extra":
            await js.publish(chunks, b"{}", stream=stream)
        else:
            original = await js.get_last_msg(stream, chunks)
            assert original.data is not None
            await js.purge_stream(stream, subject=chunks)
            await js.publish(chunks, original.data.replace(b"w0", b"w9"), stream=stream)
        assert await snapshots.load_snapshot(project) is None, tamper
        view = await attached(await replicas(), project, seq)
        assert view.tail is not None and view.tail.from_seq == 1, tamper
        assert state_hash(view.state) == state_hash(truth)
    await snapshots.delete_snapshot(project)


async def test_a_snapshot_ahead_of_the_stream_is_ignored(
    store: EventStore, snapshots: SnapshotStore, project: str, replicas: ReplicaFactory
) -> None:
    """A snapshot of an older stream of the same name (deleted, then re-created) must not hide
    the new stream's events."""
    ghost = work_submitted(project, "ghost")
    ghost.seq = 100
    old = fold([ghost], project=project)
    assert decode_state(encode_state(old)).seq == 100, "a snapshot that loads, but is ahead"
    await snapshots.save_snapshot(project, encode_state(old))
    seq = await append_work(store, project, 2)
    view = await attached(await replicas(), project, seq)
    assert sorted(view.state.work) == ["w0", "w1"]
    assert state_hash(view.state) == state_hash(await full_replay(store, project))
    await snapshots.delete_snapshot(project)


# --- several replicas ---------------------------------------------------------------------


async def test_two_replicas_converge_after_concurrent_appends_from_both(
    project: str, replicas: ReplicaFactory
) -> None:
    a, b = await replicas(), await replicas()
    views = [await a.attach(project), await b.attach(project)]
    await a.store.append(target_registered(project), 0)

    async def writer(readmodel: ReadModel, view: ProjectView, name: str) -> None:
        for i in range(10):
            await readmodel.store.append(work_submitted(project, f"{name}{i}"), 0)
            # Contended entity: OCC against the writer's own view, catch up and retry on conflict.
            while True:
                expected = view.state.entity_seq.get("target.t1", 0)
                try:
                    await readmodel.store.append(target_updated(project, f"{name}{i}"), expected)
                    break
                except ConcurrencyConflict:
                    assert await readmodel.catch_up(project, WAIT)

    await asyncio.gather(writer(a, views[0], "a"), writer(b, views[1], "b"))
    last = await a.store.last_seq(project)
    assert last == 1 + 4 * 10
    assert all([await v.wait_for(last, WAIT) for v in views])
    assert state_hash(views[0].state) == state_hash(views[1].state)
    assert state_hash(views[0].state) == state_hash(await full_replay(a.store, project))
    assert len(views[0].state.work) == 20


async def test_a_started_replica_attaches_a_project_another_replica_creates(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    """The advisory path: no request ever named the project on this replica."""
    watcher = await replicas(start=True)
    announced = asyncio.Event()
    watcher.on_attach.append(lambda v: announced.set() if v.project == project else None)
    creator = await replicas()
    await creator.attach(project)  # creates the stream
    seq = await append_work(creator.store, project, 3)
    await asyncio.wait_for(announced.wait(), WAIT)
    view = watcher.views[project]
    assert await view.wait_for(seq, WAIT)
    assert state_hash(view.state) == state_hash(await full_replay(store, project))


async def test_view_attaches_lazily_and_only_for_existing_projects(
    store: EventStore, project: str, replicas: ReplicaFactory
) -> None:
    replica = await replicas()
    assert await replica.view(project) is None
    assert not await store.stream_exists(project), "looking does not create"
    seq = await append_work(store, project, 2)
    view = await replica.view(project)
    assert view is not None and await view.wait_for(seq, WAIT)
    other = project + "new"
    created = await replica.view(other, create=True)
    assert created is not None and await store.stream_exists(other)


async def test_the_publish_timeout_setting_reaches_the_event_store(nats_server: EmbeddedNats, project: str) -> None:
    async with own_replica(nats_server.url, project, publish_timeout_s=0.75) as api:
        assert api.service is not None and api.service.readmodel is not None
        assert api.service.readmodel.store.publish_timeout_s == 0.75
