"""The `local` mechanism: an agent as a detached process on weft's own host.

The agent gets a clean, explicit environment (never weft's whole environment: weft's may hold NATS
credentials, API tokens, cloud keys): PATH (weft's bin dir first, so `weft agent` resolves inside a
venv), HOME, LANG/LC_ALL if set, the target's `env` (secret references resolved at launch, never
logged) and the spin-up's agent env (WEFT_SPINUP_ID, NATS_URL, ...).

It runs in its own session (so Ctrl-C of weft does not reach it, and `stop` can signal its whole
process group), stdout/stderr to a log file per spin-up. The handle records the pid's start time and
the host's boot id, so that `stop` after a weft restart (or on another replica) never signals a
process that merely reuses the pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from weft.core.credentials import secret_named
from weft.core.targets import ConfigSchema, check_process_fields, opt_bool
from weft.spinup.base import (
    Launched,
    ProbeResult,
    SpinUpError,
    SpinUpRequest,
    Stopwatch,
    redact,
    resolve_secret,
)

log = logging.getLogger(__name__)


def _check_config(body: dict[str, Any]) -> None:
    check_process_fields(body, SCHEMA.key)
    opt_bool(body, SCHEMA.key, "detached")


SCHEMA = ConfigSchema(
    mechanism="local",
    key="local",
    required=("command",),
    defaults={"args": [], "env": {}, "detached": True},
    check=_check_config,
)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROC = Path("/proc")
EXITED_KEPT = 256


def is_reference(value: str) -> bool:
    return value.startswith(("env:", "file:"))


def target_env(env: Any, what: str) -> dict[str, str]:
    """The target's `env` with secret references (`env:NAME`, `file:PATH`) resolved now.

    Values are never logged or put into an error message; only names are."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise SpinUpError(f"{what}.env must be an object")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise SpinUpError(f"{what}.env: {key!r} is not a valid environment variable name")
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, int | float):
            out[key] = str(value)
        elif isinstance(value, str):
            if is_reference(value):
                try:
                    out[key] = resolve_secret(value)
                except SpinUpError as err:
                    raise SpinUpError(f"{what}.env.{key}: {err}") from None
            else:
                out[key] = value
        else:
            raise SpinUpError(f"{what}.env.{key} must be a string, number or boolean")
        if "\0" in out[key]:
            raise SpinUpError(f"{what}.env.{key} contains a NUL byte")
    return out


def redact_env(text: str, env_cfg: Any, resolved: dict[str, str]) -> str:
    """`text` with the values of the target env's secret references (as resolved into `resolved`)
    masked as `<reference>`: a log tail ends up in a spin-up failure event, and an event never holds
    a secret. (Values under 4 characters are left: masking them would garble the text.)"""
    if not isinstance(env_cfg, dict):
        return text
    return redact(text, {
        value: f"<{ref}>"
        for key, ref in env_cfg.items()
        if isinstance(ref, str) and is_reference(ref) and len(value := resolved.get(key) or "") >= 4
    })


