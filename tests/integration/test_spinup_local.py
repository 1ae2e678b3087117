"""The `local` spin-up mechanism against real processes.

Synchronisation is by awaiting: a process's exit (`LocalMechanism.wait`), or a TCP connection the
agent opens to the test (its first line is a report; EOF means every process holding the socket,
the agent and the child it spawned, is dead). No sleeps, no wall-clock assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.servers import AGENT, Reporter, died, ping, until_eof
from weft.core.errors import InvalidInput
from weft.core.targets import validate_new_target
from weft.spinup import SCHEMAS
from weft.spinup.base import SpinUpError, SpinUpRequest
from weft.spinup.local import LocalMechanism, boot_id, proc_stat

PY = shlex.quote(sys.executable)
NATS_URL = "nats://127.0.0.1:4999"

# Writes what the agent sees (env, argv, cwd, executable, session) to the file named by argv[1].
DUMP_ENV = """
import json, os, sys
with open(sys.argv[1], "w") as fh:
    json.dump({"env": dict(os.environ), "argv": sys.argv[1:], "cwd": os.getcwd(),
               "exe": sys.executable, "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgrp()}, fh)
"""

# Connects to the test, spawns a child that shares the socket, reports, then answers pings until
# killed. With IGNORE_TERM set in its env, both ignore SIGTERM.
@pytest.fixture
def mech(tmp_path: Path) -> LocalMechanism:
    return LocalMechanism(log_dir=tmp_path / "logs")


def target(command: str, **local: Any) -> dict[str, Any]:
    t = validate_new_target({
        "name": "laptop", "agentType": "claude-code", "mechanism": "local",
        "capabilities": ["python", "review"], "boundaries": ["personal"],
        "config": {"local": {"command": command, **local}},
    }, SCHEMAS)
    t["id"] = "tgt-1"
    return t


def request(t: dict[str, Any], spin_up_id: str = "su-1") -> SpinUpRequest:
    return SpinUpRequest(spin_up_id=spin_up_id, project="proj1", target=t, work={"id": "w-9"}, nats_url=NATS_URL)


async def launch_agent(mech: LocalMechanism, reporter: Reporter, port: int, **local: Any) -> tuple[
        dict[str, Any], dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    t = target(f"{PY} -c {shlex.quote(AGENT)}", args=[str(port)], **local)
    launched = await mech.launch(request(t))
    report, reader, writer = await reporter.next()
    return t, launched.handle, reader, writer, report


# --- launch ----------------------------------------------------------------------------------------


async def test_launch_gives_a_clean_explicit_environment(
        mech: LocalMechanism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WEFT_TEST_LEAK_MARKER", "must-not-reach-the-agent")
    monkeypatch.setenv("WEFT_TEST_SECRET", "s3cret-from-env")
    monkeypatch.setenv("LANG", "C.UTF-8")
    secret_file = tmp_path / "token"
    secret_file.write_text("s3cret-from-file\n")
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    out = tmp_path / "env.json"
    t = target(
        f"{PY} -c {shlex.quote(DUMP_ENV)}",
        args=[str(out), "--flag", "two words"],
        workingDirectory=str(workdir),
        env={"PLAIN": "it's $HOME", "FROM_ENV": "env:WEFT_TEST_SECRET", "FROM_FILE": f"file:{secret_file}",
             "COUNT": 3, "NATS_URL": "nats://overridden:1"},
    )
    launched = await mech.launch(request(t))
    pid = launched.handle["pid"]
    assert await mech.wait(pid) == 0
    seen = json.loads(out.read_text())
    env = seen["env"]

    assert "WEFT_TEST_LEAK_MARKER" not in env and "WEFT_TEST_SECRET" not in env
    # The agent env (wins over the target's env), the target env (secret references resolved), and
    # from weft's own environment only PATH, HOME and LANG.
    assert env["WEFT_SPINUP_ID"] == "su-1" and env["NATS_URL"] == NATS_URL
    assert env["LOOMINAL_PROJECT_ID"] == "proj1" and env["WEFT_AGENT_TYPE"] == "claude-code"
    assert env["WEFT_AGENT_CAPABILITIES"] == "python,review" and env["WEFT_AGENT_BOUNDARIES"] == "personal"
    assert env["WEFT_TARGET_ID"] == "tgt-1" and env["WEFT_WORK_ID"] == "w-9"
    assert env["PLAIN"] == "it's $HOME" and env["COUNT"] == "3"
    assert env["FROM_ENV"] == "s3cret-from-env" and env["FROM_FILE"] == "s3cret-from-file"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["HOME"] == os.environ["HOME"] and env["LANG"] == "C.UTF-8"
    # What a python child adds itself (LC_CTYPE coercion) aside, nothing else is there.
    allowed = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "PLAIN", "FROM_ENV", "FROM_FILE", "COUNT",
               "NATS_URL", *request(t).agent_env()}
    assert set(env) <= allowed, set(env) - allowed

    assert seen["argv"] == [str(out), "--flag", "two words"]
    assert seen["cwd"] == str(workdir)
    # Its own session and process group: not weft's terminal, not weft's Ctrl-C.
    assert seen["sid"] == pid and seen["pgid"] == pid and seen["sid"] != os.getsid(0)

    handle = launched.handle
    assert handle["pid"] == pid and handle["pgid"] == pid and handle["host"] == "localhost"
    assert handle["log"] == str(tmp_path / "logs" / "su-1.log") and await asyncio.to_thread(Path(handle["log"]).exists)
    assert isinstance(handle["startTime"], int) and handle["bootId"] == boot_id()
    # Secrets never reach the handle or the log records.
    text = orjson.dumps(handle).decode() + "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert "s3cret" not in text
    # Reaped: no zombie left behind.
    assert proc_stat(pid) is None or proc_stat(pid)[2] != handle["startTime"]  # type: ignore[index]


async def test_a_bare_command_name_resolves_in_weft_bin_dir_first(mech: LocalMechanism, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    t = target(f"python -c {shlex.quote(DUMP_ENV)}", args=[str(out)])
    launched = await mech.launch(request(t))
    assert await mech.wait(launched.handle["pid"]) == 0
    exe = json.loads(out.read_text())["exe"]
    assert os.path.dirname(exe) == os.path.dirname(sys.executable)


async def test_output_goes_to_the_per_spinup_log(mech: LocalMechanism) -> None:
    code = 'import sys; print("to stdout", flush=True); print("to stderr", file=sys.stderr)'
    t = target(f"{PY} -c {shlex.quote(code)}")
    launched = await mech.launch(request(t, "su/../odd id"))
    assert await mech.wait(launched.handle["pid"]) == 0
    log_path = Path(launched.handle["log"])
    assert log_path.parent == mech.log_dir and log_path.name == "su_.._odd_id.log"
    assert (await asyncio.to_thread(log_path.read_text)).splitlines() == ["to stdout", "to stderr"]


async def test_a_command_that_fails_at_once_raises_with_exit_code_and_log_tail(tmp_path: Path) -> None:
    # A generous window: it is awaited on the process, so it costs nothing when the process exits.
    mech = LocalMechanism(log_dir=tmp_path, startup_window_s=60)
    code = 'import os, sys; print("bad flag --nope", os.environ["TOKEN"]); sys.exit(3)'
    t = target(f"{PY} -c {shlex.quote(code)}", env={"TOKEN": "env:WEFT_TEST_TOKEN"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEFT_TEST_TOKEN", "tok-s3cret")
        with pytest.raises(SpinUpError) as err:
            await mech.launch(request(t))
    assert "exited with status 3" in str(err.value) and "bad flag --nope" in str(err.value)
    # The message is recorded in a spin-up failure event: a resolved secret is masked in the tail.
    assert "tok-s3cret" not in str(err.value) and "<env:WEFT_TEST_TOKEN>" in str(err.value)


async def test_the_agents_nats_password_is_masked_in_the_tail_of_a_crash(tmp_path: Path) -> None:
    """Found by the secrets hygiene review: a crashing agent that prints its environment put the
    agent's NATS password (weft's WEFT_AGENT_NATS_PASS) into the spin-up failure event."""
    mech = LocalMechanism(log_dir=tmp_path, startup_window_s=60)
    code = 'import os, sys; print("env", os.environ["NATS_PASS"], os.environ["NATS_USER"]); sys.exit(3)'
    req = request(target(f"{PY} -c {shlex.quote(code)}"))
    req = SpinUpRequest(req.spin_up_id, req.project, req.target, req.work, req.nats_url,
                        {"NATS_USER": "agent-user", "NATS_PASS": "nats-s3cret-pw"})
    with pytest.raises(SpinUpError) as err:
        await mech.launch(req)
    assert "nats-s3cret-pw" not in str(err.value) and "<NATS_PASS>" in str(err.value)
    assert "agent-user" in str(err.value)  # a user name is not a secret


@pytest.mark.parametrize(
    ("local", "message"),
    [
        ({"command": "/nonexistent/agent"}, "command /nonexistent/agent not found"),
        ({"command": "no-such-agent-binary-xyz"}, "command no-such-agent-binary-xyz not found"),
        ({"command": "python", "workingDirectory": "/nonexistent/dir"}, "workingDirectory /nonexistent/dir does not exist"),
        ({"command": "python", "env": {"K": "env:WEFT_TEST_UNSET_VAR"}}, "WEFT_TEST_UNSET_VAR is not set"),
    ],
)
async def test_launch_preconditions_fail_clearly(mech: LocalMechanism, local: dict[str, Any], message: str) -> None:
    t = target(**local)
    with pytest.raises(SpinUpError, match=message):
        await mech.launch(request(t))


# --- stop ------------------------------------------------------------------------------------------


async def test_stop_terminates_the_process_group_and_its_child(mech: LocalMechanism, reporter: Reporter) -> None:
    port = reporter.port
    t, handle, reader, writer, report = await launch_agent(mech, reporter, port)
    assert report["pid"] == handle["pid"] and report["pgid"] == handle["pid"] and report["sid"] == handle["pid"]
    assert report["spinup"] == "su-1"
    assert await ping(reader, writer) == b"pong\n"  # alive and well after launch returned
    await mech.stop(t, handle, graceful=True)
    await until_eof(reader)  # the agent and its child both closed the shared socket: both dead
    assert await died(report["pid"], report["child"])
    await mech.stop(t, handle, graceful=True)  # already gone: a no-op


async def test_graceful_stop_escalates_to_sigkill(mech: LocalMechanism, reporter: Reporter) -> None:
    port = reporter.port
    t, handle, reader, _, report = await launch_agent(
        mech, reporter, port, env={"IGNORE_TERM": "1"}, stopGraceMs=200)
    await mech.stop(t, handle, graceful=True)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])
    assert await mech.wait(handle["pid"]) in (None, -signal.SIGKILL)


async def test_forced_stop_kills_at_once(mech: LocalMechanism, reporter: Reporter) -> None:
    port = reporter.port
    t, handle, reader, _, report = await launch_agent(mech, reporter, port, env={"IGNORE_TERM": "1"})
    await mech.stop(t, handle, graceful=False)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])


async def test_stop_after_a_restart_works_from_the_handle_alone(
        mech: LocalMechanism, reporter: Reporter, tmp_path: Path) -> None:
    port = reporter.port
    t, handle, reader, _, report = await launch_agent(mech, reporter, port)
    # A new weft process: a fresh mechanism that never saw the launch, and the handle as stored in
    # the spinup.started event (JSON round trip).
    restarted = LocalMechanism(log_dir=tmp_path / "other")
    stored = orjson.loads(orjson.dumps(handle))
    await restarted.stop(t, stored, graceful=True)
    await until_eof(reader)
    assert await died(report["pid"], report["child"])


async def test_stop_never_signals_a_reused_pid(mech: LocalMechanism, reporter: Reporter) -> None:
    """A handle whose pid now belongs to another process (here: a live process with a different
    start time than recorded) must leave that process alone."""
    port = reporter.port
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, str(port), start_new_session=True,
        env={"PATH": os.environ["PATH"]})
    _, reader, writer = await reporter.next()
    st = proc_stat(victim.pid)
    assert st is not None
    t = target("python")
    fakes: list[dict[str, Any]] = [
        {"pid": victim.pid, "pgid": victim.pid, "startTime": st[2] - 1, "bootId": boot_id(), "host": "localhost"},
        {"pid": victim.pid, "pgid": victim.pid, "spinUpId": "su-someone-else"},  # no start time: env identity
        {"pid": victim.pid, "pgid": victim.pid},  # nothing to verify with: refused
    ]
    try:
        for fake in fakes:
            for graceful in (True, False):
                await LocalMechanism().stop(t, fake, graceful=graceful)
                await mech.stop(t, fake, graceful=graceful)
        # Had stop signalled it, it would have waited for it to die before returning.
        assert await ping(reader, writer) == b"pong\n"
        assert victim.returncode is None
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        await victim.wait()
    await until_eof(reader)


async def test_stop_of_a_handle_from_another_boot_is_a_no_op(mech: LocalMechanism, reporter: Reporter) -> None:
    port = reporter.port
    t, handle, reader, writer, _ = await launch_agent(mech, reporter, port)
    await LocalMechanism().stop(t, {**handle, "bootId": "another-host-or-boot"}, graceful=False)
    assert await ping(reader, writer) == b"pong\n"
    await mech.stop(t, handle, graceful=False)
    await until_eof(reader)


async def test_a_cancelled_launch_leaves_no_agent_behind(reporter: Reporter, tmp_path: Path) -> None:
    """Cancelled (say, by the spin-up timeout) after spawning but before returning the handle: nobody
    could stop that agent later, so launch kills it."""
    mech = LocalMechanism(log_dir=tmp_path, startup_window_s=60)
    t = target(f"{PY} -c {shlex.quote(AGENT)}", args=[str(reporter.port)])
    task = asyncio.create_task(mech.launch(request(t)))
    report, reader, _ = await reporter.next()  # spawned, and launch is still in its startup window
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_eof(reader)
    assert await died(report["pid"], report["child"])


async def test_stop_refuses_init_and_garbage(mech: LocalMechanism) -> None:
    t = target("python")
    for bad in ({"pid": 1}, {"pid": 0}, {"pid": "x"}, {}):
        with pytest.raises(SpinUpError):
            await mech.stop(t, bad, graceful=True)


# --- probe -----------------------------------------------------------------------------------------


async def test_probe_healthy(mech: LocalMechanism, tmp_path: Path) -> None:
    result = await mech.probe(target("python -c pass", workingDirectory=str(tmp_path)))
    assert result.status == "healthy" and result.error is None and result.latency_ms is not None


async def test_probe_unhealthy(mech: LocalMechanism, tmp_path: Path) -> None:
    not_exec = tmp_path / "agent.sh"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    cases = [
        (target("/nonexistent/agent"), "not found"),
        (target("no-such-agent-binary-xyz"), "not found"),
        (target(str(not_exec)), "not executable"),
        (target("python", workingDirectory=str(tmp_path / "missing")), "does not exist"),
        (target("python", env={"K": "env:WEFT_TEST_UNSET_VAR"}), "WEFT_TEST_UNSET_VAR"),
    ]
    for t, message in cases:
        result = await mech.probe(t)
        assert result.status == "unhealthy" and message in (result.error or ""), result


@pytest.mark.parametrize(
    ("local", "field"),
    [
        ({"env": {"1BAD": "x"}}, "config.local.env.1BAD"),
        ({"env": {"K": "secret:k8s-only"}}, "config.local.env.K"),
        ({"env": {"SSH_PASSPHRASE": "literal"}}, "config.local.env.SSH_PASSPHRASE"),
        ({"stopGraceMs": "soon"}, "config.local.stopGraceMs"),
        ({"logDir": 3}, "config.local.logDir"),
        ({"detached": "yes"}, "config.local.detached"),
    ],
)
def test_registration_rejects_bad_local_fields(local: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        target("weft agent", **local)
    assert err.value.field == field
