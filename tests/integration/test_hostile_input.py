"""Inputs an attacker (or a buggy client) sends, each found answering 5xx or a wrong 2xx: a forged
cursor, a deeply nested target, a body the stream cannot hold, a method a route lacks, a reused
Idempotency-Key with another body. Each gets a 4xx with weft's JSON error naming the field, and
appends nothing. Real nats-servers (one with a small max payload), real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import Api, make_client, own_replica
from weft.service import WeftService
from weft.settings import Settings
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port
from weft.store.eventstore import EventStore

WORK = {"capability": "python", "boundary": "personal", "description": "write tests"}


async def appended(store: EventStore, project: str) -> list[str]:
    return [e.type for e in await _events(store, project) if e.type != "leader.elected"]


async def _events(store: EventStore, project: str) -> list[Any]:
    return [e async for e in store.read_range(project)]


def cursor(offset: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset, "limit": 5}).encode()).decode().rstrip("=")


@pytest.mark.parametrize("offset", [2**63, 10**30, 1e23, -1, "7", 1.5])
async def test_a_forged_cursor_offset_is_a_400_naming_the_cursor(api: Api, offset: Any) -> None:
    await api.ok("POST", "/api/work", WORK, status=201)
    resp = await api.call("GET", "/api/work", params={"cursor": cursor(offset)})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["details"]["field"] == "cursor"


async def test_a_target_config_nested_300_levels_is_a_400_and_appends_nothing(api: Api, store: EventStore) -> None:
    nested: Any = "leaf"
    for _ in range(300):
        nested = {"a": nested}
    target = {"name": "deep", "agentType": "claude-code", "mechanism": "webhook", "capabilities": ["python"],
              "config": {"webhook": {"url": "http://127.0.0.1:9/hook", "bodyTemplate": nested}}}
    resp = await api.call("POST", "/api/targets", target)
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"] == "ValidationError"
    assert body["details"]["field"] == "config"
    assert await appended(store, api.project) == []


async def test_a_method_a_route_lacks_is_a_405_with_an_allow_header(api: Api) -> None:
    resp = await api.call("DELETE", "/api/work")
    body = await resp.json()
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(", ")) == set(body["details"]["allowed"]) >= {"GET", "POST"}


async def test_the_same_idempotency_key_with_another_body_is_a_422_naming_the_key(api: Api, store: EventStore) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = await api.ok("POST", "/api/work", WORK, status=201, headers=headers)
    again = await api.ok("POST", "/api/work", WORK, status=200, headers=headers)
    assert again["id"] == first["id"]
    resp = await api.call("POST", "/api/work", {**WORK, "description": "something else"}, headers=headers)
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"] == "IdempotencyKeyReused"
    assert body["details"]["field"] == "Idempotency-Key"
    assert "description" in body["details"]["differs"]
    assert await appended(store, api.project) == ["work.submitted"]


async def test_a_target_idempotency_key_reused_with_another_body_is_a_422(api: Api, store: EventStore) -> None:
    target = {"name": "hook", "agentType": "claude-code", "mechanism": "webhook", "capabilities": ["python"],
              "config": {"webhook": {"url": "http://127.0.0.1:9/hook"}}}
    headers = {"Idempotency-Key": "target-once"}
    first = await api.call("POST", "/api/targets", target, headers=headers)
    assert first.status == 201, await first.text()
    again = await api.call("POST", "/api/targets", target, headers=headers)
    assert again.status == 200, await again.text()
    other = await api.call("POST", "/api/targets", {**target, "name": "other", "capabilities": ["rust"]},
                           headers=headers)
    body = await other.json()
    assert other.status == 422, body
    assert body["error"] == "IdempotencyKeyReused" and body["details"]["field"] == "Idempotency-Key"
    assert body["details"]["differs"] == ["capabilities", "name"]
    registered = [t for t in await appended(store, api.project) if t == "target.registered"]
    assert registered == ["target.registered"]  # (health checks of the first target append on their own)


async def test_idempotency_keys_are_scoped_per_token(weft_service: Any, project: str, store: EventStore) -> None:
    client = await make_client(weft_service, api_tokens=("token-a", "token-b"))
    try:
        ids = []
        for token in ("token-a", "token-b", "token-a"):
            resp = await client.post(f"/api/work?projectId={project}", json=WORK,
                                     headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "shared"})
            assert resp.status in (200, 201), await resp.text()
            ids.append((await resp.json())["id"])
    finally:
        await client.close()
    assert ids[0] == ids[2] != ids[1]
    assert await appended(store, project) == ["work.submitted", "work.submitted"]


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server whose max payload (64 KiB) is far below weft's default body limit (1 MiB)."""
    server = EmbeddedNats(NatsServerConfig(store_dir=tmp_path / "js", port=free_port(), max_payload=64 * 1024))
    await server.start()
    yield server
    await server.stop()


