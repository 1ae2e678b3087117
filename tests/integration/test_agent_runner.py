"""The reference agent (`weft agent`, weft/agent/) against a fake weft on a real nats-server.

`FakeWeft` answers the protocol's request subjects with plain NATS (no weft server side), records
every request, and pushes to the agent's inbox, so each test controls exactly what weft says. The
commands are real shell commands; tests wait on requests, futures and FIFOs, never on sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.servers import own_nats_server
from weft.agent.client import AgentClient, Assignment, Cancel, Shutdown, parse_push
from weft.agent.main import add_arguments
from weft.agent.runner import (
    AgentRunner,
    ItemRun,
    StopRequest,
    TailBuffer,
    iter_lines,
    parse_progress,
    tail_text,
    work_env,
)
from weft.agent.settings import AgentSettings, AgentSettingsError, default_guid
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port

Body = dict[str, Any]
Handler = Callable[[Body], Body | Awaitable[Body]]
WEFT = str(Path(sys.executable).parent / "weft")
T = 15.0  # generous bound on every await: a hang fails the test instead of the suite


# --- a fake weft: request/reply handlers on a real nats-server ---------------------------------------


class FakeWeft:
    def __init__(self, nc: NATS, project: str) -> None:
        self.nc = nc
        self.project = project
        self.requests: list[tuple[str, Body]] = []
        self.heartbeats: list[Body] = []
        self.held: list[Body] = []  # returned by register and sync
        self.heartbeat_ms = 10_000
        self.handlers: dict[str, Handler] = {}
        self._changed = asyncio.Condition()
        self._subs: list[Any] = []

    async def start(self) -> FakeWeft:
        self._subs.append(await self.nc.subscribe(f"weft.{self.project}.*.*", cb=self._on_request))
        self._subs.append(await self.nc.subscribe(f"weft.{self.project}.agent.heartbeat.*", cb=self._on_heartbeat))
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        verb = ".".join(msg.subject.split(".")[2:4])
        body = orjson.loads(msg.data)
        async with self._changed:
            self.requests.append((verb, body))
            self._changed.notify_all()
        handler = self.handlers.get(verb)
        reply = handler(body) if handler is not None else self._default(verb, body)
        if asyncio.iscoroutine(reply):
            reply = await reply
        await msg.respond(orjson.dumps(reply))

    def _default(self, verb: str, body: Body) -> Body:
        if verb == "agent.register":
            return {"ok": True, "guid": body["guid"], "seq": 1, "heartbeatIntervalMs": self.heartbeat_ms,
                    "inbox": self.inbox(body["guid"]), "assignments": list(self.held), "shutdown": None}
        if verb == "agent.sync":
            return {"ok": True, "assignments": list(self.held), "shutdown": None}
        if verb == "work.fail":
            return {"ok": True, "seq": len(self.requests), "outcome": "retry"}
        return {"ok": True, "seq": len(self.requests)}

    async def _on_heartbeat(self, msg: Msg) -> None:
        async with self._changed:
            self.heartbeats.append(orjson.loads(msg.data))
            self._changed.notify_all()

    def inbox(self, guid: str) -> str:
        return f"weft.{self.project}.agent.{guid}.inbox"

    async def push(self, guid: str, body: Body) -> None:
        await self.nc.publish(self.inbox(guid), orjson.dumps(body))
        await self.nc.flush()

    def of(self, verb: str, work_id: str | None = None) -> list[Body]:
        return [b for v, b in self.requests if v == verb and (work_id is None or b.get("workId") == work_id)]

    def verbs(self, work_id: str | None = None) -> list[str]:
        return [v for v, b in self.requests if work_id is None or b.get("workId") == work_id]

    async def wait(self, verb: str, pred: Callable[[Body], bool] = lambda b: True, count: int = 1) -> Body:
        """The `count`-th request of `verb` matching `pred` (waits for it)."""

        def found() -> Body | None:
            hits = [b for v, b in self.requests if v == verb and pred(b)]
            return hits[count - 1] if len(hits) >= count else None

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), T)
        hit = found()
        assert hit is not None
        return hit

    async def wait_heartbeats(self, count: int) -> list[Body]:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.heartbeats) >= count), T)
        return self.heartbeats


def work(work_id: str, **kw: Any) -> Body:
    base = {"id": work_id, "taskId": f"task-{work_id}", "capability": "python", "boundary": "personal",
            "description": f"do {work_id}", "priority": 5, "contextData": {"repo": "weft"}, "deadline": None,
            "attempts": 1, "maxAttempts": 3, "status": "assigned", "correlationId": f"corr-{work_id}"}
    base.update(kw)
    return base


def settings_for(project: str, command: str, **kw: Any) -> AgentSettings:
    base = AgentSettings(
        project=project, guid=f"g-{project}", agent_type="claude-code", capabilities=("python",),
        boundaries=("personal",), command=command, hostname="testhost", username="tester",
        request_timeout_s=1.0, max_backoff_s=0.3, kill_grace_s=5.0, drain_timeout_s=0.5,
        child_env=dict(os.environ),
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
async def agent_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this module's own: the session's weft replica (tests/conftest.py) would answer
    the protocol's subjects too and race the fake."""
    async with own_nats_server(tmp_path_factory, "agent-test") as server:
        yield server


