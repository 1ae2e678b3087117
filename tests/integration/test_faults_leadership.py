"""Leadership under faults (issue 9, faults 1 and 5): epochs stay monotonic per project whatever
happens to the lease bucket, a new leader announces its term before deciding, and a deposed
leader's late decisions never take effect.

Each test runs on a nats-server of this module's own: they delete the lease bucket, which would
depose every other test's scheduler on the session's server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext

from projections import fold
from tests.servers import own_nats_server
from tests.support import FakeAgent, own_replica, state_reaches
from weft.core.errors import Fenced
from weft.store import connection
from weft.store.embedded import EmbeddedNats
from weft.store.lease import LEASE_BUCKET

TTL_S = 1.0


@pytest.fixture(scope="module")
async def lease_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "leadership") as server:
        yield server


@pytest.fixture
async def conn(lease_nats: EmbeddedNats) -> AsyncIterator[NATS]:
    nc = await connection.connect(lease_nats.url)
    yield nc
    await nc.close()


def submit_body(description: str) -> dict[str, str]:
    return {"capability": "python", "boundary": "personal", "description": description}


async def test_recreating_the_lease_bucket_keeps_epochs_monotonic_and_work_flowing(
    lease_nats: EmbeddedNats, conn: NATS, project: str
) -> None:
    """Fault 1: revisions of a recreated bucket start again at 1, below the stream's epoch. The new
    term must still be above every epoch in the stream, and nothing may loop on fenced decisions."""
    js = conn.jetstream()
    # A bucket that has lived a while: its revisions (the lease epochs) are well above 1.
    await _recreate_bucket(js)
    kv = await js.key_value(LEASE_BUCKET)
    for i in range(5):
        await kv.put(f"other-{i}", b"x")
    async with own_replica(lease_nats.url, project, heartbeat_ms=500, lease_ttl_s=TTL_S) as api:
        assert api.service is not None and api.service.readmodel is not None
        view = api.service.readmodel.views.get(project) or await api.service.readmodel.attach(project)
        agent = FakeAgent(conn, project, "a1", auto=True)
        await agent.start()
        try:
            first = await api.ok("POST", "/api/work", submit_body("before"), status=201)
            await state_reaches(view, lambda s: s.work[first["id"]]["status"] == "completed")
            epoch_before = view.state.epoch

            assert epoch_before > 1
            leader_seq = view.state.leader["seq"] if view.state.leader else 0
            await _recreate_bucket(js)  # revisions start again at 1
            seq_at_recreate = view.state.seq
            await state_reaches(view, lambda s: s.leader is not None and s.leader["seq"] > leader_seq)

            second = await api.ok("POST", "/api/work", submit_body("after"), status=201)
            await state_reaches(view, lambda s: s.work[second["id"]]["status"] == "completed")
        finally:
            await agent.close()
        assert view.state.epoch > epoch_before, "the new term is above every epoch in the stream"
        assert view.state.leader is not None and view.state.leader["epoch"] == view.state.epoch
        # Submit, announce, assign, start, complete (and perhaps a re-announcement): a handful of
        # events, not a flood of fenced decisions (it was thousands within seconds).
        assert view.state.seq - seq_at_recreate < 20


async def test_a_new_leader_announces_its_term_before_its_first_decision(
    lease_nats: EmbeddedNats, project: str
) -> None:
    """Fault 5: on an idle project the new term is in the stream at once, not with its first decision."""
    async with own_replica(lease_nats.url, project, lease_ttl_s=TTL_S) as api:
        assert api.service is not None and api.service.readmodel is not None and api.service.scheduler
        await api.ok("POST", "/api/work", {**submit_body("nobody takes this"), "capability": "rust"}, status=201)
        view = api.service.readmodel.views[project]
        await state_reaches(view, lambda s: s.leader is not None)
        assert view.state.leader is not None
        assert view.state.leader["holder"] == api.service.scheduler.elector.holder
        assert api.service.scheduler.leading()[project] == view.state.epoch
        events = [e.type async for e in api.service.readmodel.store.read_range(project)]
        assert sorted(events) == ["leader.elected", "work.submitted"], "announced, though nothing was decided"


async def test_a_deposed_leaders_decisions_never_take_effect_after_the_new_announcement(
    lease_nats: EmbeddedNats, conn: NATS, project: str
) -> None:
    """The handover with two live schedulers. A's renewals stall (its elector loop stops, as in a
    paused or partitioned process) while its lease stays locally valid for a long TTL, so its
    scheduler keeps running and deciding; an operator removes A's lease entry and B takes the
    lease and announces its term. From B's announcement on, no decision of A's takes effect: A's
    view fences them before they are appended, and any appended before A folded the announcement
    is ignored by every fold."""
    long_ttl = 30.0
    await _recreate_bucket(conn.jetstream(), long_ttl)
    async with (
        own_replica(lease_nats.url, project, heartbeat_ms=500, lease_ttl_s=long_ttl, replica_name="a") as a,
        own_replica(lease_nats.url, project, heartbeat_ms=500, lease_ttl_s=long_ttl, replica_name="b") as b,
    ):
        assert a.service and b.service and a.service.scheduler and b.service.scheduler
        await a.ok("POST", "/api/work", {**submit_body("creates the project"), "capability": "rust"}, status=201)
        host_a, host_b = a.service.scheduler, b.service.scheduler
        view_a = a.service.readmodel.views[project]  # type: ignore[union-attr]
        await state_reaches(view_a, lambda s: s.leader is not None)
        assert view_a.state.leader is not None
        if view_a.state.leader["holder"] == host_b.elector.holder:
            host_a, host_b = host_b, host_a
            view_a = b.service.readmodel.views[project]  # type: ignore[union-attr]
        await asyncio.wait_for(asyncio.shield(host_a._takeovers[project]), 10)
        old_epoch = host_a.leading()[project]
        sched_a = host_a.schedulers[project]

        stalled = host_a.elector._task
        assert stalled is not None
        stalled.cancel()  # A renews nothing from now on, and does not know it is deposed
        kv = await conn.jetstream().key_value(LEASE_BUCKET)
        await kv.delete(project)
        await host_b.elector.run_once()
        await asyncio.wait_for(asyncio.shield(host_b._takeovers[project]), 10)
        new_epoch = host_b.leading()[project]
        assert new_epoch > old_epoch
        assert host_a.leading()[project] == old_epoch, "A still believes it leads"
        assert sched_a.lease_valid(), "and its lease is still locally valid"

        agent = FakeAgent(conn, project, "a1")
        await agent.start()
        try:
            item = await a.ok("POST", "/api/work", submit_body("contended"), status=201)
            view_b = host_b.readmodel.views[project]
            await state_reaches(view_b, lambda s: s.work[item["id"]]["status"] == "assigned")
            await state_reaches(view_a, lambda s: s.seq >= view_b.state.seq)
            # A's loop runs on and decides nothing; a late decision of its own epoch is fenced.
            await sched_a.tick(datetime.now(UTC))
            with pytest.raises(Fenced):
                await sched_a.commands.mark_agent_lost(sched_a.ctx, "a1", None, old_epoch)
        finally:
            await agent.close()

        events = [e async for e in host_b.readmodel.store.read_range(project)]
        announced = next(e.seq for e in events if e.type == "leader.elected" and e.epoch == new_epoch)
        late = [e for e in events if e.seq > announced and e.epoch is not None and e.epoch < new_epoch]
        state = fold(events, project=project)
        assert state.epoch == new_epoch
        assert state.agents["a1"]["status"] != "offline", "A's late loss verdict never applied"
        item_state = state.work[item["id"]]
        assert item_state["attempts"] == 1 and item_state["assignedTo"] == "a1"
        # Whatever of A's landed late is in the stream, never in the state: folding without it
        # gives the same state.
        without = fold([e for e in events if e not in late], project=project)
        assert without.work[item["id"]] == item_state and without.agents == state.agents


async def _recreate_bucket(js: JetStreamContext, ttl_s: float = TTL_S) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_key_value(LEASE_BUCKET)
    await js.create_key_value(KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=ttl_s))


async def test_a_deleted_lease_bucket_is_recreated_and_work_flows_again(
    lease_nats: EmbeddedNats, conn: NATS, project: str
) -> None:
    """An operator deletes the bucket and does not recreate it: the elector creates it again."""
    js = conn.jetstream()
    await _recreate_bucket(js)
    async with own_replica(lease_nats.url, project, heartbeat_ms=500, lease_ttl_s=TTL_S) as api:
        assert api.service is not None and api.service.readmodel is not None
        agent = FakeAgent(conn, project, "a1", auto=True)
        await agent.start()
        try:
            first = await api.ok("POST", "/api/work", submit_body("before"), status=201)
            view = api.service.readmodel.views[project]
            await state_reaches(view, lambda s: s.work[first["id"]]["status"] == "completed")
            leader_seq = view.state.leader["seq"] if view.state.leader else 0
            await js.delete_key_value(LEASE_BUCKET)
            await state_reaches(view, lambda s: s.leader is not None and s.leader["seq"] > leader_seq)
            second = await api.ok("POST", "/api/work", submit_body("after"), status=201)
            await state_reaches(view, lambda s: s.work[second["id"]]["status"] == "completed")
        finally:
            await agent.close()
        await js.key_value(LEASE_BUCKET)  # it exists again
