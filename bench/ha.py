"""High availability and live events, measured with real processes on 127.0.0.1:

- WebSocket event-to-client latency with many clients on one replica (bench.wsclients);
- time from kill -9 / SIGTERM of the scheduling leader to the next assignment, default settings;
- REST submit throughput through nginx (ops/nginx/weft.conf) in front of 1 and of 3 replicas;
- submit throughput and restart-to-ready on a 3-node R3 cluster against one R1 node;
- the cost of metrics and of tracing on REST submit throughput (same run, alternating).

Replicas are `weft serve` processes (tests.processes.WeftProcess), the load balancer and the cluster
are the tests' own helpers (tests.lb, tests.cluster), so the bench runs what the tests run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench import rest
from bench.server import connect, nats_server
from tests.cluster import NatsCluster
from tests.lb import LoadBalancer, available
from tests.processes import WeftProcess
from weft.agent.client import AgentClient, Assignment

WORK = {"capability": "python", "boundary": "personal", "description": "bench ha"}
QUIET = {"LOG_LEVEL": "warning", "WEFT_DRAIN_S": "0", "WEFT_WARP_BRIDGE": "off"}


def pct(xs: list[float], p: float) -> float:
    data = sorted(xs)
    return data[max(0, min(len(data) - 1, round(p / 100 * (len(data) - 1))))] if data else 0.0


@contextlib.asynccontextmanager
async def replicas(nats_url: str, project: str, n: int, **env: str) -> AsyncIterator[list[WeftProcess]]:
    procs = [WeftProcess(nats_url, project, env={**QUIET, "WEFT_REPLICA_NAME": f"bench-r{i + 1}", **env})
             for i in range(n)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.kill() for p in procs), return_exceptions=True)


# --- WebSocket fan-out ---------------------------------------------------------------------------

@dataclass
class WsResult:
    clients: int
    events: int
    latencies_ms: list[float] = field(default_factory=list)  # from the publish reaching NATS
    from_post_ms: list[float] = field(default_factory=list)  # from the POST being sent
    missing: int = 0


async def ws_latency(nats_url: str, root: Path, clients: int = 500, events: int = 100,
                     processes: int = 2) -> WsResult:
    """`clients` subscribers (in `processes` processes) on one replica; `events` submits one at a
    time, 20 ms apart. Latency: a client's receipt - the moment the event's publish reached NATS
    (seen by a plain subscriber in the clients' process): what weft adds (fold, fan-out,
    WebSocket); also from the moment the POST was sent (append and fold included)."""
    project = "benchws"
    async with replicas(nats_url, project, 1) as [weft], aiohttp.ClientSession() as http:
        async with http.post(weft.base + "/api/work", json=WORK, params={"projectId": project}) as resp:
            assert resp.status == 201  # the project exists before anyone subscribes
        ws_url = weft.base.replace("http://", "ws://") + "/api/ws"
        outs = [root / f"ws-{i}.json" for i in range(processes)]
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.wsclients", ws_url, nats_url, project, str(clients // processes), str(events),
            str(out),
            stdout=asyncio.subprocess.PIPE) for out in outs]
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 90)
            assert line.strip() == b"ready", line
        sent: dict[str, float] = {}
        for _ in range(events):
            t = time.time()
            async with http.post(weft.base + "/api/work", json=WORK, params={"projectId": project}) as resp:
                body = await resp.json()
            sent[body["id"]] = t
            await asyncio.sleep(0.02)  # load shape, not synchronisation: one event at a time
        await asyncio.gather(*(asyncio.wait_for(p.wait(), 150) for p in procs))
    res = WsResult(clients, events)
    for out in outs:
        recorded = orjson.loads(out.read_bytes())
        published = recorded["nats"]
        for seen in recorded["clients"]:
            got = {wid: t for wid, t in seen if wid in sent}
            res.missing += len(sent) - len(got)
            res.from_post_ms += [(t - sent[wid]) * 1000 for wid, t in got.items()]
            res.latencies_ms += [(t - published[wid]) * 1000 for wid, t in got.items() if wid in published]
    res.missing += (clients - clients // processes * processes) * events
    return res


# --- leader failover --------------------------------------------------------------------------------

async def _next_assignment(agent: AgentClient, pushes: AsyncIterator[Any], timeout: float) -> str:
    while True:
        push = await asyncio.wait_for(anext(pushes), timeout)
        if isinstance(push, Assignment):
            await agent.accept(push.work_id)
            await agent.complete(push.work_id, summary="ok")
            return push.work_id


async def _leader(procs: list[WeftProcess], http: aiohttp.ClientSession, project: str) -> WeftProcess:
    """The replica whose /health names `project` among the projects it leads (bounded poll)."""
    for _ in range(200):
        for p in procs:
            if p.proc is None:
                continue
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(p.base + "/health") as resp:
                    if project in (await resp.json()).get("leading", {}):
                        return p
        await asyncio.sleep(0.05)
    raise RuntimeError("no leader found")


async def failover(nats_url: str, rounds: int = 3) -> dict[str, list[float]]:
    """Two replicas and an idle agent; the leader is killed (SIGKILL) or stopped (SIGTERM), a
    submit goes to the survivor at once, and the time from the signal to the agent holding the
    assignment is taken; the dead replica is started again for the next round."""
    project = "benchfailover"
    out: dict[str, list[float]] = {"kill": [], "term": []}
    nc = await connect(nats_url)
    agent = AgentClient(project, "bench-failover", nc=nc)
    try:
        async with replicas(nats_url, project, 2) as procs, aiohttp.ClientSession() as http:
            await agent.register(agent_type="claude-code", capabilities=["python"], boundaries=["*"],
                                 max_concurrent_tasks=1, hostname="bench")
            pushes = agent.pushes()
            beat = asyncio.create_task(_beat(agent))
            try:
                async with http.post(procs[0].base + "/api/work", json=WORK, params={"projectId": project}) as r:
                    assert r.status == 201
                await _next_assignment(agent, pushes, 30)
                for rnd in range(rounds * 2):
                    how = "kill" if rnd % 2 == 0 else "term"
                    leader = await _leader(procs, http, project)
                    survivor = next(p for p in procs if p is not leader)
                    t0 = time.perf_counter()
                    leader.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)  # type: ignore[union-attr]
                    async with http.post(survivor.base + "/api/work", json=WORK, params={"projectId": project}) as r:
                        assert r.status == 201, await r.text()
                    await _next_assignment(agent, pushes, 60)
                    out[how].append(time.perf_counter() - t0)
                    await leader.stop()
                    await leader.start()
            finally:
                beat.cancel()
    finally:
        await nc.close()
    return out


async def _beat(agent: AgentClient) -> None:
    while True:
        await agent.heartbeat(0)
        await asyncio.sleep(2)


# --- nginx in front of 1 and 3 replicas -----------------------------------------------------------------

async def through_nginx(nats_url: str, root: Path, n: int, concurrency: int) -> dict[int, rest.RestResult]:
    out: dict[int, rest.RestResult] = {}
    for count in (1, 3):
        async with replicas(nats_url, rest.PROJECT, count) as procs:
            ports = [p.port for p in procs] * (3 // count)
            lb = LoadBalancer("nginx", ports, root / f"nginx-{count}")
            await lb.start()
            try:
                out[count] = await rest.fire(lb.base, n, concurrency)
            finally:
                await lb.stop()
    return out


# --- R3 cluster against R1 -------------------------------------------------------------------------------

@dataclass
class StoreResult:
    submit: rest.RestResult
    restart_s: float
    events: int


async def _restart_to_ready(nats_url: str, env: dict[str, str], project: str, last_seq: int) -> float:
    t0 = time.perf_counter()
    async with replicas(nats_url, project, 1, **env) as [weft], aiohttp.ClientSession() as http:
        for _ in range(1200):  # bounded: 60 s
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(weft.base + "/api/stats/projection", params={"projectId": project}) as resp:
                    if resp.status == 200 and (await resp.json())["seq"] >= last_seq:
                        return time.perf_counter() - t0
            await asyncio.sleep(0.05)
    raise RuntimeError("restart never caught up")


async def r3_vs_r1(root: Path, n: int, concurrency: int) -> dict[str, StoreResult]:
    out: dict[str, StoreResult] = {}
    for name in ("R1", "R3"):
        env = {"WEFT_SNAPSHOT_EVERY": "0"} | ({"WEFT_STREAM_REPLICAS": "3"} if name == "R3" else {})
        async with _store(name, root) as url:
            async with replicas(url, rest.PROJECT, 1, **env) as [weft]:
                submit = await rest.fire(weft.base, n, concurrency)
            nc = await connect(url)
            try:
                last = (await nc.jetstream().stream_info(f"WEFT_{rest.PROJECT}")).state.last_seq
            finally:
                await nc.close()
            out[name] = StoreResult(submit, await _restart_to_ready(url, env, rest.PROJECT, last), last)
    return out


@contextlib.asynccontextmanager
async def _store(name: str, root: Path) -> AsyncIterator[str]:
    if name == "R1":
        async with nats_server(root / "r1", name="weft-bench-r1") as srv:
            yield srv.url
        return
    cluster = NatsCluster(root / "r3", name="weft-bench-r3")
    await cluster.start()
    try:
        yield cluster.url
    finally:
        await cluster.stop()


# --- metrics and tracing overhead --------------------------------------------------------------------------

VARIANTS: dict[str, Callable[[str], dict[str, str]]] = {
    "off": lambda _sink: {"WEFT_METRICS": "off"},
    "metrics": lambda _sink: {},
    "metrics+tracing": lambda sink: {"OTEL_EXPORTER_OTLP_ENDPOINT": sink},
    "metrics+tracing 10%": lambda sink: {"OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                                         "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                         "OTEL_TRACES_SAMPLER_ARG": "0.1"},
}


async def overhead(nats_url: str, rounds: int, n: int, concurrency: int) -> dict[str, list[float]]:
    """REST submit req/s per variant; each round runs every variant once, in turn, on a fresh
    process, so drift of this machine's speed falls on all of them alike. Prometheus-style scrapes
    every 2 s while metrics are on; spans go to a local OTLP sink answering 200."""
    spans = [0]

    async def sink(request: web.Request) -> web.Response:
        await request.read()
        spans[0] += 1
        return web.Response(status=200)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", sink)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for rnd in range(rounds):
            names = list(VARIANTS)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # no variant always first
                env = VARIANTS[name]
                project = f"benchobs{uuid.uuid4().hex[:6]}"
                async with replicas(nats_url, project, 1, **env(base)) as [weft]:
                    scraper = asyncio.create_task(_scrape(weft.base)) if name != "off" else None
                    try:
                        res = await rest.fire(weft.base, n, concurrency, project=project)
                    finally:
                        if scraper is not None:
                            scraper.cancel()
                    out[name].append(res.rate)
                await _drop(nats_url, f"WEFT_{project}")
    finally:
        await runner.cleanup()
    return out


async def _scrape(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/metrics") as resp:
                    await resp.read()
            await asyncio.sleep(2)


async def _drop(url: str, stream: str) -> None:
    nc = await connect(url)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


__all__ = ["available", "failover", "median", "overhead", "pct", "r3_vs_r1", "through_nginx", "ws_latency"]