@pytest.fixture
async def fake(agent_nats: EmbeddedNats, project: str) -> AsyncIterator[FakeWeft]:
    nc = await nats.connect(agent_nats.url)
    weft = await FakeWeft(nc, project).start()
    yield weft
    await weft.stop()
    await nc.close()


class Agent:
    """A runner on its own connection, started as a task; `stop()` forces it down if still running."""

    def __init__(self, runner: AgentRunner, client: AgentClient) -> None:
        self.runner = runner
        self.client = client
        self.task: asyncio.Task[int] = asyncio.create_task(runner.run())

    async def result(self) -> int:
        return await asyncio.wait_for(asyncio.shield(self.task), T)

    def run_of(self, work_id: str) -> ItemRun:
        return self.runner.running[work_id]

    async def item_done(self, work_id: str) -> ItemRun:
        run = self.runner.running[work_id]
        assert run.task is not None
        await asyncio.wait_for(asyncio.wait({run.task}), T)
        return run


@asynccontextmanager
async def agent(url: str, settings: AgentSettings) -> AsyncIterator[Agent]:
    client = AgentClient(settings.project, settings.guid, request_timeout_s=settings.request_timeout_s,
                         max_backoff_s=settings.max_backoff_s)
    await client.connect(url, connect_timeout_s=T)
    a = Agent(AgentRunner(settings, client), client)
    try:
        yield a
    finally:
        if not a.task.done():
            a.runner.request_stop(StopRequest(False, "test teardown"))
            await asyncio.wait({a.task}, timeout=T)
        await client.close()


async def release(gate: Path, text: str = "go\n") -> None:
    """Open the FIFO the command waits on (blocks until the command opens it: a thread does it)."""

    def write() -> None:
        with open(gate, "w") as f:
            f.write(text)

    await asyncio.wait_for(asyncio.to_thread(write), T)


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    path = tmp_path / "gate"
    os.mkfifo(path)
    return path


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    """A directory with one FIFO per work id (`gates / "w1"`), for commands that wait on their own."""
    path = tmp_path / "gates"
    path.mkdir()
    for name in ("w1", "w2", "w3"):
        os.mkfifo(path / name)
    return path


# --- pure pieces ----------------------------------------------------------------------------------


def test_parse_progress_lines() -> None:
    assert parse_progress("progress: 40 compiling the parser") == (40, "compiling the parser")
    assert parse_progress("progress: 0") == (0, None)
    assert parse_progress("  Progress:100%  done ") == (100, "done")
    assert parse_progress("progress: 12.5 half a step") == (12, "half a step")
    assert parse_progress("progress: 101 too much") is None
    assert parse_progress("progress: -1") is None
    assert parse_progress("progress: soon") is None
    assert parse_progress("my progress: 50") is None
    assert parse_progress("progress:50") == (50, None)
    long_message = parse_progress("progress: 5 " + "x" * 5000)
    assert long_message is not None and long_message[1] is not None and len(long_message[1]) == 1000


def test_tail_buffer_keeps_the_last_bytes_and_flags_truncation() -> None:
    buf = TailBuffer(20)
    for i in range(10):
        buf.add(f"line-{i}")
    assert buf.truncated and buf.text().endswith("line-9") and len(buf.text().encode()) <= 20
    assert tail_text("héllo wörld", 6) == "wörld"
    assert tail_text("ééé", 3) == "é"  # never cut inside a character
    small = TailBuffer(100)
    small.add("a")
    assert not small.truncated and small.text() == "a"


