"""Reads and health through REST under faults (issue 9, faults 8 and 11), on the session's
replica: a halted project shows in `/health`, reads never create a project, and a `min_seq`
beyond the stream is a 400.
"""

from __future__ import annotations

import nats
import orjson
from nats.aio.client import Client as NATS

from projections.events import stream_name
from tests.support import Api
from weft.stamps import new_id

WAIT = 10.0


def foreign_event(project: str, type_: str, v: int = 1) -> bytes:
    """A well-formed envelope as a newer weft would write it."""
    return orjson.dumps({
        "id": new_id(), "type": type_, "v": v, "ts": "2026-12-01T00:00:00.000Z", "actor": "api",
        "project": project, "entityId": "w9", "data": {"taskId": "w9", "capability": "x", "boundary": "y"},
    })


async def test_health_names_a_halted_project(api: Api, nc: NATS) -> None:
    svc = api.service
    assert svc is not None and svc.readmodel is not None
    await api.ok("POST", "/api/targets", {"name": "t", "agentType": "developer", "mechanism": "local",
                                          "capabilities": ["code"], "config": {"command": "true"}}, status=201)
    ack = await nc.jetstream().publish(
        f"weft.{api.project}.ev.work.w9", foreign_event(api.project, "work.teleported"),
        stream=stream_name(api.project), headers={"Nats-Msg-Id": new_id()},
    )
    view = svc.readmodel.views[api.project]
    try:
        assert not await view.wait_for(ack.seq, WAIT)
        resp = await api.call("GET", "/health")
        body = await resp.json()
        assert resp.status == 503 and body["ready"] is False
        assert body["halted"][api.project]["seq"] == ack.seq
        assert "work.teleported" in body["halted"][api.project]["reason"]
        resp = await api.call("POST", "/api/work", {"capability": "c", "boundary": "personal", "description": "d"})
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert (await resp.json())["error"] == "Unavailable"
    finally:
        view.halted = None  # the session's other tests must not see this replica unready
        view.state.seq = ack.seq
        # Nor may replica processes started later (they would attach this project, halted).
        await nc.jetstream().delete_msg(stream_name(api.project), ack.seq)


# --- fault 11: reads never create a project ----------------------------------------------------


async def stream_exists(nc: NATS, project: str) -> bool:
    try:
        await nc.jetstream().stream_info(stream_name(project))
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_reads_of_an_unknown_project_create_nothing(api: Api, nc: NATS) -> None:
    ghost = f"ghost{new_id()[:10]}"
    headers = {"X-Weft-Project": ghost}
    resp = await api.call("GET", "/api/work", headers=headers)
    assert resp.status == 200 and (await resp.json())["workItems"] == []
    resp = await api.call("GET", "/api/work?min_seq=1", headers=headers)
    body = await resp.json()
    assert resp.status == 400 and body["details"]["field"] == "min_seq", body
    for method, path in [("GET", "/api/work/w1"), ("POST", "/api/work/w1/cancel"), ("GET", "/api/targets/t1"),
                         ("POST", "/api/targets/t1/enable"), ("GET", "/api/agents/a1"),
                         ("POST", "/api/agents/a1/shutdown")]:
        resp = await api.call(method, path, json={}, headers=headers)
        assert resp.status == 404, (method, path, resp.status, await resp.text())
    for method, path in [("GET", "/api/targets"), ("GET", "/api/agents"), ("GET", "/api/dlq"), ("GET", "/api/stats"),
                         ("POST", "/api/work/cancel-batch")]:
        resp = await api.call(method, path, json={"filter": {}}, headers=headers)
        assert resp.status == 200, (method, path, resp.status, await resp.text())
    assert not await stream_exists(nc, ghost)
    assert api.service is not None and api.service.readmodel is not None
    assert ghost not in api.service.readmodel.views
    assert api.service.scheduler is not None and ghost not in api.service.scheduler.elector._leases


async def test_a_min_seq_beyond_the_stream_is_a_400(api: Api) -> None:
    created = await api.ok("POST", "/api/work", {"capability": "nobody-has-this", "boundary": "personal",
                                                 "description": "d"}, status=201)
    resp = await api.call("GET", f"/api/work?min_seq={created['seq'] + 1000}")
    body = await resp.json()
    assert resp.status == 400 and body["details"]["field"] == "min_seq"
    assert body["details"]["lastSeq"] >= created["seq"]
    resp = await api.call("GET", f"/api/work/{created['id']}?min_seq={created['seq']}")
    assert resp.status == 200
