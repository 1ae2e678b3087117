"""Drop-in compatibility with Loominal's clients (the Shuttle CLI, Loominal's black-box scenarios),
through real HTTP against a real nats-server; Warp agents are real `agent-registry` KV entries.

One section per difference the compatibility issue lists (README, "Compatibility with Loominal"):
1 manual spin-up answer, 2 idempotent cancel, 3 lazily read channels, 4 Warp entries' limits and
visibility, 5 flat stats, 6 targets as registered, 7 the submit answer's agent type.
Syncing is by KV revision, by the projection's sequence or by a NATS message, never by sleeping.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nats.aio.client import Client as NATS
from nats.js import api as js_api
from nats.js.kv import KeyValue

from projections.events import format_ts
from tests.support import Api, FakeAgent, make_client
from weft.runtime.warp_bridge import WarpBridge, open_registry
from weft.service import WeftService
from weft.store.eventstore import EventStore

TIMEOUT = 10.0


# --- helpers -------------------------------------------------------------------------------------


async def events_of(store: EventStore, project: str, entity_id: str | None = None) -> list[Any]:
    return [ev async for ev in store.read_range(project) if entity_id is None or ev.entity_id == entity_id]


def bridge_of(service: WeftService) -> WarpBridge:
    assert service.warp is not None
    return service.warp


@pytest.fixture
async def registry(weft_service: WeftService) -> KeyValue:
    bridge = bridge_of(weft_service)
    assert await bridge.wait_ready(TIMEOUT)
    return await open_registry(bridge.js)


def warp_entry(project: str, **over: Any) -> dict[str, Any]:
    """A Warp v1 RegistryEntry as Warp writes it (scope team, no boundaries), fresh."""
    now = format_ts(datetime.now(UTC))
    entry: dict[str, Any] = {
        "guid": uuid.uuid4().hex, "agentType": "developer", "handle": "dev", "hostname": "laptop",
        "projectId": project, "natsUrl": "nats://127.0.0.1:4222", "username": "ada",
        "capabilities": ["python"], "scope": "team", "status": "online", "currentTaskCount": 0,
        "registeredAt": now, "lastHeartbeat": now,
    }
    entry.update(over)
    return entry


async def put(kv: KeyValue, service: WeftService, entry: dict[str, Any]) -> None:
    rev = await kv.put(entry["guid"], orjson.dumps(entry))
    assert await bridge_of(service).wait_processed(rev, TIMEOUT), f"bridge did not handle revision {rev}"


async def listed(api: Api, project: str | None = None) -> dict[str, dict[str, Any]]:
    path = "/api/agents?limit=100" + (f"&projectId={project or api.project}")
    body = await api.ok("GET", path)
    return {a["guid"]: a for a in body["agents"]}


async def next_offer(queue: Any, work_id: str) -> dict[str, Any]:
    """The next offer of `work_id` on a Warp queue subscription (skipping re-pushes of others)."""
    while True:
        offer: dict[str, Any] = orjson.loads((await queue.next_msg(timeout=TIMEOUT)).data)
        if offer["id"] == work_id:
            return offer


async def waiting_reason(api: Api, work_id: str) -> str:
    got = await api.ok("GET", f"/api/work/{work_id}")
    assert got["status"] == "pending", got
    reason: str = got["waitingReason"]
    return reason


# --- 1. manual spin-up answer ----------------------------------------------------------------------


class HoldingHook:
    """A webhook receiver that holds every spin-up call until released, so spin-ups stay in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.called = asyncio.Event()
        self.calls = 0
        app = web.Application()
        app.router.add_post("/spawn", self._spawn)
        self.server = TestServer(app, host="127.0.0.1")

    async def _spawn(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.called.set()
        await self.release.wait()
        return web.json_response({"accepted": True}, status=202)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/spawn"))


@pytest.fixture
async def hook() -> AsyncIterator[HoldingHook]:
    h = HoldingHook()
    await h.server.start_server()
    yield h
    h.release.set()
    await h.server.close()


def hook_target(hook: HoldingHook, name: str = "hook", **extra: Any) -> dict[str, Any]:
    return {"name": name, "agentType": "claude-code", "mechanism": "webhook", "capabilities": ["python"],
            "config": {"url": hook.url}, "healthCheck": {"enabled": False}, "spinUpTimeoutMs": 30000, **extra}


async def test_manual_spin_up_answers_200_with_a_spin_up_result(api: Api, hook: HoldingHook) -> None:
    await api.ok("POST", "/api/targets", hook_target(hook), status=201)
    res = await api.ok("POST", "/api/targets/hook/spin-up", {})
    assert res["success"] is True and res["triggered"] is True and res["status"] == "in-progress"
    assert res["operationId"] == res["spinUpId"] and res["targetName"] == "hook" and res["seq"] >= 1
    assert res["targetId"] and res["timestamp"]
    t = await api.ok("GET", f"/api/targets/hook?min_seq={res['seq']}")
    assert [op["spinUpId"] for op in t["activeSpinUps"]] == [res["operationId"]]
    await asyncio.wait_for(hook.called.wait(), TIMEOUT)  # weft really launches it
    # A refused spin-up keeps its 4xx.
    assert (await api.call("POST", "/api/targets/nope/spin-up")).status == 404
    await api.ok("POST", "/api/targets/hook/disable")
    refused = await api.call("POST", "/api/targets/hook/spin-up")
    assert refused.status == 409 and (await refused.json())["error"] == "Conflict"


async def test_repeated_manual_spin_ups_on_a_busy_target_are_never_5xx(
    api: Api, hook: HoldingHook, store: EventStore
) -> None:
    await api.ok("POST", "/api/targets", hook_target(hook, maxConcurrentAgents=2), status=201)
    responses = await asyncio.gather(*(api.call("POST", "/api/targets/hook/spin-up") for _ in range(8)))
    statuses = sorted(r.status for r in responses)
    assert set(statuses) <= {200, 409, 429}, statuses
    assert statuses.count(200) == 2, statuses  # the launches are held: two in flight fill the target
    bodies = [await r.json() for r in responses if r.status != 200]
    assert all(b["details"]["field"] == "id" for b in bodies)
    requested = [ev for ev in await events_of(store, api.project) if ev.type == "spinup.requested"]
    assert len(requested) == 2
    again = await api.call("POST", "/api/targets/hook/spin-up")
    assert again.status == 409 and "limit of 2" in (await again.json())["message"]


# --- 2. cancel is idempotent -----------------------------------------------------------------------


async def test_cancel_is_idempotent_but_a_finished_item_stays_409(api: Api, nc: NATS, store: EventStore) -> None:
    work = {"capability": f"c{api.project}", "boundary": "personal", "description": "d"}
    item = await api.ok("POST", "/api/work", work, status=201)
    first = await api.ok("POST", f"/api/work/{item['id']}/cancel", {"reason": "not needed"})
    assert first["success"] is True and first["alreadyCancelled"] is False
    assert first["workItem"]["status"] == "cancelled" and first["workItem"]["id"] == item["id"]
    before = await events_of(store, api.project, item["id"])
    again = await api.ok("POST", f"/api/work/{item['id']}/cancel")
    assert again["success"] is True and again["alreadyCancelled"] is True
    assert again["workItem"]["status"] == "cancelled" and again["workItem"]["cancelReason"] == "not needed"
    assert await events_of(store, api.project, item["id"]) == before  # no new event

    agent = FakeAgent(nc, api.project, "finisher", capabilities=(work["capability"],), max_tasks=2)
    await agent.start()
    try:
        done = await api.ok("POST", "/api/work", work, status=201)
        failed = await api.ok("POST", "/api/work", work, status=201)
        for _ in range(2):
            await agent.next_push("assignment")
        assert (await agent.request("work.accept", {"workId": done["id"]}))["ok"]
        assert (await agent.request("work.complete", {"workId": done["id"], "summary": "ok"}))["ok"]
        assert (await agent.request("work.accept", {"workId": failed["id"]}))["ok"]
        last = await agent.request("work.fail", {"workId": failed["id"], "message": "no", "recoverable": False})
        assert last["ok"]
        await api.ok("GET", f"/api/work/{failed['id']}?min_seq={last['seq']}")
        for wid, status in ((done["id"], "completed"), (failed["id"], "failed")):
            before = await events_of(store, api.project, wid)
            resp = await api.call("POST", f"/api/work/{wid}/cancel")
            body = await resp.json()
            assert resp.status == 409 and body["error"] == "Conflict" and status in body["message"]
            assert await events_of(store, api.project, wid) == before
    finally:
        await agent.close()


# --- 3. Warp channels read lazily ------------------------------------------------------------------


async def test_unused_channel_reads_empty_and_an_invalid_name_is_404(api: Api, nc: NATS) -> None:
    empty = await api.ok("GET", f"/api/channels/never-used/messages?projectId={api.project}")
    assert empty == {"channel": "never-used", "messages": [], "count": 0, "projectId": api.project}
    js = nc.jetstream()
    assert f"{api.project}_NEVER_USED" not in [s.config.name for s in await js.streams_info()]  # nothing created
    bad = await api.call("GET", f"/api/channels/no.dots/messages?projectId={api.project}")
    assert bad.status == 404 and (await bad.json())["details"]["field"] == "name"
    # Once Warp wrote to it (its stream, its message shape), the messages read back.
    stream = f"{api.project}_ROADMAP"
    await js.add_stream(js_api.StreamConfig(name=stream, subjects=[f"{api.project}.roadmap"], max_msgs=10000))
    try:
        msg = {"handle": "dev", "message": "ship it", "timestamp": format_ts(datetime.now(UTC))}
        await js.publish(f"{api.project}.roadmap", orjson.dumps(msg))
        got = await api.ok("GET", f"/api/channels/roadmap/messages?projectId={api.project}")
        assert got["count"] == 1 and got["messages"][0]["message"] == "ship it"
    finally:
        await js.delete_stream(stream)


# --- 4. Warp registry entries keep their limits and visibility -------------------------------------


async def test_warp_entry_limits_are_read_from_the_entry(api: Api, registry: KeyValue, weft_service: WeftService) -> None:
    p = api.project
    meta = warp_entry(p, metadata={"agentType": "copilot-cli", "boundaries": ["corporate", "*"]},
                      maxConcurrentTasks=3, currentTaskCount=1, spindownAfterIdleMs=60000)
    top = warp_entry(p, boundaries=["open-source"], agentType="reviewer")
    sparse: dict[str, Any] = {"guid": uuid.uuid4().hex, "capabilities": ["go"], "projectId": p}
    for e in (meta, top, sparse):
        await put(registry, weft_service, e)
    agents = await listed(api)
    m = agents[meta["guid"]]
    assert m["agentType"] == "copilot-cli" and m["boundaries"] == ["corporate"]  # a literal "*" is no wildcard
    assert m["maxConcurrentTasks"] == 3 and m["spindownAfterIdleMs"] == 60000
    assert m["labels"]["warpCurrentTaskCount"] == "1"
    t = agents[top["guid"]]
    assert t["agentType"] == "reviewer" and t["boundaries"] == ["open-source"] and t["maxConcurrentTasks"] == 1
    s = agents[sparse["guid"]]
    assert s["boundaries"] == ["default"] and s["agentType"] == "warp" and s["maxConcurrentTasks"] == 1
    assert s["spindownAfterIdleMs"] is None and s["visibility"] == "project-only"


async def test_routing_honours_warp_boundaries_policy_and_reported_load(
    api: Api, registry: KeyValue, weft_service: WeftService, nc: NATS
) -> None:
    p = api.project
    cap = f"w{p}"  # the Warp queues are global: a capability of this test's own
    sparse = warp_entry(p, capabilities=[cap])  # no boundaries: ["default"]
    claude = warp_entry(p, capabilities=[cap], metadata={"agentType": "claude-code", "boundaries": ["corporate"]})
    for e in (sparse, claude):
        await put(registry, weft_service, e)
    personal = await api.ok("POST", "/api/work", {"capability": cap, "boundary": "personal", "description": "x"},
                            status=201)
    assert await waiting_reason(api, personal["id"]) == "no agent accepts boundary personal"
    corporate = await api.ok("POST", "/api/work", {"capability": cap, "boundary": "corporate", "description": "x"},
                             status=201)
    assert await waiting_reason(api, corporate["id"]) == "boundary corporate allows only copilot-cli"
    # The boundary the sparse entry got is served.
    queue = await nc.subscribe(f"global.workqueue.{cap}")
    default = await api.ok("POST", "/api/work", {"capability": cap, "boundary": "default", "description": "x"},
                           status=201)
    offer = await next_offer(queue, default["id"])
    assert offer["assignedTo"] == sparse["guid"]
    # A copilot-cli entry that reports itself full takes no corporate work until it reports room.
    copilot = warp_entry(p, capabilities=[cap], maxConcurrentTasks=2, currentTaskCount=2,
                         metadata={"agentType": "copilot-cli", "boundaries": ["corporate"]})
    await put(registry, weft_service, copilot)
    assert await waiting_reason(api, corporate["id"]) == "all eligible agents busy"
    await put(registry, weft_service, {**copilot, "currentTaskCount": 1})
    offer = await next_offer(queue, corporate["id"])
    assert offer["assignedTo"] == copilot["guid"]
    await queue.unsubscribe()
    for wid in (personal["id"], corporate["id"], default["id"]):
        await api.ok("POST", f"/api/work/{wid}/cancel")


async def test_warp_visibility_in_listing_lookup_and_routing(
    api: Api, registry: KeyValue, weft_service: WeftService, nc: NATS
) -> None:
    p = api.project
    foreign = p + "x"
    cap = f"v{p}"
    private = warp_entry(p, capabilities=[cap + "-private"], scope="private")
    user_only = warp_entry(p, capabilities=[cap + "-user"], visibility="user-only")
    personal = warp_entry(p, capabilities=[cap + "-user"], scope="personal")  # Warp's name for user-only
    team = warp_entry(p, capabilities=[cap + "-team"], metadata={"boundaries": ["personal"]})
    foreign_team = warp_entry(foreign, capabilities=[cap + "-foreign"], metadata={"boundaries": ["personal"]})
    beat = format_ts(datetime.now(UTC) - timedelta(seconds=42))
    public = warp_entry(foreign, capabilities=[cap + "-public"], scope="public", lastHeartbeat=beat,
                        metadata={"boundaries": ["personal"]})
    for e in (private, user_only, personal, team, foreign_team, public):
        await put(registry, weft_service, e)

    mine = await listed(api)
    assert team["guid"] in mine and public["guid"] in mine  # own project-only, and every public one
    for hidden in (private, user_only, personal, foreign_team):
        assert hidden["guid"] not in mine
        assert (await api.call("GET", f"/api/agents/{hidden['guid']}?projectId={p}")).status == 404
    assert mine[public["guid"]]["projectId"] == foreign
    assert mine[public["guid"]]["lastHeartbeat"] == beat  # the entry's own, not weft's time of reading
    # Public: fetchable from any project, with its real lastHeartbeat; listed from a third one too.
    for project in (p, foreign, p + "y"):
        got = await api.ok("GET", f"/api/agents/{public['guid']}?projectId={project}")
        assert got["guid"] == public["guid"] and got["lastHeartbeat"] == beat
    assert public["guid"] in await listed(api, p + "y")
    # The foreign project sees its own project-only agent; nobody sees private or user-only ones.
    theirs = await listed(api, foreign)
    assert foreign_team["guid"] in theirs and team["guid"] not in theirs
    unnamed = await api.client.get("/api/agents", params={"limit": "100"})  # no project: every project
    everywhere = {a["guid"] for a in (await unnamed.json())["agents"]}
    assert not {private["guid"], user_only["guid"], personal["guid"]} & everywhere
    assert {team["guid"], foreign_team["guid"], public["guid"]} <= everywhere
    # Seeing another project's public agent does not make it this project's to stop.
    stop = await api.call("POST", f"/api/agents/{public['guid']}/shutdown?projectId={p}", {"graceful": True})
    assert stop.status == 404
    # Stats count only what the project may see.
    stats = await api.ok("GET", f"/api/stats?projectId={p}")
    assert stats["byProject"][p]["agents"] == 1  # team

    # Routing: the visible project-only agent takes work; private, user-only and other projects'
    # agents take none from this project.
    queue = await nc.subscribe(f"global.workqueue.{cap}-team")
    served = await api.ok("POST", "/api/work", {"capability": cap + "-team", "boundary": "personal",
                                                "description": "x"}, status=201)
    offer = await next_offer(queue, served["id"])
    assert offer["assignedTo"] == team["guid"]
    await queue.unsubscribe()
    for suffix in ("-private", "-user", "-foreign", "-public"):
        item = await api.ok("POST", "/api/work", {"capability": cap + suffix, "boundary": "personal",
                                                  "description": "x"}, status=201)
        assert await waiting_reason(api, item["id"]) == f"no agent with capability {cap}{suffix}"
        await api.ok("POST", f"/api/work/{item['id']}/cancel")
    await api.ok("POST", f"/api/work/{served['id']}/cancel")


# --- 5. stats for both generations of clients -----------------------------------------------------


async def test_stats_carry_the_flat_fields_of_the_requests_project(api: Api, weft_service: WeftService) -> None:
    work = {"capability": f"s{api.project}", "boundary": "personal", "description": "d"}
    await api.ok("POST", "/api/work", work, status=201)
    item = await api.ok("POST", "/api/work", work, status=201)
    await api.ok("POST", f"/api/work/{item['id']}/cancel")
    stats = await api.ok("GET", "/api/stats")  # the project comes in X-Weft-Project
    assert set(stats) >= {"timestamp", "totalProjects", "totals", "byProject"}
    assert stats["byProject"][api.project]["pendingWork"] == 1
    assert (stats["projectId"], stats["pending"], stats["active"], stats["completed"], stats["failed"],
            stats["total"]) == (api.project, 1, 0, 0, 1, 2)
    # A request that names no project gets the default project's flat counts beside every project.
    client = await make_client(weft_service)
    try:
        resp = await client.get("/api/stats")
        body = await resp.json()
        assert resp.status == 200 and body["projectId"] == weft_service.settings.default_project
        assert all(isinstance(body[k], int) for k in ("pending", "active", "completed", "failed", "total"))
        assert api.project in body["byProject"]
    finally:
        await client.close()


# --- 6. targets as registered ----------------------------------------------------------------------


SHUTTLE_TARGETS = [  # what `shuttle targets add` sends (no Kubernetes case)
    ("box", "ssh", {"mechanism": "ssh", "host": "127.0.0.1", "user": "root", "command": "weft agent"}),
    ("gh", "github-actions", {"repo": "acme/agents", "workflowFile": "agent.yml"}),
    ("hook", "webhook", {"url": "http://127.0.0.1:9/hook"}),
    ("here", "local", {"command": "weft agent"}),
]


async def test_targets_answer_config_as_registered(api: Api, store: EventStore) -> None:
    for name, mechanism, config in SHUTTLE_TARGETS:
        body = {"name": name, "agentType": "claude-code", "mechanism": mechanism, "capabilities": ["python"],
                "config": config, "healthCheck": {"enabled": False}}
        created = await api.ok("POST", "/api/targets", body, status=201)
        assert created["config"] == config
        got = await api.ok("GET", f"/api/targets/{name}")
        assert got["config"] == config, name
        assert all(not isinstance(v, dict | list) for v in got["config"].values())  # no [object Object]
        key = {"github-actions": "githubActions"}.get(mechanism, mechanism)
        assert got["normalizedConfig"]["mechanism"] == mechanism and key in got["normalizedConfig"]
        listed_one = next(t for t in (await api.ok("GET", "/api/targets"))["targets"] if t["name"] == name)
        assert listed_one["config"] == config
    gh = await api.ok("GET", "/api/targets/gh")
    assert gh["normalizedConfig"]["githubActions"]["workflow"] == "agent.yml"
    # The original's nested shape comes back nested.
    nested = {"mechanism": "local", "local": {"command": "weft agent", "args": ["--x"]}}
    await api.ok("POST", "/api/targets", {"name": "nested", "agentType": "claude-code", "mechanism": "local",
                                          "capabilities": ["python"], "config": nested,
                                          "healthCheck": {"enabled": False}}, status=201)
    assert (await api.ok("GET", "/api/targets/nested"))["config"] == nested
    # An update keeps the shape it was registered in.
    await api.ok("PUT", "/api/targets/here", {"config": {"command": "weft agent --max-tasks 2"}})
    here = await api.ok("GET", "/api/targets/here")
    assert here["config"] == {"command": "weft agent --max-tasks 2"}
    assert here["normalizedConfig"]["local"]["command"] == "weft agent --max-tasks 2"
    await api.ok("PUT", "/api/targets/nested", {"config": {"args": ["--y"]}})
    assert (await api.ok("GET", "/api/targets/nested"))["config"] == {"mechanism": "local",
                                                                      "local": {"command": "weft agent", "args": ["--y"]}}


async def test_kubernetes_target_without_namespace_gets_default(api: Api) -> None:
    body = {"name": "k8s", "agentType": "claude-code", "mechanism": "kubernetes", "capabilities": ["python"],
            "config": {"image": "ghcr.io/acme/agent:1"}, "healthCheck": {"enabled": False}}
    t = await api.ok("POST", "/api/targets", body, status=201)
    assert t["config"] == {"image": "ghcr.io/acme/agent:1"}
    assert t["normalizedConfig"]["kubernetes"]["namespace"] == "default"
    no_image = await api.call("POST", "/api/targets", {**body, "name": "k8s2", "config": {}})
    assert no_image.status == 400 and (await no_image.json())["details"]["field"] == "config.kubernetes.image"


async def test_config_as_registered_never_echoes_a_secret(api: Api, store: EventStore) -> None:
    secret = "hunter2-literal-token"
    bad = [
        {"url": "http://127.0.0.1:9/hook", "headers": {"Authorization": f"Bearer {secret}"}},
        {"url": "http://127.0.0.1:9/hook", "apiToken": secret},
    ]
    for config in bad:
        resp = await api.call("POST", "/api/targets", {"name": "hook", "agentType": "x", "mechanism": "webhook",
                                                       "capabilities": ["python"], "config": config})
        err = await resp.json()
        assert resp.status == 400 and err["details"]["field"].startswith("config.") and secret not in str(err)
    assert await store.last_seq(api.project) == 0  # bad input appends nothing
    ok = {"url": "http://127.0.0.1:9/hook", "headers": {"Authorization": "env:HOOK_TOKEN"}}
    await api.ok("POST", "/api/targets", {"name": "hook", "agentType": "x", "mechanism": "webhook",
                                          "capabilities": ["python"], "config": ok,
                                          "healthCheck": {"enabled": False}}, status=201)
    assert (await api.ok("GET", "/api/targets/hook"))["config"] == ok  # a reference, never a value


# --- 7. the submit answer's agent type -------------------------------------------------------------


async def test_submit_reports_the_agent_type_the_original_would(api: Api, nc: NATS) -> None:
    async def reported(boundary: str, capability: str = "general", **extra: Any) -> Any:
        body = {"capability": capability, "boundary": boundary, "description": "d", **extra}
        item = await api.ok("POST", "/api/work", body, status=201)
        await api.ok("POST", f"/api/work/{item['id']}/cancel")
        return item["targetAgentType"]

    # No agent at all: the boundary's preferred type, else claude-code (never null).
    assert await reported("open-source") == "claude-code"
    assert await reported("team-x") == "claude-code"
    assert await reported("corporate") == "copilot-cli"
    assert await reported("personal") == "claude-code"
    assert await reported("open-source", requiredAgentType="copilot-cli") == "copilot-cli"
    # The first available type, else the preferred, else the fallback.
    cap = f"t{api.project}"
    copilot = FakeAgent(nc, api.project, "copilot-1", agent_type="copilot-cli", capabilities=(cap,), max_tasks=50)
    await copilot.start()
    try:
        assert await reported("open-source", cap) == "copilot-cli"
        assert await reported("personal", cap) == "copilot-cli"  # claude-code preferred, but none is there
        claude = FakeAgent(nc, api.project, "claude-1", agent_type="claude-code", capabilities=(cap,), max_tasks=50)
        await claude.start()
        try:
            assert await reported("personal", cap) == "claude-code"
            assert await reported("corporate-adjacent", cap) == "copilot-cli"
            assert await reported("open-source", cap) == "copilot-cli"  # first registered
            assert await reported("personal", cap, preferredAgentType="copilot-cli") == "copilot-cli"
            assert await reported("personal", cap, requiredAgentType="claude-code") == "claude-code"
        finally:
            await claude.close()
    finally:
        await copilot.close()