async def test_iter_lines_splits_crlf_long_lines_and_a_last_line_without_newline() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(b"one\r\ntwo\n" + b"x" * 25 + b"\nlast")
    stream.feed_eof()
    lines = [line async for line in iter_lines(stream, max_line=10)]
    assert lines == ["one", "two", "x" * 10, "x" * 10, "x" * 5, "last"]


def test_parse_push_types() -> None:
    assert parse_push({"type": "assignment", "work": work("w1")}) == Assignment(work("w1"))
    assert parse_push({"type": "cancel", "workId": "w1", "reason": "user"}) == Cancel("w1", "user")
    pushed = parse_push({"type": "shutdown", "graceful": False, "reason": "scale", "gracePeriodMs": 500})
    assert isinstance(pushed, Shutdown) and not pushed.request.graceful and pushed.request.grace_period_ms == 500
    assert parse_push({"type": "assignment", "work": {}}) is None
    assert parse_push({"type": "nope"}) is None and parse_push([1]) is None


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_settings_from_flags_and_environment() -> None:
    args = _args("--capabilities", "python, review,python", "--boundaries", "personal,corp", "--command", "true",
                 "--max-tasks", "3", "--label", "team=core", "--label", "gpu=", "--recoverable-exit-codes", "75,69",
                 "--idle-exit", "30", "--heartbeat-ms", "2000", "--handle", "h1")
    env = {"LOOMINAL_PROJECT_ID": "proj1", "NATS_URL": "nats://127.0.0.1:1", "NATS_USER": "u", "NATS_PASS": "p",
           "WEFT_SPINUP_ID": "spin-9", "WEFT_TARGET_ID": "target-3", "LOG_FORMAT": "JSON", "PATH": "/bin"}
    s = AgentSettings.from_args(args, env)
    assert s.project == "proj1" and s.capabilities == ("python", "review") and s.boundaries == ("personal", "corp")
    assert s.max_tasks == 3 and s.handle == "h1" and s.idle_exit_s == 30 and s.heartbeat_ms == 2000
    assert s.labels == {"team": "core", "gpu": "", "targetId": "target-3"}
    assert s.recoverable_exit_codes == frozenset({75, 69})
    assert (s.nats_url, s.nats_user, s.nats_pass) == ("nats://127.0.0.1:1", "u", "p")
    assert (s.spin_up_id, s.target_id, s.log_format) == ("spin-9", "target-3", "json")
    assert s.child_env["PATH"] == "/bin"
    # a spun-up agent's guid comes from its spin-up id (many may share a host)
    assert s.guid == "claude-code-spin-9"
    # otherwise the default guid is stable for host + project + type + capabilities, and valid in subjects
    own = {k: v for k, v in env.items() if k != "WEFT_SPINUP_ID"}
    first = AgentSettings.from_args(_args("--capabilities", "python,review", "--command", "x"), own)
    again = AgentSettings.from_args(_args("--capabilities", "review,python", "--command", "x"), own)
    assert again.guid == first.guid == default_guid(s.hostname, "proj1", "claude-code", ("python", "review"))
    other = AgentSettings.from_args(_args("--capabilities", "python", "--command", "x", "--type", "copilot-cli"), own)
    assert other.guid != first.guid and other.guid.startswith("copilot-cli@")
    # the target's declaration arrives as WEFT_AGENT_* variables when no flags are given
    spun = AgentSettings.from_args(_args(), {"WEFT_AGENT_CAPABILITIES": "go,rust", "WEFT_AGENT_BOUNDARIES": "personal",
                                             "WEFT_AGENT_TYPE": "copilot-cli", "WEFT_AGENT_COMMAND": "echo hi"})
    assert (spun.capabilities, spun.boundaries, spun.agent_type, spun.command) == (
        ("go", "rust"), ("personal",), "copilot-cli", "echo hi")
    # WEFT_AGENT_GUID overrides the derived guid, --guid overrides both; --project beats the env
    assert AgentSettings.from_args(_args("--capabilities", "a", "--command", "x"), {**env, "WEFT_AGENT_GUID": "e-1"}).guid == "e-1"
    flagged = AgentSettings.from_args(_args("--capabilities", "a", "--command", "x", "--guid", "f-1", "--project", "p2"),
                                      {**env, "WEFT_AGENT_GUID": "e-1"})
    assert (flagged.guid, flagged.project) == ("f-1", "p2")
    assert AgentSettings.from_args(_args("--capabilities", "a", "--command", "x"), {}).project == "default"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--capabilities", " , ", "--command", "x"], "capabilities"),
        (["--capabilities", "a", "--command", "x", "--project", "bad.project"], "project"),
        (["--capabilities", "a", "--command", "x", "--guid", "has space"], "guid"),
        (["--capabilities", "a", "--command", "x", "--max-tasks", "0"], "max-tasks"),
        (["--capabilities", "a", "--command", "x", "--label", "novalue"], "label"),
        (["--capabilities", "a", "--command", "x", "--recoverable-exit-codes", "x"], "exit-codes"),
        (["--capabilities", "a", "--command", "x", "--idle-exit", "-1"], "idle-exit"),
    ],
)
def test_settings_reject_bad_configuration(argv: list[str], fragment: str) -> None:
    with pytest.raises(AgentSettingsError, match=fragment):
        AgentSettings.from_args(_args(*argv), {})


