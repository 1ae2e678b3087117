"""Every panel of the Grafana dashboards (ops/grafana/dashboards) answers with data from a real
Prometheus scraping real replicas.

Three `weft serve` processes on a nats-server of this module's own, scraped every second by
Debian's `prometheus` (tests.prometheus; the weft job of ops/prometheus/prometheus.yml). A short,
bounded load makes every series a panel reads exist: work submitted to every replica, a real
`weft agent` completing some, retrying one and dead-lettering others, a burst of submits to one
replica (group commit) that stays pending, a `local` target spinning an agent up that is scaled
down once idle, a target whose launch fails (breaker: `error`), one whose probe fails
(`unhealthy`), concurrent updates of one target through every replica (OCC conflicts and command
retries), a WebSocket client subscribed, requests answered 2xx and 4xx. Then every target
expression of every panel, with the Grafana variables substituted as Grafana would, is an instant
query through Prometheus's HTTP API, retried after each scrape round (bounded) until it answers:
each must return a non-empty result. The `project` variable's own query must offer the project.

Synchronisation is by awaiting: the replicas' ready lines, the projection (long-polled with
`min_seq`), Prometheus's own view of its targets and scrapes. No fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import AgentProcess, WeftProcess, until
from tests.prometheus import SKIP_REASON, Prometheus, available, prometheus_binary
from tests.servers import own_nats_server
from tests.unit.test_dashboard_files import DASHBOARDS, panels
from weft.store.embedded import EmbeddedNats

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason=SKIP_REASON)]

WEFT = str(Path(sys.executable).parent / "weft")
REPLICAS = 3
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval): >= 40 s with
# ops/prometheus's 10 s scrapes, 4 s with this test's 1 s. One minute spans the whole load (a rate
# over a window the events fell out of is 0, and a quantile or ratio of such rates NaN), whatever
# the machine's speed, and still many samples.
RATE_INTERVAL = "1m"
INTERVAL = "1s"  # $__interval: the scrape interval, as for a short time range
QUERY_TIMEOUT_S = 60.0  # every query answers within this, or the test fails naming it
# Panels left out on purpose, as (dashboard file, panel title) -> why. None: no panel reads a
# nats_* series (NATS's /varz is JSON; no exporter here), every panel reads what weft emits.
EXCLUDED: dict[tuple[str, str], str] = {}

# What the agent does with an item: `retry ...` fails recoverably (exit 75) on its first attempt,
# `dead ...` fails for good (exit 1), anything else completes.
AGENT_COMMAND = ('d=$(cat); case "$d" in dead*) exit 1;; retry*) [ "$WEFT_WORK_ATTEMPT" = 1 ] && exit 75;; esac; '
                 'echo "done: $d"')


@dataclass(frozen=True)
class Query:
    dashboard: str
    title: str
    expr: str
    range: str  # the dashboard's time range as a duration ($__range)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.title}: {self.expr}"


def duration(grafana_from: str) -> str:
    """`now-1h` -> `1h` (a dashboard's default time range, as $__range)."""
    found = re.fullmatch(r"now-(\d+[smhdwy])", grafana_from)
    assert found, f"dashboard time range {grafana_from!r} is not now-<duration>"
    return found[1]


def seconds(text: str) -> int:
    n, unit = int(text[:-1]), text[-1]
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[unit]


def dashboard_queries() -> list[Query]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in panels(board):
            if (path.name, panel.get("title")) in EXCLUDED:
                continue
            for target in panel.get("targets") or []:
                if target.get("hide"):
                    continue
                out.append(Query(path.name, str(panel.get("title")), target["expr"], duration(board["time"]["from"])))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, metric, label) of every `label_values(metric, label)` variable."""
    out = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            query = var.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            found = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", text or "")
            if var.get("type") == "query" and found:
                out.append((path.name, found[1].strip(), found[2]))
    return out


def substitute(q: Query, project: str) -> str:
    """The expression as Grafana sends it: $var, ${var} and ${var:format} replaced."""
    values = {"project": project, "__rate_interval": RATE_INTERVAL, "__interval": INTERVAL, "__range": q.range,
              "__range_s": str(seconds(q.range)), "__range_ms": str(seconds(q.range) * 1000),
              "__interval_ms": str(seconds(INTERVAL) * 1000)}

    def one(m: re.Match[str]) -> str:
        name = m["braced"] or m["plain"] or m["old"]
        assert name in values, f"{q}: variable ${name} has no value in this test; add one"
        return values[name]

    return re.sub(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)|\[\[(?P<old>\w+)\]\]", one, q.expr)


# --- the cluster and the load ------------------------------------------------------------------------


@pytest.fixture
async def dash_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this test's own: its replicas attach only the test's project."""
    async with own_nats_server(tmp_path_factory, "dashboards") as server:
        yield server


