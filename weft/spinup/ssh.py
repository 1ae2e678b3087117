"""The `ssh` mechanism: an agent as a detached process on another host, over asyncssh.

Key-based authentication only (`privateKeyPath`, or `privateKey` as a reference `env:NAME` /
`file:PATH`, optional `passphrase` reference; resolved at use, never stored or logged). Host keys are
verified per `knownHosts`: `default` (~/.ssh/known_hosts), a path to a known_hosts file, or the
explicit opt-outs `accept-new` (verify hosts already listed in ~/.ssh/known_hosts, accept unknown
ones without recording them) and `insecure` (no verification), both logged as warnings.

Every remote script is fed to `/bin/sh -s` on stdin, so it does not depend on the remote login
shell's syntax and neither the script nor the secret env values it carries appear in the remote
process list as the shell's arguments. The agent command runs as an argv (the `command` string is
shell-split, like `local`), with its environment applied to the command itself
(`env K='v' ... nohup <argv> > <log> 2>&1 < /dev/null &`), in its own session where `setsid` exists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shlex
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft.core.targets import ConfigSchema, check_process_fields, fail, opt_int, opt_resolvable_ref, opt_str
from weft.spinup.base import Launched, ProbeResult, SpinUpError, SpinUpRequest, Stopwatch, resolve_secret
from weft.spinup.local import is_reference, target_env

if TYPE_CHECKING:  # imported where used, so that the schema needs no asyncssh
    import asyncssh

log = logging.getLogger(__name__)


def _check_config(body: dict[str, Any]) -> None:
    key = SCHEMA.key
    if not (isinstance(body.get("port"), int) and 0 < body["port"] < 65536):
        raise fail(key, "port", "must be an integer port")
    check_process_fields(body, key)
    for name in ("host", "user", "privateKeyPath"):
        opt_str(body, key, name)
    opt_resolvable_ref(body, key, "privateKey")
    opt_resolvable_ref(body, key, "passphrase")
    opt_str(body, key, "knownHosts")  # default | accept-new | insecure | a known_hosts file path
    opt_int(body, key, "connectionTimeoutMs", 100)


SCHEMA = ConfigSchema(
    mechanism="ssh",
    key="ssh",
    required=("host", "user", "command"),
    defaults={"port": 22, "env": {}, "connectionTimeoutMs": 30000, "knownHosts": "default"},
    check=_check_config,
)

DEFAULT_LOG_DIR = "/tmp/weft-agents"
KNOWN_HOSTS_OPT_OUTS = ("accept-new", "insecure")
LAUNCHED = re.compile(r"^weft-launched (\d+) (\d+|none) (.+)$", re.M)
STOPPED = re.compile(r"^weft-stop (\w+)$", re.M)


def q(value: str) -> str:
    return shlex.quote(value)


def _dir_arg(path: str) -> str:
    """A directory argument that `cd`/`mkdir` cannot mistake for an option."""
    return "./" + path if path.startswith("-") else path


def _argv(cfg: dict[str, Any]) -> list[str]:
    command = cfg.get("command")
    if not isinstance(command, str) or not command.strip():
        raise SpinUpError("config.ssh.command is empty")
    try:
        argv = shlex.split(command)
    except ValueError as err:
        raise SpinUpError(f"config.ssh.command does not parse: {err}") from None
    args = cfg.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpinUpError("config.ssh.args must be a list of strings")
    return argv + list(args)


# Reads /proc/<pid>/stat into $r: the fields after "(comm) ", so `set -- $r` gives $1 state, $3 pgrp,
# ${20} starttime. (comm may hold spaces and parentheses, hence the longest-prefix strip.)
_STAT_FN = 'st() { { read -r l < "/proc/$1/stat"; } 2>/dev/null || return 1; r=${l##*) }; }'


def launch_script(
    spin_up_id: str, argv: list[str], env: dict[str, str], working_directory: str | None, log_dir: str
) -> str:
    """The POSIX sh script that starts the agent detached and prints `weft-launched <pid> <start> <log>`.

    Exit 97: workingDirectory missing; 98: log not writable; 127: command not found."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", spin_up_id).lstrip(".") or "spinup"
    logd = _dir_arg(log_dir)
    lines = [
        "umask 077",
        f"mkdir -p {q(logd)} || {{ echo {q(f'weft: cannot create log directory {log_dir}')} >&2; exit 98; }}",
        f'L="$(cd {q(logd)} && pwd)"/{q(name + ".log")} || exit 98',
        ': >> "$L" || { echo "weft: cannot write log $L" >&2; exit 98; }',
    ]
    if working_directory:
        wd = _dir_arg(working_directory)
        lines.append(f"cd {q(wd)} || {{ echo {q(f'weft: workingDirectory {working_directory} does not exist')} >&2; exit 97; }}")
    if "PATH" not in env:  # with a PATH of its own the command is looked up there, by env(1)
        lines.append(
            f"command -v {q(argv[0])} >/dev/null 2>&1 || "
            f"{{ echo {q(f'weft: command {argv[0]} not found')} >&2; exit 127; }}"
        )
    assignments = " ".join(f"{k}={q(v)}" for k, v in env.items())
    command = " ".join(q(a) for a in argv)
    lines += [
        "S=; command -v setsid >/dev/null 2>&1 && S=setsid",
        f'$S env {assignments} nohup {command} > "$L" 2>&1 < /dev/null &',
        "P=$!",
        _STAT_FN,
        "T=none; if st $P; then set -- $r; T=${20}; fi",
        'echo "weft-launched $P $T $L"',
    ]
    return "\n".join(lines) + "\n"


