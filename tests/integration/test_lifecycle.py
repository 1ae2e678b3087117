"""Replica lifecycle: `/health/live` and `/health/ready`, and a graceful SIGTERM (drain, finish the
in-flight requests, release the leases so another replica takes over at once).

Release is told apart from expiry without timing anything: the leases' TTL (and so the electors'
renewal interval, TTL/3) is far longer than the test's timeout, so a take-over within the timeout
can only come from the lease having been released and the successor having been told.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client as NATS

from tests.processes import WeftProcess, until
from tests.servers import own_nats_server
from tests.support import FakeAgent, make_client
from weft.service import WeftService
from weft.settings import Settings
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore
from weft.store.lease import LEASE_BUCKET, LeaderElector

LONG_TTL_S = 60.0  # far longer than any wait below: a take-over within them is a release
TAKEOVER_TIMEOUT_S = 10.0  # < LONG_TTL_S / 3, the electors' renewal interval


@contextlib.asynccontextmanager
async def replica(nats_url: str, project: str, **settings: Any) -> AsyncIterator[tuple[WeftService, TestClient]]:
    """An in-process replica whose own app (and so its own Lifecycle) is served over real HTTP."""
    base = replace(Settings.from_env({}), snapshot_every=0, warp_bridge=False, replica_name=f"life-{project}",
                   default_project=project, drain_s=0.0)
    service = WeftService(replace(base, **settings))
    await service.start(nats_url, serve_http=False)
    assert service.app is not None
    client = TestClient(TestServer(service.app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield service, client
    finally:
        await client.close()
        await service.stop()


async def answer(client: TestClient, path: str) -> tuple[int, Any]:
    resp = await client.get(path)
    return resp.status, await resp.json()


def connection_events(nc: NATS) -> tuple[asyncio.Event, asyncio.Event]:
    """Events set when the replica's own NATS client reports a disconnect and a reconnect (chained
    to the callbacks the service installed)."""
    disconnected, reconnected = asyncio.Event(), asyncio.Event()
    on_disconnect, on_reconnect = nc._disconnected_cb, nc._reconnected_cb

    async def disconnect() -> None:
        disconnected.set()
        if on_disconnect is not None:
            await on_disconnect()

    async def reconnect() -> None:
        reconnected.set()
        if on_reconnect is not None:
            await on_reconnect()

    nc._disconnected_cb, nc._reconnected_cb = disconnect, reconnect
    return disconnected, reconnected


# --- live and ready ---------------------------------------------------------------------------------


async def test_live_and_ready_answer_200_on_a_caught_up_replica(nats_server: Any, project: str) -> None:
    async with replica(nats_server.url, project) as (_, client):
        status, live = await answer(client, "/health/live")
        assert status == 200 and live["status"] == "alive" and live["replica"] == f"life-{project}"
        status, ready = await answer(client, "/health/ready")
        assert (status, ready["status"], ready["reasons"]) == (200, "ready", [])
        status, health = await answer(client, "/health")  # the summary keeps its shape
        assert status == 200 and health["status"] == "ok" and health["websocket"] == {
            "connections": 0, "status": "enabled", "subscriptions": 0}
        assert {"timestamp", "ready", "nats", "replica", "projects", "leading", "uptimeSeconds"} <= set(health)


async def test_health_paths_stay_open_when_tokens_are_required(nats_server: Any, project: str) -> None:
    async with replica(nats_server.url, project) as (service, _):
        client = await make_client(service, api_tokens=("s3cret",))
        try:
            for path in ("/health", "/health/live", "/health/ready"):
                assert (await client.get(path)).status == 200, path
            assert (await client.get("/api/work")).status == 401
        finally:
            await client.close()


async def test_ready_is_503_while_a_project_catches_up(nats_server: Any, project: str) -> None:
    async with replica(nats_server.url, project) as (service, client):
        assert service.readmodel is not None
        view = await service.readmodel.view(project, create=True)
        assert view is not None
        view.caught_up.clear()  # as while the backlog found at attach is folded
        try:
            status, ready = await answer(client, "/health/ready")
            assert status == 503
            assert ready == {"status": "not-ready", "reasons": [f"project {project} catching up"],
                             "replica": f"life-{project}"}
            assert (await client.get("/health/live")).status == 200
        finally:
            view.set_caught_up()
        assert (await client.get("/health/ready")).status == 200


async def test_ready_is_503_while_nats_is_down_and_200_again_once_back(
    tmp_path_factory: pytest.TempPathFactory, project: str
) -> None:
    async with own_nats_server(tmp_path_factory, "lifecycle-down") as server:
        async with replica(server.url, project) as (service, client):
            assert service.nc is not None
            disconnected, reconnected = connection_events(service.nc)
            assert (await client.get("/health/ready")).status == 200
            await server.stop()
            await asyncio.wait_for(disconnected.wait(), 20)
            status, body = await answer(client, "/health/ready")
            assert status == 503 and body["status"] == "not-ready" and "nats disconnected" in body["reasons"]
            status, live = await answer(client, "/health/live")
            assert status == 200 and live["status"] == "alive"
            await server.start()
            await asyncio.wait_for(reconnected.wait(), 30)
            status, body = await answer(client, "/health/ready")
            assert (status, body["reasons"]) == (200, [])


async def test_draining_replica_is_not_ready_but_still_serves(nats_server: Any, project: str) -> None:
    async with replica(nats_server.url, project) as (service, client):
        service.begin_drain()
        status, ready = await answer(client, "/health/ready")
        assert status == 503 and ready["reasons"] == ["draining"]
        status, health = await answer(client, "/health")
        assert status == 503 and health["status"] == "draining"
        assert (await client.get("/health/live")).status == 200
        resp = await client.post("/api/work", json={"capability": "python", "boundary": "personal",
                                                    "description": "still served"},
                                 headers={"X-Weft-Project": project})
        assert resp.status == 201, await resp.text()


# --- release of the leases ----------------------------------------------------------------------------


async def test_stop_deposes_before_it_releases_and_the_other_elector_takes_over_at_once(
    nc: NATS, project: str
) -> None:
    bucket = f"leases-{project}"
    js = nc.jetstream()
    events: list[tuple[str, Any]] = []
    kv_seen: list[Any] = []

    async def a_deposed(p: str) -> None:
        kv = await js.key_value(bucket)
        entry = await kv.get(p)  # the lease is still ours while our scheduler stops
        kv_seen.append(orjson.loads(entry.value or b"{}").get("holder"))
        events.append(("a deposed", p))

    def b_elected(p: str, epoch: int) -> None:
        events.append(("b elected", epoch))

    a = LeaderElector(js, "holder-a", [project], ttl_s=LONG_TTL_S, bucket=bucket, on_deposed=a_deposed)
    b = LeaderElector(js, "holder-b", [project], ttl_s=LONG_TTL_S, bucket=bucket, on_elected=b_elected)
    try:
        await a.start()
        epoch_a = await a.wait_elected(project, timeout=10)
        await b.start()
        await b.run_once()  # b has campaigned (and lost) at least once; its next round is LONG_TTL_S / 3 away
        assert not b.is_leader(project)
        released = await a.stop(release=True)
        assert released == [project]
        epoch_b = await b.wait_elected(project, timeout=TAKEOVER_TIMEOUT_S)
        assert epoch_b > epoch_a
        assert events == [("a deposed", project), ("b elected", epoch_b)]
        assert kv_seen == ["holder-a"]
    finally:
        await a.stop(release=False)
        await b.stop(release=True)
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)


async def test_release_never_removes_a_successors_lease(nc: NATS, project: str) -> None:
    bucket = f"leases-{project}"
    js = nc.jetstream()
    a = LeaderElector(js, "holder-a", [project], ttl_s=LONG_TTL_S, bucket=bucket)
    try:
        await a.run_once()
        assert a.is_leader(project)
        kv = await js.key_value(bucket)
        entry = await kv.get(project)
        await kv.delete(project, last=entry.revision)  # an operator removed it...
        successor = await kv.create(project, orjson.dumps({"holder": "holder-b"}))  # ...and b took it
        assert await a.stop(release=True) == [project]  # a believed it held the lease: tried its revision
        after = await kv.get(project)
        assert after.revision == successor and orjson.loads(after.value or b"{}")["holder"] == "holder-b"
    finally:
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)


# --- the shutdown sequence, in-process ----------------------------------------------------------------


async def test_shutdown_drains_runs_on_shutdown_finishes_in_flight_then_releases(
    life_nats: EmbeddedNats, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain (503, still serving) -> on_shutdown hooks -> the in-flight request answered -> leases
    released -> stopped; a second replica then leads without waiting for the TTL."""
    import weft.api.health
    import weft.service

    order: list[str] = []
    in_handler, finish = asyncio.Event(), asyncio.Event()
    live = weft.api.health.live

    async def slow_live(request: Any) -> Any:  # /health/live, made an in-flight request we control
        if request.query.get("slow"):
            in_handler.set()
            await finish.wait()
            order.append("in-flight answered")
        return await live(request)

    monkeypatch.setattr(weft.api.health, "live", slow_live)
    create_app = weft.service.create_app

    def app_with_hook(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)

        async def on_shutdown(_app: Any) -> None:  # where the WebSocket module closes its sockets
            order.append("on_shutdown")
            finish.set()  # the in-flight request may finish now: the server must still answer it

        app.on_shutdown.append(on_shutdown)
        return app

    monkeypatch.setattr(weft.service, "create_app", app_with_hook)
    settings = replace(Settings.from_env({}), snapshot_every=0, warp_bridge=False, default_project=project,
                       lease_ttl_s=LONG_TTL_S, drain_s=600.0, api_host="127.0.0.1", api_port=0)
    a = WeftService(replace(settings, replica_name="life-a"))
    await a.start(life_nats.url)  # its own server: the session's lease bucket has a short TTL
    assert a.readmodel is not None and a.scheduler is not None
    await a.readmodel.view(project, create=True)
    b: WeftService | None = None
    try:
        await a.scheduler.wait_scheduling(project, timeout=10)
        b = WeftService(replace(settings, replica_name="life-b"))
        await b.start(life_nats.url, serve_http=False)
        assert b.scheduler is not None
        await b.scheduler.elector.wait_until(lambda: b.scheduler is not None and b.scheduler.elector.rounds > 0
                                             and project in b.scheduler.elector._leases, timeout=10)
        assert not b.scheduler.elector.is_leader(project)
        release_all = a.scheduler.elector.release_all

        async def recorded_release() -> list[str]:
            order.append("leases released")
            return await release_all()

        monkeypatch.setattr(a.scheduler.elector, "release_all", recorded_release)
        base = f"http://127.0.0.1:{a.port}"
        async with aiohttp.ClientSession() as http:
            in_flight = asyncio.create_task(http.get(base + "/health/live", params={"slow": "1"}))
            await asyncio.wait_for(in_handler.wait(), 10)
            cut_short = asyncio.Event()
            stopping = asyncio.create_task(a.shutdown(cut_short))
            async with http.get(base + "/health/ready") as resp:
                assert resp.status == 503 and (await resp.json())["reasons"] == ["draining"]
            order.append("drained")
            cut_short.set()
            resp = await asyncio.wait_for(in_flight, 20)
            assert resp.status == 200 and (await resp.json())["status"] == "alive"
            await asyncio.wait_for(stopping, 20)
        assert order == ["drained", "on_shutdown", "in-flight answered", "leases released"]
        assert project in a.released
        await b.scheduler.wait_scheduling(project, timeout=TAKEOVER_TIMEOUT_S)  # < TTL/3: released, not lapsed
    finally:
        await a.stop()
        if b is not None:
            await b.stop()