def agent_path() -> str:
    """PATH for local agents: weft's own bin directory first, so `weft agent` resolves in a venv."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def base_env() -> dict[str, str]:
    """What a local agent inherits from weft: only PATH (weft's bin dir first), HOME, LANG, LC_ALL."""
    env = {"PATH": agent_path()}
    home = os.environ.get("HOME") or str(Path.home())
    env["HOME"] = home
    for name in ("LANG", "LC_ALL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _argv(cfg: dict[str, Any]) -> list[str]:
    command = cfg.get("command")
    if not isinstance(command, str) or not command.strip():
        raise SpinUpError("config.local.command is empty")
    try:
        argv = shlex.split(command)
    except ValueError as err:
        raise SpinUpError(f"config.local.command does not parse: {err}") from None
    args = cfg.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpinUpError("config.local.args must be a list of strings")
    return argv + list(args)


def _resolve_exe(exe: str, path: str) -> str:
    """The executable's path, resolved against `path` (or as given if it names a path)."""
    found = exe if os.sep in exe else shutil.which(exe, path=path)
    if found is None or not os.path.isfile(found):
        raise SpinUpError(f"command {exe} not found")
    if not os.access(found, os.X_OK):
        raise SpinUpError(f"command {found} is not executable")
    return found


def _cwd(cfg: dict[str, Any]) -> str:
    cwd = cfg.get("workingDirectory") or os.getcwd()
    cwd = os.path.expanduser(str(cwd))
    if not os.path.isdir(cwd):
        raise SpinUpError(f"workingDirectory {cwd} does not exist")
    return cwd


def _safe_name(spin_up_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", spin_up_id).lstrip(".")
    return name or "spinup"


# --- /proc: who is this pid, really? -------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, starttime) of a pid from /proc/<pid>/stat, None if there is no such process."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[2]), int(rest[19])


def proc_spinup_id(pid: int) -> str | None:
    """WEFT_SPINUP_ID from a process's initial environment (/proc/<pid>/environ), if readable."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    for entry in raw.split(b"\0"):
        if entry.startswith(b"WEFT_SPINUP_ID="):
            return entry.split(b"=", 1)[1].decode(errors="replace")
    return ""


def boot_id() -> str | None:
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def have_proc() -> bool:
    return (PROC / "self" / "stat").exists()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, by scanning /proc."""
    members = []
    try:
        entries = os.listdir(PROC)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        st = proc_stat(int(entry))
        if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _alive(pid: int, pgid: int, leader: bool) -> bool:
    if group_members(pgid):
        return True
    st = proc_stat(pid) if leader else None
    return st is not None and st[0] not in ("Z", "X")


def _log_tail(path: Path, max_bytes: int = 4096, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


def _open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class LocalMechanism:
    """Agents as detached local processes. One instance per weft process; it tracks (and reaps) the
    children it spawned, and can stop processes spawned by an earlier weft run from their handle."""

    name = SCHEMA.mechanism

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        startup_window_s: float = 0.3,
        stop_grace_s: float = 10.0,
        kill_wait_s: float = 5.0,
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir()) / "weft-agents"
        self.startup_window_s = startup_window_s
        self.stop_grace_s = stop_grace_s
        self.kill_wait_s = kill_wait_s
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._waiters: dict[int, asyncio.Task[int]] = {}
        self._exited: dict[int, int] = {}  # pid -> exit status of the most recent EXITED_KEPT children

    # --- launch --------------------------------------------------------------------------------

    def log_path(self, cfg: dict[str, Any], spin_up_id: str) -> Path:
        log_dir = Path(os.path.expanduser(str(cfg.get("logDir") or self.log_dir)))
        return log_dir / f"{_safe_name(spin_up_id)}.log"

    def build_env(self, req: SpinUpRequest) -> dict[str, str]:
        """The agent's complete environment: base, then the target's env, then the agent env
        (which wins: an agent must register with its own spin-up id and project)."""
        return {**base_env(), **target_env(req.config.get("env"), "config.local"), **req.agent_env()}

    async def launch(self, req: SpinUpRequest) -> Launched:
        cfg = req.config
        argv = _argv(cfg)
        cwd = _cwd(cfg)
        env = self.build_env(req)
        exe = _resolve_exe(argv[0], env.get("PATH", ""))
        log_path = self.log_path(cfg, req.spin_up_id)
        try:
            fd = _open_log(log_path)
        except OSError as err:
            raise SpinUpError(f"cannot open agent log {log_path}: {err.strerror}") from None
        try:
            proc = await asyncio.create_subprocess_exec(
                exe,
                *argv[1:],
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own session and process group: no terminal, no Ctrl-C
                close_fds=True,
            )
        except OSError as err:
            raise SpinUpError(f"cannot start {exe}: {err.strerror}") from None
        finally:
            os.close(fd)
        pid = proc.pid
        stat = proc_stat(pid)
        waiter = asyncio.create_task(proc.wait(), name=f"weft-local-agent-{pid}")
        self._children[pid] = proc
        self._waiters[pid] = waiter
        waiter.add_done_callback(functools.partial(self._reaped, pid))
        log.info(
            "local agent started",
            extra={"spin_up_id": req.spin_up_id, "pid": pid, "command": exe, "log": str(log_path),
                   "env_names": sorted(env)},
        )
        # A command that fails at once (bad flags, missing module, ...) is reported as a failed
        # launch with its exit status and the end of its log, not as a spin-up that never registers.
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.startup_window_s)
        except asyncio.CancelledError:
            # Cancelled (e.g. the spin-up timeout) before the handle could be returned and recorded:
            # an agent nobody could ever stop must not be left behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            raise
        if done and waiter.result() != 0:
            code = waiter.result()
            tail = redact_env(_log_tail(log_path), cfg.get("env"), env)
            # The agent's own NATS password or token, which a crashing agent may print, too.
            tail = redact(tail, {v: f"<{k}>" for k, v in req.nats_env.items() if secret_named(k) and len(v) >= 4})
            raise SpinUpError(
                f"local command {argv[0]} {_describe_exit(code)} right after start (log {log_path})"
                + (f":\n{tail}" if tail else "")
            )
        handle: dict[str, Any] = {
            "pid": pid,
            "pgid": pid,  # start_new_session: the agent leads its own process group
            "log": str(log_path),
            "host": "localhost",
            "hostname": socket.gethostname(),
            "spinUpId": req.spin_up_id,
        }
        if stat is not None:
            handle["startTime"] = stat[2]
            handle["bootId"] = boot_id()
        return Launched(handle=handle)

    def _reaped(self, pid: int, _task: asyncio.Task[int]) -> None:
        proc = self._children.pop(pid, None)
        self._waiters.pop(pid, None)
        if proc is not None and proc.returncode is not None:
            self._exited[pid] = proc.returncode
            while len(self._exited) > EXITED_KEPT:
                del self._exited[next(iter(self._exited))]
            log.info("local agent exited", extra={"pid": pid, "returncode": proc.returncode})

    def children(self) -> list[int]:
        """Pids of the agents this instance launched that have not exited yet."""
        return list(self._children)

    async def wait(self, pid: int) -> int | None:
        """The exit status of an agent this instance spawned, once it exits (None if unknown)."""
        waiter = self._waiters.get(pid)
        if waiter is None:
            return self._exited.get(pid)
        return await asyncio.shield(waiter)

    # --- stop ----------------------------------------------------------------------------------

    def _verify(self, handle: dict[str, Any]) -> tuple[str, int]:
        """Is the handle's process still ours? -> ("alive" | "orphans" | "gone" | "reused" | "unknown", pgid).

        "orphans": the leader is gone but members of its process group live on (a pid that is some
        group's id is never reused by Linux while the group exists)."""
        try:
            pid = int(handle["pid"])
            pgid = int(handle.get("pgid", pid))
        except (KeyError, TypeError, ValueError):
            raise SpinUpError("local handle has no valid pid") from None
        if pid <= 1 or pgid <= 1:
            raise SpinUpError(f"local handle names pid {pid} / pgid {pgid}: refusing to signal it")
        if not have_proc():
            # No /proc (not Linux): only processes this run spawned (and has not reaped) are known.
            tracked = self._children.get(pid)
            if tracked is None:
                return "unknown", pgid
            return ("alive" if tracked.returncode is None else "gone"), pgid
        recorded_boot = handle.get("bootId")
        if recorded_boot and recorded_boot != boot_id():
            return "gone", pgid  # another host or a reboot since: whatever has that pid is not ours
        started = handle.get("startTime")
        stat = proc_stat(pid)
        if stat is not None:
            if started is None:
                # No start time recorded: the agent env's spin-up id identifies it, if readable.
                spin_up_id = handle.get("spinUpId")
                if not spin_up_id or stat[0] in ("Z", "X"):
                    return "unknown", pgid
                found = proc_spinup_id(pid)
                if found is None:
                    return "unknown", pgid
                return ("alive" if found == spin_up_id else "reused"), pgid
            if stat[2] != started:
                return "reused", pgid
            return ("alive" if stat[0] not in ("Z", "X") else "orphans"), pgid
        if started is None:
            return "unknown", pgid
        return ("orphans" if group_members(pgid) else "gone"), pgid

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        state, pgid = self._verify(handle)
        pid = int(handle["pid"])
        if state in ("gone", "reused", "unknown"):
            if state == "reused":
                log.warning("local agent pid was reused by another process; not signalling it", extra={"pid": pid})
            elif state == "unknown":
                log.warning("cannot verify local agent pid (no start time or no /proc); not signalling it",
                            extra={"pid": pid})
            else:
                log.info("local agent already gone", extra={"pid": pid})
            return
        if state == "orphans" and not group_members(pgid):
            return
        grace = self.stop_grace_s
        cfg = target.get("config", {}).get(SCHEMA.key, {}) if isinstance(target.get("config"), dict) else {}
        if isinstance(cfg.get("stopGraceMs"), int) and not isinstance(cfg.get("stopGraceMs"), bool):
            grace = cfg["stopGraceMs"] / 1000
        # The leader is signalled on its own only if it is verified ours and left its group.
        st = proc_stat(pid) if state == "alive" else None
        leader = st is not None and st[1] != pgid
        if graceful:
            self._signal(pid, pgid, signal.SIGTERM, leader)
            if await self._wait_gone(pid, pgid, grace, leader):
                log.info("local agent stopped", extra={"pid": pid})
                return
            log.warning("local agent ignored SIGTERM; killing it", extra={"pid": pid, "grace_s": grace})
        self._signal(pid, pgid, signal.SIGKILL, leader)
        if not await self._wait_gone(pid, pgid, self.kill_wait_s, leader):
            log.warning("local agent process group survives SIGKILL", extra={"pid": pid, "pgid": pgid})

    @staticmethod
    def _signal(pid: int, pgid: int, sig: signal.Signals, leader_too: bool) -> None:
        """Signal the process group; and the leader itself if it is verified ours (in case it left
        its group)."""
        targets = [(os.killpg, pgid)] + ([(os.kill, pid)] if leader_too else [])
        for send, ident in targets:
            try:
                send(ident, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise SpinUpError(f"not permitted to signal process {ident}") from None

    async def _wait_gone(self, pid: int, pgid: int, timeout: float, leader: bool) -> bool:
        """Until no live member of the group remains (True) or the timeout (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = self._waiters.get(pid)
        if waiter is not None:  # the leader is our child: await its exit rather than polling it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
        if not have_proc():
            return waiter is None or waiter.done()
        delay = 0.005
        # Other members (the agent's own children) cannot be awaited: poll /proc, bounded.
        while True:
            if not await asyncio.to_thread(_alive, pid, pgid, leader):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    # --- probe ---------------------------------------------------------------------------------

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        """Could an agent be launched right now? The command resolves to an executable (PATH with
        weft's bin dir first), the working directory exists, the env's secret references resolve."""
        watch = Stopwatch()
        try:
            cfg = target["config"][SCHEMA.key]
            argv = _argv(cfg)
            if cfg.get("workingDirectory"):
                _cwd(cfg)
            env = {**base_env(), **target_env(cfg.get("env"), "config.local")}
            _resolve_exe(argv[0], env.get("PATH", ""))
        except SpinUpError as err:
            return ProbeResult("unhealthy", watch.ms, str(err))
        except (KeyError, TypeError) as err:
            return ProbeResult("unhealthy", watch.ms, f"target has no local config: {err}")
        return ProbeResult("healthy", watch.ms, None)