def test_work_env_exposes_the_item() -> None:
    s = settings_for("p1", "true", child_env={"PATH": "/bin", "KEEP": "1"})
    env = work_env(s, work("w1", description="fix\x00 it", priority=7, attempts=2, contextData={"a": [1]}))
    assert env["KEEP"] == "1" and env["WEFT_WORK_ID"] == "w1" and env["WEFT_WORK_TASK_ID"] == "task-w1"
    assert (env["WEFT_WORK_CAPABILITY"], env["WEFT_WORK_BOUNDARY"]) == ("python", "personal")
    assert (env["WEFT_WORK_PRIORITY"], env["WEFT_WORK_ATTEMPT"]) == ("7", "2")
    assert env["WEFT_WORK_DESCRIPTION"] == "fix it" and orjson.loads(env["WEFT_WORK_CONTEXT"]) == {"a": [1]}
    assert (env["WEFT_PROJECT"], env["WEFT_AGENT_GUID"]) == ("p1", "g-p1")
    assert orjson.loads(work_env(s, work("w2", contextData=None))["WEFT_WORK_CONTEXT"]) == {}


def test_cli_has_the_agent_command() -> None:
    from weft.cli.main import build_parser

    args = build_parser().parse_args(["agent", "--capabilities", "python", "--command", "echo hi", "--idle-exit", "5"])
    assert args.command == "agent" and args.agent_command == "echo hi"
    assert args.capabilities == "python" and args.idle_exit == 5.0


# --- the agent end to end against the fake weft -----------------------------------------------------


async def test_registers_with_every_field_after_subscribing_its_inbox(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str
) -> None:
    s = settings_for(project, "echo from-register", handle="h-1", max_tasks=2, labels={"team": "core", "targetId": "t-1"},
                     spin_up_id="spin-1", target_id="t-1", idle_exit_s=600)

    async def register(body: Body) -> Body:
        # Pushed before the reply: only an agent that subscribed before registering receives it.
        await fake.push(body["guid"], {"type": "assignment", "work": work("w-early")})
        return fake._default("agent.register", body)

    fake.handlers["agent.register"] = register
    async with agent(agent_nats.url, s):
        body = await fake.wait("agent.register")
        assert body == {
            "guid": s.guid, "agentType": "claude-code", "capabilities": ["python"], "boundaries": ["personal"],
            "maxConcurrentTasks": 2, "handle": "h-1", "hostname": "testhost", "username": "tester",
            "labels": {"team": "core", "targetId": "t-1"}, "spinUpId": "spin-1", "targetId": "t-1",
            "spindownAfterIdleMs": 600_000,
        }
        done = await fake.wait("work.complete", lambda b: b["workId"] == "w-early")
        assert done["summary"] == "from-register" and done["guid"] == s.guid


