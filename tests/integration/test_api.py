"""REST API against a real nats-server, over real HTTP: shapes, errors, consistency, no stray events."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support import Api, make_client
from weft.api.openapi import document
from weft.service import WeftService
from weft.store.eventstore import EventStore

WORK = {"capability": "python", "boundary": "personal", "description": "write tests"}
LOCAL_TARGET = {
    "name": "laptop",
    "agentType": "claude-code",
    "mechanism": "local",
    "capabilities": ["python"],
    "config": {"local": {"command": "python3 -c pass"}},
}


async def stream_len(store: EventStore, project: str) -> int:
    """Events the requests appended: all but the scheduler's announcement of its term, which the
    session's replica appends once it leads the project (whenever that is)."""
    return len([e async for e in store.read_range(project) if e.type != "leader.elected"])


async def test_submit_returns_201_with_seq_and_item_is_readable(api: Api) -> None:
    resp = await api.call("POST", "/api/work", {**WORK, "priority": 7})
    body = await resp.json()
    assert resp.status == 201
    assert body["id"] == body["workItemId"]
    assert body["seq"] == int(resp.headers["X-Weft-Seq"]) >= 1
    assert body["taskId"]  # generated when absent
    item = await api.ok("GET", f"/api/work/{body['id']}")
    assert item["status"] == "pending"
    assert item["priority"] == 7
    assert item["boundary"] == "personal"
    assert item["assignedToAgent"] is None


