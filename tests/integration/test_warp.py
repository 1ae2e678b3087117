"""The Warp bridge against a real nats-server: registry import from `agent-registry`, work offers on
Warp's `global.workqueue.<cap>` queues, completion over REST.

Warp's KV bucket is global (one for all projects), so every test puts entries whose `projectId` is
its own project and only looks at that project. Syncing is by KV revision (`wait_processed`) and by
the projection's sequence, never by sleeping.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.kv import KeyValue

from projections.events import format_ts
from tests.support import Api
from weft.runtime.warp_bridge import (
    WarpBridge,
    declaration,
    open_registry,
    parse_entry,
    project_for,
    workqueue_stream,
    workqueue_subject,
)
from weft.service import WeftService
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

TIMEOUT = 10.0


def warp_entry(project: str | None, guid: str | None = None, **over: Any) -> dict[str, Any]:
    """A full Warp RegistryEntry, fresh."""
    now = format_ts(datetime.now(UTC))
    entry: dict[str, Any] = {
        "guid": guid or uuid.uuid4().hex,  # Warp ids: 32 hex characters
        "agentType": "developer",
        "handle": "dev-1",
        "hostname": "laptop",
        "projectId": project,
        "natsUrl": "nats://127.0.0.1:4222",
        "username": "ada",
        "capabilities": ["python", "typescript"],
        "scope": "team",
        "status": "online",
        "currentTaskCount": 0,
        "registeredAt": now,
        "lastHeartbeat": now,
    }
    entry.update(over)
    return entry


def bridge_of(service: WeftService) -> WarpBridge:
    assert service.warp is not None
    return service.warp


async def put(kv: KeyValue, bridge: WarpBridge, key: str, value: Any) -> int:
    """Put a value (dicts as JSON) and wait until the bridge handled that revision."""
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    rev = await kv.put(key, raw, validate_keys=False)
    assert await bridge.wait_processed(rev, TIMEOUT), f"bridge did not handle revision {rev}"
    return rev


@pytest.fixture
async def registry(weft_service: WeftService) -> KeyValue:
    bridge = bridge_of(weft_service)
    assert await bridge.wait_ready(TIMEOUT)
    return await open_registry(bridge.js)


async def agents_of(api: Api) -> dict[str, dict[str, Any]]:
    """The project's own agents (its listing also shows other projects' public ones)."""
    body = await api.ok("GET", f"/api/agents?projectId={api.project}")
    return {a["guid"]: a for a in body["agents"] if a["projectId"] == api.project}


async def count_events(store: EventStore, project: str) -> int:
    """The project's agent events (the scheduler's own `leader.elected` comes and goes on its own time)."""
    return len([ev async for ev in store.read_range(project) if ev.type.startswith("agent.")])


# --- pure mapping ------------------------------------------------------------------------------


def test_entry_maps_to_a_warp_declaration() -> None:
    entry = parse_entry("g1", orjson.dumps(warp_entry("abcdef0123456789", guid="g1", scope="personal")))
    assert entry is not None
    decl = declaration(entry)
    assert decl["source"] == "warp" and decl["boundaries"] == ["default"] and decl["maxConcurrentTasks"] == 1
    assert decl["agentType"] == "developer" and decl["visibility"] == "user-only"
    assert decl["labels"] == {"warpProjectId": "abcdef0123456789", "warpCurrentTaskCount": "0"}
    assert project_for(entry, "default") == "abcdef0123456789"
    assert project_for(entry, "default", {"abcdef0123456789": "web"}) == "web"
    odd = parse_entry("g2", orjson.dumps(warp_entry("not a weft id!", guid="g2", visibility="public")))
    assert odd is not None and project_for(odd, "default") == "default" and odd.visibility == "public"


@pytest.mark.parametrize(
    "key,value",
    [
        ("g", b"not json"),
        ("g", b"[1, 2]"),
        ("g", b'"a string"'),
        ("g", b"{}"),
        ("g", b""),
        ("g", orjson.dumps({"guid": "g", "projectId": "p"})),  # no capabilities
        ("g", orjson.dumps({"guid": "g", "capabilities": "python"})),  # not a list
        ("g", orjson.dumps({"guid": "g", "capabilities": [1, None]})),  # not strings
        ("g", orjson.dumps({"guid": "other", "capabilities": ["python"]})),  # guid is not its key
        ("a.b", orjson.dumps({"guid": "a.b", "capabilities": ["python"]})),  # not a weft guid
        ("g", orjson.dumps({"guid": 7, "capabilities": ["python"]})),
    ],
)
def test_garbage_does_not_parse(key: str, value: bytes) -> None:
    assert parse_entry(key, value) is None


def test_queue_names_follow_warp() -> None:
    assert workqueue_stream("node.js") == "WORKQUEUE_NODE_JS"
    assert workqueue_subject("node.js") == "global.workqueue.node.js"  # Warp uses the capability verbatim
    assert workqueue_subject("python") == "global.workqueue.python"
    for bad in ("a b", "a*", "a>", "a..b", ".a", "a.", ""):
        assert workqueue_subject(bad) is None


# --- registry import ---------------------------------------------------------------------------


async def test_warp_entry_appears_as_warp_agent(api: Api, registry: KeyValue, weft_service: WeftService) -> None:
    entry = warp_entry(api.project)
    await put(registry, bridge_of(weft_service), entry["guid"], entry)
    agents = await agents_of(api)
    got = agents[entry["guid"]]
    assert got["source"] == "warp" and got["agentType"] == "developer" and got["status"] == "online"
    assert got["boundaries"] == ["default"] and got["maxConcurrentTasks"] == 1
    assert got["capabilities"] == ["python", "typescript"] and got["visibility"] == "project-only"
    assert (got["handle"], got["hostname"], got["username"]) == ("dev-1", "laptop", "ada")
    one = await api.ok("GET", f"/api/agents/{entry['guid']}")
    assert one["guid"] == entry["guid"]
    typed = await api.ok("GET", f"/api/agents?projectId={api.project}&type=developer")
    assert [a["guid"] for a in typed["agents"] if a["projectId"] == api.project] == [entry["guid"]]


async def test_sparse_garbage_foreign_and_deleted_entries(
    api: Api, registry: KeyValue, weft_service: WeftService
) -> None:
    bridge = bridge_of(weft_service)
    p = api.project
    sparse = {"guid": uuid.uuid4().hex, "capabilities": ["go"], "projectId": p}  # no type, scope, status...
    odd_type = warp_entry(p, agentType="🦜 reviewer", visibility="public")
    deleted = warp_entry(p)
    purged = warp_entry(p)
    for e in (sparse, odd_type, deleted, purged):
        await put(registry, bridge, e["guid"], e)
    garbage_key = uuid.uuid4().hex
    await put(registry, bridge, garbage_key, b"not json at all")
    await put(registry, bridge, uuid.uuid4().hex, b"[1, 2, 3]")
    await put(registry, bridge, uuid.uuid4().hex, {"guid": "someone-else", "capabilities": ["go"], "projectId": p})
    no_caps = uuid.uuid4().hex
    await put(registry, bridge, no_caps, {"guid": no_caps, "projectId": p, "agentType": "developer"})
    await put(registry, bridge, f"foreign.tool.{uuid.uuid4().hex[:8]}", {"setting": True, "projectId": p})
    rev = await registry.delete(deleted["guid"])
    assert await bridge.wait_processed(rev, TIMEOUT)
    await registry.purge(purged["guid"])
    last = await registry.put(garbage_key, b"\xff\xfe not utf-8")  # a later revision: both markers handled
    assert await bridge.wait_processed(last, TIMEOUT)

    agents = await agents_of(api)
    assert set(agents) == {sparse["guid"], odd_type["guid"], deleted["guid"], purged["guid"]}
    s = agents[sparse["guid"]]
    assert s["agentType"] == "warp" and s["visibility"] == "project-only" and s["status"] == "online"
    assert s["spindownAfterIdleMs"] is None and s["capabilities"] == ["go"]
    assert agents[odd_type["guid"]]["agentType"] == "🦜 reviewer" and agents[odd_type["guid"]]["visibility"] == "public"
    for gone in (deleted, purged):
        assert agents[gone["guid"]]["status"] == "offline"
        assert agents[gone["guid"]]["offlineReason"] == "warp: registry entry deleted"
    # The odd type must not break routing or listing (no 500), and the watcher is still alive.
    item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal", "description": "x"},
                        status=201)
    await api.ok("POST", f"/api/work/{item['id']}/cancel", {})  # nobody here will ever accept it
    late = warp_entry(p)
    await put(registry, bridge, late["guid"], late)
    assert late["guid"] in await agents_of(api)


async def test_entry_without_valid_project_goes_to_default_project(
    registry: KeyValue, weft_service: WeftService
) -> None:
    bridge = bridge_of(weft_service)
    entry = warp_entry("not a weft id!")
    await put(registry, bridge, entry["guid"], entry)
    assert weft_service.readmodel is not None
    view = weft_service.readmodel.views[weft_service.settings.default_project]
    assert view.state.agents[entry["guid"]]["labels"]["warpProjectId"] == "not a weft id!"


async def test_heartbeat_only_update_appends_no_event(
    api: Api, registry: KeyValue, weft_service: WeftService, store: EventStore
) -> None:
    bridge = bridge_of(weft_service)
    assert weft_service.liveness is not None
    entry = warp_entry(api.project)
    await put(registry, bridge, entry["guid"], entry)
    before = await count_events(store, api.project)
    beat_before = weft_service.liveness.seen[(api.project, entry["guid"])]
    later = format_ts(datetime.now(UTC))
    await put(registry, bridge, entry["guid"], {**entry, "lastHeartbeat": later, "status": "busy"})
    assert await count_events(store, api.project) == before
    assert weft_service.liveness.seen[(api.project, entry["guid"])] > beat_before
    # A capability change is something weft cares about: one new registration.
    await put(registry, bridge, entry["guid"], {**entry, "capabilities": ["python", "rust"]})
    assert await count_events(store, api.project) == before + 1
    assert (await agents_of(api))[entry["guid"]]["capabilities"] == ["python", "rust"]
    # So is the task count the entry reports (routing counts it as load): one more.
    await put(registry, bridge, entry["guid"], {**entry, "capabilities": ["python", "rust"], "currentTaskCount": 1})
    assert await count_events(store, api.project) == before + 2


async def test_offline_status_then_online_again(api: Api, registry: KeyValue, weft_service: WeftService) -> None:
    bridge = bridge_of(weft_service)
    entry = warp_entry(api.project)
    await put(registry, bridge, entry["guid"], entry)
    await put(registry, bridge, entry["guid"], {**entry, "status": "offline"})
    got = (await agents_of(api))[entry["guid"]]
    assert got["status"] == "offline" and got["offlineReason"] == "warp: offline"
    await put(registry, bridge, entry["guid"], {**entry, "status": "online"})
    assert (await agents_of(api))[entry["guid"]]["status"] == "online"


async def test_stale_entry_is_not_imported(api: Api, registry: KeyValue, weft_service: WeftService) -> None:
    bridge = bridge_of(weft_service)
    entry = warp_entry(api.project)
    old, bridge.stale_after_s = bridge.stale_after_s, -1.0  # every put counts as too old
    try:
        await put(registry, bridge, entry["guid"], entry)
    finally:
        bridge.stale_after_s = old
    assert await agents_of(api) == {}


# --- the watcher itself (a bridge of the test's own on a bucket of its own) ----------------------


@pytest.fixture
async def own_bridge(
    nats_server: EmbeddedNats, weft_service: WeftService
) -> AsyncIterator[tuple[WarpBridge, NATS, str]]:
    nc = await nats.connect(nats_server.url)
    assert weft_service.commands and weft_service.readmodel and weft_service.liveness
    bucket = f"warp-test-{uuid.uuid4().hex[:10]}"
    bridge = WarpBridge(
        nc, weft_service.commands, weft_service.readmodel, weft_service.liveness,
        default_project=weft_service.settings.default_project, bucket=bucket, check_interval_s=0.2,
    )
    yield bridge, nc, bucket
    await bridge.stop()
    try:
        await nc.jetstream().delete_stream(f"KV_{bucket}")
    finally:
        await nc.close()


async def test_empty_bucket_does_not_hang_startup(own_bridge: tuple[WarpBridge, NATS, str], project: str) -> None:
    bridge, nc, bucket = own_bridge
    await asyncio.wait_for(bridge.start(), 1)
    assert await bridge.wait_ready(5), "initial-values phase never ended on an empty bucket"
    info = await nc.jetstream().stream_info(f"KV_{bucket}")
    assert info.config.max_msgs_per_subject == 1  # created with history 1
    kv = await open_registry(nc.jetstream(), bucket)
    entry = warp_entry(project)
    await put(kv, bridge, entry["guid"], entry)
    assert entry["guid"] in bridge.readmodel.views[project].state.agents


async def test_warp_created_bucket_with_unlimited_history_is_read(
    own_bridge: tuple[WarpBridge, NATS, str], project: str
) -> None:
    """Warp creates the stream itself without a history limit, which nats-py's key_value() refuses."""
    bridge, nc, bucket = own_bridge
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], storage=api.StorageType.FILE, max_age=24 * 3600,
        allow_rollup_hdrs=True, deny_delete=True, deny_purge=False, allow_direct=True,
        discard=api.DiscardPolicy.OLD,
    ))
    entry = warp_entry(project)
    kv = await open_registry(js, bucket)
    rev = await kv.put(entry["guid"], orjson.dumps(entry))
    await bridge.start()
    assert await bridge.wait_ready(5) and await bridge.wait_processed(rev, TIMEOUT)
    assert bridge.readmodel.views[project].state.agents[entry["guid"]]["source"] == "warp"


