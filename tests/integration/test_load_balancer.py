"""Three real `weft serve` replicas behind a real nginx running ops/nginx/weft.conf itself, and
behind a real haproxy running ops/haproxy/haproxy.cfg (replica addresses, listen port, log and pid
paths substituted; tests.lb).

Requests spread over every replica; a write read back with `min_seq` through any replica; a
replica killed with SIGKILL is retried around for GETs; a POST is never retried by nginx once
sent (checked in the stream: one event per 2xx POST, never two for one request).
"""

from __future__ import annotations

import asyncio
import collections
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.lb import LoadBalancer, Logged, available
from tests.processes import WeftProcess, until
from weft.store.eventstore import EventStore

pytestmark = pytest.mark.slow


def _needs(name: str) -> Any:
    return pytest.param(name, marks=pytest.mark.skipif(
        not available(name), reason=f"needs {name} (Debian package `{name}`; `make test` installs it "
                                    "when run as root with apt)"))


KINDS = [_needs("nginx"), _needs("haproxy")]

NAMES = ("lb-r1", "lb-r2", "lb-r3")


class Cluster:
    def __init__(self, replicas: list[WeftProcess], lb: LoadBalancer, project: str) -> None:
        self.replicas = replicas
        self.lb = lb
        self.project = project

    def url(self, path: str) -> str:
        return self.lb.base + path

    def server_id(self, replica: WeftProcess) -> str:
        return self.lb.server_id(self.replicas.index(replica), replica.port)

    async def logged(self, http: aiohttp.ClientSession, done: Callable[[list[Logged]], bool]) -> list[Logged]:
        """The load balancer's log once `done` holds for it. A balancer logs a request just after
        answering it, so each round has it answer one more request (bounded: 50 rounds)."""
        for _ in range(50):
            requests = self.lb.requests()
            if done(requests):
                return requests
            async with http.get(self.url("/health/live")):
                pass
        raise AssertionError("log never complete:\n" + "\n".join(self.lb.access_log()[-20:]))

    async def submit(self, http: aiohttp.ClientSession, description: str) -> tuple[int, Any]:
        body = {"capability": "python", "boundary": "personal", "description": description}
        async with http.post(self.url("/api/work"), json=body, params={"projectId": self.project}) as resp:
            text = await resp.text()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, text


async def start_cluster(kind: str, nats_url: str, project: str, workdir: Path, drain_s: tuple[float, ...] = (0, 0, 0),
                        **options: Any) -> Cluster:
    # WEFT_DRAIN_S=0 by default: a stop at the end of a test need not wait out the drain period.
    replicas = [WeftProcess(nats_url, project, env={"WEFT_REPLICA_NAME": name, "WEFT_DRAIN_S": str(d)})
                for name, d in zip(NAMES, drain_s, strict=True)]
    await asyncio.gather(*(r.start() for r in replicas))
    lb = LoadBalancer(kind, [r.port for r in replicas], workdir / kind, **options)
    await lb.start()
    return Cluster(replicas, lb, project)


