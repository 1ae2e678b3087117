"""The `ssh` spin-up mechanism against a real SSH server on 127.0.0.1.

The server is an asyncssh server started by the test on a free port, with a generated host key and
one authorized client key; it runs each session's command with `/bin/sh -c` in a subprocess (a real
remote side: the agent outlives the session as it would under sshd). Agents report to the test over
TCP: the first line is a report, EOF means the agent (and anything sharing its socket) is dead.
No sleeps, no wall-clock assertions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.servers import AGENT, Reporter, SshServer, died, ping, run_sshd, until_eof
from weft.core.errors import InvalidInput
from weft.core.targets import validate_new_target
from weft.spinup import SCHEMAS
from weft.spinup.base import SpinUpError, SpinUpRequest
from weft.spinup.ssh import SshMechanism
from weft.store.embedded import free_port

NATS_URL = "nats://127.0.0.1:4222"
USER = "agent"


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[SshServer]:
    async with run_sshd(tmp_path) as server:
        yield server


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """weft's own HOME, so ~/.ssh/known_hosts is under the test's control."""
    home = tmp_path / "weft-home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def target(server: SshServer, command: str = "python -c pass", **ssh: Any) -> dict[str, Any]:
    cfg = {"host": "127.0.0.1", "port": server.port, "user": USER, "command": command,
           "privateKeyPath": str(server.client_key_path), "knownHosts": str(server.known_hosts),
           "connectionTimeoutMs": 10000, **ssh}
    t = validate_new_target({"name": "box", "agentType": "copilot-cli", "mechanism": "ssh",
                             "capabilities": ["python"], "boundaries": ["open-source"], "config": {"ssh": cfg}}, SCHEMAS)
    t["id"] = "tgt-ssh"
    return t


def request(t: dict[str, Any], spin_up_id: str = "su-ssh-1") -> SpinUpRequest:
    return SpinUpRequest(spin_up_id=spin_up_id, project="proj2", target=t, work=None, nats_url=NATS_URL)


def agent_command() -> str:
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(AGENT)}"


# --- launch ----------------------------------------------------------------------------------------


async def test_launch_runs_detached_with_env_applied_to_the_command(
        sshd: SshServer, reporter: Reporter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WEFT_TEST_SSH_SECRET", "s3cret-value")
    workdir = tmp_path / "remote work"
    workdir.mkdir()
    out = tmp_path / "seen.json"
    dump_then_serve = (
        "import json, os, sys\n"
        f"json.dump({{'env': dict(os.environ), 'cwd': os.getcwd(), 'argv': sys.argv[1:]}}, open({str(out)!r}, 'w'))\n"
        + AGENT
    )
    t = target(sshd, f"{shlex.quote(sys.executable)} -c {shlex.quote(dump_then_serve)}", args=[str(reporter.port)],
               workingDirectory=str(workdir),
               env={"TARGET_VAR": "it's a \"quoted\" $value; `x`", "TOKEN_FROM_REF": "env:WEFT_TEST_SSH_SECRET"})
    launched = await SshMechanism().launch(request(t))
    # The session is over (the remote shell exited and the channel closed) ...
    assert sshd.sessions_done == ["/bin/sh -s"]
    report, reader, writer = await reporter.next()
    # ... while the agent it started lives on, detached, and answers.
    assert await ping(reader, writer) == b"pong\n"
    handle = launched.handle
    assert handle["pid"] == report["pid"]  # $! is the agent itself (env and nohup exec it)
    assert report["sid"] == report["pid"]  # its own session (setsid)
    assert handle["host"] == "127.0.0.1" and handle["port"] == sshd.port and handle["user"] == USER
    assert handle["log"] == "/tmp/weft-agents/su-ssh-1.log" and isinstance(handle["startTime"], int)

    seen = json.loads(out.read_text())
    env = seen["env"]
    # The env is the command's, not `cd`'s: the target's vars (values intact through quoting, the
    # reference resolved on weft's side) and the agent env.
    assert env["TARGET_VAR"] == "it's a \"quoted\" $value; `x`"
    assert env["TOKEN_FROM_REF"] == "s3cret-value"
    assert env["WEFT_SPINUP_ID"] == "su-ssh-1" and env["NATS_URL"] == NATS_URL
    assert env["LOOMINAL_PROJECT_ID"] == "proj2" and env["WEFT_AGENT_TYPE"] == "copilot-cli"
    assert env["WEFT_AGENT_CAPABILITIES"] == "python" and env["WEFT_AGENT_BOUNDARIES"] == "open-source"
    assert seen["cwd"] == str(workdir) and seen["argv"] == [str(reporter.port)]
    # The secret travelled in the script on stdin, never on a command line or in weft's log.
    assert all("s3cret" not in c for c in sshd.commands)
    assert all("s3cret" not in (r.getMessage() + str(r.__dict__)) for r in caplog.records)

    await SshMechanism().stop(t, handle, graceful=True)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])


async def test_stop_kills_the_remote_process_and_tolerates_a_gone_pid(sshd: SshServer, reporter: Reporter) -> None:
    t = target(sshd, agent_command(), args=[str(reporter.port)], env={"IGNORE_TERM": "1"}, stopGraceMs=200)
    mech = SshMechanism()
    launched = await mech.launch(request(t))
    report, reader, _ = await reporter.next()
    await mech.stop(t, launched.handle, graceful=False)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])
    await mech.stop(t, launched.handle, graceful=True)  # already gone: fine
    await mech.stop(t, {**launched.handle, "pid": 999_999_999}, graceful=False)  # never existed: fine


async def test_graceful_stop_escalates_when_term_is_ignored(sshd: SshServer, reporter: Reporter) -> None:
    t = target(sshd, agent_command(), args=[str(reporter.port)], env={"IGNORE_TERM": "1"}, stopGraceMs=200)
    mech = SshMechanism()
    launched = await mech.launch(request(t))
    report, reader, _ = await reporter.next()
    await mech.stop(t, launched.handle, graceful=True)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])


async def test_stop_never_signals_a_reused_pid(sshd: SshServer, reporter: Reporter) -> None:
    t = target(sshd, agent_command(), args=[str(reporter.port)])
    mech = SshMechanism()
    launched = await mech.launch(request(t))
    _, reader, writer = await reporter.next()
    reused = {**launched.handle, "startTime": launched.handle["startTime"] - 1}
    await mech.stop(t, reused, graceful=False)
    assert await ping(reader, writer) == b"pong\n"  # a signalled agent would be dead by now
    await mech.stop(t, launched.handle, graceful=False)
    await until_eof(reader)


@pytest.mark.parametrize(
    ("ssh", "message"),
    [
        ({"workingDirectory": "/nonexistent/dir"}, "workingDirectory /nonexistent/dir does not exist"),
        ({"command": "no-such-agent-binary-xyz"}, "command no-such-agent-binary-xyz not found"),
    ],
)
async def test_launch_fails_clearly_on_the_remote_side(sshd: SshServer, ssh: dict[str, Any], message: str) -> None:
    with pytest.raises(SpinUpError) as err:
        await SshMechanism().launch(request(target(sshd, **ssh)))
    assert message in str(err.value) and str(err.value).startswith(f"ssh {USER}@127.0.0.1:{sshd.port}: ")


# --- authentication and host keys ------------------------------------------------------------------


async def test_a_wrong_key_is_permission_denied(sshd: SshServer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(wrong)
    t = target(sshd, privateKeyPath=str(wrong))
    with pytest.raises(SpinUpError) as err:
        await SshMechanism().launch(request(t))
    assert str(err.value) == f"ssh {USER}@127.0.0.1:{sshd.port}: permission denied (publickey)"
    result = await SshMechanism().probe(t)
    assert result.status == "unhealthy" and result.error == str(err.value)


async def test_the_key_may_be_a_reference_with_a_passphrase(
        sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = asyncssh.read_private_key(sshd.client_key_path)
    encrypted = key.export_private_key("pkcs8-pem", passphrase="correct horse").decode()  # no bcrypt needed
    monkeypatch.setenv("WEFT_TEST_SSH_KEY", encrypted)
    (tmp_path / "pass").write_text("correct horse\n")
    ok = target(sshd, privateKeyPath=None, privateKey="env:WEFT_TEST_SSH_KEY", passphrase=f"file:{tmp_path / 'pass'}")
    assert (await SshMechanism().probe(ok)).status == "healthy"
    (tmp_path / "bad").write_text("wrong\n")
    bad = target(sshd, privateKeyPath=None, privateKey="env:WEFT_TEST_SSH_KEY", passphrase=f"file:{tmp_path / 'bad'}")
    result = await SshMechanism().probe(bad)
    assert result.status == "unhealthy" and "private key env:WEFT_TEST_SSH_KEY" in (result.error or "")
    assert "decrypt" in (result.error or "")
    assert "PRIVATE KEY" not in (result.error or "")
    none = target(sshd, privateKeyPath=None)
    assert "no private key configured" in ((await SshMechanism().probe(none)).error or "")


async def test_an_unknown_host_key_fails_with_known_hosts_default(sshd: SshServer, fake_home: Path) -> None:
    t = target(sshd, knownHosts="default")
    with pytest.raises(SpinUpError) as err:
        await SshMechanism().launch(request(t))
    assert f"ssh {USER}@127.0.0.1:{sshd.port}: host key not verifiable" in str(err.value)
    assert "knownHosts=default" in str(err.value)
    # Listed in the user's known_hosts: trusted.
    (fake_home / ".ssh" / "known_hosts").write_text(sshd.known_hosts.read_text())
    assert (await SshMechanism().probe(t)).status == "healthy"


async def test_a_known_hosts_file_with_another_key_fails(sshd: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "other_known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    other.write_text(f"[127.0.0.1]:{sshd.port} {other_key}")
    result = await SshMechanism().probe(target(sshd, knownHosts=str(other)))
    assert result.status == "unhealthy" and "host key not verifiable" in (result.error or "")
    missing = await SshMechanism().probe(target(sshd, knownHosts=str(tmp_path / "nope")))
    assert missing.status == "unhealthy" and "does not exist" in (missing.error or "")


async def test_accept_new_and_insecure_are_explicit_opt_outs(
        sshd: SshServer, fake_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="weft.spinup.ssh")
    mech = SshMechanism()
    assert (await mech.probe(target(sshd, knownHosts="insecure"))).status == "healthy"
    assert (await mech.probe(target(sshd, knownHosts="accept-new"))).status == "healthy"  # unknown host: accepted
    # This logger's only: another test's leftover replica may log its reconnects meanwhile.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "weft.spinup.ssh"]
    assert {getattr(r, "knownHosts", None) for r in warnings} == {"insecure", "accept-new"}
    # accept-new still rejects a host whose listed key changed.
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    (fake_home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other_key}")
    result = await mech.probe(target(sshd, knownHosts="accept-new"))
    assert result.status == "unhealthy" and "host key not verifiable" in (result.error or "")


# --- probe -----------------------------------------------------------------------------------------


async def test_probe_healthy(sshd: SshServer, tmp_path: Path) -> None:
    result = await SshMechanism().probe(target(sshd, "python -c pass", workingDirectory=str(tmp_path)))
    assert result.status == "healthy" and result.error is None and result.latency_ms is not None


async def test_probe_unhealthy(sshd: SshServer, tmp_path: Path) -> None:
    mech = SshMechanism()
    missing = await mech.probe(target(sshd, "no-such-agent-binary-xyz"))
    assert missing.status == "unhealthy" and "command no-such-agent-binary-xyz not found" in (missing.error or "")
    wd = await mech.probe(target(sshd, workingDirectory=str(tmp_path / "missing")))
    assert wd.status == "unhealthy" and "does not exist" in (wd.error or "")
    closed = free_port()
    refused = await mech.probe(target(sshd, port=closed))
    assert refused.status == "unhealthy" and refused.error == f"ssh {USER}@127.0.0.1:{closed}: connection refused"


async def test_a_host_that_never_answers_times_out(sshd: SshServer) -> None:
    """A TCP listener that accepts and never speaks SSH: the connection timeout applies."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SpinUpError) as err:
            await SshMechanism().launch(request(target(sshd, port=port, connectionTimeoutMs=200)))
        assert str(err.value) == f"ssh {USER}@127.0.0.1:{port}: timed out after 200 ms"
    finally:
        for w in held:
            w.close()
        silent.close()
        await silent.wait_closed()


