"""Restart = rebuild, with real `weft serve` processes on a real nats-server.

Graceful stop and kill -9 lose nothing that was acknowledged; two processes on the same streams
converge to the same state hash; concurrent writers on one entity never both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import orjson
import pytest

from projections import fold, state_hash
from tests.processes import WEFT, WeftProcess
from tests.servers import own_nats_server
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def own_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A server of this module's own: weft processes attach every project on their server and
    would otherwise compete for the scheduler leases of other tests' projects."""
    async with own_nats_server(tmp_path_factory, "restart") as server:
        yield server


@pytest.fixture
async def own_store(own_nats: EmbeddedNats) -> AsyncIterator[EventStore]:
    nc = await nats.connect(own_nats.url)
    yield EventStore(nc.jetstream())
    await nc.close()

WORK = {"capability": "python", "boundary": "personal", "description": "restart test"}
# A target no pending item can use, with probes off: the restarted replica (which schedules) has
# nothing to decide but its own term: its state is the one before the restart plus `leader.elected`.
LOGS = {"LOG_LEVEL": "info", "LOG_FORMAT": "json"}
TARGET = {"name": "laptop", "agentType": "claude-code", "mechanism": "local", "capabilities": ["go"],
          "config": {"command": "python3 -c pass"}, "healthCheck": {"enabled": False}}


async def scheduling(weft: WeftProcess, project: str, since: int = 0) -> None:
    """Until the process leads `project` and has announced its term (it logs "scheduling" then)."""
    await weft.line(lambda t: (r := log_record(t)).get("msg") == "scheduling" and r.get("project") == project,
                    since=since)


async def only_announcements_after(store: EventStore, project: str, seq: int) -> bool:
    return {e.type async for e in store.read_range(project, seq + 1)} <= {"leader.elected"}


async def replayed_hash(store: EventStore, project: str) -> tuple[int, str]:
    state = fold([e async for e in store.read_range(project)], project=project)
    return state.seq, state_hash(state)


async def test_graceful_restart_rebuilds_identical_state(own_nats: EmbeddedNats, project: str,
                                                         own_store: EventStore) -> None:
    weft = WeftProcess(own_nats.url, project, env=LOGS)
    await weft.start()
    async with aiohttp.ClientSession() as http:
        ids = []
        for i in range(20):
            status, body = await weft.post(http, "/api/work", {**WORK, "priority": 1 + i % 10})
            assert status == 201
            ids.append(body["id"])
        for work_id in ids[:5]:
            assert (await weft.post(http, f"/api/work/{work_id}/cancel", {}))[0] == 200
        assert (await weft.post(http, "/api/targets", TARGET))[0] == 201
        before = await weft.get(http, "/api/stats/projection")
        assert await weft.stop() == 0

        since = len(weft.output)
        await weft.start()
        await scheduling(weft, project, since)
        after = await weft.get(http, "/api/stats/projection", min_seq=await own_store.last_seq(project))
        assert after["seq"] > before["seq"] and await only_announcements_after(own_store, project, before["seq"])
        listing = await weft.get(http, "/api/work", limit=100)
        assert {w["id"] for w in listing["workItems"]} == set(ids)
        assert (await weft.get(http, "/api/targets/laptop"))["name"] == "laptop"
        assert await replayed_hash(own_store, project) == (after["seq"], after["stateHash"])
    await weft.stop()


def log_record(text: str) -> dict[str, Any]:
    """A LOG_FORMAT=json line as a dict ({} for any other line)."""
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


async def test_kill_9_with_snapshots_restarts_from_one_and_replays_to_the_same_hash(
    own_nats: EmbeddedNats, project: str, own_store: EventStore
) -> None:
    """Snapshots every 7 events (each settles the writer's cancelled items back into encoded
    form), then kill -9: the new process starts from a snapshot, not from the first event, and
    holds the state of a full replay; `weft replay`, the debugging tool, prints the same hash,
    and a past state's with --to-seq."""
    env = {"WEFT_SNAPSHOT_EVERY": "7", **LOGS}
    weft = WeftProcess(own_nats.url, project, env=env)
    await weft.start()
    async with aiohttp.ClientSession() as http:
        ids = [(await weft.post(http, "/api/work", WORK))[1]["id"] for _ in range(12)]
        seq = 0
        for work_id in ids[:6]:
            status, body = await weft.post(http, f"/api/work/{work_id}/cancel", {})
            assert status == 200
            seq = body["seq"]
        assert seq >= 18  # 18 commands and the term's announcement, wherever it fell
        await weft.line(lambda t: (r := log_record(t)).get("msg") == "snapshot written" and r.get("seq") == 14)
        before = await weft.get(http, "/api/stats/projection", min_seq=seq)
        await weft.kill()

        since = len(weft.output)
        await weft.start()
        attached = log_record(
            await weft.line(lambda t: log_record(t).get("msg") == "project attached"
                            and log_record(t).get("project") == project, since=since)
        )
        assert attached["from_seq"] >= 14, "the restart began at a snapshot"
        await scheduling(weft, project, since)
        after = await weft.get(http, "/api/stats/projection", min_seq=await own_store.last_seq(project))
        assert after["seq"] > before["seq"] and await only_announcements_after(own_store, project, before["seq"])
        assert await replayed_hash(own_store, project) == (after["seq"], after["stateHash"])
    await weft.stop()

    replay_env = {**os.environ, "NATS_URL": own_nats.url, "LOG_LEVEL": "warning"}
    whole = await run_replay(replay_env, "--project", project)
    assert (whole["seq"], whole["state_hash"]) == (after["seq"], after["stateHash"])
    assert whole["work"]["cancelled"] == 6 and whole["work"]["pending"] == 6
    past = await run_replay(replay_env, "--project", project, "--to-seq", "7")
    first_seven = fold([e async for e in own_store.read_range(project, 1, 7)], project=project)
    assert (past["seq"], past["state_hash"]) == (7, state_hash(first_seven))


