"""Every answer the API gives matches what its OpenAPI document says of that route and status: a
full work loop (REST and agent), the DLQ, targets, agents, stats, health, plus the fixes the
fuzzer (tests/fuzz) led to, and a small seeded fuzz run of all three configurations."""

from __future__ import annotations

import asyncio
import json  # orjson cannot write the integers one test sends
from typing import Any

import jsonschema_rs
import orjson
import pytest
from aiohttp import ClientResponse
from nats.aio.client import Client as NATS

from tests.support import Api, FakeAgent
from weft.api.openapi import document

DOC = document()
WORK = {"capability": "python", "boundary": "personal", "description": "write tests"}
TARGET = {"name": "box", "agentType": "claude-code", "mechanism": "local", "capabilities": ["never-matched"],
          "config": {"command": "python3 -c pass"}}


def documented(method: str, template: str, status: int, content_type: str) -> dict[str, Any]:
    answers = DOC["paths"][template][method.lower()]["responses"]
    assert str(status) in answers, f"{method} {template} answered {status}, documented {sorted(answers)}"
    content = answers[str(status)].get("content", {})
    assert content_type in content, f"{method} {template} {status}: {content_type} not in {sorted(content)}"
    schema: dict[str, Any] = content[content_type].get("schema", {})
    return schema


