"""The fleet commands of the `weft` CLI (submit, work, agents, targets, stats, dlq, watch), each run as
a real subprocess (`.venv/bin/weft`) against a live replica on 127.0.0.1 (the session replica's app
over real HTTP, a real nats-server), with and without `--json`. Also: the environment the CLI reads
(WEFT_API_URL/TOKEN, Shuttle's LOOM_API_URL/TOKEN), and shell completion (argcomplete).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from tests.support import Api, FakeAgent, until

WEFT = str(Path(sys.executable).parent / "weft")
WORK = {"capability": "python", "boundary": "personal", "description": "cli work"}


def url_of(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


def cli_env(api: Api, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "LOOM_", "LOOMINAL_", "_ARGCOMPLETE"))}
    return {**env, "WEFT_API_URL": url_of(api), "LOOMINAL_PROJECT_ID": api.project, "NO_COLOR": "1", **extra}


async def start_cli(api: Api, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        WEFT, *args, env=cli_env(api, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"weft did not finish in {timeout}s: {out.decode()} {err.decode()}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def weft(api: Api, *args: str, **env: str) -> str:
    code, out, err = await finish(await start_cli(api, *args, **env))
    assert code == 0, f"weft {' '.join(args)} exited {code}: {err}{out}"
    return out


async def weft_json(api: Api, *args: str, **env: str) -> Any:
    return orjson.loads(await weft(api, *args, "--json", **env))


async def read_line(proc: asyncio.subprocess.Process, wanted: Any, timeout: float = 30) -> str:
    """The output up to and including the first line for which `wanted(line)` holds."""
    assert proc.stdout is not None
    seen = ""
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        seen += line
        assert line, f"weft ended before the line wanted: {seen}"
        if wanted(line):
            return seen


@contextlib.asynccontextmanager
async def agent(nc: NATS, project: str, guid: str, **kw: Any) -> AsyncIterator[FakeAgent]:
    a = FakeAgent(nc, project, guid, **kw)
    await a.start()
    try:
        yield a
    finally:
        await a.close()


# --- the bug: `submit --wait` / `watch <id>` failed with 400 once caught up with the stream --------


async def test_submit_wait_waits_for_an_agent_without_a_400(api: Api, nc: NATS) -> None:
    """Submitted while no agent exists: the CLI catches up with the stream long before anything
    happens to the item. It must keep waiting (not answer `HTTP 400: min_seq N is beyond...`), print
    each status change, and return once an agent that turns up later completes the item."""
    proc = await start_cli(api, "submit", "--capability", "python", "--boundary", "personal", "--wait", "later")
    assert proc.stdout is not None
    # its first line: it has read the item, so it is caught up with the stream, and nothing will
    # happen to the item until an agent exists
    first = await read_line(proc, lambda line: line.startswith("pending"))
    item = await until(api, lambda s: next(iter(s.work.values()), None))
    async with agent(nc, api.project, "late-agent", auto=True) as late:
        code, out, err = await finish(proc)
        assert late.completed == [item["id"]] or code != 0
    assert code == 0, err + first + out
    lines = (first + out).strip().splitlines()
    assert lines[0] == f"submitted {item['id']}"
    assert lines[1].split()[0] == "pending"
    assert lines[-1].split()[0] == "completed"


async def test_watch_follows_progress_until_terminal(api: Api, nc: NATS) -> None:
    async with agent(nc, api.project, "slow-agent") as a:
        created = await api.ok("POST", "/api/work", WORK, status=201)
        push = await a.next_push("assignment")
        work_id = push["work"]["id"]
        assert (await a.request("work.accept", {"workId": work_id}))["ok"]
        proc = await start_cli(api, "watch", work_id, "--json")
        seen = await read_line(proc, lambda line: orjson.loads(line)["status"] == "in-progress")
        for pct in (25, 75):
            reply = await a.request("work.progress", {"workId": work_id, "progress": pct, "message": f"at {pct}"})
            assert reply["ok"], reply
            seen += await read_line(proc, lambda line, pct=pct: orjson.loads(line).get("progress") == pct)
        assert (await a.request("work.complete", {"workId": work_id, "summary": "done"}))["ok"]
        code, out, err = await finish(proc)
        out = seen + out
    assert code == 0, err
    updates = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert updates[-1]["status"] == "completed" and updates[-1]["id"] == created["id"]
    assert [u["status"] for u in updates] == ["in-progress"] * 3 + ["completed"]
    assert [u.get("progressMessage") for u in updates[1:3]] == ["at 25", "at 75"]


# --- every command, with and without --json --------------------------------------------------------


def table_rows(out: str) -> list[list[str]]:
    """Plain (piped) tables: a header in upper case, then one row per line, columns 2+ spaces apart."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and lines[0] == lines[0].upper(), out
    return [line.split() for line in lines[1:]]


