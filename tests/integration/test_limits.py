"""Input limits and rate limits (issue 14 item 3): each limit is a setting, each refusal names the
field, the limit and the setting, and appends nothing. Real nats-server, real HTTP and WebSocket."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.support import make_client
from weft.core.access import Principal, Role, ScryptParams, TokenEntry, TokenFile
from weft.core.limits import Limits
from weft.service import WeftService
from weft.store.eventstore import EventStore

WORK = {"capability": "python", "boundary": "personal", "description": "limited"}
TARGET = {"agentType": "claude-code", "mechanism": "webhook", "capabilities": ["python"],
          "config": {"webhook": {"url": "http://127.0.0.1:9/hook"}}}
SMALL = Limits(description_chars=50, id_chars=40, context_bytes=100, list_items=3, targets_per_project=2,
               ws_message_bytes=1024, ws_messages_per_s=0.5)


@pytest.fixture
async def client(weft_service: WeftService) -> AsyncIterator[TestClient]:
    c = await make_client(weft_service, limits=SMALL)
    yield c
    await c.close()


async def refused(resp: aiohttp.ClientResponse, status: int, field: str) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == status, body
    assert body["details"]["field"] == field
    return dict(body)


async def work_events(store: EventStore, project: str) -> list[str]:
    return [e.type async for e in store.read_range(project) if e.type.startswith(("work.", "target."))]


@pytest.mark.parametrize(("body", "headers", "field", "setting"), [
    ({**WORK, "description": "x" * 51}, {}, "description", "WEFT_MAX_DESCRIPTION_CHARS"),
    ({**WORK, "taskId": "t" * 41}, {}, "taskId", "WEFT_MAX_ID_CHARS"),
    ({**WORK, "contextData": {"blob": "y" * 200}}, {}, "contextData", "WEFT_MAX_CONTEXT_BYTES"),
    (WORK, {"X-Correlation-Id": "c" * 41}, "X-Correlation-Id", "WEFT_MAX_ID_CHARS"),
])
async def test_a_submission_over_a_limit_is_a_400_naming_field_and_setting(
    client: TestClient, project: str, store: EventStore, body: dict[str, Any], headers: dict[str, str], field: str,
    setting: str,
) -> None:
    resp = await client.post(f"/api/work?projectId={project}", json=body, headers=headers)
    error = await refused(resp, 400, field)
    assert error["details"]["setting"] == setting and setting in error["message"]
    assert await work_events(store, project) == []


async def test_list_sizes_are_limited_for_batches_and_targets(client: TestClient, project: str) -> None:
    resp = await client.post(f"/api/work/cancel-batch?projectId={project}", json={"workItemIds": ["a", "b", "c", "d"]})
    await refused(resp, 400, "workItemIds")
    resp = await client.post(f"/api/targets?projectId={project}",
                             json={**TARGET, "name": "many", "capabilities": ["a", "b", "c", "d"]})
    await refused(resp, 400, "capabilities")


async def test_a_project_holds_at_most_the_configured_number_of_targets(
    client: TestClient, project: str, store: EventStore
) -> None:
    for name in ("one", "two"):
        resp = await client.post(f"/api/targets?projectId={project}", json={**TARGET, "name": name})
        assert resp.status == 201, await resp.text()
    resp = await client.post(f"/api/targets?projectId={project}", json={**TARGET, "name": "three"})
    error = await refused(resp, 409, "name")
    assert error["details"]["setting"] == "WEFT_MAX_TARGETS_PER_PROJECT"
    registered = [t for t in await work_events(store, project) if t == "target.registered"]
    assert len(registered) == 2


async def test_a_token_over_its_rate_gets_429_with_retry_after_and_others_are_unaffected(
    weft_service: WeftService, tmp_path: Path, project: str
) -> None:
    params = ScryptParams(salt=b"0123456789abcdef", n=2**10)
    slow, fast = "weft_" + secrets.token_urlsafe(16), "weft_" + secrets.token_urlsafe(16)
    path = tmp_path / "tokens.json"
    path.write_bytes(TokenFile(params, (
        TokenEntry(Principal("slow", Role.read, None, rate_per_s=0.1), params.hash(slow)),  # a burst of 1
        TokenEntry(Principal("fast", Role.read, None), params.hash(fast)),
    )).to_json())
    client = await make_client(weft_service, tokens_file=path)
    try:
        first = await client.get(f"/api/work?projectId={project}", headers={"Authorization": f"Bearer {slow}"})
        assert first.status == 200
        second = await client.get(f"/api/work?projectId={project}", headers={"Authorization": f"Bearer {slow}"})
        body = await refused(second, 429, "Authorization")
        assert body["error"] == "TooManyRequests"
        assert int(second.headers["Retry-After"]) >= 1
        for _ in range(5):  # no per-token rate and no WEFT_RATE_LIMIT_PER_S: never limited
            resp = await client.get(f"/api/work?projectId={project}", headers={"Authorization": f"Bearer {fast}"})
            assert resp.status == 200
    finally:
        await client.close()


async def test_websocket_messages_are_limited_in_size_and_rate(client: TestClient, project: str) -> None:
    async with client.ws_connect("/api/ws") as ws:
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json())["type"] == "pong"
        await ws.send_json({"type": "ping"})  # the burst (one message at 0.5/s) is spent
        refusal = await ws.receive_json()
        assert refusal["type"] == "error" and "WEFT_WS_MAX_MESSAGES_PER_S" in refusal["error"]
        assert not ws.closed
    async with client.ws_connect("/api/ws") as ws:
        await ws.send_str("x" * 2048)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