async def test_watcher_is_recreated_when_it_stops_or_loses_its_consumer(
    own_bridge: tuple[WarpBridge, NATS, str], project: str
) -> None:
    bridge, nc, bucket = own_bridge
    await bridge.start()
    assert await bridge.wait_ready(5)
    kv = await open_registry(nc.jetstream(), bucket)
    # 1. The watcher stops (as nats-py's does when its subscription ends).
    assert bridge._watcher is not None
    await bridge._watcher.stop()  # type: ignore[no-untyped-call]
    first = warp_entry(project)
    await put(kv, bridge, first["guid"], first)
    assert bridge.watchers_started >= 2
    # 2. Its ephemeral consumer vanishes server-side (as after a server restart).
    started = bridge.watchers_started
    assert bridge._watcher is not None and bridge._watcher._sub is not None
    await nc.jetstream().delete_consumer(f"KV_{bucket}", bridge._watcher._sub._consumer)
    second = warp_entry(project)
    await put(kv, bridge, second["guid"], second)
    assert bridge.watchers_started > started
    agents = bridge.readmodel.views[project].state.agents
    assert agents[first["guid"]]["status"] == agents[second["guid"]]["status"] == "online"


async def test_two_bridges_on_one_bucket_register_each_entry_once(
    own_bridge: tuple[WarpBridge, NATS, str], project: str, store: EventStore
) -> None:
    """Like two replicas: both see every entry, the deterministic event id lets only one append land."""
    bridge, nc, bucket = own_bridge
    kv = await open_registry(nc.jetstream(), bucket)
    entries = [warp_entry(project) for _ in range(5)]
    last = 0
    for e in entries:
        last = await kv.put(e["guid"], orjson.dumps(e))
    twin = WarpBridge(nc, bridge.commands, bridge.readmodel, bridge.liveness,
                      default_project=bridge.default_project, bucket=bucket)
    try:
        await asyncio.gather(bridge.start(), twin.start())
        for b in (bridge, twin):
            assert await b.wait_processed(last, TIMEOUT)
    finally:
        await twin.stop()
    registered = [ev.entity_id async for ev in store.read_range(project) if ev.type == "agent.registered"]
    assert sorted(registered) == sorted(e["guid"] for e in entries)