def fields(out: str) -> dict[str, str]:
    """Plain records: `key  value` lines."""
    pairs = [line.split(None, 1) for line in out.splitlines() if line.strip()]
    return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}


async def test_submit_and_work_list_show_cancel(api: Api) -> None:
    created = fields(await weft(api, "submit", "--capability", "rust", "--boundary", "personal", "--priority", "7",
                                "first job"))
    assert created["status"] == "pending" and created["projectId"] == api.project and "rust" in created["waiting"]
    second = await weft_json(api, "submit", "--capability", "rust", "--boundary", "personal", "second job")
    assert second["status"] == "pending" and second["projectId"] == api.project

    rows = table_rows(await weft(api, "work"))
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == {created["id"], second["id"]}
    assert by_id[created["id"]][1:5] == ["pending", "7", "rust", "personal"]
    listed = await weft_json(api, "work", "--status", "pending")
    assert {w["id"] for w in listed["workItems"]} == {created["id"], second["id"]}

    shown = fields(await weft(api, "work", "show", created["id"]))
    assert shown["id"] == created["id"] and shown["description"] == "first job"
    assert "rust" in shown["waiting"]  # waitingReason: no agent with capability rust
    assert (await weft_json(api, "work", "show", second["id"]))["id"] == second["id"]

    cancelled = await weft(api, "work", "cancel", second["id"])
    assert cancelled.splitlines()[0] == "cancelled" and fields(cancelled)["status"] == "cancelled"
    again = await weft_json(api, "work", "cancel", second["id"])
    assert again["alreadyCancelled"] is True and again["workItem"]["status"] == "cancelled"
    assert [r[0] for r in table_rows(await weft(api, "work", "--status", "cancelled"))] == [second["id"]]

    code, _, err = await finish(await start_cli(api, "work", "show", "no-such-item"))
    assert code == 1 and "HTTP 404" in err


async def test_agents_list_show_shutdown(api: Api, nc: NATS) -> None:
    async with agent(nc, api.project, "cli-agent", capabilities=("python", "go"), max_tasks=3):
        await until(api, lambda s: "cli-agent" in s.agents)
        rows = table_rows(await weft(api, "agents"))
        assert [r[:4] for r in rows] == [["cli-agent", "online", "claude-code", "0/3"]]
        assert rows[0][4] == "python,go"
        listed = await weft_json(api, "agents", "--capability", "go")
        assert [a["guid"] for a in listed["agents"]] == ["cli-agent"]
        shown = fields(await weft(api, "agents", "show", "cli-agent"))
        assert shown["guid"] == "cli-agent" and shown["capabilities"] == "python,go"
        assert (await weft_json(api, "agents", "show", "cli-agent"))["maxConcurrentTasks"] == 3
        ack = fields(await weft(api, "agents", "shutdown", "cli-agent"))
        assert ack["success"] == "yes"
        again = await weft_json(api, "agents", "shutdown", "cli-agent", "--force")
        assert again["success"] is True


