"""weft against secured nats-servers (the bundled binary, 127.0.0.1): TLS with client certificates,
users with per-user permissions, a token, an NKey. The clients are weft's own (`connection.connect`
with `NatsAuth`), a whole replica (`WeftService`) and the reference agent as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import nkeys
import pytest

import weft.service
from tests.natscerts import Certs, make_certs, make_operator
from tests.processes import AgentProcess, WeftProcess
from tests.support import own_replica, until
from weft.core.protocol import VERBS, heartbeat_subject, inbox_subject, request_subject
from weft.settings import Settings
from weft.store import connection
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port
from weft.store.natsauth import NatsAuth, agent_inbox_prefix

pytestmark = pytest.mark.slow

WEFT_PASS = "weft-pass-0123456789"
WEFT_BIN = str(Path(sys.executable).parent / "weft")
AGENT_PASS = "agent-pass-9876543210"
TOKEN = "tok-abcdefghijklmnop"
# weft.service hands NatsAuth (from Settings.nats_env) to connect_nats and to spun-up agents.
WIRED = pytest.mark.skipif(
    "NatsAuth" not in Path(weft.service.__file__).read_text()
    or "nats_env" not in {f.name for f in dataclasses.fields(Settings)},
    reason="weft.service/weft.settings do not wire NatsAuth in yet")
NO_RETRY: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 0, "connect_timeout": 2}


@contextlib.asynccontextmanager
async def secured_server(tmp: Path, extra: str, name: str = "sec") -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(NatsServerConfig(store_dir=tmp / f"nats-{name}", port=free_port(),
                                           server_name=f"weft-{name}", extra=extra))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def tls_block(certs: Certs, *, verify: bool) -> str:
    return (f'tls {{\n  cert_file: "{certs.server_cert}"\n  key_file: "{certs.server_key}"\n'
            f'  ca_file: "{certs.ca}"\n  verify: {"true" if verify else "false"}\n  timeout: 2\n}}')


def agent_permissions(project: str) -> str:
    """ops/nats/accounts.conf's agent permissions for one project."""
    publish = [*(request_subject(project, verb) for verb in VERBS), heartbeat_subject(project, "*")]
    return (f'permissions: {{ publish: {{ allow: {json.dumps(publish)} }}, '
            f'subscribe: {{ allow: ["{inbox_subject(project, "*")}", "{agent_inbox_prefix(project)}.>"] }} }}')


async def connect(url: str, env: Mapping[str, str], **options: Any) -> connection.Client:
    return await connection.connect(url, auth=NatsAuth.from_env({"NATS_URL": url, **env}), **{**NO_RETRY, **options})


async def fails_to_connect(url: str, env: Mapping[str, str]) -> BaseException:
    with pytest.raises(Exception) as info:  # nats-py raises several kinds
        nc = await connect(url, env)
        await nc.close()
    return info.value


