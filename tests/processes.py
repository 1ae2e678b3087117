"""Real `weft serve` processes for tests: start, wait for the ready line, stop gracefully or kill -9."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from weft.store.embedded import die_with_parent

WEFT = str(Path(sys.executable).parent / "weft")
# Every process a test starts, so a failing test cannot leave one behind (see conftest).
LIVE: set[Any] = set()
READY = re.compile(r"weft ready on http://[^:]+:(?P<port>\d+) ")


class WeftProcess:
    def __init__(self, nats_url: str, project: str, env: Mapping[str, str] | None = None) -> None:
        self.nats_url = nats_url
        self.project = project
        # 0 until the first start: `weft serve` binds port 0 and names the port it got in its ready
        # line. A port picked here and bound later can be taken meanwhile by any connect()'s
        # ephemeral port (EADDRINUSE in CI). A restart binds the same port again, since a load
        # balancer's config names it.
        self.port = 0
        self.extra_env = dict(env or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[str], bool], asyncio.Future[str]]] = []

    async def line(self, predicate: Callable[[str], bool], since: int = 0, timeout: float = 30.0) -> str:
        """The first output line from index `since` on (printed already or yet to come) that
        satisfies `predicate`."""
        for text in self.output[since:]:
            if predicate(text):
                return text
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, waiter))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiters.remove((predicate, waiter))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            "NATS_URL": self.nats_url,
            "API_HOST": "127.0.0.1",
            "API_PORT": str(self.port),
            "LOOMINAL_PROJECT_ID": self.project,
            "LOG_LEVEL": "warning",
            "WEFT_SNAPSHOT_EVERY": "0",
            **self.extra_env,
        }
        self.proc = await asyncio.create_subprocess_exec(
            WEFT, "serve", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        LIVE.add(self)
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        await asyncio.wait_for(ready, timeout)

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.output.append(text)
            if (found := READY.search(text)) and not ready.done():
                self.port = int(found["port"])
                ready.set_result(None)
            for predicate, waiter in self._waiters:
                if not waiter.done() and predicate(text):
                    waiter.set_result(text)
        if not ready.done():
            ready.set_exception(RuntimeError("weft exited before ready:\n" + "\n".join(self.output[-20:])))

    async def stop(self) -> int:
        return await self._signal(signal.SIGTERM)

    async def kill(self) -> int:
        return await self._signal(signal.SIGKILL)

    async def _signal(self, sig: signal.Signals) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader
        self.proc = None
        return code

    async def get(self, session: aiohttp.ClientSession, path: str, **params: Any) -> Any:
        async with session.get(self.base + path, params={"projectId": self.project, **params}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def post(self, session: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, Any]:
        async with session.post(self.base + path, json=body, params={"projectId": self.project}) as resp:
            return resp.status, await resp.json()


class AgentProcess:
    """A real `weft agent` process."""

    def __init__(self, nats_url: str, project: str, guid: str, command: str, *, capabilities: str = "python",
                 boundaries: str = "*", agent_type: str = "claude-code", max_tasks: int = 1,
                 extra: list[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.argv = [WEFT, "agent", "--project", project, "--guid", guid, "--capabilities", capabilities,
                     "--boundaries", boundaries, "--type", agent_type, "--max-tasks", str(max_tasks),
                     "--command", command, *(extra or [])]
        self.env = {**os.environ, "NATS_URL": nats_url, "LOG_LEVEL": "info", **(env or {})}
        self.guid = guid
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        LIVE.add(self)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode(errors="replace").rstrip())

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(30)
            except TimeoutError:
                await self.kill()


async def until(http: aiohttp.ClientSession, base: str, project: str, check: Any, timeout: float = 60) -> Any:
    """Await `check()` (an async callable returning a truthy value) by long-polling the projection:
    each round waits server-side (min_seq) for the next event instead of sleeping."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < deadline, "condition not reached in time"
        async with http.get(f"{base}/api/stats/projection", params={"projectId": project}) as resp:
            seq = (await resp.json())["seq"]
        async with http.get(f"{base}/api/stats/projection", params={"projectId": project, "min_seq": seq + 1}):
            pass  # 200 when something new was folded, 503 after the server's bounded wait
