"""weft on a 3-node JetStream cluster (tests/cluster.py) with WEFT_STREAM_REPLICAS=3: its streams,
lease bucket and snapshot store are R3; work flows to an agent; and while nodes die (kill -9, a
follower or the stream's leader) or the leader steps down, every submit weft acknowledged (2xx) is
in the stream exactly once. A client retries a 503/504 with the same Idempotency-Key, as the API
promises it may; it must never see a 500 nor lose an accepted command.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from projections.events import stream_name
from tests.cluster import NatsCluster, nats_cluster, poll
from tests.support import Api, FakeAgent, own_replica, until
from weft.settings import Settings
from weft.store import connection
from weft.store.eventstore import EventStore
from weft.store.lease import LEASE_BUCKET
from weft.store.snapshots import SNAPSHOT_BUCKET

# Nobody has this capability: the submits under faults stay pending (the stream holds submits only).
IDLE_WORK = {"capability": "nobody-has-this", "boundary": "personal", "description": "cluster fault test"}
WORK = {"capability": "python", "boundary": "personal", "description": "cluster work"}
REPLICAS = Settings.from_env({"WEFT_STREAM_REPLICAS": "3"}).stream_replicas
RETRY_FOR_S = 30.0  # a submit is retried on 503/504 this long: spans a leader election (JetStream's
# election timeout is several seconds after a kill -9; a step-down moves the leader at once)


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    async with nats_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
async def healthy(cluster: NatsCluster) -> NatsCluster:
    """The cluster with all three nodes up (an earlier test may have left one down)."""
    await cluster.ensure_all_running()
    return cluster


@pytest.fixture
async def replica(healthy: NatsCluster, project: str) -> AsyncIterator[Api]:
    async with own_replica(
        healthy.url, project, stream_replicas=REPLICAS, heartbeat_ms=1000, accept_timeout_ms=3000,
        retry_base_ms=20, lease_ttl_s=2.0, min_seq_wait_ms=5000,
    ) as api:
        yield api


@pytest.fixture
async def cnc(healthy: NatsCluster) -> AsyncIterator[NATS]:
    """A client of the test's own, connected to all three nodes."""
    nc = await connection.connect(healthy.url, **connection.RECONNECT_FOREVER)
    yield nc
    await nc.close()


@dataclass
class Submitter:
    """Submits work with a fresh Idempotency-Key each, retrying a 503/504 with the same key, until
    told to stop; remembers each acknowledged key's work id and every status it saw."""

    api: Api
    prefix: str
    acked: dict[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    slowest: float = 0.0  # seconds from a submit's first try to its acknowledgement, at most

    async def submit(self, key: str) -> str:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < RETRY_FOR_S:
            resp = await self.api.call("POST", "/api/work", IDLE_WORK, headers={"Idempotency-Key": key})
            body: dict[str, Any] = await resp.json()
            self.statuses[resp.status] += 1
            if resp.status in (200, 201, 202):
                self.acked[key] = body["id"]
                self.slowest = max(self.slowest, loop.time() - start)
                return str(body["id"])
            assert resp.status in (503, 504), f"submit {key}: {resp.status} {body}"
            await asyncio.sleep(0.1)  # the store said retry (Retry-After); a leader election is under way
        raise AssertionError(f"submit {key} not acknowledged in {RETRY_FOR_S}s: {self.statuses}")

    async def run(self, workers: int = 4) -> None:
        counter = iter(range(1_000_000))

        async def worker() -> None:
            while not self.stop.is_set():
                await self.submit(f"{self.prefix}-{next(counter)}")

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def until_acked(self, n: int, timeout: float = 30.0) -> None:
        """Wait until `n` more submits than now are acknowledged."""
        target = len(self.acked) + n

        async def enough() -> bool:
            return len(self.acked) >= target

        await poll(enough, timeout, f"{n} more acknowledged submits")


@contextlib.asynccontextmanager
async def submitting(api: Api, prefix: str) -> AsyncIterator[Submitter]:
    sub = Submitter(api, prefix)
    task = asyncio.create_task(sub.run())
    try:
        await sub.until_acked(5)
        yield sub
        sub.stop.set()
        await asyncio.wait_for(task, 60)  # a failed submit (a 500, say) fails the test here
        print(f"{prefix}: {len(sub.acked)} acknowledged, statuses {dict(sub.statuses)}, slowest {sub.slowest:.1f}s")
    finally:
        sub.stop.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def submitted_ids(nc: NATS, project: str) -> Counter[str]:
    """work.submitted events per work id, read from the stream itself (again if a read fails: the
    test's own client may be reconnecting, its consumer may have been on a node that just died)."""
    store = EventStore(nc.jetstream())

    async def read() -> tuple[Counter[str]]:  # a tuple: truthy even when nothing was found
        return (Counter([ev.entity_id async for ev in store.read_range(project) if ev.type == "work.submitted"]),)

    return (await poll(read, 30, f"a full read of {stream_name(project)}"))[0]


async def assert_each_ack_once(nc: NATS, project: str, sub: Submitter) -> None:
    counts = await submitted_ids(nc, project)
    missing = [k for k, wid in sub.acked.items() if counts[wid] == 0]
    twice = {wid: n for wid, n in counts.items() if n > 1}
    assert not missing, f"acknowledged submits not in the stream: {missing[:5]} (of {len(missing)})"
    assert not twice, f"work ids in the stream more than once: {twice}"
    assert len(set(sub.acked.values())) == len(sub.acked), "two keys acknowledged with one work id"
    assert 500 not in sub.statuses, sub.statuses


async def assert_folded(api: Api, sub: Submitter) -> None:
    """The replica's projection (its ordered consumer) kept folding through the fault."""
    ids = set(sub.acked.values())
    loop = asyncio.get_running_loop()
    start = loop.time()
    await until(api, lambda s: all(i in s.work for i in ids), timeout=30)
    print(f"folded every acknowledged submit {loop.time() - start:.1f}s after the last")


# --- (a) every resource is R3 -------------------------------------------------------------------


async def test_streams_lease_bucket_and_snapshot_store_are_r3(replica: Api, cnc: NATS, healthy: NatsCluster) -> None:
    await replica.ok("POST", "/api/work", IDLE_WORK, status=201)
    js = cnc.jetstream()  # the snapshot store exists: the replica looked for a snapshot of the project

    async def lease_bucket_exists() -> bool:
        return any(i.config.name == f"KV_{LEASE_BUCKET}" for i in await js.streams_info())

    await poll(lease_bucket_exists, 20, "the lease bucket")  # the scheduler opens it in the background
    for name in (stream_name(replica.project), f"KV_{LEASE_BUCKET}", f"OBJ_{SNAPSHOT_BUCKET}"):
        info = await js.stream_info(name)
        assert info.config.num_replicas == 3, (name, info.config.num_replicas)
        assert info.cluster is not None and info.cluster.leader in healthy.nodes, (name, info.cluster)
        peers = {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])}
        assert peers == set(healthy.nodes), (name, peers)


