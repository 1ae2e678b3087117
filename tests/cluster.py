"""A 3-node JetStream cluster of the bundled nats-server on 127.0.0.1, for tests of weft under node
loss: kill -9 a node, restart it on its own store, find a stream's leader, step it down, and read
each node's own copy of a stream (its `/jsz`), so a test can check that the replicas converge.

Each node is an `EmbeddedNats` (weft.store.embedded) with free client, route and monitoring ports,
JetStream with `sync_interval: always`, and its store under the directory given. Nothing here
sleeps blindly: every wait polls a condition, bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from nats.js import JetStreamContext

from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port

T = TypeVar("T")
POLL_S = 0.05  # between two looks at a condition


async def poll(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """`check()`'s first truthy value, asked every POLL_S until `timeout` (then AssertionError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except Exception as err:  # a node not up yet, a leaderless moment: look again
            last = err
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")
        await asyncio.sleep(POLL_S)


class NatsCluster:
    """Three (or `size`) clustered nats-servers named n1..nN; `url` lists every client URL."""

    def __init__(self, base_dir: Path, size: int = 3, name: str = "weft-cluster") -> None:
        route_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in route_ports]
        self.nodes: dict[str, EmbeddedNats] = {}
        for i in range(size):
            node = f"n{i + 1}"
            self.nodes[node] = EmbeddedNats(
                NatsServerConfig(
                    store_dir=base_dir / node,
                    port=free_port(),
                    server_name=node,
                    http_port=free_port(),
                    cluster_name=name,
                    cluster_port=route_ports[i],
                    routes=[r for j, r in enumerate(routes) if j != i],
                    sync_always=True,
                )
            )
        self._http: aiohttp.ClientSession | None = None

    # --- addresses ---------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes.values()]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated: what NATS_URL takes."""
        return ",".join(self.urls)

    def running(self) -> list[str]:
        return [name for name, n in self.nodes.items() if n.proc is not None and n.proc.returncode is None]

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        await asyncio.gather(*(n.start() for n in self.nodes.values()))
        await self.wait_meta_leader(timeout)

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes.values()), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def kill(self, name: str) -> None:
        """kill -9 the node: no flush, no goodbye to its routes or clients."""
        await self.nodes[name].kill()

    async def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start a stopped node again on the same store and ports; returns when the cluster has a
        meta leader that every running node (this one included) agrees on."""
        await self.nodes[name].start()
        await self.wait_meta_leader(timeout)

    async def ensure_all_running(self, timeout: float = 30.0) -> None:
        for name in self.nodes:
            if name not in self.running():
                await self.nodes[name].start()
        await self.wait_meta_leader(timeout)

    # --- monitoring --------------------------------------------------------------------------

    async def jsz(self, name: str, **query: str) -> dict[str, Any]:
        """The node's own `/jsz` (monitoring endpoint): what this node holds, not the leader's view."""
        assert self._http is not None, "cluster not started"
        port = self.nodes[name].config.http_port
        async with self._http.get(f"http://127.0.0.1:{port}/jsz", params=query) as resp:
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    async def meta_leader(self) -> str | None:
        """The meta leader every running node reports, or None while they disagree or have none."""
        leaders = set()
        for name in self.running():
            meta = (await self.jsz(name)).get("meta_cluster") or {}
            leaders.add(meta.get("leader") or "")
        if len(leaders) == 1 and (leader := leaders.pop()) in self.nodes:
            return leader
        return None

    async def wait_meta_leader(self, timeout: float = 30.0) -> str:
        return await poll(self.meta_leader, timeout, "a JetStream meta leader agreed by every running node")

    async def stream_state(self, name: str, stream: str) -> dict[str, Any] | None:
        """The state of the node's own replica of `stream` (from its /jsz), None if it holds none."""
        body = await self.jsz(name, accounts="true", streams="true")
        for account in body.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    state: dict[str, Any] = detail.get("state") or {}
                    return state
        return None

    async def wait_converged(self, stream: str, timeout: float = 30.0) -> int:
        """Wait until every node's replica of `stream` has the same last sequence; returns it."""

        async def same() -> int | None:
            seqs = set()
            for name in self.nodes:
                state = await self.stream_state(name, stream)
                seqs.add(None if state is None else (state.get("last_seq"), state.get("messages")))
            if len(seqs) == 1 and (only := seqs.pop()) is not None and only[0]:
                return int(only[0])
            return None

        return await poll(same, timeout, f"every node's replica of {stream} at the same last seq")

    # --- stream leadership (through a client) -------------------------------------------------

    @staticmethod
    async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
        info = await js.stream_info(stream)
        return info.cluster.leader if info.cluster is not None else None

    async def wait_stream_leader(
        self, js: JetStreamContext, stream: str, *, not_on: str | None = None, timeout: float = 30.0
    ) -> str:
        """The stream's leader once it has one (other than `not_on`, if given) on a running node."""

        async def leader() -> str | None:
            got = await self.stream_leader(js, stream)
            return got if got and got != not_on and got in self.running() else None

        return await poll(leader, timeout, f"a leader of {stream}" + (f" other than {not_on}" if not_on else ""))

    @staticmethod
    async def step_down(js: JetStreamContext, stream: str) -> dict[str, Any]:
        """Ask the stream's leader to step down ($JS.API.STREAM.LEADER.STEPDOWN.<stream>)."""
        import orjson

        msg = await js._nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply


@contextlib.asynccontextmanager
async def nats_cluster(base_dir: Path, size: int = 3) -> AsyncIterator[NatsCluster]:
    """A started cluster (with a meta leader), stopped on exit."""
    cluster = NatsCluster(base_dir, size)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