@pytest.fixture
async def replicas(dash_nats: EmbeddedNats, project: str) -> AsyncIterator[list[WeftProcess]]:
    env = {
        "WEFT_DRAIN_S": "0",  # a stop at the end need not wait out the drain period
        "WEFT_HEARTBEAT_MS": "500",
        "IDLE_TIMEOUT_MS": "1500",  # the spun-up agent is scaled down within the test
        "WEFT_RETRY_BASE_MS": "50",  # a recoverable failure is retried at once
        "WEFT_GROUP_COMMIT_AFTER": "1",  # a burst of submits goes out as atomic batches
        "WEFT_LEASE_TTL_S": "2",
    }
    procs = [WeftProcess(dash_nats.url, project, env={**env, "WEFT_REPLICA_NAME": f"dash-r{i + 1}"})
             for i in range(REPLICAS)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        local_agents: list[int] = []
        with contextlib.suppress(Exception):
            async with aiohttp.ClientSession() as http:
                agents = (await procs[0].get(http, "/api/agents"))["agents"]
            local_agents = [int(a["launch"]["handle"]["pgid"]) for a in agents
                            if (a.get("launch") or {}).get("handle", {}).get("pgid")]
        await asyncio.gather(*(p.stop() for p in procs if p.proc is not None))
        # Local agents run in their own session on purpose (they outlive weft): end the ones the
        # replicas launched (by their process group, from the projection), normally gone already.
        for pgid in local_agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
async def prometheus(replicas: list[WeftProcess], tmp_path: Path) -> AsyncIterator[Prometheus]:
    binary = prometheus_binary()
    assert binary is not None
    prom = Prometheus(binary, tmp_path / "prometheus", [f"127.0.0.1:{r.port}" for r in replicas])
    try:
        await prom.start()  # its first scrapes (discovery takes ~5 s) overlap the load; the test awaits them
        yield prom
    finally:
        await prom.stop()


def instances(replicas: list[WeftProcess]) -> list[str]:
    return [f"127.0.0.1:{r.port}" for r in replicas]


class Load:
    def __init__(self, http: aiohttp.ClientSession, replicas: list[WeftProcess], project: str) -> None:
        self.http = http
        self.replicas = replicas
        self.project = project
        self.statuses: dict[int, int] = {}
        self._next = 0

    def base(self) -> str:
        """Each request to the next replica, round robin."""
        self._next += 1
        return self.replicas[self._next % len(self.replicas)].base

    async def call(self, method: str, path: str, body: Any = None, base: str | None = None,
                   expect: int | tuple[int, ...] = (200, 201)) -> Any:
        async with self.http.request(method, (base or self.base()) + path, json=body,
                                     params={"projectId": self.project}) as resp:
            answer = await resp.json(content_type=None)
            self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
            wanted = (expect,) if isinstance(expect, int) else expect
            assert resp.status in wanted, (method, path, resp.status, answer)
            return answer

    async def submit(self, description: str, capability: str = "python", base: str | None = None,
                     **extra: Any) -> str:
        body = {"capability": capability, "boundary": "personal", "description": description, **extra}
        return str((await self.call("POST", "/api/work", body, base=base, expect=201))["id"])

    async def until(self, check: Any, timeout: float = 45) -> Any:
        async def fetched() -> Any:
            return check(await self.state())

        return await until(self.http, self.replicas[0].base, self.project, fetched, timeout)

    async def state(self) -> dict[str, Any]:
        work = await self.replicas[0].get(self.http, "/api/work", limit="200")
        targets = await self.replicas[0].get(self.http, "/api/targets")
        agents = await self.replicas[0].get(self.http, "/api/agents")
        return {"work": {w["id"]: w for w in work["workItems"]}, "targets": {t["name"]: t for t in targets["targets"]},
                "agents": {a["guid"]: a for a in agents["agents"]}}


def target(name: str, capability: str, command: str, args: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "agentType": "claude-code", "mechanism": "local", "capabilities": [capability],
            "config": {"command": command, "args": args}, "cooldownMs": 0, **extra}


async def churn_until_conflict(load: Load, replicas: list[WeftProcess], rounds: int = 30) -> None:
    """Update one target through every replica at once until one replica saw an OCC conflict and
    retried its command (read from the replicas' own /metrics; bounded)."""
    for i in range(rounds):
        await asyncio.gather(*(load.call("PUT", "/api/targets/churn", {"description": f"round {i} via {r.port}"},
                                         base=r.base) for r in replicas))
        texts = []
        for r in replicas:
            async with load.http.get(r.base + "/metrics") as resp:
                texts.append(await resp.text())
        if (any(re.search(r"^weft_occ_conflicts_total\{", t, re.M) for t in texts)
                and any(re.search(r"^weft_command_retries_total\{", t, re.M) for t in texts)):
            return
    raise AssertionError(f"no OCC conflict and command retry after {rounds} rounds of concurrent updates")


async def first_round(load: Load, replicas: list[WeftProcess], agent: AgentProcess) -> None:
    # Targets: one that spins an agent up (capability go), one whose launch fails (rust: its
    # breaker opens after one failure, status error), one whose command does not exist (probed:
    # unhealthy), one only to be updated concurrently.
    await load.call("POST", "/api/targets", target("laptop", "go", WEFT, ["agent", "--command", "echo built"],
                                                   maxConcurrentAgents=1, spinUpTimeoutMs=30_000), expect=201)
    await load.call("POST", "/api/targets", target("broken", "rust", "sh", ["-c", "exit 3"], circuitBreakerThreshold=1,
                                                   healthCheck={"enabled": False}), expect=201)
    await load.call("POST", "/api/targets", target("missing", "haskell", "/nonexistent/weft-agent", []), expect=201)
    await load.call("POST", "/api/targets", target("churn", "cobol", "sh", ["-c", "exit 0"],
                                                   healthCheck={"enabled": False}), expect=201)
    probe = await load.call("POST", "/api/targets/missing/test")
    assert probe["healthStatus"] == "unhealthy", probe

    await agent.start()
    done = [await load.submit(f"ok {i}") for i in range(6)]
    retried = [await load.submit(f"retry {i}", maxAttempts=3) for i in range(2)]
    dead = [await load.submit(f"dead {i}") for i in range(2)]
    spun = await load.submit("build on the laptop", capability="go")
    burst = await submit_burst(load, replicas[1])
    # 4xx answers: an unknown item, an invalid body.
    await load.call("GET", "/api/work/no-such-item", expect=404)
    await load.call("POST", "/api/work", {"capability": "python"}, expect=400)
    await churn_until_conflict(load, replicas)

    def settled(s: dict[str, Any]) -> bool:
        work, targets = s["work"], s["targets"]
        return (all(work[i]["status"] == "completed" for i in done + retried)
                and all(work[i]["status"] == "failed" for i in dead)
                and all(work[i]["status"] == "pending" for i in burst)
                and targets["broken"]["status"] == "error"
                and targets["missing"]["healthStatus"] == "unhealthy"
                and spun_up_and_scaled_down(s, spun))

    await load.until(settled)


async def second_round(load: Load, replicas: list[WeftProcess]) -> None:
    """The same kinds of thing again, once Prometheus has sampled the first round's series: a
    series' first increment is never seen by rate() or increase() (the series appears with it),
    so the ratios and quantiles of rare events (spin-ups, batches) need a second one to be numbers."""
    done = [await load.submit(f"ok again {i}") for i in range(3)]
    retried = await load.submit("retry again", maxAttempts=3)
    dead = await load.submit("dead again")
    spun = await load.submit("build on the laptop again", capability="go")
    burst = await submit_burst(load, replicas[1])  # the same replica: its batch series exist now
    await load.call("GET", "/api/targets/no-such-target", expect=404)

    def settled(s: dict[str, Any]) -> bool:
        work = s["work"]
        return (all(work[i]["status"] == "completed" for i in [*done, retried])
                and work[dead]["status"] == "failed"
                and all(work[i]["status"] == "pending" for i in burst)
                and spun_up_and_scaled_down(s, spun))

    await load.until(settled)


async def submit_burst(load: Load, replica: WeftProcess, n: int = 40) -> list[str]:
    """Concurrent submits to one replica: its appends share atomic batches (group commit). Nothing
    takes rust work (its target is broken), so these stay pending for the queue panels."""
    return list(await asyncio.gather(*(load.submit(f"burst {i}", capability="rust", base=replica.base)
                                       for i in range(n))))


def spun_up_and_scaled_down(s: dict[str, Any], item: str) -> bool:
    """`item` completed by an agent the laptop target spun up, and that agent scaled down (idle)."""
    work = s["work"][item]
    agent = s["agents"].get(work.get("assignedTo") or "")
    return (work["status"] == "completed" and agent is not None
            and agent.get("targetId") == s["targets"]["laptop"]["id"] and agent["status"] == "offline")


# --- the test ----------------------------------------------------------------------------------------


async def test_every_dashboard_panel_returns_data_from_live_replicas(
        replicas: list[WeftProcess], prometheus: Prometheus, dash_nats: EmbeddedNats, project: str) -> None:
    started = time.monotonic()
    queries = dashboard_queries()
    assert queries, "no panel queries found"
    agent = AgentProcess(dash_nats.url, project, "dash-agent", AGENT_COMMAND, max_tasks=2)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        ws = await http.ws_connect(replicas[0].base + "/api/ws")
        try:
            await ws.send_json({"type": "subscribe", "topic": "work", "projectId": project})
            ack = await ws.receive_json(timeout=10)
            assert ack["type"] == "ack" and ack["subscribed"] == "work", ack
            load = Load(http, replicas, project)
            await first_round(load, replicas, agent)
            await prometheus.targets_up(instances(replicas))
            await prometheus.scraped_after(time.time(), instances(replicas))  # a sample of every series
            await second_round(load, replicas)
            assert {200, 201, 400, 404} <= set(load.statuses), load.statuses
            # What the load did is in the TSDB once every replica was scraped after it.
            await prometheus.scraped_after(time.time(), instances(replicas))

            for dashboard, metric, label in variable_queries():
                values = await prometheus.label_values(label, metric)
                assert project in values, f"{dashboard}: label_values({metric}, {label}) = {values}"

            loop = asyncio.get_running_loop()
            deadline = loop.time() + QUERY_TIMEOUT_S
            pending = {q: substitute(q, project) for q in queries}
            answers: dict[Query, list[dict[str, Any]]] = {}
            while True:
                for q, expr in list(pending.items()):
                    answers[q] = await prometheus.query(expr)
                    if has_data(answers[q]):
                        del pending[q]
                if not pending or loop.time() > deadline:
                    break
                await prometheus.scrape_round(instances(replicas))  # one more sample of every series
        finally:
            await ws.close()
            await agent.stop()

    assert not pending, (
        f"{len(pending)} of {len(queries)} panel queries returned no data (no series, or NaN only) within "
        f"{QUERY_TIMEOUT_S} s:\n" + "\n".join(f"  {q}\n    sent: {e}\n    got: {answers.get(q)}"
                                             for q, e in pending.items()))
    print(f"\n{len(queries)} panel queries ({len({(q.dashboard, q.title) for q in queries})} panels) of "
          f"{len(DASHBOARDS)} dashboards answered with data, {time.monotonic() - started:.1f} s after the load began")


def has_data(result: list[dict[str, Any]]) -> bool:
    """What a panel would draw: at least one series with a number (NaN, as 0/0 gives, is a gap)."""
    return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result)
