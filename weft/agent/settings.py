"""The reference agent's configuration: command-line flags and environment, read once, typed.

`weft agent` is a separate program from `weft serve`, so it has its own settings object; like
weft/settings.py it is the only place of the agent that reads `os.environ`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from weft.store.connection import SECRET_VARS, NatsAuth

PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
GUID_RE = re.compile(r"^[A-Za-z0-9_:@+=-]{1,128}$")
_GUID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_RECOVERABLE_EXIT_CODES = frozenset({75})  # EX_TEMPFAIL (sysexits.h)


class AgentSettingsError(ValueError):
    pass


def default_guid(hostname: str, project: str, agent_type: str, capabilities: tuple[str, ...]) -> str:
    """Stable per host + project + type + capability set, readable: `claude-code@host-<sha256 prefix>`.

    Two agents of the same type and capabilities on one host get the same guid: a mechanism that
    starts several on a host must give each its own (`--guid` or `WEFT_AGENT_GUID`).
    """
    key = "\n".join((hostname, project, agent_type, ",".join(sorted(set(capabilities)))))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    kind = _GUID_UNSAFE.sub("-", agent_type).strip("-")[:40] or "agent"
    host = _GUID_UNSAFE.sub("-", hostname.split(".")[0]).strip("-")[:40] or "host"
    return f"{kind}@{host}-{digest}"


def split_list(raw: str | None) -> tuple[str, ...]:
    """`a,b, c` -> ("a", "b", "c"), order kept, duplicates and empties dropped."""
    out: list[str] = []
    for part in (raw or "").split(","):
        item = part.strip()
        if item and item not in out:
            out.append(item)
    return tuple(out)


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AgentSettingsError(f"--label must be key=value, got {pair!r}")
        labels[key.strip()] = value
    return labels


def parse_exit_codes(raw: str) -> frozenset[int]:
    codes: set[int] = set()
    for part in split_list(raw):
        try:
            codes.add(int(part))
        except ValueError:
            raise AgentSettingsError(f"--recoverable-exit-codes must be integers, got {part!r}") from None
    return frozenset(codes)


def _username(env: Mapping[str, str]) -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        return env.get("USER") or env.get("LOGNAME") or None


@dataclass(frozen=True)
class AgentSettings:
    project: str
    guid: str
    agent_type: str
    capabilities: tuple[str, ...]
    boundaries: tuple[str, ...]
    command: str
    max_tasks: int = 1
    handle: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    idle_exit_s: float = 0.0  # 0: never
    heartbeat_ms: int | None = None  # None: the register reply's heartbeatIntervalMs
    recoverable_exit_codes: frozenset[int] = DEFAULT_RECOVERABLE_EXIT_CODES
    kill_grace_s: float = 10.0  # SIGTERM -> SIGKILL on cancel / forced shutdown
    request_timeout_s: float = 5.0  # one NATS request attempt
    max_backoff_s: float = 5.0  # cap of the retry backoff of accept/complete/fail/register
    connect_timeout_s: float = 60.0  # initial NATS connection; 0: wait forever
    deregister_timeout_s: float = 10.0  # bounded: an unreachable weft must not keep the agent alive
    drain_timeout_s: float = 2.0  # after the command exits, how long its leftovers may hold stdout
    summary_lines: int = 5
    summary_max_bytes: int = 4096
    output_max_bytes: int = 64 * 1024
    stderr_max_bytes: int = 4096
    sync_every_heartbeats: int = 3
    nats_url: str = DEFAULT_NATS_URL
    nats_user: str | None = None
    nats_pass: str | None = field(default=None, repr=False)
    nats_auth: NatsAuth = field(default_factory=NatsAuth)  # NATS_USER/PASS/TOKEN/NKEY_SEED/CREDS/TLS_*
    spin_up_id: str | None = None
    target_id: str | None = None
    hostname: str = ""
    username: str | None = None
    workdir: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    uvloop: bool = True
    child_env: Mapping[str, str] = field(default_factory=dict)  # the environment commands inherit

    def __post_init__(self) -> None:
        if not PROJECT_RE.match(self.project):
            raise AgentSettingsError(f"project {self.project!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not GUID_RE.match(self.guid):
            raise AgentSettingsError(f"guid {self.guid!r} must match [A-Za-z0-9_:@+=-]{{1,128}}")
        if not self.agent_type.strip():
            raise AgentSettingsError("--type must not be empty")
        if not self.capabilities:
            raise AgentSettingsError("--capabilities (or WEFT_AGENT_CAPABILITIES) needs at least one capability")
        if not self.boundaries:
            raise AgentSettingsError("--boundaries needs at least one boundary (or '*')")
        if not self.command.strip():
            raise AgentSettingsError("--command (or WEFT_AGENT_COMMAND) is required")
        if self.max_tasks < 1:
            raise AgentSettingsError("--max-tasks must be >= 1")
        if self.idle_exit_s < 0:
            raise AgentSettingsError("--idle-exit must be >= 0")
        if self.heartbeat_ms is not None and self.heartbeat_ms < 50:
            raise AgentSettingsError("--heartbeat-ms must be >= 50")
        if self.kill_grace_s < 0 or self.request_timeout_s <= 0:
            raise AgentSettingsError("--kill-grace must be >= 0 and --request-timeout > 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> AgentSettings:
        """Flags win over the environment: --project over LOOMINAL_PROJECT_ID, --guid over WEFT_AGENT_GUID."""
        e = dict(os.environ if env is None else env)
        project = args.project or e.get("LOOMINAL_PROJECT_ID") or "default"
        capabilities = split_list(args.capabilities or e.get("WEFT_AGENT_CAPABILITIES"))
        boundaries = split_list(args.boundaries or e.get("WEFT_AGENT_BOUNDARIES") or "*")
        agent_type = args.type or e.get("WEFT_AGENT_TYPE") or "claude-code"
        command = args.agent_command or e.get("WEFT_AGENT_COMMAND") or ""
        spin_up_id = e.get("WEFT_SPINUP_ID") or None
        hostname = os.uname().nodename
        labels = parse_labels(args.label)
        target_id = e.get("WEFT_TARGET_ID") or None
        try:
            auth = NatsAuth.from_env(e)
        except ValueError as err:
            raise AgentSettingsError(str(err)) from None
        if target_id is not None:
            labels.setdefault("targetId", target_id)
        # A spun-up agent is one of possibly many on its host: its spin-up id makes its guid unique.
        guid = (
            args.guid
            or e.get("WEFT_AGENT_GUID")
            or (f"{agent_type}-{spin_up_id}" if spin_up_id else None)
            or default_guid(hostname, project, agent_type, capabilities)
        )
        return cls(
            project=project,
            guid=guid,
            agent_type=agent_type,
            capabilities=capabilities,
            boundaries=boundaries,
            command=command,
            max_tasks=args.max_tasks,
            handle=args.handle,
            labels=labels,
            idle_exit_s=args.idle_exit,
            heartbeat_ms=args.heartbeat_ms,
            recoverable_exit_codes=parse_exit_codes(args.recoverable_exit_codes),
            kill_grace_s=args.kill_grace,
            request_timeout_s=args.request_timeout,
            connect_timeout_s=args.connect_timeout,
            nats_url=e.get("NATS_URL") or DEFAULT_NATS_URL,
            nats_user=auth.user,
            nats_pass=auth.password,
            nats_auth=auth,
            spin_up_id=spin_up_id,
            target_id=target_id,
            hostname=hostname,
            username=_username(e),
            workdir=args.workdir,
            log_level=e.get("LOG_LEVEL", "info").upper(),
            log_format=e.get("LOG_FORMAT", "text").lower(),
            uvloop=e.get("WEFT_UVLOOP", "1").lower() not in ("0", "false", "no", "off"),
            # The agent's NATS secrets stay with the agent: the commands it runs do not need them.
            child_env={k: v for k, v in e.items() if k not in SECRET_VARS},
        )