@contextlib.asynccontextmanager
async def replica_with(auth: NatsAuth, nats_url: str, project: str, **settings: Any) -> AsyncIterator[Any]:
    """`own_replica` whose NATS connection carries `auth`: handed to `connection.connect` (what
    `weft.service.connect_nats` calls) unless the service passes credentials of its own."""
    original = connection.connect

    async def with_auth(url: Any, **options: Any) -> connection.Client:
        given = options.get("auth")
        if given is None or not given.connect_options():
            options["auth"] = auth
        return await original(url, **options)

    patch = pytest.MonkeyPatch()
    patch.setattr(connection, "connect", with_auth)
    try:
        async with own_replica(nats_url, project, **settings) as api:
            yield api
    finally:
        patch.undo()


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def tls_nats(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> AsyncIterator[EmbeddedNats]:
    async with secured_server(tmp_path_factory.mktemp("tls"), tls_block(certs, verify=True), "tls") as server:
        yield server


def tls_env(certs: Certs) -> dict[str, str]:
    return {"NATS_TLS_CA": str(certs.ca), "NATS_TLS_CERT": str(certs.client_cert),
            "NATS_TLS_KEY": str(certs.client_key)}


async def test_tls_with_a_client_certificate_connects_and_jetstream_works(tls_nats: EmbeddedNats,
                                                                          certs: Certs) -> None:
    for url in (tls_nats.url, tls_nats.url.replace("nats://", "tls://")):
        nc = await connect(url, tls_env(certs))
        try:
            assert nc._server_info.get("tls_required")
            info = await nc.jetstream().account_info()
            assert info is not None
        finally:
            await nc.close()


async def test_tls_fails_without_the_client_certificate_or_with_the_wrong_ca(tls_nats: EmbeddedNats,
                                                                             certs: Certs) -> None:
    await fails_to_connect(tls_nats.url, {"NATS_TLS_CA": str(certs.ca)})  # verify: a client cert is required
    err = await fails_to_connect(tls_nats.url, {**tls_env(certs), "NATS_TLS_CA": str(certs.other_ca)})
    assert "CERTIFICATE_VERIFY_FAILED" in repr(err) or "certificate verify failed" in repr(err).lower()
    await fails_to_connect(tls_nats.url, {})  # no CA: the system's trust does not know the test CA


async def test_tls_url_refuses_a_server_without_tls(nats_server: Any, certs: Certs) -> None:
    with pytest.raises(connection.TLSRequired):
        nc = await connect(nats_server.url.replace("nats://", "tls://"), {"NATS_TLS_CA": str(certs.ca)})
        await nc.close()


async def test_a_whole_replica_serves_over_tls(tls_nats: EmbeddedNats, certs: Certs, project: str) -> None:
    auth = NatsAuth.from_env({"NATS_URL": tls_nats.url, **tls_env(certs)})
    async with replica_with(auth, tls_nats.url, project) as api:
        item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                  "description": "over tls"}, status=201)
        got = await api.ok("GET", f"/api/work/{item['id']}")
        assert got["description"] == "over tls"


@WIRED
async def test_weft_serve_process_over_tls(tls_nats: EmbeddedNats, certs: Certs, project: str) -> None:
    weft = WeftProcess(tls_nats.url, project, env=tls_env(certs))
    await weft.start()
    assert await weft.stop() == 0


# --- users with permissions: weft may do anything, an agent only its project's protocol -----------


PERM_PROJECT = "sec" + os.urandom(4).hex()


@pytest.fixture(scope="module")
def perm_project() -> str:
    return PERM_PROJECT


@pytest.fixture(scope="module")
async def users_nats(tmp_path_factory: pytest.TempPathFactory, perm_project: str) -> AsyncIterator[EmbeddedNats]:
    conf = ("authorization {\n  users = [\n"
            f'    {{ user: weft, password: "{WEFT_PASS}" }}\n'
            f'    {{ user: agent, password: "{AGENT_PASS}", {agent_permissions(perm_project)} }}\n'
            "  ]\n}")
    async with secured_server(tmp_path_factory.mktemp("users"), conf, "users") as server:
        yield server


async def test_user_and_password_from_env_and_from_the_url(users_nats: EmbeddedNats) -> None:
    nc = await connect(users_nats.url, {"NATS_USER": "weft", "NATS_PASS": WEFT_PASS})
    await nc.jetstream().account_info()
    await nc.close()
    url = users_nats.url.replace("nats://", f"nats://weft:{WEFT_PASS}@")
    nc = await connect(url, {})
    await nc.close()
    err = await fails_to_connect(users_nats.url, {"NATS_USER": "weft", "NATS_PASS": "wrong"})
    assert "authorization" in repr(err).lower()