async def test_the_body_limit_never_exceeds_what_the_stream_accepts(small_nats: EmbeddedNats, project: str) -> None:
    async with own_replica(small_nats.url, project) as api:
        assert api.service is not None
        limit = api.service.settings.max_body_bytes
        assert limit < 64 * 1024
        resp = await api.call("POST", "/api/work", {**WORK, "description": "x" * (limit + 1)})
        body = await resp.json()
        assert resp.status == 413, body
        assert body["details"] == {"field": "body", "limit": limit}
        assert (await api.call("POST", "/api/work", WORK)).status == 201


async def test_an_event_over_the_nats_max_payload_is_a_413_and_appends_nothing(small_nats: EmbeddedNats,
                                                                                project: str) -> None:
    """Even with a body limit configured above what the stream takes (a second app on the replica
    with the limit overridden), the append is refused before sending: 413, nothing stored."""
    async with own_replica(small_nats.url, project) as api:
        assert api.service is not None
        client = await make_client(api.service, max_body_bytes=1024 * 1024)
        try:
            resp = await client.post(f"/api/work?projectId={project}", json={**WORK, "description": "x" * 100_000})
            body = await resp.json()
            assert resp.status == 413, body
            assert body["error"] == "PayloadTooLarge"
            assert body["details"]["field"] == "body"
        finally:
            await client.close()
        store = api.service.readmodel.store if api.service.readmodel else None
        assert store is not None
        assert await appended(store, project) == []



async def test_a_url_over_the_parsers_limit_gets_the_json_error_shape(nats_server: EmbeddedNats, project: str) -> None:
    """aiohttp's parser refuses a request line over 8 KiB before any middleware runs; the server
    weft runs (not the test client's) answers in JSON too."""
    settings = replace(Settings.from_env({}), api_host="127.0.0.1", api_port=0, snapshot_every=0, warp_bridge=False,
                       replica_name=f"url-{project}")
    service = WeftService(settings)
    await service.start(nats_server.url)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{service.port}/api/work?projectId={project}&q={'x' * 9000}"
            async with http.get(url) as resp:
                body = await resp.json()
                assert resp.status in (400, 414), body
                assert resp.headers["Content-Type"].startswith("application/json")
                assert body["details"] == {"field": "request"}
                assert body["message"].startswith("request refused before routing")
    finally:
        await service.stop()


@pytest.mark.parametrize("request_bytes", [
    b"GET /api/work HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x00b\r\n\r\n",  # a NUL in a header value
    b"GET /api/work HTTP/1.1\r\nHost: 127.0.0.1\r\nX Bad: b\r\n\r\n",  # a space in a header name
    b"GET /api/\x00work HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a NUL in the path
    b"GET /api/work HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",  # an unknown version
    # a good request, then a bad one on the same keep-alive connection
    b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /api/work HTTP/1.1\r\nX-Bad: \x00\r\n\r\n",
])
async def test_a_request_the_parser_refuses_gets_the_json_error_shape(
    nats_server: EmbeddedNats, project: str, request_bytes: bytes
) -> None:
    """Raw bytes on a real socket, since no HTTP client sends these."""
    settings = replace(Settings.from_env({}), api_host="127.0.0.1", api_port=0, snapshot_every=0, warp_bridge=False,
                       replica_name=f"raw-{project}")
    service = WeftService(settings)
    await service.start(nats_server.url)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(request_bytes)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after a parser error
        writer.close()
    finally:
        await service.stop()
    if answer.startswith(b"HTTP/1.1 200"):  # the good request's answer comes first
        length = int(answer.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        answer = answer[answer.index(b"\r\n\r\n") + 4 + length:]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer
    assert b"Content-Type: application/json" in head, answer
    assert orjson.loads(body)["details"] == {"field": "request"}, answer
