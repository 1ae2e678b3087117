"""Real servers for tests that have no real peer here: an SSH server (asyncssh) and a recording
HTTP server standing in for the Kubernetes and GitHub APIs, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from weft.spinup.local import proc_stat
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port

# The session's nats-server runs in Docker (testcontainers) only when asked for and possible.
DOCKER_ENV = "WEFT_TEST_DOCKER"
DOCKER_IMAGE_ENV = "WEFT_TEST_NATS_IMAGE"  # default nats:latest: JetStream atomic batches need 2.12+


@contextlib.asynccontextmanager
async def session_nats_server(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> AsyncIterator[EmbeddedNats | DockerNats]:
    """The session's nats-server. By default the bundled binary (`own_nats_server`), as always.
    With WEFT_TEST_DOCKER=1 and a reachable Docker engine, a nats-server container instead
    (`docker_nats_server`), so the suite also runs against the official image. Without a Docker
    engine (this machine, CI without Docker) that path is skipped, with a warning when it was asked
    for, and the embedded server runs. Tests see only `.url`."""
    if os.environ.get(DOCKER_ENV) == "1":
        if docker_engine_reachable():
            async with docker_nats_server(name) as container:
                yield container
            return
        import warnings

        warnings.warn(f"{DOCKER_ENV}=1 but no Docker engine is reachable: using the embedded nats-server",
                      stacklevel=2)
    async with own_nats_server(tmp_path_factory, name) as server:
        yield server


def docker_engine_reachable() -> bool:
    """Whether a Docker engine answers (DOCKER_HOST or the local socket), within 3 s."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False  # where docker.from_env would look: no engine (and no socket left open)
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@dataclass
class DockerNats:
    """A nats-server in a container: the same `url` an EmbeddedNats has, on the mapped port."""

    container: Any

    @property
    def url(self) -> str:
        return str(self.container.nats_uri())


@contextlib.asynccontextmanager
async def docker_nats_server(name: str) -> AsyncIterator[DockerNats]:
    """A nats-server container (testcontainers) with the embedded server's configuration (JetStream,
    `sync_interval: always`, 8 MiB payloads), copied in rather than mounted so a remote engine
    works too. Needs a Docker engine: nothing calls it unless WEFT_TEST_DOCKER=1 and one answers."""
    from testcontainers.community.nats import NatsContainer

    config = NatsServerConfig(
        store_dir=Path("/data/jetstream"), host="0.0.0.0", port=4222, http_port=8222, server_name=f"weft-{name}"
    )
    container = NatsContainer(os.environ.get(DOCKER_IMAGE_ENV, "nats:latest"))
    container.with_copy_into_container(config.render().encode(), "/etc/weft/nats.conf")
    container.with_command(["-c", "/etc/weft/nats.conf"])
    await asyncio.to_thread(container.start)
    try:
        yield DockerNats(container)
    finally:
        await asyncio.to_thread(container.stop)


@contextlib.asynccontextmanager
async def own_nats_server(tmp_path_factory: pytest.TempPathFactory, name: str) -> AsyncIterator[EmbeddedNats]:
    """A real nats-server on 127.0.0.1 and a free port, with its own store: for a test module whose
    replicas must not see (or compete for) the projects of every other test on the session's server."""
    server = EmbeddedNats(
        NatsServerConfig(store_dir=tmp_path_factory.mktemp(f"nats-{name}"), port=free_port(), server_name=f"weft-{name}")
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True  # authentication required: public key only (authorized_client_keys)

    def password_auth_supported(self) -> bool:
        return False


@dataclass
class SshServer:
    port: int
    host_key: asyncssh.SSHKey
    client_key_path: Path
    known_hosts: Path
    home: Path
    commands: list[str]
    sessions_done: list[str]



@contextlib.asynccontextmanager
async def run_sshd(tmp_path: Path) -> AsyncIterator[SshServer]:
    """A real SSH server (asyncssh) on 127.0.0.1: public-key auth only; each session runs its command
    with /bin/sh -c on this machine, as a remote host would."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "id_ed25519"
    client_key.write_private_key(key_path)
    key_path.chmod(0o600)
    home = tmp_path / "remote-home"
    home.mkdir()
    login_env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}
    commands: list[str] = []
    done: list[str] = []

    async def session(process: asyncssh.SSHServerProcess[str]) -> None:
        command = process.command or "/bin/sh"
        commands.append(command)
        script = await process.stdin.read()  # until EOF
        proc = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=login_env, cwd=home)
        out, err = await proc.communicate(script.encode())
        process.stdout.write(out.decode())
        process.stderr.write(err.decode())
        done.append(command)
        process.exit(proc.returncode or 0)

    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=_Server, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        process_factory=session,
    )
    port = acceptor.get_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    try:
        yield SshServer(port, host_key, key_path, known_hosts, home, commands, done)
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Recorded], Awaitable[web.StreamResponse] | web.StreamResponse]


class RecordingServer:
    """Records every request; answers from `(method, path)` responders, else a JSON 404."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.routes: dict[tuple[str, str], Responder] = {}
        self.arrived = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def on(self, method: str, path: str, responder: Responder) -> None:
        self.routes[(method, path)] = responder

    def reply(self, method: str, path: str, status: int, body: Any = None) -> None:
        self.on(method, path, lambda _r: json_response(status, body))

    def of(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(
            request.method, request.path, dict(request.query), dict(request.headers), await request.read()
        )
        self.requests.append(rec)
        self.arrived.set()
        responder = self.routes.get((rec.method, rec.path))
        if responder is None:
            return json_response(404, {"message": "Not Found"})
        answer = responder(rec)
        return await answer if asyncio.iscoroutine(answer) else answer  # type: ignore[return-value]


def json_response(status: int, body: Any) -> web.Response:
    if body is None:
        return web.Response(status=status)
    return web.json_response(body, status=status)


# --- a stand-in agent that reports to the test over TCP ---------------------------------------------
# Synchronisation is by awaiting: its first line is a report; EOF means every process holding the
# socket (the agent and the child it spawned) is dead.

AGENT = """
import json, os, signal, socket, subprocess, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
child = subprocess.Popen([sys.executable, "-c",
    "import os, signal\\nif os.environ.get('IGNORE_TERM'): signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "signal.pause()"], pass_fds=(s.fileno(),))
s.sendall((json.dumps({"pid": os.getpid(), "child": child.pid, "pgid": os.getpgrp(), "sid": os.getsid(0),
                       "spinup": os.environ.get("WEFT_SPINUP_ID")}) + "\\n").encode())
f = s.makefile("rb")
for line in f:
    s.sendall(b"pong\\n")
"""


class Reporter:
    """A TCP server on 127.0.0.1 that agents connect to: each connection's first line is its report."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        line = await reader.readline()
        await self.conns.put((orjson.loads(line), reader, writer))

    async def next(self) -> tuple[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conns.get(), 30)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Returns when every process holding the agent's socket has died (bounded by 30 s)."""
    async with asyncio.timeout(30):
        while await reader.read(4096):
            pass


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"ping\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 30)


def dead(pid: int) -> bool:
    st = proc_stat(pid)
    return st is None or st[0] in ("Z", "X")


async def died(*pids: int) -> bool:
    """Await the exit of processes that are not our children: a Linux pidfd becomes readable when
    its process exits (zombie or reaped), so the loop is woken by the exit itself. Bounded (30 s)."""
    loop = asyncio.get_running_loop()
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # already gone
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit(f: asyncio.Future[None] = exited) -> None:
            if not f.done():
                f.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await asyncio.wait_for(exited, 30)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    return all(dead(p) for p in pids)