# --- SIGTERM of the scheduling replica process ---------------------------------------------------------


@pytest.fixture(scope="module")
async def life_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "lifecycle") as server:
        yield server


def weft_env(name: str, drain_s: float) -> dict[str, str]:
    return {"WEFT_REPLICA_NAME": name, "WEFT_LEASE_TTL_S": str(LONG_TTL_S), "WEFT_DRAIN_S": str(drain_s),
            "WEFT_RETRY_BASE_MS": "50", "WEFT_WARP_BRIDGE": "false"}


async def leading(http: aiohttp.ClientSession, proc: WeftProcess, project: str) -> bool:
    async with http.get(proc.base + "/health") as resp:
        return project in (await resp.json())["leading"]


@pytest.mark.slow
async def test_sigterm_of_the_scheduling_replica_drains_then_hands_the_lease_over_at_once(
    life_nats: EmbeddedNats,
) -> None:
    project = "life" + uuid.uuid4().hex[:8]
    # a drains until told twice (no timing); b stops at once when the test is done with it.
    a = WeftProcess(life_nats.url, project, env=weft_env("replica-a", drain_s=600))
    b = WeftProcess(life_nats.url, project, env=weft_env("replica-b", drain_s=0))
    nc = await nats.connect(life_nats.url)
    agent = FakeAgent(nc, project, "worker-1", max_tasks=3)
    try:
        async with aiohttp.ClientSession() as http:
            await a.start()
            status, _ = await a.post(http, "/api/work", {"capability": "python", "boundary": "personal",
                                                         "description": "creates the project"})
            assert status == 201
            await until(http, a.base, project, lambda: leading(http, a, project))
            await b.start()  # a holds the lease: b campaigns, loses, and next tries LONG_TTL_S / 3 later
            kv = await nc.jetstream().key_value(LEASE_BUCKET)
            assert orjson.loads((await kv.get(project)).value or b"{}")["holder"].startswith("replica-a-")

            assert a.proc is not None
            since = len(a.output)
            a.proc.send_signal(signal.SIGTERM)
            await a.line(lambda text: "weft draining" in text, since=since)
            async with http.get(a.base + "/health/ready") as resp:
                assert resp.status == 503 and (await resp.json())["reasons"] == ["draining"]
            async with http.get(a.base + "/health/live") as resp:
                assert resp.status == 200  # still serving while draining
            status, early = await a.post(http, "/api/work", {"capability": "python", "boundary": "personal",
                                                              "description": "while a drains"})
            assert status == 201
            assert a.proc.returncode is None  # readiness turned 503 before the process exits
            a.proc.send_signal(signal.SIGTERM)  # the second signal ends the drain: a stops now
            assert await a.stop() == 0  # already exiting: waits for it

            # b takes over within TAKEOVER_TIMEOUT_S, far below the TTL: a released its lease.
            async with asyncio.timeout(TAKEOVER_TIMEOUT_S):
                await until(http, b.base, project, lambda: leading(http, b, project))
            entry = await kv.get(project)
            lease = orjson.loads(entry.value or b"{}")
            assert lease["holder"].startswith("replica-b-")

            await agent.start()  # only now: nothing appended while a's request was in flight but b's submit

            status, late = await b.post(http, "/api/work", {"capability": "python", "boundary": "personal",
                                                             "description": "after a stopped"})
            assert status == 201
            assigned = set()
            async with asyncio.timeout(TAKEOVER_TIMEOUT_S):
                while late["id"] not in assigned:
                    push = await agent.next_push("assignment")
                    assigned.add(push["work"]["id"])
                    await agent.request("work.accept", {"workId": push["work"]["id"]})

        events = [e async for e in EventStore(nc.jetstream()).read_range(project)]
        elected = [e for e in events if e.type == "leader.elected"]
        assert len(elected) == 2 and elected[1].data["holder"] == lease["holder"]
        late_assigned = [e for e in events if e.type == "work.assigned" and e.entity_id == late["id"]]
        assert elected[0].data["holder"].startswith("replica-a-")
        assert late_assigned and late_assigned[0].epoch == elected[1].epoch
        assert early["id"] in {e.entity_id for e in events if e.type == "work.submitted"}
    finally:
        with contextlib.suppress(Exception):
            await agent.close()
        await nc.close()
        for proc in (a, b):
            if proc.proc is not None and proc.proc.returncode is None:
                await proc.kill() if proc is a else await proc.stop()