# --- what registration accepts (weft.core.targets) ---------------------------------------------------


@pytest.mark.parametrize(
    ("ssh", "field"),
    [
        ({"privateKey": "-----BEGIN OPENSSH PRIVATE KEY-----"}, "config.ssh.privateKey"),
        ({"privateKey": "secret:k8s-name"}, "config.ssh.privateKey"),
        ({"passphrase": "hunter2"}, "config.ssh.passphrase"),
        ({"env": {"BAD-NAME": "x"}}, "config.ssh.env.BAD-NAME"),
        ({"env": {"K": ["list"]}}, "config.ssh.env.K"),
        ({"connectionTimeoutMs": 5}, "config.ssh.connectionTimeoutMs"),
        ({"stopGraceMs": -1}, "config.ssh.stopGraceMs"),
        ({"knownHosts": ""}, "config.ssh.knownHosts"),
        ({"command": "weft 'agent"}, "config.ssh.command"),
    ],
)
def test_registration_rejects_bad_ssh_fields(ssh: dict[str, Any], field: str) -> None:
    body = {"name": "box", "agentType": "x", "mechanism": "ssh", "capabilities": ["python"],
            "config": {"ssh": {"host": "h", "user": "u", "command": "weft agent", **ssh}}}
    with pytest.raises(InvalidInput) as err:
        validate_new_target(body, SCHEMAS)
    assert err.value.field == field
    assert "hunter2" not in str(err.value) and "BEGIN" not in str(err.value)


def test_registration_accepts_the_supported_ssh_fields() -> None:
    cfg = {"host": "h", "user": "u", "command": "weft agent", "args": ["--x"], "port": 2222,
           "privateKeyPath": "~/.ssh/id_ed25519", "passphrase": "env:KEY_PASS", "knownHosts": "accept-new",
           "connectionTimeoutMs": 5000, "workingDirectory": "/srv", "logDir": "/var/tmp/agents",
           "stopGraceMs": 0, "env": {"A": "1", "B": 2, "C": True, "TOKEN": "file:/run/secrets/t"}}
    t = validate_new_target({"name": "box", "agentType": "x", "mechanism": "ssh", "capabilities": ["python"],
                             "config": {"ssh": cfg}}, SCHEMAS)
    assert t["config"] == {"mechanism": "ssh", "ssh": cfg}
