"""History endpoints and the replay tools (`weft replay state|diff|export`, `weft events tail`)
against a real nats-server: the REST routes over real HTTP, the CLI as real processes.

`test_record_replay_fixtures` (skipped unless WEFT_RECORD_FIXTURES=1) regenerates the fixtures in
tests/fixtures/replay from real runs through the export code:

    WEFT_RECORD_FIXTURES=1 .venv/bin/python -m pytest tests/integration/test_history.py -k record
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from projections import ProjectState, apply, state_hash
from projections.events import parse_ts
from tests.replay_fixtures import FIXTURES, check, load
from tests.servers import own_nats_server
from tests.support import Api, FakeAgent, own_replica, until
from weft.cli.replay import export, tail_events
from weft.store.eventstore import EventStore

WEFT = str(Path(sys.executable).parent / "weft")
WORK = {"capability": "python", "boundary": "personal", "description": "write the parser"}
EVENT_FIELDS = {"seq", "time", "type", "actor", "correlationId", "data"}


async def work_loop(api: Api, nc: NATS, guid: str = "hist-agent") -> tuple[FakeAgent, dict[str, Any]]:
    """Submit, assign, accept, progress, complete: one item through the whole loop."""
    agent = FakeAgent(nc, api.project, guid)
    await agent.start()
    item = await api.ok("POST", "/api/work", WORK, status=201, headers={"X-Correlation-Id": "corr-hist-1"})
    push = await agent.next_push("assignment")
    assert push["work"]["id"] == item["id"]
    assert (await agent.request("work.accept", {"workId": item["id"]}))["ok"]
    assert (await agent.request("work.progress", {"workId": item["id"], "progress": 50, "message": "half"}))["ok"]
    done = await agent.request("work.complete", {"workId": item["id"], "summary": "parsed"})
    assert done["ok"]
    await until(api, lambda s: s.work[item["id"]]["status"] == "completed")
    return agent, item


async def weft_cli(nats_url: str, *args: str) -> str:
    """Run `weft <args>` as a process against the test's nats-server; its stdout (asserts exit 0)."""
    env = {**os.environ, "NATS_URL": nats_url, "LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(WEFT, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (args, err.decode())
    assert b"Traceback" not in err and b"events/s" not in err, err.decode()  # piped: no progress bar
    return out.decode()


def fold_upto(events: list[Any], project: str, seq: int) -> ProjectState:
    state = ProjectState(project=project)
    for ev in events:
        if ev.seq <= seq:
            apply(state, ev)
    return state


# --- history endpoints -----------------------------------------------------------------------------


async def test_work_history_is_every_event_of_the_item_in_stream_order(api: Api, nc: NATS) -> None:
    agent, item = await work_loop(api, nc)
    body = await api.ok("GET", f"/api/work/{item['id']}/history")
    assert body["id"] == item["id"] and body["entity"] == "work" and body["projectId"] == api.project
    events = body["events"]
    assert [e["type"] for e in events] == ["work.submitted", "work.assigned", "work.started", "work.progressed",
                                           "work.completed"]
    assert body["count"] == 5 and all(set(e) == EVENT_FIELDS for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert events[0]["correlationId"] == "corr-hist-1" and events[0]["data"]["description"] == WORK["description"]
    assert events[3]["data"]["progress"] == 50 and events[3]["actor"] == "agent:hist-agent"
    assert [parse_ts(e["time"]) for e in events] == sorted(parse_ts(e["time"]) for e in events)
    # ?projectId= names the project as on every route (the client's header names the same one here)
    same = await api.ok("GET", f"/api/work/{item['id']}/history?projectId={api.project}")
    assert same["events"] == events
    await agent.close()


async def test_agent_history_starts_with_its_registration(api: Api, nc: NATS) -> None:
    agent, _item = await work_loop(api, nc, guid="hist-agent-2")
    body = await api.ok("GET", "/api/agents/hist-agent-2/history")
    assert body["entity"] == "agent" and body["events"][0]["type"] == "agent.registered"
    assert body["events"][0]["data"]["guid"] == "hist-agent-2"
    assert all(set(e) == EVENT_FIELDS for e in body["events"])
    await agent.close()


async def test_history_of_an_unknown_entity_is_404_in_the_error_shape(api: Api, nc: NATS) -> None:
    item = await api.ok("POST", "/api/work", WORK, status=201)
    for path in ("/api/work/no-such-item/history", "/api/agents/no-such-agent/history",
                 "/api/work/bad.id*/history", f"/api/work/{item['id']}/history?projectId=someotherproject1"):
        resp = await api.call("GET", path)
        err = await resp.json()
        assert resp.status == 404, (path, err)
        assert err["error"] == "NotFound" and err["message"] and "field" in err["details"], err
    assert (await api.ok("GET", f"/api/work/{item['id']}/history"))["count"] == 1


# --- replay tools ----------------------------------------------------------------------------------


async def test_replay_state_at_seq_and_at_time_equal_the_fold(
        api: Api, nc: NATS, store: EventStore, nats_server: Any) -> None:
    agent, item = await work_loop(api, nc)
    events = [e async for e in store.read_range(api.project)]
    mid = next(e for e in events if e.type == "work.started")
    out = orjson.loads(await weft_cli(nats_server.url, "replay", "state", "--project", api.project,
                                      "--at-seq", str(mid.seq), "--json"))
    expected = fold_upto(events, api.project, mid.seq)
    assert out["seq"] == mid.seq and out["state_hash"] == state_hash(expected)
    assert out["work"][item["id"]]["status"] == "in-progress"
    # at a time: the prefix of events stamped at or before it
    at = mid.ts
    prefix_end = 0
    for ev in events:
        if parse_ts(ev.ts) > parse_ts(at):
            break
        prefix_end = ev.seq
    out = orjson.loads(await weft_cli(nats_server.url, "replay", "state", "--project", api.project,
                                      "--at-time", at, "--json"))
    assert out["seq"] == prefix_end >= mid.seq
    assert out["state_hash"] == state_hash(fold_upto(events, api.project, prefix_end))
    # the summary tables, piped: plain text naming the item and its status
    text = await weft_cli(nats_server.url, "replay", "state", "--project", api.project, "--at-seq", str(mid.seq))
    assert f"at seq {mid.seq}" in text and item["id"] in text and "in-progress" in text
    assert "\x1b[" not in text  # no terminal escapes when piped
    await agent.close()


async def test_replay_diff_names_the_changed_fields(api: Api, nc: NATS, store: EventStore, nats_server: Any) -> None:
    agent, item = await work_loop(api, nc)
    events = [e async for e in store.read_range(api.project)]
    submitted = next(e for e in events if e.type == "work.submitted")
    completed = next(e for e in events if e.type == "work.completed")
    out = orjson.loads(await weft_cli(nats_server.url, "replay", "diff", "--project", api.project,
                                      "--from", str(submitted.seq), "--to", str(completed.seq), "--json"))
    assert out["fromSeq"] == submitted.seq and out["toSeq"] == completed.seq
    change = out["items"]["changed"][item["id"]]
    assert change["status"] == {"old": "pending", "new": "completed"}
    assert change["assignedTo"] == {"old": None, "new": "hist-agent"}
    assert not out["items"]["added"] and not out["items"]["removed"]
    before_agent = next(e for e in events if e.type == "agent.registered").seq - 1
    out = orjson.loads(await weft_cli(nats_server.url, "replay", "diff", "--project", api.project,
                                      "--from", str(before_agent), "--to", str(completed.seq), "--json"))
    assert "hist-agent" in out["agents"]["added"]
    text = await weft_cli(nats_server.url, "replay", "diff", "--project", api.project,
                          "--from", str(submitted.seq), "--to", str(completed.seq))
    assert item["id"] in text and "status" in text and "completed" in text
    await agent.close()


async def test_events_tail_prints_the_entitys_events(api: Api, nc: NATS, nats_server: Any) -> None:
    agent, item = await work_loop(api, nc)
    history = (await api.ok("GET", f"/api/work/{item['id']}/history"))["events"]
    lines = (await weft_cli(nats_server.url, "events", "tail", "--project", api.project, "--entity", item["id"],
                            "--json")).splitlines()
    got = [orjson.loads(line) for line in lines]
    assert [(e["seq"], e["type"], e["data"]) for e in got] == [(e["seq"], e["type"], e["data"]) for e in history]
    pretty = (await weft_cli(nats_server.url, "events", "tail", "--project", api.project)).splitlines()
    assert any("work.completed" in line and item["id"] in line for line in pretty)
    assert any("agent.registered" in line for line in pretty)
    await agent.close()


async def test_events_tail_follow_prints_new_events_as_they_come(api: Api, store: EventStore) -> None:
    first = await api.ok("POST", "/api/work", WORK, status=201)
    lines: asyncio.Queue[str] = asyncio.Queue()
    follow = asyncio.create_task(tail_events(store, api.project, as_json=True, follow=True, write=lines.put_nowait))
    try:
        seen = orjson.loads(await asyncio.wait_for(lines.get(), 10))
        while seen["entityId"] != first["id"]:
            seen = orjson.loads(await asyncio.wait_for(lines.get(), 10))
        second = await api.ok("POST", "/api/work", WORK, status=201)  # appended after the tail started
        while seen["entityId"] != second["id"]:
            seen = orjson.loads(await asyncio.wait_for(lines.get(), 10))
        assert seen["type"] == "work.submitted" and seen["seq"] == second["seq"]
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow


async def test_export_round_trips_through_the_fixture_helper(
        api: Api, nc: NATS, store: EventStore, nats_server: Any, tmp_path: Path) -> None:
    agent, item = await work_loop(api, nc)
    raw = await weft_cli(nats_server.url, "replay", "export", "--project", api.project)
    path = tmp_path / "run.jsonl"
    path.write_text(raw)
    fx = load(path)
    assert fx.footer["kind"] == "footer" and fx.footer["seq"] == fx.events[-1].seq
    state = check(fx)  # the fold of the file equals the footer's hash
    assert state.work[item["id"]]["status"] == "completed"
    live = [e async for e in store.read_range(api.project, 1, fx.footer["seq"])]
    assert state_hash(fold_upto(live, api.project, fx.footer["seq"])) == fx.footer["state_hash"]
    # a bounded range: only those events written; the hash is of the fold up to --to
    sub = (await weft_cli(nats_server.url, "replay", "export", "--project", api.project, "--from", "2", "--to",
                          "3")).splitlines()
    assert [orjson.loads(x)["seq"] for x in sub[:-1]] == [2, 3]
    assert orjson.loads(sub[-1])["state_hash"] == state_hash(fold_upto(live, api.project, 3))
    await agent.close()


async def test_the_bare_replay_command_still_prints_the_hash_summary(
        api: Api, nc: NATS, store: EventStore, nats_server: Any) -> None:
    item = await api.ok("POST", "/api/work", WORK, status=201)
    summary = orjson.loads(await weft_cli(nats_server.url, "replay", "--project", api.project, "--to-seq",
                                          str(item["seq"])))
    events = [e async for e in store.read_range(api.project, 1, item["seq"])]
    assert summary["state_hash"] == state_hash(fold_upto(events, api.project, item["seq"]))


# --- recording the replay fixtures -----------------------------------------------------------------


async def _record(api: Api, name: str) -> None:
    assert api.service is not None and api.service.readmodel is not None
    buf = bytearray()
    await export(api.service.readmodel.store, api.project, write=buf.extend)
    path = FIXTURES / f"{name}.jsonl"
    path.write_bytes(bytes(buf))
    check(load(path))


@contextlib.asynccontextmanager
async def _fleet_replica(url: str, project: str) -> AsyncIterator[Api]:
    mechanisms: dict[str, Any] = {}
    try:
        async with own_replica(url, project, heartbeat_ms=500, accept_timeout_ms=10_000, idle_timeout_ms=1_500,
                               lease_ttl_s=2.0, retry_base_ms=20) as api:
            assert api.service is not None
            mechanisms = api.service.mechanisms
            yield api
    finally:
        local: Any = mechanisms.get("local")
        for pid in local.children() if local is not None else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            await local.wait(pid)


@pytest.mark.skipif(os.environ.get("WEFT_RECORD_FIXTURES") != "1", reason="set WEFT_RECORD_FIXTURES=1 to re-record")
async def test_record_replay_fixtures(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Three real runs, each on a server and replica of its own (no other replica competes for the
    project), exported with `weft.cli.replay.export` into tests/fixtures/replay."""
    import nats

    async with own_nats_server(tmp_path_factory, "record") as server:
        nc = await nats.connect(server.url)
        try:
            # (1) the full work loop
            async with _fleet_replica(server.url, "rec-work-loop") as api:
                agent, _ = await work_loop(api, nc, guid="rec-agent")
                await agent.close()
                await _record(api, "work_loop")
            # (2) a spin-up on a `local` target, the item waits, an agent comes up, runs it, idles out
            async with _fleet_replica(server.url, "rec-spinup") as api:
                target = {
                    "name": "laptop", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
                    "config": {"command": WEFT, "args": ["agent", "--command", "echo built: $(cat)"]},
                    "maxConcurrentAgents": 1, "cooldownMs": 0, "spinUpTimeoutMs": 30_000,
                }
                await api.ok("POST", "/api/targets", target, status=201)
                item = await api.ok("POST", "/api/work", {**WORK, "description": "build it"}, status=201)
                done = await until(api, lambda s: s.work[item["id"]]["status"] == "completed" and s.work[item["id"]])
                guid = done["assignedTo"]
                agent_rec = await until(api, lambda s: s.agents[guid]["launch"] and s.agents[guid])
                await until(api, lambda s: s.agents[guid]["status"] == "offline")
                assert api.service is not None
                local: Any = api.service.mechanisms["local"]
                await asyncio.wait_for(local.wait(agent_rec["launch"]["handle"]["pid"]), 30)
                await _record(api, "spinup_scale_down")
            # (3) a DLQ retry: fails beyond its attempts, dead-lettered, retried through the API
            async with _fleet_replica(server.url, "rec-dlq") as api:
                flaky = FakeAgent(nc, api.project, "rec-flaky")
                await flaky.start()
                item = await api.ok("POST", "/api/work", {**WORK, "maxAttempts": 2}, status=201)
                for _ in range(2):
                    await flaky.next_push("assignment")
                    await flaky.request("work.accept", {"workId": item["id"]})
                    await flaky.request("work.fail", {"workId": item["id"], "message": "network flake",
                                                      "recoverable": True})
                await until(api, lambda s: s.work[item["id"]]["status"] == "failed")
                await api.ok("POST", f"/api/dlq/{item['id']}/retry")
                await flaky.next_push("assignment")
                await flaky.request("work.accept", {"workId": item["id"]})
                await flaky.request("work.complete", {"workId": item["id"], "summary": "third time lucky"})
                await until(api, lambda s: s.work[item["id"]]["status"] == "completed")
                await flaky.close()
                await _record(api, "dlq_retry")
        finally:
            await nc.close()