async def test_targets_list_show_test_disable_enable_remove(api: Api) -> None:
    await api.ok("POST", "/api/targets", {"name": "laptop", "agentType": "claude-code", "mechanism": "local",
                                          "capabilities": ["cobol"], "config": {"local": {"command": "true"}}},
                 status=201)
    rows = table_rows(await weft(api, "targets"))
    assert [r[0] for r in rows] == ["laptop"] and "local" in rows[0]
    assert [t["name"] for t in (await weft_json(api, "targets"))["targets"]] == ["laptop"]
    shown = fields(await weft(api, "targets", "show", "laptop"))
    assert shown["name"] == "laptop" and shown["mechanism"] == "local"
    assert (await weft_json(api, "targets", "show", "laptop"))["agentType"] == "claude-code"
    assert await weft(api, "targets", "test", "laptop")
    assert isinstance(await weft_json(api, "targets", "test", "laptop"), dict)
    await weft(api, "targets", "disable", "laptop")
    assert (await weft_json(api, "targets", "show", "laptop"))["status"] == "disabled"
    assert (await weft_json(api, "targets", "enable", "laptop")) is not None
    assert (await weft_json(api, "targets", "show", "laptop"))["status"] != "disabled"
    await weft(api, "targets", "remove", "laptop")
    assert (await weft(api, "targets")).strip() == "(none)"
    assert (await weft_json(api, "targets"))["targets"] == []


async def test_stats(api: Api) -> None:
    await api.ok("POST", "/api/work", {**WORK, "capability": "rust"}, status=201)
    stats = fields((await weft(api, "stats")).split("\n\n")[0])
    assert stats["projectId"] == api.project and stats["pending"] == "1"
    body = await weft_json(api, "stats")
    assert body["projectId"] == api.project and body["pending"] == 1 and "byProject" in body


async def test_dlq_list_retry_discard(api: Api, nc: NATS) -> None:
    async with agent(nc, api.project, "failing-agent") as a:
        item = await api.ok("POST", "/api/work", {**WORK, "maxAttempts": 1}, status=201)
        for _ in range(2):
            push = await a.next_push("assignment")
            assert (await a.request("work.accept", {"workId": push["work"]["id"]}))["ok"]
            reply = await a.request("work.fail", {"workId": item["id"], "message": "boom"})
            assert reply["ok"], reply
            await until(api, lambda s: s.work[item["id"]]["status"] == "failed")
            rows = table_rows(await weft(api, "dlq"))
            assert [r[0] for r in rows] == [item["id"]]
            assert [d["id"] for d in (await weft_json(api, "dlq"))["items"]] == [item["id"]]
            if _ == 0:
                assert fields(await weft(api, "dlq", "retry", item["id"]))["success"] == "yes"
        assert (await weft_json(api, "dlq", "discard", item["id"]))["success"] is True
        assert "(none)" in await weft(api, "dlq")
        assert (await weft_json(api, "dlq"))["items"] == []


# --- weft watch: the live view of a project --------------------------------------------------------


async def project_history(api: Api, nc: NATS) -> dict[str, Any]:
    """A short history: an agent registers, an item is submitted, assigned and completed."""
    async with agent(nc, api.project, "watched", auto=True) as a:
        item = await api.ok("POST", "/api/work", WORK, status=201)
        await until(api, lambda s: s.work[item["id"]]["status"] == "completed")
    assert a.completed == [item["id"]]  # close() waited for its report's reply
    return item


async def test_watch_a_project_prints_one_line_per_event_when_piped(api: Api, nc: NATS) -> None:
    item = await project_history(api, nc)
    # The whole history: 5 work events and 3 agent events. Each topic is its own subscription,
    # replayed on its own, so the topics interleave in any order; a prefix would be a coin toss.
    out = await weft(api, "watch", "--from-seq", "1", "--events", "8")
    lines = out.splitlines()
    assert len(lines) == 8, out
    names = [line.split()[1] for line in lines]
    assert sorted(names) == sorted(["agent:registered", "work:submitted", "work:assigned", "work:started",
                                    "work:completed", "agent:updated", "agent:updated", "agent:updated"]), out
    assert "watched" in lines[names.index("agent:registered")]
    assert "work:submitted" in names and item["id"] in lines[names.index("work:submitted")]
    # In order within each topic (each topic is its own subscription, replayed on its own).
    for topic in {name.split(":")[0] for name in names}:
        seqs = [int(line.split()[0]) for line, name in zip(lines, names, strict=True) if name.startswith(topic + ":")]
        assert seqs == sorted(seqs), (topic, out)

    events = [orjson.loads(line) for line in (await weft(api, "watch", "--from-seq", "1", "--events", "8",
                                                         "--json")).splitlines()]
    assert len(events) == 8 and all(e["type"] == "event" and e["seq"] >= 1 for e in events)
    works = [e for e in events if e["topic"] == "work"]
    assert works[0]["event"] == "work:submitted" and works[0]["data"]["workId"] == item["id"]


