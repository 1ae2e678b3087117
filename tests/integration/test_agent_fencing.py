"""An item's processes die with their agent, and each run of an item carries its fencing token.

Real `weft agent` processes: against a fake weft (tests.integration.test_agent_runner.FakeWeft) where
the test must control what weft says, against the session's real replica where the token must be
the one weft's projection hands out. Process exits are awaited through pidfds, not slept on.
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

import nats
import pytest

from tests.integration.test_agent_runner import FakeWeft, work
from tests.processes import AgentProcess
from tests.servers import own_nats_server
from tests.support import Api
from weft.spinup.local import proc_stat
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

T = 15.0


@pytest.fixture(scope="module")
async def fence_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this module's own: the session's replica must not answer the fake's subjects."""
    async with own_nats_server(tmp_path_factory, "agent-fencing") as server:
        yield server


@pytest.fixture
async def fake(fence_nats: EmbeddedNats, project: str) -> AsyncIterator[FakeWeft]:
    nc = await nats.connect(fence_nats.url)
    weft = await FakeWeft(nc, project).start()
    yield weft
    await weft.stop()
    await nc.close()


def running(pid: int) -> bool:
    """The pid is a process that has not exited (a zombie has)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


async def exited(pid: int, timeout: float) -> bool:
    """Await the exit of any process (not only our child) through a pidfd; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def read_pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


LOOPS = pytest.mark.parametrize("uvloop", ["1", "0"], ids=["uvloop", "asyncio"])


@LOOPS
async def test_kill_9_of_the_agent_kills_every_process_of_its_command(
    fence_nats: EmbeddedNats, fake: FakeWeft, project: str, tmp_path: Path, uvloop: str
) -> None:
    """The shell, its background child (same process group) and a daemon that left the command's
    session and parent (fork, setsid) all die when the agent is killed with SIGKILL: nothing of the
    attempt outlives its agent, so a re-assignment of the item cannot overlap it."""
    ready = tmp_path / "ready"
    os.mkfifo(ready)
    daemon = (
        "import os, time\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        f"f = open({str(ready)!r}, 'w'); f.write(str(os.getpid()) + chr(10)); f.close()\n"
        "time.sleep(300)\n"
    )
    (tmp_path / "daemon.py").write_text(daemon)
    command = (
        f'echo $$ > "{tmp_path}/shell"; sleep 300 & echo $! > "{tmp_path}/child"; '
        f'"{sys.executable}" "{tmp_path}/daemon.py"; read -r esc < "{ready}"; echo "$esc" > "{tmp_path}/escaped"; '
        'echo "progress: 1 running"; wait'
    )
    agent = AgentProcess(fence_nats.url, project, "doomed", command, env={"WEFT_UVLOOP": uvloop})
    await agent.start()
    pids: list[int] = []
    try:
        await fake.wait("agent.register")
        await fake.push("doomed", {"type": "assignment", "work": work("w1")})
        await fake.wait("work.progress")
        pids = [read_pid(tmp_path / name) for name in ("shell", "child", "escaped")]
        shell, child, escaped = pids
        assert all(running(pid) for pid in pids)
        assert os.getpgid(child) == os.getpgid(shell) and os.getsid(escaped) == escaped != os.getsid(shell)
        await agent.kill()
        gone = await asyncio.gather(*(exited(pid, T) for pid in pids))
        assert gone == [True, True, True], dict(zip(("shell", "child", "escaped"), gone, strict=True))
    finally:
        kill_all(pids)
        await agent.kill()


@LOOPS
async def test_a_finished_item_leaves_no_process_behind(
    fence_nats: EmbeddedNats, fake: FakeWeft, project: str, tmp_path: Path, uvloop: str
) -> None:
    """A daemon the command left running (holding none of its descriptors, so nothing waits for it)
    is dead by the time weft hears `complete`: a later attempt of the item never runs beside it."""
    daemon = "import os, time; os.closerange(3, 4096); time.sleep(300)"
    command = (f'"{sys.executable}" -c "{daemon}" </dev/null >/dev/null 2>&1 & '
               f'echo $! > "{tmp_path}/daemon"; echo done')
    agent = AgentProcess(fence_nats.url, project, "tidy", command, env={"WEFT_UVLOOP": uvloop})
    await agent.start()
    pids: list[int] = []
    try:
        await fake.wait("agent.register")
        await fake.push("tidy", {"type": "assignment", "work": work("w1")})
        done = await fake.wait("work.complete")
        assert done["summary"] == "done"
        pids = [read_pid(tmp_path / "daemon")]
        assert not running(pids[0]), "the command's daemon still runs after complete was reported"
    finally:
        kill_all(pids)
        await agent.stop()


# --- the fencing token, from weft's own projection ------------------------------------------------


async def wait_status(api: Api, work_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
    """Await a status by waiting on the projection's own sequence, not by sleeping."""
    assert api.service is not None and api.service.readmodel is not None
    view = api.service.readmodel.views[api.project]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        item = view.state.work[work_id]
        if item["status"] == status:
            return dict(await api.ok("GET", f"/api/work/{work_id}"))
        remaining = deadline - loop.time()
        assert remaining > 0, f"{work_id} stuck in {item['status']}, wanted {status}"
        await view.wait_for(view.state.seq + 1, remaining)


async def test_each_run_gets_its_attempt_and_a_fencing_token_that_only_grows(
    api: Api, nats_server: EmbeddedNats, store: EventStore, tmp_path: Path
) -> None:
    """Three runs of one item: a retry (attempt 2), then, after the DLQ retry reset the attempts, attempt
    1 again. The attempt repeats; WEFT_FENCING_TOKEN, the stream sequence of the run's `work.assigned`,
    grows with every assignment, so a downstream system keeping the highest token per item rejects
    any write of a superseded run."""
    log = tmp_path / "runs"
    command = (
        f'echo "$WEFT_WORK_ID $WEFT_WORK_ATTEMPT $WEFT_FENCING_TOKEN" >> "{log}"; '
        f'[ "$(wc -l < "{log}")" -ge 3 ] || exit 75'
    )
    agent = AgentProcess(nats_server.url, api.project, "fenced", command)
    await agent.start()
    try:
        item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                  "description": "fenced job", "maxAttempts": 2}, status=201)
        failed = await wait_status(api, item["id"], "failed")
        assert [e["attempt"] for e in failed["errors"]] == [1, 2]
        await api.ok("POST", f"/api/dlq/{item['id']}/retry")
        done = await wait_status(api, item["id"], "completed")
        assert done["attempts"] == 1
    finally:
        await agent.stop()
    assigned = [e.seq for e in [e async for e in store.read_range(api.project)]
                if e.type == "work.assigned" and e.entity_id == item["id"]]
    runs = [line.split(" ") for line in log.read_text().splitlines()]
    assert [(wid, attempt) for wid, attempt, _ in runs] == [(item["id"], "1"), (item["id"], "2"), (item["id"], "1")]
    tokens = [int(token) for _, _, token in runs]
    assert tokens == assigned and tokens == sorted(set(tokens)), (tokens, assigned)
