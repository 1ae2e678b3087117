"""Faults on the append path against a real nats-server: a lost publish ack, a lost batch commit
reply, a slow fold, a closed connection, and group-commit waiters that are cancelled.

The network misbehaves through `tests.netproxy.NetProxy` on 127.0.0.1 between a store (or a whole
replica) and the server: it drops the reply to one chosen request, or holds a consumer's
deliveries, so each fault happens exactly once and the test awaits it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import urlparse

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client as NATS

from projections.events import Event, idempotent_id, stream_name
from tests.integration.test_eventstore import work_submitted
from tests.netproxy import Frame, NetProxy
from tests.support import Api, own_replica
from weft.api import create_app
from weft.api.common import Services
from weft.commands import Commands
from weft.settings import Settings
from weft.store import connection
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import Appended, AppendOutcomeUnknown, EventStore
from weft.store.groupcommit import GroupCommit
from weft.store.readmodel import ReadModel

WORK = {"capability": "nobody-has-this", "boundary": "nowhere", "description": "fault test"}
TIMEOUT_S = 0.5  # publish timeout of the stores under test: a lost reply costs this much


@pytest.fixture
async def proxy(nats_server: EmbeddedNats) -> AsyncIterator[NetProxy]:
    port = urlparse(nats_server.url).port
    assert port is not None
    async with NetProxy(port, lifetime_s=120) as p:
        yield p


@pytest.fixture
async def proxied_nc(proxy: NetProxy) -> AsyncIterator[NATS]:
    nc = await connection.connect(proxy.url, max_reconnect_attempts=3)
    yield nc
    await nc.close()


def acks_of(project: str) -> Callable[[Frame], bool]:
    """Publishes to the project's stream (not KV, not the JetStream API)."""
    return lambda f: f.subject.startswith(f"weft.{project}.ev.")


async def until(cond: Callable[[], bool], rounds: int = 10_000) -> None:
    """Let other tasks run until `cond` holds; for steps that need no I/O, only a turn of the loop."""
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def events_of(store: EventStore, project: str) -> list[Event]:
    return [e async for e in store.read_range(project)]


async def own_group(store: EventStore, project: str) -> GroupCommit:
    await store.append(work_submitted(project, "first"), 0)  # the stream and its batcher exist
    group = store._groups[stream_name(project)]
    assert group is not None
    return group


# --- fault 2: cancelled group-commit waiters -----------------------------------------------------


async def test_waiters_cancelled_after_being_handed_a_slot_give_it_back(nc: NATS, project: str) -> None:
    store = EventStore(nc.jetstream(), group_commit_after=4)
    group = await own_group(store, project)
    group.inflight += 4  # four single publishes in flight: the group is crowded
    waiters = [asyncio.create_task(store.append(work_submitted(project, f"w{i}"), 0)) for i in range(4)]
    await until(lambda: len(group._queue) == 4)
    # The four publishes finish (as `append`'s finally does) and hand their slots to the waiters,
    # which are cancelled before they resume (a scheduler stopping cancels its decisions).
    group.inflight -= 4
    group.kick()
    for t in waiters:
        t.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert group.inflight == 0, "slots leaked"
    async with asyncio.timeout(10):  # with the slots leaked, this waits forever (crowded, no batch)
        later = await store.append(work_submitted(project, "later"), 0)
    assert not later.duplicate and (await work_seqs(store, project))["later"] == later.seq


async def test_a_waiter_cancelled_while_queued_is_never_published(nc: NATS, project: str) -> None:
    store = EventStore(nc.jetstream(), group_commit_after=1)
    group = await own_group(store, project)
    group.inflight += 1  # one single publish in flight
    gone = [asyncio.create_task(store.append(work_submitted(project, f"gone{i}"), 0)) for i in range(5)]
    await until(lambda: len(group._queue) == 5)
    for t in gone:
        t.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    assert group._queue == [], "cancelled waiters stay queued"
    # Enough new appends for a batch with what is still queued: the cancelled must not be in it.
    kept = [asyncio.create_task(store.append(work_submitted(project, f"kept{i}"), 0)) for i in range(11)]
    await until(lambda: len(group._queue) == 11 or group._task is not None)
    group.inflight -= 1
    group.kick()
    async with asyncio.timeout(10):
        await asyncio.gather(*kept)
    stored = sorted(await submitted(store, project))
    assert stored == sorted(["first"] + [f"kept{i}" for i in range(11)])
    assert group.inflight == 0


# --- fault 6: a publish without a reply ---------------------------------------------------------


async def test_a_publish_whose_ack_is_lost_is_sent_again_and_lands_once(
    proxy: NetProxy, proxied_nc: NATS, store: EventStore, project: str
) -> None:
    through = EventStore(proxied_nc.jetstream(), publish_timeout_s=TIMEOUT_S, group_commit_after=0)
    await through.ensure_stream(project)
    rule = proxy.drop_replies_to(acks_of(project))
    ev = work_submitted(project, "w1")
    appended = await through.append(ev, 0)
    assert await rule.wait() and len(rule.frames) == 1, "the ack was not dropped"
    assert not appended.duplicate  # its own retry found it: created here
    assert await work_seqs(store, project) == {"w1": appended.seq} and ev.seq == appended.seq


