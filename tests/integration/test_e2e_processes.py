"""End to end with real processes: `weft serve` replicas, `weft agent` agents, one nats-server.

kill -9 of an agent holding work and kill -9 of the scheduling replica: nothing lost, nothing
doubled, checked from the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest

from tests.processes import AgentProcess, WeftProcess, until
from tests.servers import own_nats_server
from tests.support import check_work_invariants
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

pytestmark = pytest.mark.slow

FAST = {"WEFT_HEARTBEAT_MS": "500", "WEFT_ACCEPT_TIMEOUT_MS": "5000", "WEFT_LEASE_TTL_S": "2",
        "WEFT_RETRY_BASE_MS": "50"}


@pytest.fixture(scope="module")
async def e2e_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "e2e") as server:
        yield server


@pytest.fixture
async def events_of(e2e_nats: EmbeddedNats) -> AsyncIterator[Any]:
    nc = await nats.connect(e2e_nats.url)
    store = EventStore(nc.jetstream())

    async def read(project: str) -> list[Any]:
        return [e async for e in store.read_range(project)]

    yield read
    await nc.close()


@pytest.fixture
async def weft(e2e_nats: EmbeddedNats, project: str) -> AsyncIterator[WeftProcess]:
    proc = WeftProcess(e2e_nats.url, project, env=FAST)
    await proc.start()
    yield proc
    await proc.stop()


async def get_item(http: aiohttp.ClientSession, weft: WeftProcess, work_id: str) -> dict[str, Any]:
    return dict(await weft.get(http, f"/api/work/{work_id}"))


async def test_reference_agent_runs_the_item_and_reports_progress_and_result(
    weft: WeftProcess, e2e_nats: EmbeddedNats, project: str, events_of: Any
) -> None:
    agent = AgentProcess(e2e_nats.url, project, "ref-1",
                         'echo "progress: 50 halfway"; read task; echo "did: $task"; echo "attempt $WEFT_WORK_ATTEMPT"')
    await agent.start()
    try:
        async with aiohttp.ClientSession() as http:
            status, item = await weft.post(http, "/api/work", {"capability": "python", "boundary": "personal",
                                                               "description": "hello world"})
            assert status == 201

            async def done() -> Any:
                got = await get_item(http, weft, item["id"])
                return got if got["status"] == "completed" else None

            got = await until(http, weft.base, project, done)
            assert "did: hello world" in got["result"]["summary"]
            assert "attempt 1" in got["result"]["summary"]
            assert got["assignedToAgent"]["guid"] == "ref-1"
        events = await events_of(project)
        progress = [e.data for e in events if e.type == "work.progressed"]
        assert {"progress": 50, "message": "halfway"}.items() <= progress[0].items()
    finally:
        await agent.stop()


async def test_kill_9_of_an_agent_holding_work_requeues_it_to_another(
    weft: WeftProcess, e2e_nats: EmbeddedNats, project: str, events_of: Any
) -> None:
    doomed = AgentProcess(e2e_nats.url, project, "doomed", "sleep 600")
    await doomed.start()
    async with aiohttp.ClientSession() as http:
        _, item = await weft.post(http, "/api/work", {"capability": "python", "boundary": "personal",
                                                      "description": "long job"})

        async def running() -> bool:
            got = await get_item(http, weft, item["id"])
            return got["status"] == "in-progress" and got["assignedTo"] == "doomed"

        await until(http, weft.base, project, running)
        await doomed.kill()
        rescuer = AgentProcess(e2e_nats.url, project, "rescuer", "echo rescued")
        await rescuer.start()
        try:
            async def completed() -> Any:
                got = await get_item(http, weft, item["id"])
                return got if got["status"] == "completed" else None

            got = await until(http, weft.base, project, completed)
            assert got["assignedTo"] == "rescuer" and got["attempts"] == 2
            lost = await weft.get(http, "/api/agents/doomed")
            assert lost["status"] == "offline" and lost["offlineReason"] == "lost"
        finally:
            await rescuer.stop()
    check_work_invariants(await events_of(project))


async def test_kill_9_of_the_scheduling_replica_hands_over_without_loss_or_doubles(
    e2e_nats: EmbeddedNats, events_of: Any
) -> None:
    project = "e2e" + uuid.uuid4().hex[:8]
    a, b = WeftProcess(e2e_nats.url, project, env=FAST), WeftProcess(e2e_nats.url, project, env=FAST)
    await asyncio.gather(a.start(), b.start())
    agents = [AgentProcess(e2e_nats.url, project, f"worker-{i}", "echo ok", max_tasks=2) for i in range(3)]
    for ag in agents:
        await ag.start()
    submitted: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(40):
                status, item = await (a if i % 2 else b).post(
                    http, "/api/work", {"capability": "python", "boundary": "personal", "description": f"job {i}"})
                assert status == 201
                submitted.append(item["id"])

            async def leader() -> WeftProcess | None:
                for proc in (a, b):
                    async with http.get(proc.base + "/health") as resp:
                        if project in (await resp.json())["leading"]:
                            return proc
                return None

            scheduler = await until(http, a.base, project, leader)
            survivor = b if scheduler is a else a
            await scheduler.kill()
            for i in range(20):
                status, item = await survivor.post(
                    http, "/api/work", {"capability": "python", "boundary": "personal", "description": f"late {i}"})
                assert status == 201
                submitted.append(item["id"])

            async def all_done() -> bool:
                stats = await survivor.get(http, "/api/stats", projectId=project)
                return bool(stats["byProject"][project]["completedWork"] == len(submitted))

            await until(http, survivor.base, project, all_done, timeout=90)
            assert project in (await (await http.get(survivor.base + "/health")).json())["leading"]
    finally:
        for ag in agents:
            await ag.stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(a.stop(), b.stop())
    completions = check_work_invariants(await events_of(project), {ag.guid: 2 for ag in agents})
    assert set(completions) == set(submitted)
