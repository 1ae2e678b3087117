"""One chaos run: start the system, put the client load on, do `rounds` fault rounds (each: a fault
picked with the seeded generator, its undoing, a bounded wait until the system is healthy and
acknowledges submits again, a short spell of load), stop the load, let every item finish (agents
stay up), read the stream back and check the invariants (`tests.chaos.invariants`).

Everything started is stopped in a finally block, whatever failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.chaos.clients import Canceller, Submitter, WsSubscriber
from tests.chaos.harness import REPLICA_NAMES, Config, System
from tests.chaos.invariants import Report, check_all
from tests.cluster import poll
from weft.store import connection
from weft.store.eventstore import EventStore


def say(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


async def _stop_tasks(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def _settled(system: System, http: aiohttp.ClientSession, submitter: Submitter, timeout: float) -> None:
    """Every submitted item terminal, as the replicas see it (bounded)."""
    min_seq = max((r.seq or 0 for r in submitter.acked), default=0)

    async def check() -> bool:
        async with http.get(system.base + "/api/stats",
                            params={"projectId": system.project, "min_seq": str(min_seq)}) as resp:
            if resp.status != 200:
                return False
            body = await resp.json()
        return bool(body["pending"] == 0 and body["active"] == 0 and body["total"] >= len(submitter.acked))

    await poll(check, timeout, "every work item terminal")


async def _read_stream(system: System) -> list[Any]:
    nc = await connection.connect(system.cluster.url, **connection.RECONNECT_FOREVER)
    try:
        store = EventStore(nc.jetstream())

        async def read() -> tuple[list[Any]]:
            return ([e async for e in store.read_range(system.project)],)

        return (await poll(read, 60, "a full read of the stream"))[0]
    finally:
        await nc.close()


async def _hashes(system: System, http: aiohttp.ClientSession, seq: int) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for name, r in zip(REPLICA_NAMES, system.replicas, strict=True):
        async with http.get(r.base + "/api/stats/projection",
                            params={"projectId": system.project, "min_seq": str(seq)}) as resp:
            body = await resp.json()
            out[name] = (int(body["seq"]), str(body["stateHash"])) if resp.status == 200 else (-resp.status, "")
    return out


def _dump(path: Path, events: list[Any]) -> None:
    """The stream as read, one event a line (for a bug report: `grep <work id> events.jsonl`)."""
    with path.open("wb") as out:
        for e in events:
            out.write(orjson.dumps({"seq": e.seq, "type": e.type, "entity": e.entity_id, "epoch": e.epoch,
                                    "actor": e.actor, "ts": e.ts, "correlation": e.correlation_id,
                                    "idempotencyKey": e.idempotency_key, "data": e.data}) + b"\n")


async def run_chaos(config: Config) -> Report:
    report = Report(seed=config.seed)
    project = "chaos" + uuid.uuid4().hex[:8]
    system = System(config, project)
    started = time.monotonic()
    tasks: list[asyncio.Task[Any]] = []
    subscribers: list[WsSubscriber] = []
    http: aiohttp.ClientSession | None = None
    say(f"seed {config.seed}, {config.rounds} rounds, project {project}, work dir {config.workdir}")
    try:
        await system.start()
        say(f"up in {time.monotonic() - started:.1f}s: nginx {system.base}, replicas "
            f"{[r.port for r in system.replicas]}, NATS {system.cluster.urls}")
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                     timeout=aiohttp.ClientTimeout(total=20))
        tag = f"s{config.seed}-{uuid.uuid4().hex[:6]}"
        submitter = Submitter(system.base, project, tag, config.submitters, config.submit_pause_s, seed=config.seed)
        canceller = Canceller(system.base, project, tag, submitter, config.cancel_pause_s, seed=config.seed + 1)
        subscribers = [WsSubscriber(system.base, project, f"ws{i + 1}") for i in range(config.ws_clients)]
        load = [asyncio.create_task(submitter.run(http), name="chaos submitter"),
                asyncio.create_task(canceller.run(http), name="chaos canceller")]
        watchers = [asyncio.create_task(s.run(http), name=f"chaos {s.name}") for s in subscribers]
        tasks = load + watchers
        assert await submitter.wait_new_ack(30), "no submit acknowledged before the first fault"
        for i in range(1, config.rounds + 1):
            t0 = time.monotonic()
            what = await system.inject(system.pick(i))
            await system.healthy(config.round_timeout_s)
            assert await submitter.wait_new_ack(config.round_timeout_s), f"round {i}: no submit acknowledged after"
            report.rounds = i
            say(f"round {i}/{config.rounds}: {what}; healthy and acknowledging after "
                f"{time.monotonic() - t0:.1f}s; {len(submitter.acked)} submits acknowledged")
            await asyncio.sleep(system.rng.uniform(*config.load_s))  # load time between faults
        submitter.stop.set()
        canceller.stop.set()
        await _stop_tasks(load, 120)
        say(f"load stopped: {len(submitter.records)} submits ({len(submitter.acked)} acknowledged), "
            f"{len(canceller.records)} cancels; waiting for every item to finish")
        await _settled(system, http, submitter, config.settle_timeout_s)
        # The stream, and every replica's hash at its last seq (again if something was appended meanwhile).
        for _attempt in range(5):
            events = await _read_stream(system)
            last = events[-1].seq if events else 0
            hashes = await _hashes(system, http, last)
            if all(seq == last for seq, _ in hashes.values()):
                break
        report.hashes = hashes
        _dump(config.workdir / "events.jsonl", events)
        # Each subscriber has seen the stream's last work event (bounded), then stops.
        last_work = max((e.seq for e in events if e.type.startswith("work.")), default=0)
        for s in subscribers:
            if not await s.caught_up(last_work, 30):
                report.notes.append(f"{s.name} did not reach seq {last_work} in 30 s")
        for s in subscribers:
            s.stop.set()
        await _stop_tasks(watchers, 10)
        for s in subscribers:  # only what the stream read holds can be compared
            s.seen = [e for e in s.seen if e.seq <= last]
        check_all(report, project, events, submitter.records, canceller.records, subscribers)
        report.faults = dict(system.faults)
        return report
    finally:
        for s in subscribers:
            s.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:
            await http.close()
        with contextlib.suppress(Exception):
            await system.stop()
        report.faults = dict(system.faults)
        report.wall_s = time.monotonic() - started