# --- work offers -------------------------------------------------------------------------------


async def claim(nc: NATS, capability: str) -> Any:
    """What Warp's warp_work_claim does: the shared durable `worker-<CAP>`, fetch one, ack at once."""
    js = nc.jetstream()
    stream = workqueue_stream(capability)
    durable = "worker-" + stream[len("WORKQUEUE_"):]
    await js.add_consumer(stream, api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=300, max_deliver=3,
    ))
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    try:
        [msg] = await sub.fetch(1, timeout=TIMEOUT)
        await msg.ack_sync()
        return msg
    finally:
        await sub.unsubscribe()


async def test_work_goes_to_warp_agent_via_warp_queue_and_completes_over_rest(
    api: Api, registry: KeyValue, weft_service: WeftService, nc: NATS
) -> None:
    bridge = bridge_of(weft_service)
    capability = f"w{api.project}.py"  # unique per test: the queues are global; dotted like "node.js"
    entry = warp_entry(api.project, capabilities=[capability], metadata={"boundaries": ["personal"]})
    await put(registry, bridge, entry["guid"], entry)
    published = await nc.subscribe(f"global.workqueue.{capability}")  # to know when the offer is out
    item = await api.ok("POST", "/api/work", {"capability": capability, "boundary": "personal",
                                              "description": "port the parser", "priority": 7,
                                              "contextData": {"repo": "x"}}, status=201)
    await published.next_msg(timeout=TIMEOUT)
    await published.unsubscribe()
    msg = await claim(nc, capability)
    body = orjson.loads(msg.data)
    assert msg.subject == f"global.workqueue.{capability}"
    assert body["id"] == item["id"] and body["capability"] == capability and body["priority"] == 7
    assert body["offeredBy"] == "weft" and body["scope"] == "team" and body["attempts"] == 1
    assert body["assignedTo"] == entry["guid"] and body["projectId"] == api.project
    assert body["contextData"] == {"repo": "x"} and body["description"] == "port the parser"
    assert (msg.headers or {}).get("Nats-Msg-Id") == f"{item['id']}:1"
    held = await api.ok("GET", f"/api/work/{item['id']}")
    assert held["status"] == "assigned" and held["assignedTo"] == entry["guid"]

    # A re-push of the same attempt (new leader, say) does not put a second copy on the queue.
    assert weft_service.readmodel is not None
    view = weft_service.readmodel.views[api.project]
    await bridge.offer(api.project, view.state.agents[entry["guid"]], view.state.work[item["id"]])
    info = await nc.jetstream().stream_info(workqueue_stream(capability))
    assert info.state.messages == 0

    await api.ok("POST", f"/api/work/{item['id']}/accept", {"guid": entry["guid"]})
    done = await api.ok("POST", f"/api/work/{item['id']}/complete", {"guid": entry["guid"], "summary": "ported"})
    got = await api.ok("GET", f"/api/work/{item['id']}?min_seq={done['seq']}")
    assert got["status"] == "completed" and got["result"]["summary"] == "ported"


async def test_offer_skips_capability_that_cannot_be_a_subject(
    api: Api, weft_service: WeftService, nc: NATS
) -> None:
    bridge = bridge_of(weft_service)
    item = {"id": str(uuid.uuid4()), "taskId": "t", "capability": "bad cap*", "description": "d", "priority": 5,
            "offeredAt": format_ts(datetime.now(UTC)), "attempts": 1}
    await bridge.offer(api.project, {"guid": "g"}, item)  # a warning, no exception
    with pytest.raises(nats.js.errors.NotFoundError):
        await nc.jetstream().stream_info(workqueue_stream("bad cap*"))
