"""GET /metrics (issue 13 item 1): a real replica on a real nats-server, scraped over real HTTP.

A submit -> assign -> complete loop moves the counters and histograms with the right labels; 50
items with distinct ids and correlation ids leave no id in any label and no new series; with
tokens configured, /metrics takes a read token.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import DockerNats
from tests.support import Api, FakeAgent, make_client, own_replica, until
from weft.core.access import Principal, Role, ScryptParams, TokenEntry, TokenFile
from weft.metrics import Metrics
from weft.store.embedded import EmbeddedNats

WORK = {"capability": "python", "boundary": "personal", "description": "count me"}
PARAMS = ScryptParams(salt=b"0123456789abcdef", n=2**10)

Sample = tuple[str, dict[str, str], float]


async def scrape(api: Api, **headers: str) -> list[Sample]:
    resp = await api.client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


async def scrape_until(api: Api, check: Callable[[list[Sample]], bool], timeout: float = 20.0) -> list[Sample]:
    """Scrape until `check` holds, scraping again after each folded event (the metrics follow the
    stream), at least once a second for what a timer measures (event-loop lag)."""
    assert api.service is not None and api.service.readmodel is not None
    view = await api.service.readmodel.view(api.project, create=True)
    assert view is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await scrape(api)
        if check(samples):
            return samples
        remaining = deadline - loop.time()
        assert remaining > 0, "metrics never reached the expected values"
        await view.wait_for(view.state.seq + 1, min(remaining, 1.0))


async def test_a_work_loop_moves_the_counters_with_bounded_labels(nats_server: EmbeddedNats | DockerNats, nc: NATS, project: str) -> None:
    async with own_replica(nats_server.url, project, heartbeat_ms=1000, retry_base_ms=20) as api:
        agent = FakeAgent(nc, project, "metrics-agent", auto=True, max_tasks=2)
        await agent.start()
        ids = [(await api.ok("POST", "/api/work", WORK, status=201))["id"] for _ in range(3)]
        stuck = await api.ok("POST", "/api/work", {**WORK, "capability": "rust", "priority": 7}, status=201)
        await until(api, lambda s: all(s.work[i]["status"] == "completed" for i in ids))
        ws = await api.client.ws_connect("/api/ws")
        await ws.send_json({"type": "subscribe", "topic": "work", "projectId": project})
        assert (await ws.receive_json(timeout=10))["type"] == "ack"

        p = {"project": project}
        samples = await scrape_until(api, lambda s: value(s, "weft_work_outcomes_total", **p, outcome="completed") >= 3
                                     and value(s, "weft_event_loop_lag_seconds_count") >= 1)
        assert value(samples, "weft_commands_total", **p, command="submit_work", outcome="appended") == 4
        assert value(samples, "weft_events_appended_total", **p, type="work.submitted") == 4
        assert value(samples, "weft_append_duration_seconds_count", **p) >= 4
        assert value(samples, "weft_work_wait_seconds_count", **p) >= 3
        assert value(samples, "weft_work_run_seconds_count", **p, outcome="completed") >= 3
        assert value(samples, "weft_work_items", **p, status="completed") == 3
        assert value(samples, "weft_queue_depth_items", **p, capability="rust", boundary="personal", priority="7") == 1
        assert value(samples, "weft_queue_depth_items", **p, capability="python") == 0
        assert value(samples, "weft_agents", **p, status="online", type="claude-code") == 1
        assert value(samples, "weft_http_requests_total", route="/api/work", method="POST", status="201") >= 4
        assert value(samples, "weft_http_request_duration_seconds_count", route="/api/work", method="POST") >= 4
        assert value(samples, "weft_websocket_clients") == 1 and value(samples, "weft_websocket_subscriptions") == 1
        assert value(samples, "weft_projection_seq", **p) > 0
        assert value(samples, "weft_projection_lag_events", **p) >= 0
        assert [v for n, lab, v in samples if n == "weft_projection_lag_seconds" and lab == p] != []
        assert value(samples, "weft_leadership_changes_total", **p) >= 1
        assert api.service is not None and api.service.scheduler is not None
        leads = project in api.service.scheduler.leading()  # another replica in this process may lead
        assert value(samples, "weft_leader", **p) == (1 if leads else 0)
        # An unknown path is counted as `unmatched`, never by its raw path.
        assert (await api.client.get(f"/no/such/{stuck['id']}")).status == 404
        samples = await scrape(api)
        assert value(samples, "weft_http_requests_total", route="unmatched", status="404") >= 1
        assert not any(stuck["id"] in v for _, lab, _ in samples for v in lab.values())
        await ws.close()
        await agent.close()


async def test_no_id_reaches_a_label_and_series_stay_bounded(nats_server: EmbeddedNats | DockerNats, nc: NATS, project: str) -> None:
    async with own_replica(nats_server.url, project, heartbeat_ms=1000) as api:
        agent = FakeAgent(nc, project, f"guid-{uuid.uuid4().hex}", auto=True, max_tasks=8)
        await agent.start()
        secret_ids: set[str] = {agent.guid}

        async def submit(n: int) -> list[str]:
            out = []
            for _ in range(n):
                corr, task = f"corr-{uuid.uuid4().hex}", f"task-{uuid.uuid4().hex}"
                item = await api.ok("POST", "/api/work", {**WORK, "taskId": task}, status=201,
                                    headers={"X-Correlation-Id": corr, "Idempotency-Key": f"key-{uuid.uuid4().hex}"})
                secret_ids.update({corr, task, item["id"]})
                await api.ok("GET", f"/api/work/{item['id']}")  # a read by id: the route template, not the path
                out.append(item["id"])
            await until(api, lambda s: all(s.work[i]["status"] == "completed" for i in out))
            return out

        await submit(10)
        before = await scrape_until(api, lambda s: value(s, "weft_work_outcomes_total", project=project,
                                                         outcome="completed") >= 10)
        await submit(40)
        after = await scrape_until(api, lambda s: value(s, "weft_work_outcomes_total", project=project,
                                                        outcome="completed") >= 50)
        leaked = sorted({v for _, lab, _ in after for v in lab.values() if any(i in v for i in secret_ids)})
        assert leaked == []
        assert value(after, "weft_http_requests_total", route="/api/work/{id}", method="GET", status="200") >= 50
        mine = [(n, lab) for n, lab, _ in after if lab.get("project") == project]
        mine_before = [(n, lab) for n, lab, _ in before if lab.get("project") == project]
        # 40 more items (and their ids) add no series of the project's beyond a few new outcomes/buckets.
        assert len(mine) - len(mine_before) <= 20, sorted(set(map(str, mine)) - set(map(str, mine_before)))
        assert len(after) < 3000, len(after)
        await agent.close()


def _entry(name: str, role: Role, projects: set[str] | None) -> tuple[str, TokenEntry]:
    token = "weft_" + secrets.token_urlsafe(24)
    return token, TokenEntry(Principal(name, role, None if projects is None else frozenset(projects)),
                             PARAMS.hash(token))


async def test_metrics_needs_a_read_token_once_tokens_are_set(nats_server: EmbeddedNats | DockerNats, project: str, tmp_path: Path) -> None:
    async with own_replica(nats_server.url, project) as api:
        assert api.service is not None
        assert (await api.client.get("/metrics")).status == 200  # no tokens: open, like /health
        legacy = await make_client(api.service, api_tokens=("metrics-admin-token",))
        try:
            assert (await legacy.get("/metrics")).status == 401
            assert (await legacy.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
            ok = await legacy.get("/metrics", headers={"Authorization": "Bearer metrics-admin-token"})
            assert ok.status == 200 and "weft_http_requests_total" in await ok.text()
            assert (await legacy.get("/health/live")).status == 200
        finally:
            await legacy.close()
        reader, read_entry = _entry("scraper", Role.read, None)
        path = tmp_path / "tokens.json"
        path.write_bytes(TokenFile(PARAMS, (read_entry,)).to_json())
        scoped = await make_client(api.service, tokens_file=path)
        try:
            assert (await scoped.get("/metrics")).status == 401
            ok = await scoped.get("/metrics", headers={"Authorization": f"Bearer {reader}"})
            assert ok.status == 200 and "# TYPE weft_http_requests_total counter" in await ok.text()
        finally:
            await scoped.close()


async def test_a_token_scoped_to_projects_sees_only_their_series(
    nats_server: EmbeddedNats | DockerNats, project: str, tmp_path: Path
) -> None:
    other = f"{project}-other"
    async with own_replica(nats_server.url, project) as api:
        assert api.service is not None
        await api.ok("POST", "/api/work", WORK, status=201)
        await api.ok("POST", "/api/work", WORK, status=201, headers={"X-Weft-Project": other})
        everything = await scrape_until(api, lambda s: {project, other} <= {lab.get("project") for _, lab, _ in s})
        mine, mine_entry = _entry("mine", Role.read, [project])
        every, every_entry = _entry("every", Role.read, None)
        path = tmp_path / "tokens.json"
        path.write_bytes(TokenFile(PARAMS, (mine_entry, every_entry)).to_json())
        client = await make_client(api.service, tokens_file=path)
        try:
            seen = {}
            for name, token in (("mine", mine), ("every", every)):
                resp = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
                assert resp.status == 200
                text = await resp.text()
                seen[name] = [(s.name, dict(s.labels)) for f in text_string_to_metric_families(text) for s in f.samples]
            projects = {n: {lab["project"] for _, lab in samples if "project" in lab} for n, samples in seen.items()}
            assert projects["mine"] == {project}, "a scoped token saw another project's series"
            assert {project, other} <= projects["every"]
            # The replica's own series (no project label) stay visible to both.
            assert any(n.startswith("weft_http_requests") for n, lab in seen["mine"] if "project" not in lab)
            assert len(everything) >= len(seen["mine"])
        finally:
            await client.close()


def test_a_metrics_without_a_meter_records_nothing_and_renders_nothing() -> None:
    noop = Metrics(enabled=False)
    noop.command("p", "submit_work", "appended")
    noop.http("/api/work", "POST", 201, 0.01)
    assert noop.render() == b""


def test_replicas_in_one_process_keep_their_own_registries() -> None:
    a, b = Metrics(replica="a"), Metrics(replica="b")
    a.command("p", "submit_work", "appended")
    assert b"weft_commands_total{" in a.render()
    assert b"weft_commands_total{" not in b.render()


async def test_metrics_off_records_nothing_and_metrics_is_a_404(nats_server: EmbeddedNats | DockerNats, project: str) -> None:
    async with own_replica(nats_server.url, project, metrics=False) as api:
        assert api.service is not None and not api.service.metrics.enabled
        await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                           "description": "unmeasured"}, status=201)
        resp = await api.client.get("/metrics")
        assert resp.status == 404
        assert (await resp.json())["details"] == {"field": "path"}
        assert api.service.metrics.render() == b""  # the no-op meter: no series at all