async def test_accept_progress_complete_with_a_real_command(agent_nats: EmbeddedNats, fake: FakeWeft, project: str) -> None:
    command = (
        'desc=$(cat); echo "stdin: $desc"; echo "progress: 30 reading"; '
        'echo "env: $WEFT_WORK_ID $WEFT_WORK_TASK_ID $WEFT_WORK_CAPABILITY $WEFT_WORK_BOUNDARY '
        '$WEFT_WORK_PRIORITY $WEFT_WORK_ATTEMPT $WEFT_PROJECT $WEFT_AGENT_GUID"; echo "ctx: $WEFT_WORK_CONTEXT"; '
        'echo "desc-env: $WEFT_WORK_DESCRIPTION"; echo "progress: 90 almost"; echo line-a; echo; echo line-b'
    )
    s = settings_for(project, command)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1", description="write the parser")})
        await fake.wait("work.accept")
        run = a.run_of("w1")
        done = await fake.wait("work.complete")
        verbs = fake.verbs("w1")
        assert verbs[0] == "work.accept" and verbs[-1] == "work.complete" and verbs.count("work.accept") == 1
        progress = fake.of("work.progress", "w1")
        values = [p["progress"] for p in progress]
        assert values and values[-1] == 90 and values == sorted(values) and set(values) <= {30, 90}
        assert progress[-1] == {"guid": s.guid, "workId": "w1", "attempt": 1, "progress": 90, "message": "almost"}
        assert fake.of("work.accept", "w1") == [{"guid": s.guid, "workId": "w1", "attempt": 1}]
        # summary: the last 5 non-empty, non-progress lines; output: the stdout tail, progress lines included
        assert done["summary"].splitlines() == [
            f"env: w1 task-w1 python personal 5 1 {project} {s.guid}", 'ctx: {"repo":"weft"}',
            "desc-env: write the parser", "line-a", "line-b"]
        assert done["output"].startswith("stdin: write the parser\nprogress: 30 reading\n")
        assert done["output"].endswith("line-a\n\nline-b")
        assert run.task is not None
        await asyncio.wait_for(asyncio.wait({run.task}), T)
        assert not a.runner.running and run.stopped is None


@pytest.mark.parametrize(("code", "recoverable"), [(75, True), (3, False)])
async def test_failure_reports_exit_code_stderr_and_recoverable(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, code: int, recoverable: bool
) -> None:
    s = settings_for(project, f"echo partial; echo 'rate limited' >&2; exit {code}")
    async with agent(agent_nats.url, s):
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        failed = await fake.wait("work.fail")
        assert failed == {"guid": s.guid, "workId": "w1", "attempt": 1, "recoverable": recoverable, "code": f"exit-{code}",
                          "message": f"command exited with code {code}; stderr: rate limited"}
        assert not fake.of("work.complete")


async def test_cancel_terminates_the_command_and_reports_nothing_more(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gate: Path
) -> None:
    s = settings_for(project, f'echo "progress: 5 started"; read -r x < "{gate}"; echo never', kill_grace_s=5.0)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.progress")
        proc = a.run_of("w1").proc
        assert proc is not None
        await fake.push(s.guid, {"type": "cancel", "workId": "w1", "reason": "user cancelled"})
        run = await a.item_done("w1")
        assert run.stopped is not None and "user cancelled" in run.stopped
        assert await asyncio.wait_for(proc.wait(), T) == -signal.SIGTERM
        assert fake.verbs("w1") == ["work.accept", "work.progress"]
        # a sync that still lists the same attempt does not start it again
        again = a.runner.offer
        again(work("w1"))
        assert "w1" not in a.runner.running


async def test_graceful_shutdown_finishes_the_running_item_takes_nothing_new_then_deregisters(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gate: Path
) -> None:
    s = settings_for(project, f'echo "progress: 5 started"; read -r x < "{gate}"; echo "finished $x"', max_tasks=2)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.progress")
        offered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        original = a.runner.offer

        def spy(item: Body) -> None:
            original(item)
            if not offered.done():
                offered.set_result(item["id"])

        a.runner.offer = spy  # type: ignore[method-assign,assignment]
        await fake.push(s.guid, {"type": "shutdown", "graceful": True, "reason": "scale down", "gracePeriodMs": None})
        await fake.push(s.guid, {"type": "assignment", "work": work("w2")})
        assert await asyncio.wait_for(offered, T) == "w2"
        assert a.runner.stopping.is_set() and "w2" not in a.runner.running and "w1" in a.runner.running
        assert not fake.of("agent.deregister")
        await release(gate, "ok\n")
        assert await a.result() == 0
        verbs = fake.verbs()
        assert verbs.index("work.complete") < verbs.index("agent.deregister")
        assert fake.of("work.complete", "w1")[0]["summary"] == "finished ok"
        assert fake.of("agent.deregister") == [{"guid": s.guid, "reason": "scale down"}]
        assert not fake.of("work.accept", "w2")