@pytest.mark.parametrize("same_subject", [True, False], ids=["occ-read-back", "msg-id-dedupe"])
async def test_after_a_lost_ack_an_earlier_requests_event_is_still_a_duplicate(
    proxy: NetProxy, proxied_nc: NATS, store: EventStore, project: str, same_subject: bool
) -> None:
    """Two requests with one Idempotency-Key (one event id): the second's retry after a lost ack
    finds the first's event, and must not claim it as its own."""
    first = work_submitted(project, "w1")
    seq = (await store.append(first, 0)).seq
    through = EventStore(proxied_nc.jetstream(), publish_timeout_s=TIMEOUT_S, group_commit_after=0)
    rule = proxy.drop_replies_to(acks_of(project))
    again = work_submitted(project, "w1" if same_subject else "w2", id=first.id, correlation_id="another")
    assert await through.append(again, 0) == Appended(seq=seq, duplicate=True)
    assert len(rule.frames) == 1
    assert await work_seqs(store, project) == {"w1": seq}


async def test_an_append_that_is_never_answered_is_outcome_unknown(
    proxy: NetProxy, proxied_nc: NATS, store: EventStore, project: str
) -> None:
    through = EventStore(proxied_nc.jetstream(), publish_timeout_s=TIMEOUT_S, group_commit_after=0)
    await through.ensure_stream(project)
    rule = proxy.drop_replies_to(acks_of(project), count=3)
    ev = work_submitted(project, "w1")
    with pytest.raises(AppendOutcomeUnknown) as caught:
        await through.append(ev, 0)
    assert caught.value.event is ev and len(rule.frames) == 3
    assert list(await work_seqs(store, project)) == ["w1"]  # stored once nonetheless


async def test_a_submit_whose_ack_is_lost_answers_201_once(
    nats_server: EmbeddedNats, proxy: NetProxy, store: EventStore, project: str
) -> None:
    async with own_replica(proxy.url, project) as api:
        slow_network(api)
        rule = proxy.drop_replies_to(f"weft.{project}.ev.work.")
        resp = await api.call("POST", "/api/work", WORK)
        body = await resp.json()
        assert resp.status == 201, body
        assert "Idempotent-Replayed" not in resp.headers
        assert len(rule.frames) == 1, "the ack was not dropped"
        assert await submitted(store, project) == [body["id"]]


async def test_a_submit_never_answered_is_504_naming_the_item_to_look_up(
    nats_server: EmbeddedNats, proxy: NetProxy, store: EventStore, project: str
) -> None:
    async with own_replica(proxy.url, project) as api:
        slow_network(api)
        rule = proxy.drop_replies_to(f"weft.{project}.ev.work.", count=3)
        resp = await api.call("POST", "/api/work", WORK)
        body = await resp.json()
        assert resp.status == 504, body
        assert body["error"] == "OutcomeUnknown" and "Retry-After" not in resp.headers
        assert "Idempotency-Key" in body["message"]
        work_id = body["details"]["entityId"]
        assert len(rule.frames) == 3
        # What the body says to do finds out: the item is there.
        assert await submitted(store, project) == [work_id]
        last = await store.last_seq(project)
        found = await api.ok("GET", f"/api/work/{work_id}", params={"min_seq": last})
        assert found["id"] == work_id


# --- fault 7: a lost batch commit reply -----------------------------------------------------------


async def test_fresh_submits_in_a_batch_whose_commit_reply_is_lost_are_created(
    nats_server: EmbeddedNats, proxy: NetProxy, store: EventStore, project: str
) -> None:
    async with own_replica(proxy.url, project, group_commit_after=1) as api:
        slow_network(api)
        warm = await api.ok("POST", "/api/work", WORK, status=201)  # stream and batcher exist
        rule = proxy.drop_replies_to(lambda f: b"Nats-Batch-Commit" in f.headers)
        # Hold what the replica sends, so the first submit keeps the single slot and the others
        # queue up for a batch; let it all go once the batch's commit is on its way.
        proxy.pause("up")
        keys = [{"Idempotency-Key": f"{project}-k{i}"} if i % 2 else {} for i in range(20)]
        calls = [asyncio.create_task(api.call("POST", "/api/work", WORK, headers=k)) for k in keys]
        await proxy.seen(b"Nats-Batch-Commit", "up")
        proxy.resume("up")
        responses = await asyncio.gather(*calls)
        bodies = [await r.json() for r in responses]
        assert len(rule.frames) == 1, "the commit reply was not dropped"
        assert [r.status for r in responses] == [201] * 20, bodies
        assert not any("Idempotent-Replayed" in r.headers for r in responses)
        ids = [b["id"] for b in bodies]
        assert sorted(await submitted(store, project)) == sorted([warm["id"], *ids])
        # A genuine repeat of a key is still a replay, of the item its first request created.
        again = await api.call("POST", "/api/work", WORK, headers=keys[1])
        assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
        assert (await again.json())["id"] == ids[1]