# --- (b) work flows to an agent on the cluster ----------------------------------------------------


async def test_agent_completes_work_on_the_cluster(replica: Api, cnc: NATS) -> None:
    agent = FakeAgent(cnc, replica.project, "cluster-agent", max_tasks=2, auto=True)
    await agent.start()
    ids = [(await replica.ok("POST", "/api/work", WORK, status=201))["id"] for _ in range(5)]
    await until(replica, lambda s: all(s.work[i]["status"] == "completed" for i in ids), timeout=30)
    await agent.close()  # its last completions' replies are in
    assert sorted(agent.completed) == sorted(ids)


# --- (c) (d) (e) node loss and leader moves under submits -----------------------------------------


async def test_killing_a_follower_loses_no_acknowledged_submit(replica: Api, cnc: NATS, healthy: NatsCluster) -> None:
    stream = stream_name(replica.project)
    await replica.ok("POST", "/api/work", IDLE_WORK, status=201)  # the stream exists
    js = cnc.jetstream()
    leader = await healthy.wait_stream_leader(js, stream)
    follower = next(n for n in healthy.nodes if n != leader)
    async with submitting(replica, "c") as sub:
        await healthy.kill(follower)
        await sub.until_acked(20)
    await assert_each_ack_once(cnc, replica.project, sub)
    await assert_folded(replica, sub)
    await healthy.restart(follower)
    await healthy.wait_converged(stream)
    await assert_each_ack_once(cnc, replica.project, sub)


async def test_killing_the_stream_leader_moves_it_and_loses_no_acknowledged_submit(
    replica: Api, cnc: NATS, healthy: NatsCluster
) -> None:
    stream = stream_name(replica.project)
    await replica.ok("POST", "/api/work", IDLE_WORK, status=201)
    js = cnc.jetstream()
    leader = await healthy.wait_stream_leader(js, stream)
    async with submitting(replica, "d") as sub:
        await healthy.kill(leader)
        moved = await healthy.wait_stream_leader(js, stream, not_on=leader)
        await sub.until_acked(20)
    assert moved != leader
    await assert_each_ack_once(cnc, replica.project, sub)
    await assert_folded(replica, sub)
    await healthy.restart(leader)
    last = await healthy.wait_converged(stream)
    assert last >= len(sub.acked)
    await assert_each_ack_once(cnc, replica.project, sub)


async def test_stepping_the_stream_leader_down_loses_no_acknowledged_submit(
    replica: Api, cnc: NATS, healthy: NatsCluster
) -> None:
    stream = stream_name(replica.project)
    await replica.ok("POST", "/api/work", IDLE_WORK, status=201)
    js = cnc.jetstream()
    leader = await healthy.wait_stream_leader(js, stream)
    async with submitting(replica, "e") as sub:
        reply = await healthy.step_down(js, stream)
        assert reply.get("success"), reply
        moved = await healthy.wait_stream_leader(js, stream, not_on=leader)
        await sub.until_acked(20)
    assert moved != leader
    await assert_each_ack_once(cnc, replica.project, sub)
    await assert_folded(replica, sub)
    await healthy.wait_converged(stream)