async def stop_cluster(cluster: Cluster) -> None:
    await cluster.lb.stop()
    for r in cluster.replicas:
        if r.proc is not None and r.proc.returncode is None:
            r.proc.send_signal(signal.SIGCONT)
    await asyncio.gather(*(r.stop() for r in cluster.replicas))


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def cluster(kind: str, nats_server: Any, project: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await start_cluster(kind, nats_server.url, project, tmp_path)
    yield c
    await stop_cluster(c)


async def submitted(store: EventStore, project: str) -> collections.Counter[str]:
    """How many work.submitted events the stream holds per description."""
    return collections.Counter([e.data["description"] async for e in store.read_range(project)
                                if e.type == "work.submitted"])


async def test_requests_spread_over_all_three_replicas(cluster: Cluster) -> None:
    # Every API answer names its replica in X-Weft-Replica (a 404 as much as a 200).
    async with aiohttp.ClientSession() as http:
        seen: collections.Counter[str] = collections.Counter()
        for i in range(12):
            path = "/api/work" if i % 2 else "/api/work/no-such-item"
            async with http.get(cluster.url(path), params={"projectId": cluster.project}) as resp:
                assert resp.status == (200 if i % 2 else 404), await resp.text()
                seen[resp.headers["X-Weft-Replica"]] += 1
    assert set(seen) == set(NAMES), seen
    assert all(n >= 3 for n in seen.values()), seen  # round robin, not one sticky replica


async def test_the_body_limit_is_weft_s_own(cluster: Cluster) -> None:
    limit = 1048576  # WEFT_MAX_BODY_BYTES' default
    async with aiohttp.ClientSession() as http:
        for size, refused in ((limit + 1, True), (limit - 1024, False)):
            head, tail = b'{"capability":"python","boundary":"personal","description":"', b'"}'
            body = head + b"x" * (size - len(head) - len(tail)) + tail
            assert len(body) == size
            async with http.post(cluster.url("/api/work"), data=body, params={"projectId": cluster.project},
                                 headers={"Content-Type": "application/json"}) as resp:
                assert (resp.status == 413) == refused, (size, resp.status, (await resp.text())[:200])
                if refused:  # the balancer's own 413 (it refuses before weft sees the body) is weft's JSON
                    assert resp.headers["Content-Type"].startswith("application/json")
                    assert (await resp.json())["details"] == {"field": "body", "limit": limit}


async def test_a_write_is_read_back_with_min_seq_whatever_replica_answers(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            status, item = await cluster.submit(http, f"ryw {i}")
            assert status == 201, item
            seq = item["seq"]
            async with http.get(cluster.url(f"/api/work/{item['id']}"),
                                params={"projectId": cluster.project, "min_seq": str(seq)}) as resp:
                assert resp.status == 200, await resp.text()
                got = await resp.json()
            assert got["id"] == item["id"] and got["description"] == f"ryw {i}"
        log = await cluster.logged(http, lambda rs: sum(r.path.startswith("/api/work/") for r in rs) == 12)
    answered = {r.servers[-1] for r in log if r.path.startswith("/api/work/")}
    assert len(answered) == 3, log  # the reads really went to every replica


async def test_gets_keep_succeeding_when_a_replica_is_killed(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # keep-alive connections from nginx to every replica
            async with http.get(cluster.url("/api/work"), params={"projectId": cluster.project}) as resp:
                assert resp.status == 200
        doomed = cluster.replicas[1]
        dead = cluster.server_id(doomed)
        before = len(await cluster.logged(http, lambda rs: len(rs) >= 6))
        assert await doomed.kill() == -signal.SIGKILL
        for _ in range(15):
            async with http.get(cluster.url("/api/work"), params={"projectId": cluster.project}) as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(cluster.url("/health")) as resp:
                assert resp.status == 200
                assert (await resp.json())["replica"] != NAMES[1]
        after = (await cluster.logged(http, lambda rs: len(rs) >= before + 30))[before:]
    assert all(r.status == 200 for r in after), after
    # The killed replica really was tried, and the request retried on another.
    if cluster.lb.kind == "nginx":
        assert any(r.retries and r.servers[0] == dead for r in after), after
    else:  # haproxy names only the last server: a retry, or the health check took it out first
        assert any(r.retries for r in after) or f"{dead} is DOWN" in cluster.lb.output_text(), after


async def test_posts_around_a_sigkill_are_never_applied_twice(cluster: Cluster, store: EventStore) -> None:
    tag = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> tuple[str, int]:
            try:
                status, _ = await cluster.submit(http, f"{tag} {i}")
            except aiohttp.ServerDisconnectedError:
                status = 0  # closed without an answer: the client cannot know either
            return f"{tag} {i}", status

        first = await asyncio.gather(*(one(i) for i in range(30)))
        burst = [asyncio.create_task(one(i)) for i in range(30, 150)]
        pending: set[asyncio.Task[tuple[str, int]]] = set(burst)
        while len(pending) > len(burst) - 5:  # kill once the burst is under way
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await cluster.replicas[2].kill()
        rest = await asyncio.gather(*burst)
    answers = dict(first + rest)
    # 0: haproxy closed the client's keep-alive connection without an answer (it does so for a
    # request that was not the connection's first, when the replica died after it was sent).
    unknown = (502, 503, 504) if cluster.lb.kind == "nginx" else (0, 502, 503, 504)
    assert all(s in (201, 202, *unknown) for s in answers.values()), collections.Counter(answers.values())
    counts = await submitted(store, cluster.project)
    assert max(counts.values()) == 1, [d for d, n in counts.items() if n > 1]
    assert set(counts) <= set(answers)
    ok = {d for d, s in answers.items() if s in (201, 202)}
    assert ok <= set(counts), ok - set(counts)  # every 2xx is in the stream, once
    assert len(ok) >= 100  # most of them succeeded: only those in flight on the killed replica failed


@pytest.mark.parametrize("kind", KINDS)
async def test_a_post_is_not_retried_when_its_replica_stops_answering(
    kind: str, nats_server: Any, project: str, tmp_path: Path, store: EventStore
) -> None:
    """A stopped (SIGSTOP) replica takes the connection and the request but never answers: nginx
    times out. A GET would be retried elsewhere; the POST must get 504 from nginx, and once the
    replica resumes and stores it, the stream holds it once, not twice."""
    c = await start_cluster(kind, nats_server.url, project, tmp_path, read_timeout_s=2)
    try:
        frozen = c.replicas[0]
        assert frozen.proc is not None
        async with aiohttp.ClientSession() as http:
            status, _ = await c.submit(http, "warm-up")  # creates the project's stream
            assert status == 201
            frozen.proc.send_signal(signal.SIGSTOP)
            answers: dict[str, int] = {}
            for i in range(4):  # round robin: one of 3 consecutive POSTs goes to the frozen one
                answers[f"frozen {i}"], _ = await c.submit(http, f"frozen {i}")
                if answers[f"frozen {i}"] == 504:
                    break
            timed_out = [d for d, s in answers.items() if s == 504]
            assert len(timed_out) == 1, answers
            assert all(s == 201 for d, s in answers.items() if d not in timed_out), answers
            log = await c.logged(http, lambda rs: any(r.method == "POST" and r.status == 504 for r in rs))
            gave_up = next(r for r in log if r.method == "POST" and r.status == 504)
            assert gave_up.servers == [c.server_id(frozen)] and gave_up.retries == 0, gave_up  # not retried
            frozen.proc.send_signal(signal.SIGCONT)
            # The resumed replica reads the request nginx gave up on and stores it: wait for that
            # event (long-polling its projection), then check nothing else was stored for it.

            async def stored() -> bool:
                return (await submitted(store, project))[timed_out[0]] >= 1

            await until(http, frozen.base, project, stored, timeout=20)
        counts = await submitted(store, project)
        assert counts[timed_out[0]] == 1, counts  # applied once, by the replica nginx gave up on
        assert all(counts[d] == 1 for d, s in answers.items() if s == 201), counts
        assert max(counts.values()) == 1, counts
    finally:
        await stop_cluster(c)


@pytest.mark.skipif(not available("haproxy"), reason="needs haproxy (Debian package `haproxy`)")
async def test_without_its_disable_l7_retry_line_haproxy_would_store_a_post_twice(
    nats_server: Any, project: str, tmp_path: Path, store: EventStore
) -> None:
    """The negative control of the test above: haproxy's retry-on applies to POST too (its
    documentation says so), and only `http-request disable-l7-retry` in ops/haproxy/haproxy.cfg
    keeps a sent POST from being repeated on another replica."""
    c = await start_cluster("haproxy", nats_server.url, project, tmp_path, read_timeout_s=2, l7_retry_guard=False)
    try:
        frozen = c.replicas[0]
        assert frozen.proc is not None
        async with aiohttp.ClientSession() as http:
            assert (await c.submit(http, "warm-up"))[0] == 201
            frozen.proc.send_signal(signal.SIGSTOP)
            for i in range(3):  # round robin: one of them goes to the frozen replica first
                assert (await c.submit(http, f"frozen {i}"))[0] == 201
            log = await c.logged(http, lambda rs: sum(r.method == "POST" for r in rs) >= 4)
            retried = [r for r in log if r.method == "POST" and r.retries]
            assert len(retried) == 1, log
            frozen.proc.send_signal(signal.SIGCONT)
            # Which one it was: the description stored twice once the frozen replica resumes.

            async def doubled() -> bool:
                return max((await submitted(store, project)).values()) == 2

            await until(http, frozen.base, project, doubled, timeout=20)
    finally:
        await stop_cluster(c)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_replica_stopped_with_sigterm_drains_without_a_failed_get(
    kind: str, nats_server: Any, project: str, tmp_path: Path
) -> None:
    """SIGTERM: the replica answers /health/ready 503 for WEFT_DRAIN_S while still serving, then
    stops. haproxy's active check takes it out first; nginx (passive) retries GETs elsewhere once
    it refuses connections. Either way no GET fails."""
    c = await start_cluster(kind, nats_server.url, project, tmp_path, drain_s=(0, 3, 0))
    try:
        leaving = c.replicas[1]
        assert leaving.proc is not None
        async with aiohttp.ClientSession() as http:
            leaving.proc.send_signal(signal.SIGTERM)
            exited = asyncio.ensure_future(leaving.proc.wait())
            statuses: collections.Counter[int] = collections.Counter()
            for _ in range(20000):  # GETs back to back until the replica is gone, and then some
                async with http.get(c.url("/api/work"), params={"projectId": project}) as resp:
                    statuses[resp.status] += 1
                if exited.done() and sum(statuses.values()) > 50:
                    break
            assert exited.done(), "the replica never stopped"
            for _ in range(30):
                async with http.get(c.url("/api/work"), params={"projectId": project}) as resp:
                    statuses[resp.status] += 1
        assert set(statuses) == {200}, statuses
        if kind == "haproxy":
            assert f"{c.server_id(leaving)} is DOWN" in c.lb.output_text()
    finally:
        await stop_cluster(c)


async def test_a_websocket_through_the_balancer_resumes_on_any_replica_with_from_seq(cluster: Cluster) -> None:
    """The upgrade passes the balancer; a client that reconnects (round robin: most likely to
    another replica) with `fromSeq` = last seen + 1 gets exactly the events it missed."""

    async def submitted_events(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = []
        while len(got) < n:
            msg = await asyncio.wait_for(ws.receive_json(), 20)
            if msg["type"] == "event" and msg["event"] == "work:submitted":
                got.append((msg["seq"], msg["data"]["description"]))
        return got

    async def subscribe(http: aiohttp.ClientSession, from_seq: int) -> aiohttp.ClientWebSocketResponse:
        ws = await http.ws_connect(cluster.url("/api/ws"))
        await ws.send_json({"type": "subscribe", "topic": "work", "projectId": cluster.project, "fromSeq": from_seq})
        ack = await asyncio.wait_for(ws.receive_json(), 20)
        assert ack["type"] == "ack" and ack["subscribed"] == "work", ack
        return ws

    async with aiohttp.ClientSession() as http:
        ws = await subscribe(http, 1)
        for i in range(3):
            status, body = await cluster.submit(http, f"ws {i}")
            assert status == 201, body
        first = await submitted_events(ws, 3)
        await ws.close()
        assert [d for _, d in first] == ["ws 0", "ws 1", "ws 2"]
        for i in range(3, 5):  # while no client listens
            status, body = await cluster.submit(http, f"ws {i}")
            assert status == 201, body
        ws = await subscribe(http, first[-1][0] + 1)
        status, body = await cluster.submit(http, "ws 5")
        assert status == 201, body
        rest = await submitted_events(ws, 3)
        await ws.close()
    assert [d for _, d in rest] == ["ws 3", "ws 4", "ws 5"]  # none missed, none twice
    seqs = [s for s, _ in first + rest]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
