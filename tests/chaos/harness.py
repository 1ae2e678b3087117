"""The system under chaos, all real processes on 127.0.0.1: a 3-node NATS cluster
(`tests.cluster.NatsCluster`), three `weft serve` replicas (`tests.processes.WeftProcess`) with
WEFT_STREAM_REPLICAS=3 behind nginx running ops/nginx/weft.conf (`tests.lb.LoadBalancer`), and
reference agents (`tests.processes.AgentProcess`). One `NetProxy` per NATS node stands between the
third replica and every agent on one side and the cluster on the other, so `cut` drops their NATS
connections (the other two replicas connect to the nodes directly).

`System.inject(kind)` does one fault and undoes it (restarts what it killed); `System.healthy()`
waits, bounded and by condition, until everything is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster import NatsCluster, poll
from tests.lb import LoadBalancer
from tests.netproxy import NetProxy
from tests.processes import AgentProcess, WeftProcess

FAULTS = ("replica", "leader", "nats", "agent", "cut")
REPLICA_NAMES = ("chaos-r1", "chaos-r2", "chaos-r3")
# Short timeouts so that a killed holder's item moves on within a round or two.
FAST_ENV = {
    "WEFT_STREAM_REPLICAS": "3",
    "WEFT_HEARTBEAT_MS": "500",
    "WEFT_ACCEPT_TIMEOUT_MS": "3000",
    "WEFT_LEASE_TTL_S": "2",
    "WEFT_RETRY_BASE_MS": "50",
    "WEFT_MIN_SEQ_WAIT_MS": "3000",
    "WEFT_DRAIN_S": "0",
}
AGENT_COMMAND = "cat >/dev/null; sleep 0.2; echo done"


@dataclass
class Config:
    rounds: int = 50
    seed: int = 0
    agents: int = 3
    max_tasks: int = 2
    submitters: int = 2
    submit_pause_s: float = 0.5  # per submitter, between two submits
    cancel_pause_s: float = 1.5
    ws_clients: int = 3
    # The faults in order (round i does schedule[i % len]); empty: each picked at random (seeded).
    schedule: tuple[str, ...] = ()
    down_s: tuple[float, float] = (0.3, 1.2)  # how long a killed process stays down
    load_s: tuple[float, float] = (0.3, 1.0)  # load time between two rounds
    round_timeout_s: float = 60.0  # to be healthy again after a fault
    settle_timeout_s: float = 120.0  # for every item to be terminal at the end
    workdir: Path = field(default_factory=lambda: Path("/tmp/weft-chaos"))


class System:
    def __init__(self, config: Config, project: str) -> None:
        self.config = config
        self.project = project
        self.rng = random.Random(config.seed)
        self.cluster = NatsCluster(config.workdir / "nats", 3, name="weft-chaos")
        self.proxies: list[NetProxy] = []
        self.replicas: list[WeftProcess] = []
        self.agents: list[AgentProcess] = []
        self.lb: LoadBalancer | None = None
        self.http: aiohttp.ClientSession | None = None
        self.faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.log: list[str] = []

    @property
    def base(self) -> str:
        assert self.lb is not None
        return self.lb.base

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self.cluster.start()
        for node in self.cluster.nodes.values():
            self.proxies.append(await NetProxy(node.config.port, nats_frames=False, lifetime_s=3600).start())
        proxied = ",".join(p.url for p in self.proxies)
        urls = (self.cluster.url, self.cluster.url, proxied)
        self.replicas = [WeftProcess(url, self.project, env={**FAST_ENV, "WEFT_REPLICA_NAME": name})
                         for name, url in zip(REPLICA_NAMES, urls, strict=True)]
        # One first, so the R3 stream and buckets are created once, then the others.
        await self.replicas[0].start()
        await asyncio.gather(*(r.start() for r in self.replicas[1:]))
        self.lb = LoadBalancer("nginx", [r.port for r in self.replicas], self.config.workdir / "nginx")
        await self.lb.start()
        self.agents = [
            AgentProcess(proxied, self.project, f"chaos-agent-{i + 1}", AGENT_COMMAND, boundaries="*",
                         max_tasks=self.config.max_tasks, env={"LOG_LEVEL": "warning"})
            for i in range(self.config.agents)
        ]
        for a in self.agents:
            await a.start()
        await self.healthy(60)

    async def stop(self) -> None:
        """Stop everything, whatever state it is in (called from a finally block)."""
        for a in self.agents:
            with contextlib.suppress(Exception):
                await a.kill()
        if self.lb is not None:
            with contextlib.suppress(Exception):
                await self.lb.stop()
        for r in self.replicas:
            with contextlib.suppress(Exception):
                await r.kill()
        for p in self.proxies:
            with contextlib.suppress(Exception):
                await p.close()
        with contextlib.suppress(Exception):
            await self.cluster.stop()
        if self.http is not None:
            await self.http.close()

    # --- health ------------------------------------------------------------------------------------

    async def _ready(self, replica: WeftProcess) -> bool:
        assert self.http is not None
        if replica.proc is None or replica.proc.returncode is not None:
            return False
        async with self.http.get(replica.base + "/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200

    async def healthy(self, timeout: float) -> None:
        """Every NATS node up with an agreed meta leader, every replica ready, every agent running."""

        async def check() -> bool:
            if len(self.cluster.running()) != len(self.cluster.nodes) or await self.cluster.meta_leader() is None:
                return False
            if not all(await asyncio.gather(*(self._ready(r) for r in self.replicas))):
                return False
            return all(a.proc is not None and a.proc.returncode is None for a in self.agents)

        await poll(check, timeout, "the chaos system healthy again")

    async def leader(self) -> WeftProcess | None:
        """The replica holding the project's scheduling lease (its /health `leading`), if one does."""
        assert self.http is not None
        for r in self.replicas:
            with contextlib.suppress(Exception):
                async with self.http.get(r.base + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    body: dict[str, Any] = await resp.json()
                    if self.project in (body.get("leading") or []):
                        return r
        return None

    # --- faults ------------------------------------------------------------------------------------

    def pick(self, round_no: int) -> str:
        if self.config.schedule:
            return self.config.schedule[(round_no - 1) % len(self.config.schedule)]
        return self.rng.choice(FAULTS)

    async def _down(self) -> None:
        await asyncio.sleep(self.rng.uniform(*self.config.down_s))  # the outage's length, not a sync

    async def inject(self, kind: str) -> str:
        """Do the fault `kind` and undo it; returns what was done (for the log)."""
        target: WeftProcess | None = None
        if kind == "leader":
            with contextlib.suppress(AssertionError):  # bounded: an election may be under way
                target = await poll(self.leader, 15, "a scheduling leader")
            if target is None:  # an election under way: a random replica it is
                kind = "replica"
        if kind in ("replica", "leader"):
            replica = target if target is not None else self.rng.choice(self.replicas)
            name = replica.extra_env["WEFT_REPLICA_NAME"]
            await replica.kill()
            await self._down()
            await replica.start()
            what = f"kill -9 replica {name}" + (" (scheduling leader)" if kind == "leader" else "")
        elif kind == "nats":
            node = self.rng.choice(sorted(self.cluster.nodes))
            await self.cluster.kill(node)
            await self._down()
            await self.cluster.restart(node)
            what = f"kill -9 NATS node {node}"
        elif kind == "agent":
            agent = self.rng.choice(self.agents)
            await agent.kill()
            await self._down()
            await agent.start()
            what = f"kill -9 agent {agent.guid}"
        elif kind == "cut":
            before = sum(p.connections for p in self.proxies)
            await asyncio.gather(*(p.cut() for p in self.proxies))
            what = f"cut every proxied NATS connection (accepted so far: {before})"
        else:
            raise ValueError(kind)
        self.faults[kind] += 1
        self.log.append(what)
        return what