async def test_forced_shutdown_kills_running_commands_and_deregisters(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gate: Path
) -> None:
    s = settings_for(project, f'echo "progress: 5 started"; exec sleep 300 < "{gate}"', kill_grace_s=5.0)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.progress")
        proc = a.run_of("w1").proc
        assert proc is not None
        await fake.push(s.guid, {"type": "shutdown", "graceful": False, "reason": "node drain"})
        assert await a.result() == 0
        assert proc.returncode is not None and proc.returncode < 0
        assert fake.verbs("w1") == ["work.accept", "work.progress"]
        assert fake.of("agent.deregister") == [{"guid": s.guid, "reason": "node drain"}]


async def test_idle_exit_deregisters_and_exits_zero(agent_nats: EmbeddedNats, fake: FakeWeft, project: str) -> None:
    s = settings_for(project, "echo done", idle_exit_s=0.3)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        assert await a.result() == 0
        # it finished its work first: idle time only counts while it holds nothing
        verbs = fake.verbs()
        assert verbs.index("work.complete") < verbs.index("agent.deregister")
        assert "idle" in fake.of("agent.deregister")[0]["reason"]


async def test_heartbeats_and_sync_backstop_start_held_work_once(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str
) -> None:
    s = settings_for(project, "echo ran", heartbeat_ms=50)
    async with agent(agent_nats.url, s):
        await fake.wait("agent.register")
        beats = await fake.wait_heartbeats(1)
        assert beats[0]["guid"] == s.guid and beats[0]["currentTaskCount"] == 0 and beats[0]["ts"].endswith("Z")
        # weft says the agent holds w1 (its push was lost): the backstop sync, every 3 beats, starts it
        fake.held = [work("w1")]
        await fake.wait("work.complete", lambda b: b["workId"] == "w1")
        # later syncs still list it (a replica behind): the finished attempt is not run again
        n = len(fake.of("agent.sync"))
        await fake.wait("agent.sync", count=n + 2)
        assert len(fake.of("work.accept", "w1")) == 1
        # a new attempt of the same item (retried by weft) does run
        fake.held = [work("w1", attempts=2)]
        again = await fake.wait("work.complete", lambda b: b["workId"] == "w1", count=2)
        assert again["attempt"] == 2 and [b["attempt"] for b in fake.of("work.accept", "w1")] == [1, 2]


async def test_duplicate_assignments_run_once(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gates: Path
) -> None:
    s = settings_for(project, f'read -r x < "{gates}/$WEFT_WORK_ID"; echo "done $WEFT_WORK_ID"', max_tasks=3)
    fake.held = [work("w1")]
    async with agent(agent_nats.url, s) as a:
        await fake.wait("work.accept", lambda b: b["workId"] == "w1")
        for _ in range(3):
            await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.push(s.guid, {"type": "assignment", "work": work("w2", description="second")})
        await fake.wait("work.accept", lambda b: b["workId"] == "w2")  # pushes are handled in order
        assert set(a.runner.running) == {"w1", "w2"}
        await release(gates / "w1")
        await release(gates / "w2")
        await fake.wait("work.complete", lambda b: b["workId"] == "w1")
        await fake.wait("work.complete", lambda b: b["workId"] == "w2")
        assert len(fake.of("work.accept", "w1")) == 1 and len(fake.of("work.complete", "w1")) == 1


async def test_more_assignments_than_slots_wait_for_a_free_slot(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gate: Path
) -> None:
    s = settings_for(project, f'read -r x < "{gate}"; echo "done $WEFT_WORK_ID"', max_tasks=1)
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.push(s.guid, {"type": "assignment", "work": work("w2")})
        await fake.wait("work.accept", lambda b: b["workId"] == "w1")
        assert len(a.runner.running) == 1
        await release(gate)
        await fake.wait("work.accept", lambda b: b["workId"] == "w2")
        await release(gate)
        await fake.wait("work.complete", lambda b: b["workId"] == "w2")
        requests = [(v, b.get("workId")) for v, b in fake.requests]
        assert requests.index(("work.complete", "w1")) < requests.index(("work.accept", "w2"))