async def test_a_lost_ack_does_not_make_an_earlier_requests_key_a_creation(
    proxy: NetProxy, store: EventStore, project: str
) -> None:
    """The other side of fault 7: a request whose key another replica already used, and whose own
    ack is lost, finds that replica's event on its retry: a replay (200), never "created"."""
    async with own_replica(proxy.url, project) as api:
        slow_network(api)
        await api.ok("POST", "/api/work", WORK, status=201)  # project attached, tail running
        key = f"{project}-once"
        # This replica must not have folded the other's event when the request looks at its view.
        hold = proxy.hold(lambda f: f.reply is not None and f".WEFT_{project}." in f.reply)
        scoped = f"work:api:{key}"  # scoped by actor (no tokens: "api")
        theirs = work_submitted(project, "theirs", id=idempotent_id(project, scoped), idempotency_key=scoped)
        theirs.data.update({k: WORK[k] for k in ("capability", "boundary", "description")})  # the same request
        await store.append(theirs, 0)  # another replica's request with the key
        rule = proxy.drop_replies_to(f"weft.{project}.ev.work.")
        call = asyncio.create_task(api.call("POST", "/api/work", WORK, headers={"Idempotency-Key": key}))
        await rule.wait()  # our publish went out (so the view was read) and its ack is gone
        hold.release()
        resp = await call
        body = await resp.json()
        assert resp.status == 200 and resp.headers.get("Idempotent-Replayed") == "true", body
        assert body["id"] == "theirs"
        assert (await submitted(store, project)).count("theirs") == 1
        assert len(await submitted(store, project)) == 2


# --- fault 6: stored but not folded yet -------------------------------------------------------


async def test_a_submit_whose_fold_is_slow_answers_202_with_seq(
    nats_server: EmbeddedNats, proxy: NetProxy, store: EventStore, project: str
) -> None:
    async with own_replica(proxy.url, project) as api:
        await api.ok("POST", "/api/work", WORK, status=201)  # project attached, tail running
        assert api.service is not None and api.service.commands is not None
        api.service.commands.wait_s = 0.3
        hold = proxy.hold(lambda f: f.reply is not None and f".WEFT_{project}." in f.reply)
        resp = await api.call("POST", "/api/work", WORK)
        body = await resp.json()
        assert resp.status == 202, body
        assert hold.count >= 1, "the delivery was not held"
        assert body["folded"] is False and resp.headers["X-Weft-Seq"] == str(body["seq"])
        assert (await work_seqs(store, project))[body["id"]] == body["seq"]
        hold.release()
        found = await api.ok("GET", f"/api/work/{body['id']}", params={"min_seq": body["seq"]})
        assert found["status"] == "pending"


# --- fault 11: every 503 says when to retry -------------------------------------------------------


async def test_every_503_carries_retry_after(proxy: NetProxy, proxied_nc: NATS, project: str) -> None:
    async with bare_app(proxied_nc, project) as api:
        await api.ok("POST", "/api/work", WORK, status=201)
        # A NATS timeout: the server hears nothing, so a new project's stream cannot be made.
        proxy.blackhole("up")
        resp = await api.call("POST", "/api/work", WORK, headers={"X-Weft-Project": f"{project}-new"})
        assert resp.status == 503, await resp.text()
        assert resp.headers.get("Retry-After") == "1", "timeout"
        proxy.restore("up")
        # A closed connection: the command, and /health.
        await proxied_nc.close()
        for method, path in (("POST", "/api/work"), ("GET", "/health")):
            resp = await api.call(method, path, WORK if method == "POST" else None)
            assert resp.status == 503, (path, await resp.text())
            assert resp.headers.get("Retry-After") == "1", path


# --- helpers --------------------------------------------------------------------------------------


def slow_network(api: Api) -> None:
    """Publishes of the replica's store time out after TIMEOUT_S (5 s by default)."""
    assert api.service is not None and api.service.commands is not None
    api.service.commands.store.publish_timeout_s = TIMEOUT_S


async def submitted(store: EventStore, project: str) -> list[str]:
    return [e.entity_id for e in await events_of(store, project) if e.type == "work.submitted"]


async def work_seqs(store: EventStore, project: str) -> dict[str, int]:
    """work id -> seq of its work.submitted (other events, a leader's announcement, say, aside)."""
    return {e.entity_id: e.seq for e in await events_of(store, project) if e.type == "work.submitted"}


@contextlib.asynccontextmanager
async def bare_app(nc: NATS, project: str) -> AsyncIterator[Api]:
    """The REST app over a replica on `nc` alone (no scheduler, gateway or advisories), so a test
    may break or close that connection; JetStream requests time out after TIMEOUT_S."""
    store = EventStore(nc.jetstream(timeout=TIMEOUT_S), publish_timeout_s=TIMEOUT_S)
    replica = ReadModel(store, snapshot_every=0)
    settings = replace(Settings.from_env({}), snapshot_every=0)
    app = create_app(Services(settings=settings, readmodel=replica, commands=Commands(replica, store)))
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Api(client, project)
    finally:
        await client.close()
        await replica.stop()
