"""Retention through weft: finished items leave the projection after WEFT_RETAIN_DONE_S, by events.

A replica of this module's own (on its own nats-server, so no other replica leads the project) with
a retention of half a second; everything is observed through REST and the project's event stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from projections import ProjectState, fold, state_hash
from projections.events import Event
from tests.servers import own_nats_server
from tests.support import Api, FakeAgent, own_replica
from weft.store.embedded import EmbeddedNats

WAIT = 15.0  # bound for events that should come long before; never a synchronisation sleep


@pytest.fixture(scope="module")
async def retention_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "retention") as server:
        yield server


@pytest.fixture
async def short_retention(retention_nats: EmbeddedNats, project: str) -> AsyncIterator[Api]:
    async with own_replica(retention_nats.url, project, heartbeat_ms=1000, lease_ttl_s=2.0, retain_done_s=0.5) as api:
        yield api


async def test_finished_items_are_purged_and_live_ones_stay(short_retention: Api) -> None:
    api = short_retention
    assert api.service is not None and api.service.nc is not None and api.service.readmodel is not None
    agent = FakeAgent(api.service.nc, api.project, "worker", auto=True)
    await agent.start()
    try:
        done = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                   "description": "finish me"}, status=201)
        waiting = {"capability": "nobody-has-this", "boundary": "personal", "description": "wait"}
        cancelled = await api.ok("POST", "/api/work", waiting, status=201)
        pending = await api.ok("POST", "/api/work", waiting, status=201)
        view = api.service.readmodel.views[api.project]
        purged: set[str] = set()
        both = asyncio.Event()

        def on_event(ev: Event, state: ProjectState) -> None:
            if ev.type == "work.purged" and ev.entity_id not in state.work:
                purged.add(ev.entity_id)
                if {done["id"], cancelled["id"]} <= purged:
                    both.set()

        view.listeners.append(on_event)
        await api.ok("POST", f"/api/work/{cancelled['id']}/cancel", {"reason": "not needed"})
        async with asyncio.timeout(WAIT):
            await both.wait()

        assert purged == {done["id"], cancelled["id"]}, "only finished items are purged"
        for item in (done, cancelled):
            assert (await api.call("GET", f"/api/work/{item['id']}")).status == 404
        assert (await api.ok("GET", f"/api/work/{pending['id']}"))["status"] == "pending"
        stats = await api.ok("GET", "/api/stats")
        mine = stats["byProject"][api.project]
        assert mine["purgedWork"] == 2 and mine["completedWork"] == 0 and mine["pendingWork"] == 1

        # The events stay in the stream: a replay shows the purged item's whole life, and a fresh
        # fold of the stream reaches the replica's state exactly.
        history = [e async for e in api.service.readmodel.store.read_range(api.project)]
        assert [e.type for e in history if e.entity_id == done["id"]][-2:] == ["work.completed", "work.purged"]
        assert state_hash(fold(history, project=api.project)) == state_hash(view.state)
    finally:
        await agent.close()
