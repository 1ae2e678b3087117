"""JetStream resources (weft/store/resources.py) against a real nats-server: each stream, KV bucket
and object store is declared once and cached, with the config its owner gives, and one deleted on
the server is declared, and so created, again on the next use once it is forgotten.

The module runs on a nats-server of its own: it deletes the snapshot bucket, which every other
suite's replicas use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from projections.events import stream_name
from tests.integration.test_eventstore import read_all, work_submitted
from tests.servers import own_nats_server
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore
from weft.store.lease import LeaderElector
from weft.store.resources import JetStreamResources
from weft.store.snapshots import SNAPSHOT_BUCKET, SnapshotStore

TTL = 1.5


@pytest.fixture(scope="module")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """Overrides the session's server for this module (and the `nc` fixture built on it)."""
    async with own_nats_server(tmp_path_factory, "resources") as server:
        yield server


@pytest.fixture
def resources(nc: NATS) -> JetStreamResources:
    return JetStreamResources(nc.jetstream())


@pytest.fixture
async def bucket(resources: JetStreamResources, project: str) -> AsyncIterator[str]:
    name = f"leases-{project}"
    yield name
    try:
        await resources.js.delete_key_value(name)
    except nats.errors.Error:
        pass


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[Any]:
    """Record each call of `obj.name` (its first argument), then make it as before."""
    calls: list[Any] = []
    real = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else kwargs)
        return await real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


async def test_each_resource_is_declared_once_however_many_ask_at_once(
    resources: JetStreamResources, project: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = count_calls(monkeypatch, resources.js, "add_stream")
    kv_created = count_calls(monkeypatch, resources.js, "create_key_value")
    store = EventStore(resources)
    await asyncio.gather(*(store.ensure_stream(project) for _ in range(5)))
    await asyncio.gather(*(store.append(work_submitted(project, f"w{i}"), 0) for i in range(5)))
    assert len(added) == 1 and resources.knows_stream(stream_name(project))

    config = api.KeyValueConfig(bucket=bucket, history=1, ttl=TTL)
    kvs = await asyncio.gather(*(resources.kv(config) for _ in range(5)))
    assert len(kv_created) == 1 and all(kv is kvs[0] for kv in kvs)

    snapshots = SnapshotStore(resources)
    stores = await asyncio.gather(*(snapshots._snapshot_store() for _ in range(5)))
    assert all(s is stores[0] for s in stores)
    assert await SnapshotStore(resources)._snapshot_store() is stores[0], "one cache for every user"


async def test_the_store_the_snapshots_and_the_leases_share_the_resources_they_are_given(
    resources: JetStreamResources, project: str, bucket: str
) -> None:
    store = EventStore(resources)
    snapshots = SnapshotStore(resources)
    elector = LeaderElector(resources, "replica-a", [project], ttl_s=TTL, bucket=bucket)
    assert store.js is snapshots.js is elector.js is resources.js
    assert elector._leases[project].resources is resources
    await elector.run_once()
    assert elector.is_leader(project)
    assert resources._kvs[bucket] is elector._kv is elector._leases[project]._kv
    await elector.stop()


async def test_a_deleted_stream_is_created_again_with_the_same_config_once_forgotten(
    resources: JetStreamResources, project: str
) -> None:
    store = EventStore(resources, duplicate_window_s=30.0)
    await store.append(work_submitted(project, "before"), 0)
    name = stream_name(project)
    before = (await resources.js.stream_info(name)).config
    await resources.js.delete_stream(name)

    resources.forget_stream(name)  # what the server said: the stream is gone
    assert not await store.stream_exists(project), "looking does not create"
    await store.append(work_submitted(project, "after"), 0)
    after = (await resources.js.stream_info(name)).config
    assert after == before
    assert after.duplicate_window == 30.0 and after.allow_atomic and after.allow_direct
    assert [e.entity_id for e in await read_all(store, project)] == ["after"]


async def test_a_deleted_lease_bucket_is_created_again_by_the_next_round(
    resources: JetStreamResources, project: str, bucket: str
) -> None:
    """No responders when the lease is renewed: the lease forgets the bucket in the resources, and
    the next round declares it again with the same config."""
    elector = LeaderElector(resources, "replica-a", [project], ttl_s=TTL, bucket=bucket)
    await elector.run_once()
    assert elector.is_leader(project)
    before = (await resources.js.stream_info(f"KV_{bucket}")).config
    old = resources._kvs[bucket]

    await resources.js.delete_key_value(bucket)
    await elector.run_once()  # the renewal finds no bucket
    assert bucket not in resources._kvs, "forgotten"
    await elector.run_once()  # declared again
    assert resources._kvs[bucket] is not old
    after = (await resources.js.stream_info(f"KV_{bucket}")).config
    assert after == before
    assert after.max_age == TTL and after.max_msgs_per_subject == 1
    assert not elector.is_leader(project), "our entry went with the old bucket"
    await elector.run_once()
    assert elector.is_leader(project), "a new term in the new bucket"
    await elector.stop()


async def test_a_deleted_snapshot_bucket_is_created_again_with_the_same_config_once_forgotten(
    resources: JetStreamResources, project: str
) -> None:
    snapshots = SnapshotStore(resources)
    await snapshots.save_snapshot(project, b"one")
    stream = f"OBJ_{SNAPSHOT_BUCKET}"
    before = (await resources.js.stream_info(stream)).config
    await resources.js.delete_object_store(SNAPSHOT_BUCKET)

    resources.forget_object_store(SNAPSHOT_BUCKET)
    assert await snapshots.load_snapshot(project) is None, "a new, empty bucket"
    after = (await resources.js.stream_info(stream)).config
    assert after == before and after.storage == api.StorageType.FILE
    await snapshots.save_snapshot(project, b"two")
    assert await snapshots.load_snapshot(project) == b"two"
    await snapshots.delete_snapshot(project)