def stop_script(pid: int, start: int | None, graceful: bool, grace_s: float) -> str:
    """Signals the agent's process group (or the pid if it has none) after checking, where /proc
    exists, that the pid still is the process started (same start time). Prints `weft-stop <outcome>`:
    gone, reused, terminated or killed."""
    ticks = max(1, math.ceil(grace_s / 0.1))
    lines = [
        f"P={pid}",
        f"T={start if start is not None else ''}",
        _STAT_FN,
        'if [ -n "$T" ] && st $P; then set -- $r; if [ "${20}" != "$T" ]; then echo "weft-stop reused"; exit 0; fi; fi',
        "alive() {",
        "  if [ -r /proc/self/stat ]; then",
        "    for f in /proc/[0-9]*; do",
        '      st "${f#/proc/}" || continue',
        "      set -- $r",
        '      [ "$1" != Z ] && [ "$1" != X ] && { [ "$3" = "$P" ] || [ "${f#/proc/}" = "$P" ]; } && return 0',
        "    done",
        "    return 1",
        "  fi",
        '  kill -0 -"$P" 2>/dev/null || kill -0 "$P" 2>/dev/null',
        "}",
        'sig() { kill -"$1" -"$P" 2>/dev/null || kill -"$1" "$P" 2>/dev/null; return 0; }',
        'alive || { echo "weft-stop gone"; exit 0; }',
    ]
    if graceful:
        lines += [
            "sig TERM",
            "n=0",
            "while alive; do",
            f'  n=$((n+1)); if [ $n -gt {ticks} ]; then sig KILL; echo "weft-stop killed"; exit 0; fi',
            "  sleep 0.1",
            "done",
            'echo "weft-stop terminated"',
        ]
    else:
        lines += ["sig KILL", 'echo "weft-stop killed"']
    return "\n".join(lines) + "\n"


def probe_script(argv0: str | None, working_directory: str | None) -> str:
    lines = [":"]
    if working_directory:
        lines.append(
            f"[ -d {q(_dir_arg(working_directory))} ] || "
            f"{{ echo {q(f'workingDirectory {working_directory} does not exist')} >&2; exit 97; }}"
        )
    if argv0:
        lines.append(f"command -v {q(argv0)} >/dev/null 2>&1 || {{ echo {q(f'command {argv0} not found')} >&2; exit 127; }}")
    return "\n".join(lines) + "\n"