async def test_an_agent_user_may_not_publish_outside_its_projects_protocol(users_nats: EmbeddedNats,
                                                                          perm_project: str) -> None:
    violations: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(err: Exception) -> None:
        await violations.put(str(err))

    nc = await connect(users_nats.url, {"NATS_USER": "agent", "NATS_PASS": AGENT_PASS}, error_cb=on_error)
    try:
        for subject in (f"weft.{perm_project}.ev.work.x",  # straight into the event stream
                        "weft.otherproject.agent.register",  # another project
                        f"weft.{perm_project}.agent.someone.inbox",  # another agent's inbox
                        "$JS.API.STREAM.LIST"):  # JetStream's API
            await nc.publish(subject, b"{}")
            await nc.flush()
            msg = await asyncio.wait_for(violations.get(), 5)
            assert "permissions violation" in msg.lower() and subject.lower() in msg.lower(), msg
        for subject in ("_INBOX.>", f"weft.{perm_project}.ev.>", "weft.otherproject.agent.x.inbox"):
            await nc.subscribe(subject)  # other projects' replies, the event stream, other inboxes
            await nc.flush()
            msg = await asyncio.wait_for(violations.get(), 5)
            assert "permissions violation for subscription" in msg.lower(), msg
        await nc.publish(f"weft.{perm_project}.agent.heartbeat.me", b"{}")  # allowed
        await nc.flush()
        assert violations.empty()
    finally:
        await nc.close()


async def test_the_reference_agent_runs_work_as_a_restricted_user(users_nats: EmbeddedNats,
                                                                  perm_project: str) -> None:
    weft_auth = NatsAuth.from_env({"NATS_URL": users_nats.url, "NATS_USER": "weft", "NATS_PASS": WEFT_PASS})
    async with replica_with(weft_auth, users_nats.url, perm_project, heartbeat_ms=500) as api:
        agent = AgentProcess(users_nats.url, perm_project, "sec-agent", 'read task; echo "did: $task"',
                             env={"NATS_USER": "agent", "NATS_PASS": AGENT_PASS})
        await agent.start()
        try:
            item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                      "description": "restricted"}, status=201)

            def done(state: Any) -> Any:
                w = state.work.get(item["id"])
                return w if w is not None and w.get("status") == "completed" else None

            got = await until(api, done, timeout=30)
            assert "did: restricted" in got["result"]["summary"]
        finally:
            await agent.stop()
        assert not any(AGENT_PASS in line for line in agent.output)
        assert not any("permissions violation" in line.lower() for line in agent.output), agent.output


@WIRED
async def test_a_spun_up_agent_gets_the_agent_credentials_not_wefts(users_nats: EmbeddedNats) -> None:
    """weft connects as `weft`; the local mechanism's agent gets WEFT_AGENT_NATS_* as its NATS_*,
    and as the restricted `agent` user it registers and runs the work."""
    project = PERM_PROJECT
    nats_env = {"NATS_USER": "weft", "NATS_PASS": WEFT_PASS,
                "WEFT_AGENT_NATS_USER": "agent", "WEFT_AGENT_NATS_PASS": AGENT_PASS}
    weft_auth = NatsAuth.from_env({"NATS_URL": users_nats.url, **nats_env})
    mechanisms: dict[str, Any] = {}
    try:
        async with replica_with(weft_auth, users_nats.url, project, heartbeat_ms=500, accept_timeout_ms=10_000,
                                nats_env=nats_env, nats_user="weft", nats_pass=WEFT_PASS) as api:
            mechanisms = api.service.mechanisms
            await api.ok("POST", "/api/targets", {
                "name": "laptop", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
                "config": {"command": WEFT_BIN, "args": ["agent", "--command",
                                                         'echo "user=$NATS_USER pass=${NATS_PASS:-none}"']},
                "maxConcurrentAgents": 1, "cooldownMs": 0, "spinUpTimeoutMs": 30_000}, status=201)
            item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                      "description": "spun"}, status=201)

            def done(state: Any) -> Any:
                w = state.work.get(item["id"])
                return w if w is not None and w.get("status") == "completed" else None

            got = await until(api, done, timeout=60)
            # The agent connected as `agent` (NATS_USER), and its command did not inherit NATS_PASS.
            assert got["result"]["summary"] == "user=agent pass=none"
    finally:
        local = mechanisms.get("local")
        for pid in local.children() if local is not None else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            await local.wait(pid)


