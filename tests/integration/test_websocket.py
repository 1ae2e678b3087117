"""/api/ws against a real weft app and a real nats-server: protocol, filters, events with seq,
fromSeq replay handed over to live without a gap or a duplicate, projects created later, auth,
slow consumers, stats, going away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.support import Api, FakeAgent, until
from weft.api import create_app, ws
from weft.api.common import SERVICES
from weft.service import WeftService

WORK = {"capability": "python", "boundary": "acme", "description": "write tests"}
Factory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def ws_app(weft_service: WeftService) -> AsyncIterator[Factory]:
    """Apps on the session replica, with the WebSocket API tuned for the test."""
    clients: list[TestClient] = []

    async def make(queue_max: int = 1000, stats_interval_s: float = 30.0, **overrides: Any) -> TestClient:
        assert weft_service.app is not None
        base = weft_service.app[SERVICES]
        options = {"queue_max": queue_max, "stats_interval_s": stats_interval_s, "close_timeout_s": 2.0}
        app = create_app(replace(base, settings=replace(base.settings, **overrides), plan_cache={}), ws_options=options)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def recv(sock: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await sock.receive_json(timeout=timeout)
    assert isinstance(msg, dict)
    return msg


async def next_event(sock: aiohttp.ClientWebSocketResponse, name: str | None = None) -> dict[str, Any]:
    while True:
        msg = await recv(sock)
        if msg["type"] == "event" and (name is None or msg["event"] == name):
            return msg


async def subscribe(sock: aiohttp.ClientWebSocketResponse, topic: str, **kw: Any) -> dict[str, Any]:
    await sock.send_json({"type": "subscribe", "topic": topic, **kw})
    ack = await recv(sock)
    assert ack["type"] == "ack" and ack["subscribed"] == topic, ack
    return ack


async def test_protocol_replies(ws_app: Factory, project: str) -> None:
    client = await ws_app()
    async with client.ws_connect("/api/ws") as sock:
        await sock.send_json({"type": "ping"})
        pong = await recv(sock)
        assert pong["type"] == "pong" and pong["timestamp"]
        ack = await subscribe(sock, "work", projectId=project)
        assert ack["timestamp"] and ack["projectId"] == project
        await sock.send_json({"type": "subscribe", "topic": "bogus"})
        err = await recv(sock)
        assert err["type"] == "error" and err["error"].startswith("Unknown topic: bogus")
        await sock.send_str("{not json")
        assert (await recv(sock))["error"] == "Invalid message format"
        await sock.send_json(["a"])
        assert (await recv(sock))["error"] == "Invalid message format"
        await sock.send_json({"type": "frobnicate"})
        assert (await recv(sock))["error"] == "Unknown message type: frobnicate"
        await sock.send_json({"type": "unsubscribe", "topic": "agents"})
        assert (await recv(sock))["error"] == "Not subscribed to topic: agents"
        await sock.send_json({"type": "unsubscribe", "topic": "work"})
        un = await recv(sock)
        assert un["type"] == "ack" and un["unsubscribed"] == "work"
        await sock.send_json({"type": "ping"})  # still connected after every error
        assert (await recv(sock))["type"] == "pong"
        assert not sock.closed


async def test_a_rest_submit_arrives_with_seq_and_filters_apply(ws_app: Factory, project: str) -> None:
    client = await ws_app()
    api = Api(client, project)
    async with client.ws_connect("/api/ws") as go, client.ws_connect("/api/ws") as py:
        await subscribe(go, "work", projectId=project, filter={"capability": "go"})
        await subscribe(py, "work", projectId=project, filter={"capability": "python", "status": "pending"})
        item = await api.ok("POST", "/api/work", WORK, status=201)
        msg = await next_event(py, "work:submitted")
        assert msg["topic"] == "work" and msg["projectId"] == project
        assert isinstance(msg["seq"], int) and msg["seq"] > 0
        assert msg["data"]["workId"] == item["id"] and msg["data"]["boundary"] == "acme"
        assert msg["data"]["type"] == "work:submitted" and msg["data"]["projectId"] == project
        other = await api.ok("POST", "/api/work", {**WORK, "capability": "go"}, status=201)
        got = await next_event(go, "work:submitted")
        assert got["data"]["workId"] == other["id"]  # the python item never reached the go filter
        await api.ok("POST", f"/api/work/{item['id']}/cancel", {"reason": "not needed"})
        third = await api.ok("POST", "/api/work", WORK, status=201)
        after = await next_event(py)  # the filter says pending: the cancel did not pass
        assert after["event"] == "work:submitted" and after["data"]["workId"] == third["id"]
        assert after["seq"] > msg["seq"]


async def test_from_seq_replays_then_goes_live_without_gap_or_duplicate(ws_app: Factory, project: str) -> None:
    client = await ws_app()
    api = Api(client, project)
    n, m = 6, 6
    ids = [(await api.ok("POST", "/api/work", WORK, status=201))["id"] for _ in range(n)]
    async with client.ws_connect("/api/ws") as sock:
        await sock.send_json({"type": "subscribe", "topic": "work", "projectId": project, "fromSeq": 1})
        # more while the replay runs
        more = await asyncio.gather(*(api.ok("POST", "/api/work", WORK, status=201) for _ in range(m)))
        ids += [x["id"] for x in more]
        ack = await recv(sock)
        assert ack["type"] == "ack" and ack["fromSeq"] == 1
        got = [await next_event(sock, "work:submitted") for _ in range(n + m)]
        seqs = [g["seq"] for g in got]
        assert seqs == sorted(set(seqs)), seqs  # in order, no duplicate
        assert sorted(g["data"]["workId"] for g in got) == sorted(ids)  # no gap
        await api.ok("POST", "/api/work", WORK, status=201)
        last = await next_event(sock, "work:submitted")
        assert last["seq"] > seqs[-1]


async def test_a_project_created_after_start(ws_app: Factory) -> None:
    client = await ws_app()
    fresh = "late" + uuid.uuid4().hex[:10]
    async with client.ws_connect("/api/ws") as sock:
        await subscribe(sock, "work", projectId=fresh)
        item = await Api(client, fresh).ok("POST", "/api/work", WORK, status=201)
        msg = await next_event(sock, "work:submitted")
        assert msg["projectId"] == fresh and msg["data"]["workId"] == item["id"] and msg["seq"] >= 1


async def test_auth_rejects_at_upgrade_and_takes_both_token_paths(ws_app: Factory) -> None:
    client = await ws_app(api_tokens=("s3cret",))
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/api/ws")
    assert err.value.status == 401
    resp = await client.get("/api/ws")
    assert resp.status == 401 and (await resp.json())["error"]
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect("/api/ws?token=wrong")
    async with client.ws_connect("/api/ws?token=s3cret") as sock:
        await sock.send_json({"type": "ping"})
        assert (await recv(sock))["type"] == "pong"
    async with client.ws_connect("/api/ws", protocols=("bearer", "s3cret")) as sock:
        assert sock.protocol == "bearer"
        await sock.send_json({"type": "ping"})
        assert (await recv(sock))["type"] == "pong"


async def test_a_slow_client_is_closed_while_a_fast_one_keeps_receiving(ws_app: Factory, project: str) -> None:
    client = await ws_app(queue_max=4)
    hub = client.server.app[ws.HUB]
    api = Api(client, project)
    big = {**WORK, "description": "x" * 150_000}
    async with client.ws_connect("/api/ws") as slow, client.ws_connect("/api/ws") as fast:
        await subscribe(slow, "work", projectId=project)
        await subscribe(fast, "work", projectId=project)
        seen = 0
        for _ in range(400):  # until the slow client's buffers fill; it reads nothing meanwhile
            item = await api.ok("POST", "/api/work", big, status=201)
            msg = await next_event(fast, "work:submitted")
            assert msg["data"]["workId"] == item["id"]
            seen += 1
            if hub.dropped:
                break
        assert hub.dropped == 1, "the slow client was never dropped"
        # the fast one goes on
        item = await api.ok("POST", "/api/work", WORK, status=201)
        assert (await next_event(fast, "work:submitted"))["data"]["workId"] == item["id"]
        while True:
            msg = await slow.receive(timeout=20)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
        assert slow.close_code == 1008
        assert "slow consumer: 4 messages queued" in str(msg.extra)
        assert hub.health()["connections"] == 1 and seen > 0


async def test_stats_and_health_counts(ws_app: Factory, project: str) -> None:
    client = await ws_app(stats_interval_s=0.05)
    async with client.ws_connect("/api/ws") as sock:
        await subscribe(sock, "stats", projectId=project)
        await subscribe(sock, "work", projectId=project)
        while (msg := await recv(sock))["type"] != "stats":
            pass
        assert msg["projectId"] == project and msg["timestamp"]
        data = msg["data"]
        assert set(data) == {"agents", "work", "targets", "websocket"}
        assert set(data["work"]) == {"pending", "active", "completed", "failed"}
        assert set(data["targets"]) == {"total", "available", "inUse", "disabled"}
        assert set(data["agents"]) == {"total", "byType", "byStatus"}
        assert data["websocket"] == {"connections": 1, "subscriptions": 2}
        assert ws.health(client.server.app) == {"connections": 1, "status": "enabled", "subscriptions": 2}


async def test_shutdown_closes_every_socket_going_away(ws_app: Factory, project: str) -> None:
    client = await ws_app()
    sock = await client.ws_connect("/api/ws")
    await subscribe(sock, "work", projectId=project)
    closing = asyncio.create_task(client.server.close())
    msg = await sock.receive(timeout=10)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert sock.close_code == 1001
    await sock.close()
    await closing


async def test_a_replay_sends_the_very_messages_the_live_feed_sent(ws_app: Factory, project: str, nc: Any,
                                                                    weft_service: WeftService) -> None:
    """History is translated against the state as it was after each event, not as it is now: a
    client replaying after an agent took, finished and left its item gets, message for message,
    what a live client got (the agent's load changes, its summary in the assignment)."""
    client = await ws_app()
    api = Api(client, project, weft_service)
    first = await api.ok("POST", "/api/work", {**WORK, "capability": "nobody-has-this"}, status=201)
    start = first["seq"] + 1

    def by_topic(msgs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"work": [], "agents": []}
        for m in msgs:
            out[m["topic"]].append(m)
        return out

    async def until_marker(sock: aiohttp.ClientWebSocketResponse, agents: int | None = None) -> list[dict[str, Any]]:
        """Events until the marker item's submission (and, for a replay, which runs per topic, until
        the agents topic has as many events as the live client saw)."""
        out: list[dict[str, Any]] = []
        while not any(m["data"].get("description") == "marker" for m in out) or (
            agents is not None and len(by_topic(out)["agents"]) < agents
        ):
            out.append(await next_event(sock))
        return out

    async with client.ws_connect("/api/ws") as live:
        for topic in ("work", "agents"):
            await subscribe(live, topic, projectId=project, fromSeq=start)
        agent = FakeAgent(nc, project, f"a-{uuid.uuid4().hex[:6]}", auto=True)
        await agent.start()
        try:
            item = await api.ok("POST", "/api/work", WORK, status=201)
            await until(api, lambda state: state.work[item["id"]]["status"] == "completed")
        finally:
            await agent.close()
        await api.ok("POST", "/api/work", {**WORK, "capability": "nobody-has-this", "description": "marker"}, status=201)
        seen = await until_marker(live)
    assert {"work:assigned", "work:completed", "agent:updated"} <= {m["event"] for m in seen}, seen
    async with client.ws_connect("/api/ws") as late:
        for topic in ("work", "agents"):
            await subscribe(late, topic, projectId=project, fromSeq=start)
        replayed = await until_marker(late, agents=len(by_topic(seen)["agents"]))
    # Each topic in stream order, message for message (two subscriptions replay side by side).
    assert by_topic(replayed) == by_topic(seen)


async def test_the_openapi_document_describes_the_websocket_the_server_speaks(ws_app: Factory, project: str) -> None:
    """Every topic and filter key the document lists is accepted at subscribe; a key it does not
    list is refused: the document is built from the server's own tables, and this keeps it so."""
    client = await ws_app()
    doc = await (await client.get("/api/openapi.json")).json()
    spec = doc["paths"]["/api/ws"]["get"]["x-weft-websocket"]
    topics = spec["client"]["oneOf"][0]["properties"]["topic"]["enum"]
    assert set(topics) == {"work", "agents", "targets", "stats"}
    async with client.ws_connect("/api/ws") as sock:
        for topic in topics:
            keys = spec["x-filters"][topic]["properties"]
            filter_ = {k: "x" for k in keys}
            await sock.send_json({"type": "subscribe", "topic": topic, "projectId": project, "filter": filter_ or None})
            assert (await recv(sock))["type"] == "ack", topic
            await sock.send_json({"type": "subscribe", "topic": topic, "projectId": project,
                                  "filter": {"undocumented": "x"}})
            assert (await recv(sock))["type"] == "error", topic


class FlakyReads:
    """The store's reads of one project fail (as a read does when a NATS node goes mid-read):
    `fail_after` events into each of the first `failures` reads, then they work again."""

    def __init__(self, store: Any, project: str, failures: int, fail_after: int) -> None:
        self.store, self.project, self.failures, self.fail_after = store, project, failures, fail_after
        self.real = store.read_range
        self.calls: list[int] = []

    async def read_range(self, project: str, start: int = 1, end: int | None = None) -> AsyncIterator[Any]:
        failing = project == self.project and len(self.calls) < self.failures
        if project == self.project:
            self.calls.append(start)
        n = 0
        async for ev in self.real(project, start, end):
            if failing and n == self.fail_after:
                raise TimeoutError("nats: timeout")
            n += 1
            yield ev


async def test_a_replay_whose_read_fails_resumes_where_it_stopped(
    ws_app: Factory, project: str, weft_service: WeftService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos suite: the replay skipped ahead to the live state after a failed read
    (an `error` message, then a silent gap of the events it had not sent yet)."""
    client = await ws_app()
    api = Api(client, project)
    ids = [(await api.ok("POST", "/api/work", WORK, status=201))["id"] for _ in range(6)]
    assert weft_service.readmodel is not None
    flaky = FlakyReads(weft_service.readmodel.store, project, failures=2, fail_after=2)
    monkeypatch.setattr(weft_service.readmodel.store, "read_range", flaky.read_range)
    async with client.ws_connect("/api/ws") as sock:
        await subscribe(sock, "work", projectId=project, fromSeq=1)
        got = [await next_event(sock, "work:submitted") for _ in ids]
        assert [g["data"]["workId"] for g in got] == ids  # every one, in order, once
        await api.ok("POST", "/api/work", WORK, status=201)
        assert (await next_event(sock))["event"] == "work:submitted"  # then live
    assert flaky.calls[0] == 1 and any(start > 1 for start in flaky.calls[1:])  # resumed, not restarted


async def test_a_replay_that_keeps_failing_closes_the_connection_instead_of_skipping(
    ws_app: Factory, project: str, weft_service: WeftService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weft.runtime import live_hub

    client = await ws_app()
    api = Api(client, project)
    for _ in range(3):
        await api.ok("POST", "/api/work", WORK, status=201)
    assert weft_service.readmodel is not None
    flaky = FlakyReads(weft_service.readmodel.store, project, failures=10**6, fail_after=0)
    monkeypatch.setattr(weft_service.readmodel.store, "read_range", flaky.read_range)
    monkeypatch.setattr(live_hub, "REPLAY_RETRY_S", (0.01, 0.01))
    async with client.ws_connect("/api/ws") as sock:
        await subscribe(sock, "work", projectId=project, fromSeq=1)
        await api.ok("POST", "/api/work", WORK, status=201)  # a live event must not jump the gap
        msg = await sock.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:
            assert msg.json()["type"] != "event", msg.data
            msg = await sock.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1011, msg
        assert "replay of" in msg.extra