async def test_conflict_on_accept_drops_the_item_without_running_it(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    s = settings_for(project, f'touch "{marker}"')
    fake.handlers["work.accept"] = lambda b: {"ok": False, "error": "Conflict", "message": "work is pending", "field": "workId"}
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.accept")
        await a.item_done("w1")
        assert not marker.exists() and fake.verbs("w1") == ["work.accept"]


async def test_conflict_on_progress_stops_the_command(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str, gate: Path
) -> None:
    s = settings_for(project, f'echo "progress: 5 started"; read -r x < "{gate}"; echo never')
    fake.handlers["work.progress"] = lambda b: {"ok": False, "error": "Conflict", "message": "withdrawn"}
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.progress")
        run = await a.item_done("w1")
        assert run.stopped is not None and "Conflict" in run.stopped
        assert run.proc is not None and await asyncio.wait_for(run.proc.wait(), T) < 0
        assert fake.verbs("w1") == ["work.accept", "work.progress"]


async def test_unavailable_answers_are_retried_until_weft_answers(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str
) -> None:
    s = settings_for(project, "echo fine")
    answers = iter([{"ok": False, "error": "Unavailable", "message": "projection behind"}] * 2)
    fake.handlers["work.complete"] = lambda b: next(answers, {"ok": True, "seq": 9})
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register")
        await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
        await fake.wait("work.complete", count=3)
        await a.item_done("w1")
        assert len(fake.of("work.complete")) == 3


async def test_sync_of_an_unknown_agent_registers_again(agent_nats: EmbeddedNats, fake: FakeWeft, project: str) -> None:
    s = settings_for(project, "echo fine", heartbeat_ms=50)
    fake.handlers["agent.sync"] = lambda b: {"ok": False, "error": "NotFound", "message": "agent lost", "field": "guid"}
    async with agent(agent_nats.url, s):
        await fake.wait("agent.sync")
        second = await fake.wait("agent.register", count=2)
        assert second["guid"] == s.guid


async def test_registration_is_retried_and_a_stop_meanwhile_exits_cleanly(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str
) -> None:
    s = settings_for(project, "true")
    fake.handlers["agent.register"] = lambda b: {"ok": False, "error": "Unavailable", "message": "starting"}
    async with agent(agent_nats.url, s) as a:
        await fake.wait("agent.register", count=2)  # retried while weft cannot answer
        a.runner.request_stop(StopRequest(True, "received SIGTERM"))
        assert await a.result() == 0
        assert not fake.of("agent.deregister")


async def test_a_refused_registration_exits_with_a_configuration_error(
    agent_nats: EmbeddedNats, fake: FakeWeft, project: str
) -> None:
    s = settings_for(project, "true")
    fake.handlers["agent.register"] = lambda b: {"ok": False, "error": "ValidationError",
                                                 "message": "capabilities[0]: bad", "field": "capabilities[0]"}
    async with agent(agent_nats.url, s) as a:
        assert await a.result() == 2
        assert len(fake.of("agent.register")) == 1


async def test_client_api_directly(agent_nats: EmbeddedNats, fake: FakeWeft, project: str) -> None:
    nc = await nats.connect(agent_nats.url)
    client = AgentClient(project, "direct-1", nc=nc, request_timeout_s=1.0)
    try:
        reply = await client.register(agent_type="copilot-cli", capabilities=["review"], boundaries=["*"])
        assert reply.inbox == fake.inbox("direct-1") and reply.heartbeat_interval_ms == 10_000
        await fake.push("direct-1", {"type": "cancel", "workId": "w9", "reason": "x"})
        pushes = client.pushes()
        assert await asyncio.wait_for(anext(pushes), T) == Cancel("w9", "x")
        assert (await client.sync()).assignments == []
        assert await client.heartbeat(0, "online")
        await fake.wait_heartbeats(1)
        fake.handlers["work.accept"] = lambda b: {"ok": False, "error": "NotFound", "message": "no such item",
                                                  "field": "workId"}
        with pytest.raises(Exception) as err:
            await client.accept("w9")
        assert getattr(err.value, "not_found", False) and err.value.field == "workId"  # type: ignore[attr-defined]
        assert (await client.fail("w9", "boom", code="exit-1", recoverable=True))["outcome"] == "retry"
        await client.deregister("done")
        assert fake.of("agent.deregister") == [{"guid": "direct-1", "reason": "done"}]
    finally:
        await client.close()
        await nc.close()


class RetryWatch(logging.Handler):
    """Resolves `seen` when the client logs that a request of `verb` went unanswered."""

    def __init__(self, verb: str) -> None:
        super().__init__()
        self.verb = verb
        self.seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(f"{self.verb}: weft did not answer") and not self.seen.done():
            self.seen.set_result(None)


async def test_item_survives_a_nats_restart(project: str, tmp_path: Path, gate: Path) -> None:
    """NATS dies while the command runs and the command finishes while it is down: the agent keeps
    the command running, retries `complete` until a (restarted) weft answers, and syncs again."""
    port = free_port()
    config = NatsServerConfig(store_dir=tmp_path / "nats", port=port, server_name="agent-restart")
    server = EmbeddedNats(config)
    await server.start()
    fake_nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    fake = await FakeWeft(fake_nc, project).start()
    s = settings_for(project, f'echo "progress: 5 started"; read -r x < "{gate}"; echo "done after restart"')
    try:
        async with agent(server.url, s) as a:
            await fake.wait("agent.register")
            await fake.push(s.guid, {"type": "assignment", "work": work("w1")})
            await fake.wait("work.progress")
            run = a.run_of("w1")
            assert run.task is not None
            syncs_before = len(fake.of("agent.sync"))
            retrying = RetryWatch("work.complete")
            logging.getLogger("weft.agent.client").addHandler(retrying)
            try:
                await server.kill()
                await release(gate)  # the command finishes while NATS is down...
                assert run.proc is not None and await asyncio.wait_for(run.proc.wait(), T) == 0
                await asyncio.wait_for(retrying.seen, T)  # ...and `complete` found nobody to answer
            finally:
                logging.getLogger("weft.agent.client").removeHandler(retrying)
            server = EmbeddedNats(config)
            await server.start()
            done = await fake.wait("work.complete")
            assert done["summary"] == "done after restart"
            await fake.wait("agent.sync", count=syncs_before + 1)  # re-synced after the reconnect
            await asyncio.wait_for(asyncio.wait({run.task}), T)
            assert not a.runner.running and run.stopped is None
    finally:
        await fake.stop()
        await fake_nc.close()
        await server.stop()


async def test_weft_agent_command_end_to_end(agent_nats: EmbeddedNats, fake: FakeWeft, project: str) -> None:
    """The real `weft agent` process: env configuration, JSON logs, SIGTERM = graceful shutdown."""
    env = {
        **os.environ, "NATS_URL": agent_nats.url, "LOOMINAL_PROJECT_ID": project, "WEFT_AGENT_GUID": "cli-1",
        "WEFT_SPINUP_ID": "spin-7", "WEFT_TARGET_ID": "tgt-2", "LOG_FORMAT": "json", "LOG_LEVEL": "info",
    }
    proc = await asyncio.create_subprocess_exec(
        WEFT, "agent", "--capabilities", "python,review", "--boundaries", "personal", "--type", "copilot-cli",
        "--max-tasks", "2", "--label", "team=core", "--heartbeat-ms", "100",
        "--command", 'echo "progress: 50 half"; echo "did $WEFT_WORK_ID"',
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read())
    try:
        reg = await fake.wait("agent.register")
        assert reg["guid"] == "cli-1" and reg["agentType"] == "copilot-cli" and reg["maxConcurrentTasks"] == 2
        assert reg["capabilities"] == ["python", "review"] and reg["boundaries"] == ["personal"]
        assert reg["spinUpId"] == "spin-7" and reg["targetId"] == "tgt-2"
        assert reg["labels"] == {"team": "core", "targetId": "tgt-2"}
        await fake.push("cli-1", {"type": "assignment", "work": work("w1")})
        done = await fake.wait("work.complete")
        assert done["summary"] == "did w1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), T) == 0
        assert fake.of("agent.deregister")[0]["reason"] == "received SIGTERM"
        lines = [orjson.loads(line) for line in (await stderr).splitlines() if line.startswith(b"{")]
        item_lines = [r for r in lines if r.get("work_id") == "w1"]
        assert item_lines and all(r["project"] == project for r in item_lines)
        assert any(r["msg"].endswith("completed") and r.get("correlation_id") == "corr-w1" for r in item_lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