async def run_replay(env: dict[str, str], *args: str) -> dict[str, Any]:
    """`weft replay ...` as a process; its summary (the last line) as a dict."""
    proc = await asyncio.create_subprocess_exec(
        WEFT, "replay", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    summary: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return summary


async def test_kill_9_during_load_loses_no_acknowledged_submit(own_nats: EmbeddedNats, project: str,
                                                              own_store: EventStore) -> None:
    weft = WeftProcess(own_nats.url, project, env=LOGS)
    await weft.start()
    acknowledged: list[str] = []
    enough = asyncio.Event()

    async def submitter(http: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            try:
                status, body = await weft.post(http, "/api/work", WORK)
            except (TimeoutError, aiohttp.ClientError):
                return  # the process died under us: this request was never acknowledged
            if status == 201:
                acknowledged.append(body["id"])
                if len(acknowledged) >= 60:
                    enough.set()

    async with aiohttp.ClientSession() as http:
        workers = [asyncio.create_task(submitter(http, 30)) for _ in range(10)]
        await asyncio.wait_for(enough.wait(), 60)
        await weft.kill()
        await asyncio.gather(*workers)

        since = len(weft.output)
        await weft.start()
        await scheduling(weft, project, since)
        seq, expected_hash = await replayed_hash(own_store, project)
        proj = await weft.get(http, "/api/stats/projection", min_seq=seq)
        assert (proj["seq"], proj["stateHash"]) == (seq, expected_hash)
        present = set()
        cursor = None
        while True:
            page = await weft.get(http, "/api/work", limit=100, **({"cursor": cursor} if cursor else {}))
            present |= {w["id"] for w in page["workItems"]}
            cursor = page["nextCursor"]
            if not cursor:
                break
        assert set(acknowledged) <= present
        terms = len([e async for e in own_store.read_range(project) if e.type == "leader.elected"])
        assert terms >= 1 and len(present) == proj["eventsApplied"] - terms  # the rest are submits
    await weft.stop()


async def test_two_processes_converge_to_the_same_state_hash(own_nats: EmbeddedNats, project: str,
                                                             own_store: EventStore) -> None:
    a, b = WeftProcess(own_nats.url, project), WeftProcess(own_nats.url, project)
    await asyncio.gather(a.start(), b.start())
    try:
        async with aiohttp.ClientSession() as http:

            async def submit_many(proc: WeftProcess, n: int) -> list[dict[str, Any]]:
                return [(await proc.post(http, "/api/work", WORK))[1] for _ in range(n)]

            from_a, from_b = await asyncio.gather(submit_many(a, 40), submit_many(b, 40))
            # Cross-replica read-your-writes: cancel on B what A created, after B caught up to it.
            last_a = from_a[-1]
            got = await b.get(http, f"/api/work/{last_a['id']}", min_seq=last_a["seq"])
            assert got["status"] == "pending"
            status, cancelled = await b.post(http, f"/api/work/{last_a['id']}/cancel", {})
            assert status == 200
            high = max(cancelled["seq"], *(x["seq"] for x in from_b))
            pa, pb = await asyncio.gather(
                a.get(http, "/api/stats/projection", min_seq=high), b.get(http, "/api/stats/projection", min_seq=high)
            )
            assert pa == pb
            terms = len([e async for e in own_store.read_range(project, 1, pa["seq"]) if e.type == "leader.elected"])
            assert pa["eventsApplied"] == 81 + terms
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_concurrent_writers_on_one_entity_one_wins(own_nats: EmbeddedNats, project: str,
                                                         own_store: EventStore) -> None:
    a, b = WeftProcess(own_nats.url, project), WeftProcess(own_nats.url, project)
    await asyncio.gather(a.start(), b.start())
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                _, item = await a.post(http, "/api/work", WORK)
                await b.get(http, f"/api/work/{item['id']}", min_seq=item["seq"])
                (sa, _), (sb, _) = await asyncio.gather(
                    a.post(http, f"/api/work/{item['id']}/cancel", {}),
                    b.post(http, f"/api/work/{item['id']}/cancel", {}),
                )
                # One cancel is appended; the other, rejected by OCC, re-decides on the newest state
                # and finds the item cancelled already: cancel is idempotent (no second event).
                assert [sa, sb] == [200, 200]
            events = [e async for e in own_store.read_range(project)]
            assert sum(1 for e in events if e.type == "work.cancelled") == 5
    finally:
        with contextlib.suppress(Exception):
            await asyncio.gather(a.stop(), b.stop())
