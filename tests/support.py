"""Test helpers shared across suites: an HTTP client bound to a project, an in-process app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from weft.api import create_app
from weft.api.common import SERVICES
from weft.service import WeftService
from weft.settings import Settings


class Api:
    """An HTTP client bound to one project (sent as X-Weft-Project on every request)."""

    def __init__(self, client: TestClient, project: str, service: WeftService | None = None) -> None:
        self.client = client
        self.project = project
        self.service = service

    async def call(self, method: str, path: str, json: Any = None, **kw: Any) -> ClientResponse:
        headers = {"X-Weft-Project": self.project, **kw.pop("headers", {})}
        return await self.client.request(method, path, json=json, headers=headers, **kw)

    async def ok(self, method: str, path: str, json: Any = None, status: int = 200, **kw: Any) -> Any:
        resp = await self.call(method, path, json, **kw)
        body = await resp.json()
        assert resp.status == status, body
        return body


async def make_client(service: WeftService, **overrides: Any) -> TestClient:
    """A second app on the service's replica (same projections, commands, mechanisms), with settings
    overridden (tokens, body limit...), served over real HTTP on 127.0.0.1."""
    assert service.app is not None
    base = service.app[SERVICES]
    app = create_app(replace(base, settings=replace(base.settings, **overrides), plan_cache={}))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@contextlib.asynccontextmanager
async def own_replica(nats_url: str, project: str, **settings: Any) -> AsyncIterator[Api]:
    """A weft replica of the test's own (in-process, no Warp bridge, no snapshots) with `settings`
    overriding the defaults, so its scheduler leads the test's project with the timings it needs;
    yields a REST client bound to the project."""
    base = replace(Settings.from_env({}), snapshot_every=0, warp_bridge=False, replica_name=f"own-{project}")
    service = WeftService(replace(base, **settings))
    await service.start(nats_url, serve_http=False)
    client = await make_client(service)
    try:
        yield Api(client, project, service)
    finally:
        await client.close()
        await service.stop()


class FakeAgent:
    """A protocol-level agent for tests: raw NATS requests, pushes collected in a queue.

    With `auto=True` it accepts and completes every assignment it is pushed, like a tireless worker.
    """

    def __init__(
        self,
        nc: Any,
        project: str,
        guid: str,
        *,
        agent_type: str = "claude-code",
        capabilities: tuple[str, ...] = ("python",),
        boundaries: tuple[str, ...] = ("*",),
        max_tasks: int = 1,
        auto: bool = False,
        heartbeat_s: float = 0.1,
    ) -> None:
        self.nc = nc
        self.project = project
        self.guid = guid
        self.decl = {"guid": guid, "agentType": agent_type, "capabilities": list(capabilities),
                     "boundaries": list(boundaries), "maxConcurrentTasks": max_tasks, "hostname": "test"}
        self.auto = auto
        self.heartbeat_s = heartbeat_s
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.completed: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sub: Any = None
        self._beat: asyncio.Task[None] | None = None

    async def request(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        msg = await self.nc.request(f"weft.{self.project}.{verb}", orjson.dumps({"guid": self.guid, **body}), timeout=10)
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply

    async def start(self) -> dict[str, Any]:
        self._sub = await self.nc.subscribe(f"weft.{self.project}.agent.{self.guid}.inbox", cb=self._on_push)
        reply = await self.request("agent.register", self.decl)
        assert reply["ok"], reply
        self._beat = asyncio.create_task(self._heartbeat())
        return reply

    async def _heartbeat(self) -> None:
        while True:
            await self.nc.publish(f"weft.{self.project}.agent.heartbeat.{self.guid}", b"{}")
            await asyncio.sleep(self.heartbeat_s)

    def stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.cancel()

    async def _on_push(self, msg: Any) -> None:
        push = orjson.loads(msg.data)
        if self.auto and push["type"] == "assignment":
            task = asyncio.create_task(self._work(push["work"]["id"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self.pushes.put(push)

    async def _work(self, work_id: str) -> None:
        assert (await self.request("work.accept", {"workId": work_id}))["ok"]
        reply = await self.request("work.complete", {"workId": work_id, "summary": f"done by {self.guid}"})
        assert reply["ok"], reply
        self.completed.append(work_id)

    async def next_push(self, kind: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            push = await asyncio.wait_for(self.pushes.get(), timeout)
            if kind is None or push["type"] == kind:
                return push

    async def close(self) -> None:
        self.stop_heartbeat()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sub is not None:
            await self._sub.unsubscribe()


def check_work_invariants(events: list[Any], capacity: dict[str, int] | None = None) -> dict[str, int]:
    """Replay the stream's own facts: no item assigned while already held, no agent above its
    capacity, and every item completed at most once. Returns completions per work id."""
    holder: dict[str, str] = {}
    load: dict[str, set[str]] = {}
    completions: dict[str, int] = {}
    for ev in events:
        if ev.type == "work.assigned":
            assert ev.entity_id not in holder, f"{ev.entity_id} assigned while held by {holder[ev.entity_id]}"
            guid = ev.data["agentGuid"]
            holder[ev.entity_id] = guid
            load.setdefault(guid, set()).add(ev.entity_id)
            if capacity is not None:
                assert len(load[guid]) <= capacity.get(guid, 1), f"{guid} above capacity"
        elif ev.type in ("work.completed", "work.requeued", "work.failed", "work.cancelled", "work.dead_lettered"):
            guid = holder.pop(ev.entity_id, None)
            if guid is not None:
                load[guid].discard(ev.entity_id)
            if ev.type == "work.completed":
                completions[ev.entity_id] = completions.get(ev.entity_id, 0) + 1
    assert all(n == 1 for n in completions.values()), "an item completed twice"
    return completions


async def state_reaches(view: Any, predicate: Any, timeout: float = 20.0) -> None:
    """Wait, bounded, until `predicate(view.state)` holds: checked now and after every folded event."""
    reached = asyncio.Event()

    def check(_ev: Any = None, state: Any = None) -> None:
        if predicate(view.state):
            reached.set()

    check()
    view.listeners.append(check)
    try:
        await asyncio.wait_for(reached.wait(), timeout)
    finally:
        view.listeners.remove(check)


async def until(api: Api, check: Any, timeout: float = 60.0) -> Any:
    """Await a condition on the projection of the api's project, waking on each folded event (no
    sleeps); returns the condition's first truthy value."""
    assert api.service is not None and api.service.readmodel is not None
    view = await api.service.readmodel.view(api.project, create=True)
    assert view is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check(view.state)
        if result:
            return result
        remaining = deadline - loop.time()
        assert remaining > 0, "condition not reached in time"
        await view.wait_for(view.state.seq + 1, min(remaining, 1.0))