async def test_ctrl_c_stops_watch(api: Api, nc: NATS) -> None:
    import signal

    await project_history(api, nc)
    proc = await start_cli(api, "watch", "--from-seq", "1")
    await read_line(proc, lambda line: "agent:registered" in line)  # it is following now
    proc.send_signal(signal.SIGINT)
    code, _, err = await finish(proc, 20)
    assert code == 0, err
    assert "Traceback" not in err


async def test_watch_a_project_live_follows_new_events(api: Api, nc: NATS) -> None:
    """From now on (no --from-seq): events appended while it watches."""
    proc = await start_cli(api, "watch", "--events", "2", "--json")
    # Submit until the watcher has seen two events: it subscribes some time after it starts.
    submitted: list[str] = []
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    while len(seen) < 2:
        submitted.append((await api.ok("POST", "/api/work", {**WORK, "capability": "rust"}, status=201))["id"])
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
            assert line, "watch ended early"
            seen.append(orjson.loads(line))
    code, out, err = await finish(proc)
    assert code == 0, err
    seen += [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert len(seen) == 2 and all(e["event"] == "work:submitted" and e["data"]["workId"] in submitted for e in seen)


async def test_watch_a_project_on_a_terminal_draws_a_live_view(api: Api, nc: NATS) -> None:
    item = await project_history(api, nc)
    env = {k: v for k, v in cli_env(api, WEFT_CLI_TTY="1", COLUMNS="160").items() if k != "NO_COLOR"}
    proc = await asyncio.create_subprocess_exec(
        WEFT, "watch", "--from-seq", "1", "--events", "8", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    code, out, err = await finish(proc)
    assert code == 0, err
    for part in ("Queue", "Agents", "Recent events", "agent:registered", api.project):
        assert part in out, out
    assert "\x1b[" in out  # coloured
    assert "watched" in out and item["id"] in out  # in the recent events


async def test_tables_on_a_terminal_are_rich(api: Api) -> None:
    created = await weft_json(api, "submit", "--capability", "rust", "--boundary", "personal", "tty job")
    env = {k: v for k, v in cli_env(api, WEFT_CLI_TTY="1", COLUMNS="200").items() if k != "NO_COLOR"}
    proc = await asyncio.create_subprocess_exec(WEFT, "work", env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    code, out, err = await finish(proc)
    assert code == 0, err
    assert created["id"] in out and "\x1b[" in out and "─" in out  # colours, a rule under the header


async def test_watch_falls_back_to_polling_without_the_websocket_api(api: Api, nc: NATS) -> None:
    """A weft (or a proxy) without /api/ws: the upgrade is a 404; both watches poll instead."""
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    target = url_of(api)

    async def forward(request: web.Request) -> web.Response:
        if request.path == "/api/ws":
            return web.json_response({"error": "NotFound", "message": "no such route"}, status=404)
        async with ClientSession() as s, s.request(request.method, target + request.path_qs,
                                                   data=await request.read(), headers={
                                                       k: v for k, v in request.headers.items()
                                                       if k.lower() in ("content-type", "authorization",
                                                                        "idempotency-key")}) as resp:
            headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-weft")}
            return web.Response(status=resp.status, body=await resp.read(), headers=headers,
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    proxy = TestServer(app, host="127.0.0.1")
    await proxy.start_server()
    try:
        proxied = {"WEFT_API_URL": str(proxy.make_url("")).rstrip("/")}
        async with agent(nc, api.project, "polled", auto=True):
            code, out, err = await finish(await start_cli(
                api, "submit", "--capability", "python", "--boundary", "personal", "--wait", "polled job",
                **proxied))
            assert code == 0, err
            assert out.strip().splitlines()[-1].split()[0] == "completed"
            out = await weft(api, "watch", "--events", "1", "--interval", "0.2", "--json", **proxied)
            polled = orjson.loads(out.splitlines()[0])
            assert polled["polled"] is True and polled["topic"] in ("work", "agents")
    finally:
        await proxy.close()


# --- configuration: WEFT_API_*, Shuttle's LOOM_API_* -------------------------------------------------


def test_config_prefers_weft_variables_and_honours_shuttle_s() -> None:
    from weft.cli.rest_commands import ClientConfig

    assert ClientConfig.from_env({}, None) == ClientConfig("http://127.0.0.1:3000", None, None)
    loom = ClientConfig.from_env({"LOOM_API_URL": "http://loom:3000/", "LOOM_API_TOKEN": "lt"}, None)
    assert (loom.url, loom.token) == ("http://loom:3000", "lt")
    both = ClientConfig.from_env({"LOOM_API_URL": "http://loom:3000", "LOOM_API_TOKEN": "lt",
                                  "WEFT_API_URL": "http://weft:8080", "WEFT_API_TOKEN": "wt",
                                  "LOOMINAL_PROJECT_ID": "alpha"}, None)
    assert both == ClientConfig("http://weft:8080", "wt", "alpha")
    assert ClientConfig.from_env({"LOOMINAL_PROJECT_ID": "alpha", "WEFT_PROJECT": "beta"}, "gamma").project == "gamma"
    assert ClientConfig.from_env({"LOOMINAL_PROJECT_ID": "alpha", "WEFT_PROJECT": "beta"}, None).project == "beta"


async def test_a_token_from_loom_api_token_reaches_a_weft_with_tokens(weft_service: Any, project: str, nc: NATS
                                                                       ) -> None:
    """LOOM_API_URL/LOOM_API_TOKEN alone are enough, for REST and for the WebSocket (whose token
    travels as a subprotocol, never in the URL); without the token it is a 401."""
    from tests.support import make_client

    client = await make_client(weft_service, api_tokens=("s3cret-token",))
    api = Api(client, project, weft_service)
    loom = {"WEFT_API_URL": "", "LOOM_API_URL": url_of(api), "LOOM_API_TOKEN": "s3cret-token"}
    try:
        code, _, err = await finish(await start_cli(api, "work"))
        assert code == 1 and "HTTP 401" in err
        async with agent(nc, project, "token-agent", auto=True):
            out = await weft(api, "submit", "--capability", "python", "--boundary", "personal", "--wait", "--json",
                             "with a token", **loom)
            assert orjson.loads(out.splitlines()[-1])["status"] == "completed"
            assert (await weft_json(api, "agents", **loom))["agents"][0]["guid"] == "token-agent"
            events = (await weft(api, "watch", "--from-seq", "1", "--events", "1", **loom)).splitlines()
            assert len(events) == 1
    finally:
        await client.close()


# --- shell completion --------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh"])
async def test_completion_prints_the_registration(api: Api, shell: str) -> None:
    out = await weft(api, "completion", shell)
    assert "_python_argcomplete" in out
    assert ("complete -o nospace -o default -o bashdefault -F _python_argcomplete weft" in out if shell == "bash"
            else "compdef _python_argcomplete weft" in out)


async def test_completion_answers_subcommands_and_options(api: Api, tmp_path: Path) -> None:
    """The protocol the shell scripts speak: _ARGCOMPLETE=1 with COMP_LINE/COMP_POINT; the answer goes
    to _ARGCOMPLETE_STDOUT_FILENAME, separated by IFS (a vertical tab by default)."""

    async def complete(line: str) -> list[str]:
        answer = tmp_path / "answer"
        await weft(api, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)), COMP_TYPE="9",
                   _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(answer))
        return [w.strip() for w in answer.read_text().splitlines() if w.strip()]

    assert {"submit", "work", "agents", "targets", "stats", "dlq", "watch", "completion"} <= set(
        await complete("weft "))
    assert await complete("weft wat") == ["watch"]
    assert "--events" in await complete("weft watch --ev")
    assert set(await complete("weft work ")) >= {"list", "show", "cancel"}