async def test_idempotency_key_returns_the_same_item_and_appends_once(api: Api, store: EventStore) -> None:
    headers = {"Idempotency-Key": "submit-1"}
    first = await api.call("POST", "/api/work", WORK, headers=headers)
    second = await api.call("POST", "/api/work", WORK, headers=headers)
    assert first.status == 201 and second.status == 200
    assert (await first.json())["id"] == (await second.json())["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert await stream_len(store, api.project) == 1


async def test_concurrent_duplicate_submits_create_one_item(api: Api) -> None:
    headers = {"Idempotency-Key": "race"}
    responses = await asyncio.gather(*(api.call("POST", "/api/work", WORK, headers=headers) for _ in range(8)))
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 1
    listing = await api.ok("GET", "/api/work")
    assert listing["total"] == 1


async def test_bad_inputs_get_400_naming_the_field_and_append_nothing(api: Api, store: EventStore) -> None:
    cases: list[tuple[Any, str]] = [
        ({"boundary": "personal", "description": "x"}, "capability"),
        ({**WORK, "priority": "5"}, "priority"),
        ({**WORK, "priority": 11}, "priority"),
        ({**WORK, "description": ""}, "description"),
        ({**WORK, "capability": "has space"}, "capability"),
        ({**WORK, "deadline": "tomorrow"}, "deadline"),
        ({**WORK, "contextData": [1]}, "contextData"),
        ([1, 2], "body"),
    ]
    for body, field in cases:
        resp = await api.call("POST", "/api/work", body)
        err = await resp.json()
        assert resp.status == 400, (body, err)
        assert err["error"] == "ValidationError"
        assert err["details"]["field"] == field, (body, err)
    raw = await api.client.post(
        "/api/work", data=b"{not json", headers={"X-Weft-Project": api.project, "Content-Type": "application/json"}
    )
    assert raw.status == 400 and (await raw.json())["details"]["field"] == "body"
    assert await stream_len(store, api.project) == 0


async def test_invalid_project_id_is_400(api: Api) -> None:
    resp = await api.client.get("/api/work", params={"projectId": "no.dots"})
    assert resp.status == 400
    assert (await resp.json())["details"]["field"] == "projectId"
    resp = await api.client.post("/api/work", json=WORK, headers={"X-Weft-Project": "x" * 65})
    assert resp.status == 400


async def test_oversize_body_is_413_json(weft_service: WeftService, project: str) -> None:
    client = await make_client(weft_service, max_body_bytes=2048)
    try:
        resp = await client.post("/api/work", json={**WORK, "description": "a" * 4096}, headers={"X-Weft-Project": project})
        body = await resp.json()
        assert resp.status == 413
        assert body["details"]["field"] == "body"
    finally:
        await client.close()


async def test_unknown_ids_are_404_and_unknown_routes_json(api: Api) -> None:
    for method, path in [("GET", "/api/work/nope"), ("POST", "/api/work/nope/cancel"), ("GET", "/api/agents/nope"),
                         ("GET", "/api/targets/nope"), ("GET", "/api/no-such-route")]:
        resp = await api.call(method, path)
        assert resp.status == 404, path
        assert (await resp.json())["error"] == "NotFound"


async def test_cancel_again_is_200_and_appends_nothing(api: Api, store: EventStore) -> None:
    """Cancelling a cancelled item is idempotent (Shuttle's repeated `work cancel`); a completed or
    failed one stays a 409 (tests/integration/test_compat.py)."""
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await api.ok("POST", f"/api/work/{item['id']}/cancel", {"reason": "not needed"})

    async def item_events() -> int:  # the item's own (the scheduler's leader.elected lands on its own time)
        return len([ev async for ev in store.read_range(api.project) if ev.entity_id == item["id"]])

    before = await item_events()
    again = await api.ok("POST", f"/api/work/{item['id']}/cancel")
    assert again["success"] is True and again["alreadyCancelled"] is True
    assert again["workItem"]["status"] == "cancelled"
    assert await item_events() == before
    got = await api.ok("GET", f"/api/work/{item['id']}")
    assert got["status"] == "cancelled" and got["cancelReason"] == "not needed"


async def test_cancel_batch_by_ids_and_by_filter(api: Api) -> None:
    a = await api.ok("POST", "/api/work", {**WORK, "capability": "go"}, status=201)
    b = await api.ok("POST", "/api/work", WORK, status=201)
    c = await api.ok("POST", "/api/work", WORK, status=201)
    await api.ok("POST", f"/api/work/{c['id']}/cancel")
    res = await api.ok("POST", "/api/work/cancel-batch", {"workItemIds": [a["id"], c["id"], "missing"]})
    assert res["cancelledItems"] == [a["id"]]
    assert res["notCancellable"] == [c["id"]]
    assert res["failed"] == ["missing"] and "missing" in res["errors"]
    res = await api.ok("POST", "/api/work/cancel-batch", {"filter": {"capability": "python", "status": "pending"}})
    assert res["cancelledItems"] == [b["id"]]
    bad = await api.call("POST", "/api/work/cancel-batch", {})
    assert bad.status == 400


async def test_list_sorts_by_priority_then_age_and_paginates_with_filter_bound_cursor(api: Api) -> None:
    ids = []
    for prio in (1, 9, 5, 9, 3):
        ids.append((await api.ok("POST", "/api/work", {**WORK, "priority": prio}, status=201))["id"])
    page1 = await api.ok("GET", "/api/work?limit=2")
    assert [w["priority"] for w in page1["workItems"]] == [9, 9]
    assert [w["id"] for w in page1["workItems"]] == [ids[1], ids[3]]
    assert page1["hasMore"] and page1["prevCursor"] is None and page1["total"] == 5
    page2 = await api.ok("GET", f"/api/work?limit=2&cursor={page1['nextCursor']}")
    assert [w["priority"] for w in page2["workItems"]] == [5, 3]
    page3 = await api.ok("GET", f"/api/work?limit=2&cursor={page2['nextCursor']}")
    assert [w["priority"] for w in page3["workItems"]] == [1] and not page3["hasMore"]
    mismatch = await api.call("GET", f"/api/work?limit=2&status=pending&cursor={page1['nextCursor']}")
    assert mismatch.status == 400 and (await mismatch.json())["details"]["field"] == "cursor"
    assert (await api.call("GET", "/api/work?cursor=%%%")).status == 400
    clamped = await api.ok("GET", "/api/work?limit=1000")
    assert clamped["count"] == 5
    deprecated = await api.call("GET", "/api/work?classification=personal")
    assert deprecated.headers["X-Deprecated-Param"].startswith("classification")


async def test_lists_of_settled_items_decode_only_the_page(api: Api) -> None:
    """A snapshot turns cancelled items back into encoded form on the replica that wrote it;
    listing them then orders by keys the table holds and decodes (without keeping) the page."""
    ids = []
    for prio in (1, 9, 5, 9, 3):
        ids.append((await api.ok("POST", "/api/work", {**WORK, "priority": prio}, status=201))["id"])
    seq = 0
    for wid in ids:
        seq = (await api.ok("POST", f"/api/work/{wid}/cancel", {}))["seq"]
    await api.ok("GET", f"/api/work?min_seq={seq}")
    assert api.service is not None
    await api.service.readmodel.snapshot_now(api.project)
    work = api.service.readmodel.views[api.project].state.work
    assert work.encoded_count() == 5
    page = await api.ok("GET", "/api/work?status=cancelled&limit=2")
    assert [w["id"] for w in page["workItems"]] == [ids[1], ids[3]] and page["total"] == 5
    assert page["workItems"][0]["status"] == "cancelled" and page["workItems"][0]["priority"] == 9
    everything = await api.ok("GET", "/api/work?limit=10")
    assert [w["priority"] for w in everything["workItems"]] == [9, 9, 5, 3, 1]
    assert work.encoded_count() == 5, "nothing was kept decoded"
    by_boundary = await api.ok("GET", f"/api/work?status=cancelled&boundary={WORK['boundary']}&limit=1")
    assert by_boundary["total"] == 5 and by_boundary["workItems"][0]["id"] == ids[1]


async def test_min_seq_waits_for_the_projection_and_refuses_a_seq_beyond_the_stream(api: Api) -> None:
    item = await api.ok("POST", "/api/work", WORK, status=201)
    got = await api.ok("GET", f"/api/work/{item['id']}?min_seq={item['seq']}")
    assert got["id"] == item["id"]
    resp = await api.call("GET", f"/api/work?min_seq={item['seq'] + 1000}")
    assert resp.status == 400  # it may never come: no wait, no 503
    assert (await resp.json())["details"]["field"] == "min_seq"
    assert (await api.call("GET", "/api/work?min_seq=-1")).status == 400


async def test_target_lifecycle_and_duplicate_name_409(api: Api) -> None:
    t = await api.ok("POST", "/api/targets", LOCAL_TARGET, status=201)
    assert t["status"] == "available" and t["healthStatus"] == "unknown"
    assert t["boundaries"] == ["corporate", "corporate-adjacent", "personal", "open-source"]
    assert t["config"]["local"]["command"] == "python3 -c pass"
    dup = await api.call("POST", "/api/targets", LOCAL_TARGET)
    assert dup.status == 409 and (await dup.json())["details"]["field"] == "name"
    by_name = await api.ok("GET", "/api/targets/laptop")
    assert by_name["id"] == t["id"]
    updated = await api.ok("PUT", "/api/targets/laptop", {"capabilities": ["python", "go"], "config": {"args": ["-v"]}})
    assert updated["capabilities"] == ["python", "go"]
    assert updated["config"]["local"]["args"] == ["-v"] and updated["config"]["local"]["command"] == "python3 -c pass"
    immut = await api.call("PUT", "/api/targets/laptop", {"mechanism": "ssh"})
    assert immut.status == 400 and (await immut.json())["details"]["field"] == "mechanism"
    await api.ok("POST", "/api/targets/laptop/disable")
    assert (await api.ok("GET", "/api/targets/laptop"))["status"] == "disabled"
    again = await api.ok("POST", "/api/targets/laptop/disable")
    assert "already" in again["message"]
    await api.ok("POST", "/api/targets/laptop/enable")
    listing = await api.ok("GET", "/api/targets?capability=go")
    assert [x["name"] for x in listing["targets"]] == ["laptop"]
    await api.ok("DELETE", "/api/targets/laptop")
    assert (await api.call("GET", "/api/targets/laptop")).status == 404
    # The name is free again after removal.
    await api.ok("POST", "/api/targets", LOCAL_TARGET, status=201)


async def test_concurrent_registrations_of_one_name_create_one_target(api: Api) -> None:
    responses = await asyncio.gather(*(api.call("POST", "/api/targets", LOCAL_TARGET) for _ in range(6)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201, 409, 409, 409, 409, 409]


async def test_flat_config_is_accepted_and_stored_nested(api: Api) -> None:
    body = {"name": "box", "agentType": "copilot-cli", "mechanism": "ssh", "capabilities": ["python"],
            "config": {"mechanism": "ssh", "host": "127.0.0.1", "user": "agent", "command": "weft agent"}}
    t = await api.ok("POST", "/api/targets", body, status=201)
    assert t["config"] == body["config"]  # answered as registered; the mechanism runs the nested form
    assert t["normalizedConfig"] == {"mechanism": "ssh", "ssh": {"host": "127.0.0.1", "user": "agent", "command": "weft agent",
                                                        "port": 22, "env": {}, "connectionTimeoutMs": 30000,
                                                        "knownHosts": "default"}}


async def test_literal_secrets_are_rejected_and_never_stored(api: Api, store: EventStore) -> None:
    secret = "s3cr3t-value-xyz"
    bodies = [
        {**LOCAL_TARGET, "config": {"local": {"command": "x", "env": {"GITHUB_TOKEN": secret}}}},
        {"name": "hook", "agentType": "x", "mechanism": "webhook", "capabilities": ["python"],
         "config": {"url": "http://127.0.0.1:9/hook", "headers": {"Authorization": f"Bearer {secret}"}}},
        {"name": "gh", "agentType": "x", "mechanism": "github-actions", "capabilities": ["python"],
         "config": {"repo": "o/r", "workflow": "agent.yml", "token": secret}},
    ]
    for body in bodies:
        resp = await api.call("POST", "/api/targets", body)
        err = await resp.json()
        assert resp.status == 400, err
        assert secret not in str(err)
    ok = {**LOCAL_TARGET, "config": {"local": {"command": "x", "env": {"GITHUB_TOKEN": "env:GITHUB_TOKEN"}}}}
    await api.ok("POST", "/api/targets", ok, status=201)
    dump = [e.encode() async for e in store.read_range(api.project)]
    assert all(secret.encode() not in raw for raw in dump)


async def test_target_test_runs_a_real_probe(api: Api) -> None:
    await api.ok("POST", "/api/targets", LOCAL_TARGET, status=201)
    res = await api.ok("POST", "/api/targets/laptop/test")
    assert res["healthy"] is True and res["latencyMs"] is not None
    assert (await api.ok("GET", "/api/targets/laptop"))["healthStatus"] == "healthy"
    broken = {**LOCAL_TARGET, "name": "broken", "config": {"local": {"command": "/nonexistent/agent"}}}
    await api.ok("POST", "/api/targets", broken, status=201)
    res = await api.ok("POST", "/api/targets/broken/test")
    assert res["healthy"] is False and "not found" in res["error"]


async def test_spin_up_request_is_recorded(api: Api) -> None:
    await api.ok("POST", "/api/targets", LOCAL_TARGET, status=201)
    res = await api.ok("POST", "/api/targets/laptop/spin-up")
    assert res["success"] is True and res["status"] == "in-progress"
    t = await api.ok("GET", "/api/targets/laptop")
    assert [op["spinUpId"] for op in t["activeSpinUps"]] == [res["operationId"]]
    await api.ok("POST", "/api/targets/laptop/disable")
    assert (await api.call("POST", "/api/targets/laptop/spin-up")).status == 409


async def test_disable_batch(api: Api) -> None:
    await api.ok("POST", "/api/targets", LOCAL_TARGET, status=201)
    await api.ok("POST", "/api/targets", {**LOCAL_TARGET, "name": "other"}, status=201)
    await api.ok("POST", "/api/targets/other/disable")
    res = await api.ok("POST", "/api/targets/disable-batch", {"filter": {"mechanism": "local"}})
    assert len(res["disabledTargets"]) == 1 and len(res["alreadyDisabled"]) == 1


async def test_agents_list_is_never_blocked_by_an_empty_registry(api: Api) -> None:
    body = await api.ok("GET", "/api/agents")
    # Other projects' public Warp agents are listed in every project: none of this project's own.
    assert [a for a in body["agents"] if a["projectId"] == api.project] == [] and body["hasMore"] is False
    assert (await api.call("POST", "/api/agents/nobody/shutdown", {"graceful": True})).status == 404
    assert (await api.call("GET", "/api/agents?status=sleeping")).status == 400


async def test_stats_have_the_multi_project_shape(api: Api) -> None:
    await api.ok("POST", "/api/work", WORK, status=201)
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await api.ok("POST", f"/api/work/{item['id']}/cancel")
    stats = await api.ok("GET", f"/api/stats?projectId={api.project}")
    assert set(stats) >= {"timestamp", "totalProjects", "totals", "byProject"}
    assert set(stats["totals"]) >= {"agents", "pendingWork", "activeWork", "completedWork", "failedWork", "targets"}
    mine = stats["byProject"][api.project]
    assert mine["pendingWork"] == 1 and mine["failedWork"] == 1 and mine["cancelledWork"] == 1
    everything = await api.ok("GET", "/api/stats")
    assert api.project in everything["byProject"]
    resp = await api.client.get("/api/stats", headers={"If-None-Match": (await api.call("GET", "/api/stats")).headers["ETag"]})
    assert resp.status in (200, 304)  # another test may have changed the fleet meanwhile
    projects = await api.ok("GET", "/api/stats/projects")
    assert api.project in projects["projects"]


async def test_work_in_another_project_is_addressable(api: Api) -> None:
    other = api.project + "b"
    resp = await api.client.post("/api/work", json=WORK, params={"projectId": other})
    item = await resp.json()
    assert resp.status == 201 and item["projectId"] == other
    mine = await api.ok("GET", "/api/work")
    assert mine["total"] == 0
    theirs = await api.client.get("/api/work", params={"projectId": other})
    assert (await theirs.json())["total"] == 1
    # Without a project named, get searches every project, as the original did.
    found = await api.client.get(f"/api/work/{item['id']}")
    assert found.status == 200


async def test_auth_rejects_missing_and_wrong_tokens_but_health_is_open(weft_service: WeftService, project: str) -> None:
    client = await make_client(weft_service, api_tokens=("tok-1", "tok-2"))
    try:
        assert (await client.get("/health")).status == 200
        assert (await client.get("/api/openapi.json")).status == 200
        resp = await client.post("/api/work", json=WORK, headers={"X-Weft-Project": project})
        assert resp.status == 401 and (await resp.json())["error"] == "Unauthorized"
        bad = await client.get("/api/work", headers={"Authorization": "Bearer nope"})
        assert bad.status == 401
        good = await client.post("/api/work", json=WORK, headers={"Authorization": "Bearer tok-2", "X-Weft-Project": project})
        assert good.status == 201
        item = weft_service.readmodel.views[project].state.work[(await good.json())["id"]]  # type: ignore[union-attr]
        assert item["offeredBy"].startswith("token:") and "tok-2" not in item["offeredBy"]
    finally:
        await client.close()


async def test_openapi_documents_every_route_and_nothing_else(api: Api) -> None:
    doc = await api.ok("GET", "/api/openapi.json")
    served = set()
    for route in api.client.server.app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        served.add((route.method.lower(), path))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert doc == document()


async def test_every_answer_names_the_replica(api: Api) -> None:
    assert api.service is not None
    name = api.service.settings.replica_name
    answers = [await api.call("POST", "/api/work", WORK), await api.call("GET", "/api/work/no-such-item"),
               await api.call("DELETE", "/api/work"), await api.call("POST", "/api/work", {"capability": 7}),
               await api.call("GET", "/health/live")]
    assert [r.status for r in answers] == [201, 404, 405, 400, 200]
    assert {r.headers.get("X-Weft-Replica") for r in answers} == {name}