class SshMechanism:
    name = SCHEMA.mechanism
    requires = ("asyncssh",)  # what build_mechanisms imports before offering this mechanism

    def __init__(self, *, log_dir: str = DEFAULT_LOG_DIR, stop_grace_s: float = 10.0) -> None:
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self._warned: set[tuple[str, str]] = set()

    # --- connection ----------------------------------------------------------------------------

    @staticmethod
    def _cfg(target: dict[str, Any]) -> dict[str, Any]:
        try:
            cfg = target["config"][SCHEMA.key]
        except (KeyError, TypeError):
            raise SpinUpError("target has no ssh config") from None
        if not isinstance(cfg, dict):
            raise SpinUpError("config.ssh must be an object")
        for field in ("host", "user"):
            if not isinstance(cfg.get(field), str) or not cfg[field]:
                raise SpinUpError(f"config.ssh.{field} is required")
        return cfg

    @staticmethod
    def _where(cfg: dict[str, Any]) -> str:
        return f"ssh {cfg['user']}@{cfg['host']}:{cfg.get('port', 22)}"

    def _load_key(self, cfg: dict[str, Any]) -> asyncssh.SSHKey:
        import asyncssh

        passphrase_ref = cfg.get("passphrase")
        passphrase = None
        if passphrase_ref:
            if not isinstance(passphrase_ref, str) or not is_reference(passphrase_ref):
                raise SpinUpError("config.ssh.passphrase must be a reference (env:NAME or file:PATH)")
            passphrase = resolve_secret(passphrase_ref)
        key_ref = cfg.get("privateKey")
        key_path = cfg.get("privateKeyPath")
        source = ""
        try:
            if key_ref:
                if not isinstance(key_ref, str) or not is_reference(key_ref):
                    raise SpinUpError("config.ssh.privateKey must be a reference (env:NAME or file:PATH)")
                source = key_ref
                return asyncssh.import_private_key(resolve_secret(key_ref), passphrase)
            if key_path:
                source = str(key_path)
                return asyncssh.read_private_key(Path(str(key_path)).expanduser(), passphrase)
        except asyncssh.KeyEncryptionError as err:
            raise SpinUpError(f"cannot decrypt private key {source}: {err}") from None
        except asyncssh.KeyImportError as err:
            raise SpinUpError(f"cannot load private key {source}: {err}") from None
        except OSError as err:
            raise SpinUpError(f"cannot read private key {source}: {err.strerror}") from None
        raise SpinUpError("no private key configured: set config.ssh.privateKeyPath or config.ssh.privateKey")

    def _known_hosts(self, target: dict[str, Any], cfg: dict[str, Any]) -> Any:
        policy = cfg.get("knownHosts") or "default"
        if not isinstance(policy, str):
            raise SpinUpError("config.ssh.knownHosts must be default, accept-new, insecure or a file path")
        if policy == "default":
            return ()  # asyncssh's default: ~/.ssh/known_hosts, and no host is trusted if it is absent
        if policy in KNOWN_HOSTS_OPT_OUTS:
            key = (str(target.get("id") or target.get("name")), policy)
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "ssh host key verification relaxed by configuration",
                    extra={"target": key[0], "knownHosts": policy, "host": cfg["host"]},
                )
            if policy == "insecure":
                return None
            # accept-new: a host already listed must still match; an unlisted one is accepted.
            default = Path("~/.ssh/known_hosts").expanduser()
            if default.is_file():
                import asyncssh

                try:
                    known = asyncssh.read_known_hosts(str(default))
                except (OSError, ValueError):
                    known = None
                port = cfg.get("port", 22)
                if known is not None:
                    keys, cas, *_ = known.match(cfg["host"], cfg["host"], None if port == 22 else port)
                    if keys or cas:
                        return str(default)
            return None
        path = Path(policy).expanduser()
        if not path.is_file():
            raise SpinUpError(f"knownHosts file {policy} does not exist")
        return str(path)

    async def _connect(self, target: dict[str, Any]) -> asyncssh.SSHClientConnection:
        import asyncssh

        cfg = self._cfg(target)
        where = self._where(cfg)
        timeout_ms = cfg.get("connectionTimeoutMs", 30000)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float) or timeout_ms <= 0:
            raise SpinUpError(f"{where}: connectionTimeoutMs must be a positive number")
        try:
            key = self._load_key(cfg)
            known_hosts = self._known_hosts(target, cfg)
        except SpinUpError as err:
            raise SpinUpError(f"{where}: {err}") from None
        try:
            return await asyncssh.connect(
                cfg["host"],
                int(cfg.get("port", 22)),
                username=cfg["user"],
                client_keys=[key],
                known_hosts=known_hosts,
                preferred_auth="publickey",
                agent_path=None,
                agent_forwarding=False,
                password=None,
                config=None,  # no ~/.ssh/config: the target's fields are the whole configuration
                connect_timeout=timeout_ms / 1000,
            )
        except asyncssh.PermissionDenied:
            raise SpinUpError(f"{where}: permission denied (publickey)") from None
        except asyncssh.HostKeyNotVerifiable as err:
            policy = cfg.get("knownHosts") or "default"
            raise SpinUpError(f"{where}: host key not verifiable ({err.reason}; knownHosts={policy})") from None
        except asyncssh.DisconnectError as err:
            raise SpinUpError(f"{where}: disconnected: {err.reason}") from None
        except asyncssh.Error as err:
            raise SpinUpError(f"{where}: {err}") from None
        except TimeoutError:
            raise SpinUpError(f"{where}: timed out after {timeout_ms} ms") from None
        except ConnectionRefusedError:
            raise SpinUpError(f"{where}: connection refused") from None
        except socket.gaierror as err:
            raise SpinUpError(f"{where}: cannot resolve host: {err.strerror}") from None
        except OSError as err:
            raise SpinUpError(f"{where}: {err.strerror or err}") from None
        except ValueError as err:  # e.g. a key type the server does not accept
            raise SpinUpError(f"{where}: {err}") from None

    async def _run(
        self, conn: asyncssh.SSHClientConnection, where: str, script: str, timeout: float
    ) -> asyncssh.SSHCompletedProcess:
        import asyncssh

        try:
            return await conn.run("/bin/sh -s", input=script, check=False, timeout=timeout)
        except asyncssh.TimeoutError:
            raise SpinUpError(f"{where}: remote command timed out after {round(timeout * 1000)} ms") from None
        except asyncssh.Error as err:
            raise SpinUpError(f"{where}: {err}") from None
        except OSError as err:
            raise SpinUpError(f"{where}: {err.strerror or err}") from None

    @staticmethod
    async def _close(conn: asyncssh.SSHClientConnection) -> None:
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()

    @staticmethod
    def _op_timeout(cfg: dict[str, Any]) -> float:
        ms = cfg.get("connectionTimeoutMs", 30000)
        return max(1.0, float(ms) / 1000) if isinstance(ms, int | float) and not isinstance(ms, bool) else 30.0

    # --- launch / stop / probe -----------------------------------------------------------------

    async def launch(self, req: SpinUpRequest) -> Launched:
        cfg = self._cfg(req.target)
        where = self._where(cfg)
        argv = _argv(cfg)
        try:
            env = {**target_env(cfg.get("env"), "config.ssh"), **req.agent_env()}
        except SpinUpError as err:
            raise SpinUpError(f"{where}: {err}") from None
        wd = cfg.get("workingDirectory")
        log_dir = str(cfg.get("logDir") or self.log_dir)
        script = launch_script(req.spin_up_id, argv, env, str(wd) if wd else None, log_dir)
        conn = await self._connect(req.target)
        try:
            result = await self._run(conn, where, script, self._op_timeout(cfg))
        finally:
            await self._close(conn)
        stdout = str(result.stdout or "")
        stderr = str(result.stderr or "").strip()
        match = LAUNCHED.search(stdout)
        if result.exit_status != 0 or match is None:
            reason = stderr.splitlines()[-1] if stderr else f"remote launch exited with status {result.exit_status}"
            raise SpinUpError(f"{where}: {reason}")
        pid = int(match.group(1))
        handle: dict[str, Any] = {
            "host": cfg["host"],
            "port": int(cfg.get("port", 22)),
            "user": cfg["user"],
            "pid": pid,
            "log": match.group(3),
        }
        if match.group(2) != "none":
            handle["startTime"] = int(match.group(2))
        log.info("ssh agent started", extra={"spin_up_id": req.spin_up_id, "where": where, "pid": pid,
                                             "log": handle["log"], "env_names": sorted(env)})
        return Launched(handle=handle)

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        cfg = self._cfg(target)
        # The handle says where the agent was started; the target's credentials are used to get there.
        cfg = {**cfg, **{k: handle[k] for k in ("host", "port", "user") if k in handle}}
        where = self._where(cfg)
        try:
            pid = int(handle["pid"])
        except (KeyError, TypeError, ValueError):
            raise SpinUpError(f"{where}: handle has no valid pid") from None
        if pid <= 1:
            raise SpinUpError(f"{where}: handle names pid {pid}: refusing to signal it")
        start = handle.get("startTime")
        grace = self.stop_grace_s
        if isinstance(cfg.get("stopGraceMs"), int) and not isinstance(cfg.get("stopGraceMs"), bool):
            grace = cfg["stopGraceMs"] / 1000
        script = stop_script(pid, int(start) if isinstance(start, int) else None, graceful, grace)
        conn = await self._connect({**target, "config": {**target.get("config", {}), SCHEMA.key: cfg}})
        try:
            result = await self._run(conn, where, script, grace + self._op_timeout(cfg))
        finally:
            await self._close(conn)
        match = STOPPED.search(str(result.stdout or ""))
        if result.exit_status != 0 or match is None:
            raise SpinUpError(f"{where}: stopping pid {pid} failed: {str(result.stderr or '').strip()[-300:]}")
        outcome = match.group(1)
        if outcome == "reused":
            log.warning("ssh agent pid was reused by another process; not signalled", extra={"where": where, "pid": pid})
        else:
            log.info("ssh agent stop", extra={"where": where, "pid": pid, "outcome": outcome})

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        """Connect (key auth, host key per policy) and run a no-op that also checks the command and the
        working directory exist on the remote host."""
        watch = Stopwatch()
        try:
            cfg = self._cfg(target)
            where = self._where(cfg)
            argv = _argv(cfg)
            env = cfg.get("env") or {}
            argv0 = None if isinstance(env, dict) and "PATH" in env else argv[0]
            wd = cfg.get("workingDirectory")
            conn = await self._connect(target)
            try:
                result = await self._run(conn, where, probe_script(argv0, str(wd) if wd else None),
                                         self._op_timeout(cfg))
            finally:
                await self._close(conn)
            if result.exit_status != 0:
                stderr = str(result.stderr or "").strip()
                reason = stderr.splitlines()[-1] if stderr else f"exit status {result.exit_status}"
                return ProbeResult("unhealthy", watch.ms, f"{where}: {reason}")
        except SpinUpError as err:
            return ProbeResult("unhealthy", watch.ms, str(err))
        return ProbeResult("healthy", watch.ms, None)