class Checked:
    """An Api whose every answer is validated against the document (route template given)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.seen: set[tuple[str, str, int]] = set()

    async def call(self, method: str, template: str, path: str | None = None, json: Any = None,
                   status: int = 200, **kw: Any) -> Any:
        resp = await self.api.call(method, path or template, json, **kw)
        body = await check(resp, method, template)
        assert resp.status == status, body
        self.seen.add((method.lower(), template, resp.status))
        return body


async def check(resp: ClientResponse, method: str, template: str) -> Any:
    content_type = resp.content_type
    schema = documented(method, template, resp.status, content_type)
    raw = await resp.read()
    if content_type != "application/json":
        return raw.decode()
    body = orjson.loads(raw)
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": DOC["components"]})
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{method} {template} {resp.status}: {errors[:5]}\n{str(body)[:1000]}"
    return body


async def test_every_answer_of_a_full_session_matches_the_document(api: Api, nc: NATS) -> None:
    c = Checked(api)
    for path in ("/health", "/health/live", "/health/ready", "/api/openapi.json", "/api/docs", "/metrics"):
        await c.call("GET", path)
    # Submit, idempotent replay, list, get, history.
    item = await c.call("POST", "/api/work", json={**WORK, "maxAttempts": 1}, status=201,
                        headers={"Idempotency-Key": "k1"})
    await c.call("POST", "/api/work", json={**WORK, "maxAttempts": 1}, headers={"Idempotency-Key": "k1"})
    await c.call("GET", "/api/work")
    await c.call("GET", "/api/work/{id}", f"/api/work/{item['id']}")
    await c.call("GET", "/api/work/{id}/history", f"/api/work/{item['id']}/history")
    # An agent takes it; it reports over REST and fails it into the DLQ.
    agent = FakeAgent(nc, api.project, "agent-1")
    await agent.start()
    push = await agent.next_push("assignment")
    assert push["work"]["id"] == item["id"]
    wid = item["id"]
    await c.call("GET", "/api/work/{id}", f"/api/work/{wid}")
    await c.call("POST", "/api/work/{id}/accept", f"/api/work/{wid}/accept", {"guid": agent.guid})
    await c.call("POST", "/api/work/{id}/progress", f"/api/work/{wid}/progress", {"guid": agent.guid, "progress": 50})
    await c.call("POST", "/api/work/{id}/fail", f"/api/work/{wid}/fail", {"guid": agent.guid, "message": "boom"})
    await c.call("GET", "/api/dlq")
    await c.call("POST", "/api/dlq/{id}/retry", f"/api/dlq/{wid}/retry", {})
    await agent.next_push("assignment")
    await c.call("POST", "/api/work/{id}/accept", f"/api/work/{wid}/accept", {"guid": agent.guid})
    await c.call("POST", "/api/work/{id}/complete", f"/api/work/{wid}/complete",
                 {"guid": agent.guid, "summary": "done", "output": {"n": 1}})
    await c.call("POST", "/api/work/{id}/cancel", f"/api/work/{wid}/cancel", {}, status=409)
    # A second item dead-lettered, then discarded; a third cancelled, a batch cancelled.
    other = await c.call("POST", "/api/work", json={**WORK, "maxAttempts": 1}, status=201)
    await agent.next_push("assignment")
    await c.call("POST", "/api/work/{id}/fail", f"/api/work/{other['id']}/fail", {"guid": agent.guid, "message": "x"})
    await c.call("POST", "/api/dlq/{id}/discard", f"/api/dlq/{other['id']}/discard", {})
    waiting = await c.call("POST", "/api/work", json={**WORK, "capability": "rust"}, status=201)
    await c.call("POST", "/api/work/{id}/cancel", f"/api/work/{waiting['id']}/cancel", {"reason": "no"})
    await c.call("POST", "/api/work/{id}/cancel", f"/api/work/{waiting['id']}/cancel", {})
    await c.call("POST", "/api/work", json={**WORK, "capability": "go"}, status=201)
    await c.call("POST", "/api/work/cancel-batch", json={"filter": {"capability": "go"}})
    await c.call("POST", "/api/work/cancel-batch", json={"workItemIds": ["nope"]})
    # Agents.
    await c.call("GET", "/api/agents")
    await c.call("GET", "/api/agents/{guid}", f"/api/agents/{agent.guid}")
    await c.call("GET", "/api/agents/{guid}/history", f"/api/agents/{agent.guid}/history")
    await c.call("POST", "/api/agents/{guid}/shutdown", f"/api/agents/{agent.guid}/shutdown", {})
    await c.call("POST", "/api/agents/shutdown-batch", json={"agentGuids": [agent.guid]})
    await agent.close()
    # Targets.
    t = await c.call("POST", "/api/targets", json=TARGET, status=201, headers={"Idempotency-Key": "t1"})
    await c.call("POST", "/api/targets", json=TARGET, headers={"Idempotency-Key": "t1"})
    name = f"/api/targets/{t['id']}"
    await c.call("GET", "/api/targets")
    await c.call("GET", "/api/targets/{idOrName}", name)
    await c.call("PUT", "/api/targets/{idOrName}", name, {"description": "the box"})
    await c.call("POST", "/api/targets/{idOrName}/test", f"{name}/test")
    await c.call("POST", "/api/targets/{idOrName}/disable", f"{name}/disable", {})
    await c.call("POST", "/api/targets/{idOrName}/enable", f"{name}/enable", {})
    await c.call("POST", "/api/targets/disable-batch", json={"targetIds": [t["id"]]})
    await c.call("POST", "/api/targets/{idOrName}/spin-up", f"{name}/spin-up", {}, status=409)
    await c.call("POST", "/api/targets/{idOrName}/enable", f"{name}/enable", {})
    await c.call("POST", "/api/targets/{idOrName}/spin-up", f"{name}/spin-up", {})
    await c.call("DELETE", "/api/targets/{idOrName}", name)
    # Stats, channels.
    for path in ("/api/stats", "/api/stats/projects", "/api/stats/projection", "/api/channels"):
        await c.call("GET", path)
    await c.call("GET", "/api/channels/{name}/messages", "/api/channels/general/messages")
    # Errors.
    await c.call("GET", "/api/work/{id}", "/api/work/nope", status=404)
    await c.call("POST", "/api/work", json={"capability": 7}, status=400)
    await c.call("GET", "/api/work", params={"status": "lost"}, status=400)
    await c.call("POST", "/api/work", json=WORK, headers={"Idempotency-Key": "k1"}, status=422)
    documented_2xx = {(m, p, int(s)) for p, ops in DOC["paths"].items() for m, op in ops.items()
                      for s in op.get("responses", {}) if s.startswith("2") and p != "/api/ws"}
    # Every documented success body was seen, but the 202s (a replica behind its own append).
    assert {x for x in documented_2xx if x[2] != 202} - c.seen == set()


async def test_an_integer_beyond_64_bits_in_a_body_is_a_400_not_a_500(api: Api) -> None:
    # Found by the fuzzer: pydantic keeps the integer, orjson cannot encode it (event, limits).
    for path, body in (("/api/work", {**WORK, "contextData": {"n": 2**64}}),
                       ("/api/work/x/complete", {"guid": "g", "output": [-(2**63) - 1]}),
                       ("/api/agents/shutdown-batch", {"filter": {"idleTimeMs": 10**30}})):
        resp = await api.client.post(path, data=json.dumps(body).encode(),
                                     headers={"X-Weft-Project": api.project, "content-type": "application/json"})
        err = await resp.json()
        assert resp.status == 400, err
        assert err["error"] == "ValidationError" and "64" in err["message"], (path, err)


async def test_a_plain_get_of_the_websocket_route_is_a_json_400(api: Api) -> None:
    # Found by the fuzzer: aiohttp's own refusal (no Upgrade header) was text/plain.
    resp = await api.call("GET", "/api/ws")
    body = await check(resp, "GET", "/api/ws")
    assert resp.status == 400 and body["error"] == "BadRequest"


@pytest.mark.timeout(120)
async def test_a_small_seeded_fuzz_run_of_both_configurations_finds_nothing() -> None:
    from tests.fuzz.runner import fuzz_all, report

    results = await asyncio.to_thread(fuzz_all, 20261203, 3)
    print(report(results))
    assert all(r.cases > 500 for r in results), report(results)
    assert not [f for r in results for f in r.failures], report(results)
