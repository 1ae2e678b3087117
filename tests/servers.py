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
from aiohttp import web
from aiohttp.test_utils import TestServer


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
