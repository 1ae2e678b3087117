"""The agent work loop under `weft serve`: submit -> agent-holds-assignment latency with an idle
agent waiting, and assignments/s with 20 agents. Agents are the real protocol client
(weft.agent.client.AgentClient) in this process; weft is a separate `weft serve` process."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS

from weft.agent.client import AgentClient, Assignment

WORK = {"capability": "python", "boundary": "personal", "description": "bench loop"}


@dataclass
class LatencyResult:
    samples_ms: list[float] = field(default_factory=list)

    def pct(self, p: float) -> float:
        data = sorted(self.samples_ms)
        k = max(0, min(len(data) - 1, round(p / 100 * (len(data) - 1))))
        return data[k]


@dataclass
class ThroughputResult:
    items: int
    agents: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


async def _agent(nc: NATS, project: str, guid: str, max_tasks: int) -> AgentClient:
    client = AgentClient(project, guid, nc=nc)
    await client.register(agent_type="claude-code", capabilities=["python"], boundaries=["*"],
                          max_concurrent_tasks=max_tasks, hostname="bench")
    return client


async def _heartbeats(clients: list[AgentClient], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.gather(*(c.heartbeat(0) for c in clients))
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


async def latency(base: str, nc: NATS, project: str, n: int) -> LatencyResult:
    """One idle agent waits; each submit is timed until its assignment push reaches the agent."""
    agent = await _agent(nc, project, "bench-latency", 1)
    stop = asyncio.Event()
    beats = asyncio.create_task(_heartbeats([agent], stop))
    pushes = agent.pushes()
    result = LatencyResult()
    try:
        async with aiohttp.ClientSession() as http:
            # Warm up: the first submit creates the project, its stream and the scheduler lease.
            for i in range(n + 5):
                t0 = time.perf_counter()
                async with http.post(f"{base}/api/work", json=WORK, params={"projectId": project}) as resp:
                    assert resp.status == 201, await resp.text()
                push = await asyncio.wait_for(anext(pushes), 10)
                took = (time.perf_counter() - t0) * 1000
                assert isinstance(push, Assignment)
                if i >= 5:
                    result.samples_ms.append(took)
                await agent.accept(push.work_id)
                await agent.complete(push.work_id, summary="ok")
    finally:
        stop.set()
        await beats
    return result


async def throughput(base: str, nc: NATS, project: str, items: int, n_agents: int) -> ThroughputResult:
    """A backlog of `items`, then `n_agents` agents (1 slot each) that accept and complete at once:
    assignments/s over the whole loop (assign -> accept -> complete is three appends an item)."""
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(64)

        async def submit() -> None:
            async with sem, http.post(f"{base}/api/work", json=WORK, params={"projectId": project}) as resp:
                assert resp.status == 201

        await asyncio.gather(*(submit() for _ in range(items)))
    done = 0
    finished = asyncio.Event()
    clients = [AgentClient(project, f"bench-w{i}", nc=nc) for i in range(n_agents)]

    async def work(client: AgentClient) -> None:
        nonlocal done
        async for push in client.pushes():
            if isinstance(push, Assignment):
                await client.accept(push.work_id)
                await client.complete(push.work_id, summary="ok")
                done += 1
                if done >= items:
                    finished.set()

    stop = asyncio.Event()
    workers = [asyncio.create_task(work(c)) for c in clients]
    t0 = time.perf_counter()
    for c in clients:
        await c.register(agent_type="claude-code", capabilities=["python"], boundaries=["*"],
                         max_concurrent_tasks=1, hostname="bench")
    beats = asyncio.create_task(_heartbeats(clients, stop))
    try:
        await asyncio.wait_for(finished.wait(), 300)
        seconds = time.perf_counter() - t0
    finally:
        stop.set()
        await beats
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return ThroughputResult(items, n_agents, seconds)


def summary(lat: LatencyResult) -> dict[str, Any]:
    return {"n": len(lat.samples_ms), "mean_ms": statistics.fmean(lat.samples_ms),
            "p50_ms": lat.pct(50), "p95_ms": lat.pct(95), "p99_ms": lat.pct(99)}