# --- token, NKey ----------------------------------------------------------------------------------


async def test_token(tmp_path: Path) -> None:
    async with secured_server(tmp_path, f'authorization {{ token: "{TOKEN}" }}', "token") as server:
        nc = await connect(server.url, {"NATS_TOKEN": TOKEN})
        await nc.jetstream().account_info()
        await nc.close()
        await fails_to_connect(server.url, {"NATS_TOKEN": "not-the-token"})
        await fails_to_connect(server.url, {})


async def test_nkey_seed_file(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    other = tmp_path / "other.nk"
    other.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    conf = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}'
    async with secured_server(tmp_path, conf, "nkey") as server:
        nc = await connect(server.url, {"NATS_NKEY_SEED": str(seed_file)})
        await nc.jetstream().account_info()
        await nc.close()
        await fails_to_connect(server.url, {"NATS_NKEY_SEED": str(other)})


# --- ops/nats/accounts.conf as shipped ------------------------------------------------------------

OPS_ACCOUNTS = Path(__file__).resolve().parents[2] / "ops" / "nats" / "accounts.conf"


async def test_the_shipped_accounts_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """weft as `weft` and the reference agent as `agent_demo` do their work; `agent_demo` cannot
    touch JetStream, the event stream or another project."""
    store = tmp_path / "nats-accounts"
    store.mkdir()
    (store / "accounts.conf").write_text(OPS_ACCOUNTS.read_text())
    for name, value in (("WEFT_NATS_PASS", WEFT_PASS), ("AGENT_DEMO_NATS_PASS", AGENT_PASS), ("SYS_NATS_PASS", TOKEN)):
        monkeypatch.setenv(name, value)  # nats-server reads $NAME from its environment
    async with secured_server(tmp_path, "include ./accounts.conf", "accounts") as server:
        monkeypatch.delenv("AGENT_DEMO_NATS_PASS")
        violations: asyncio.Queue[str] = asyncio.Queue()

        async def on_error(err: Exception) -> None:
            await violations.put(str(err))

        nc = await connect(server.url, {"NATS_USER": "agent_demo", "NATS_PASS": AGENT_PASS}, error_cb=on_error)
        try:
            for subject in ("$JS.API.INFO", "weft.demo.ev.work.x", "weft.other.agent.register"):
                await nc.publish(subject, b"{}")
                await nc.flush()
                assert "permissions violation" in (await asyncio.wait_for(violations.get(), 5)).lower()
        finally:
            await nc.close()
        await fails_to_connect(server.url, {})  # no anonymous access

        weft_auth = NatsAuth.from_env({"NATS_URL": server.url, "NATS_USER": "weft", "NATS_PASS": WEFT_PASS})
        async with replica_with(weft_auth, server.url, "demo", heartbeat_ms=500) as api:
            agent = AgentProcess(server.url, "demo", "demo-agent", 'read task; echo "did: $task"',
                                 env={"NATS_USER": "agent_demo", "NATS_PASS": AGENT_PASS})
            await agent.start()
            try:
                item = await api.ok("POST", "/api/work", {"capability": "python", "boundary": "personal",
                                                          "description": "by the book"}, status=201)

                def done(state: Any) -> Any:
                    w = state.work.get(item["id"])
                    return w if w is not None and w.get("status") == "completed" else None

                got = await until(api, done, timeout=30)
                assert "did: by the book" in got["result"]["summary"]
            finally:
                await agent.stop()
            assert not any("permissions violation" in line.lower() for line in agent.output), agent.output


async def test_creds_file_with_an_operator(tmp_path: Path) -> None:
    op = make_operator(tmp_path / "op")
    async with secured_server(tmp_path, op.server_conf, "operator") as server:
        nc = await connect(server.url, {"NATS_CREDS": str(op.creds)})
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()
        await fails_to_connect(server.url, {})
