"""The one interface every spin-up mechanism implements, and what they share.

A mechanism launches an agent somewhere (`launch`), cleans it up on scale-down (`stop`) and says
whether it could launch one right now (`probe`). It never decides anything: the scheduler decides,
records events, and counts a spin-up as successful only when an agent registers with the spin-up's
id (`WEFT_SPINUP_ID`), never merely because a command returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from weft.stamps import utc_now


class SpinUpError(Exception):
    """The mechanism could not launch the agent; the message says why, for people."""


class SecretError(SpinUpError):
    pass


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: str  # healthy | unhealthy | unknown
    latency_ms: float | None
    error: str | None
    checked_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, slots=True)
class SpinUpRequest:
    spin_up_id: str
    project: str
    target: dict[str, Any]  # the target record; its config is nested: target["config"][<mechanism key>]
    work: dict[str, Any] | None  # the waiting item that caused it, if any
    nats_url: str  # the NATS URL the agent must use (as reachable from where it runs)
    # The agent's NATS credentials and TLS files (`NatsAuth.agent_env()`: NATS_USER, NATS_PASS,
    # NATS_TOKEN, NATS_CREDS, NATS_NKEY_SEED, NATS_TLS_*), never weft's own.
    nats_env: Mapping[str, str] = field(default_factory=dict)

    def agent_env(self) -> dict[str, str]:
        """What every spun-up agent receives, whatever the mechanism: enough for `weft agent` to
        register for the right project with the target's declaration and the spin-up id."""
        t = self.target
        env = {
            "WEFT_SPINUP_ID": self.spin_up_id,
            "WEFT_TARGET_ID": t["id"],
            "WEFT_TARGET_NAME": t["name"],
            "LOOMINAL_PROJECT_ID": self.project,
            "NATS_URL": self.nats_url,
            **self.nats_env,
            "WEFT_AGENT_TYPE": t["agentType"],
            "WEFT_AGENT_CAPABILITIES": ",".join(t["capabilities"]),
            "WEFT_AGENT_BOUNDARIES": ",".join(t["boundaries"]),
        }
        if self.work is not None:
            env["WEFT_WORK_ID"] = self.work["id"]
        return env

    @property
    def config(self) -> dict[str, Any]:
        return mechanism_config(self.target)


@dataclass(frozen=True, slots=True)
class Launched:
    """What the mechanism started, JSON-able: recorded in `spinup.started` and handed back to `stop`."""

    handle: dict[str, Any]


class Mechanism(Protocol):
    name: str

    async def launch(self, req: SpinUpRequest) -> Launched: ...

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None: ...

    async def probe(self, target: dict[str, Any]) -> ProbeResult: ...


def mechanism_config(target: dict[str, Any]) -> dict[str, Any]:
    """The target's own block of its (normalised, nested) config, by its mechanism's schema key."""
    from weft.spinup import SCHEMAS  # the registry, which imports this module

    cfg: dict[str, Any] = target["config"][SCHEMAS[target["mechanism"]].key]
    return cfg


def redact(text: str, secrets: Iterable[str] | Mapping[str, str]) -> str:
    """`text` with every secret value in it masked, as `[redacted]`, or, when `secrets` maps each
    value to a label (say the reference it was resolved from), as that label. Longer values go
    first, so a secret holding another is masked whole. Error messages, log tails and responses
    pass through here before they reach an event, a log line or a client."""
    labels = dict(secrets) if isinstance(secrets, Mapping) else dict.fromkeys(secrets, "[redacted]")
    for value in sorted(labels, key=len, reverse=True):
        if value:
            text = text.replace(value, labels[value])
    return text


def resolve_secret(ref: str, environ: dict[str, str] | None = None) -> str:
    """`env:NAME` or `file:PATH` to the secret's value, at the moment of use, never stored.

    (`secret:NAME` references are Kubernetes secrets, resolved by the cluster, not here.)
    """
    env = os.environ if environ is None else environ
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in env:
            raise SecretError(f"secret reference {ref}: environment variable {name} is not set")
        return env[name]
    if ref.startswith("file:"):
        path = Path(ref[5:]).expanduser()
        try:
            return path.read_text().strip()
        except OSError as err:
            raise SecretError(f"secret reference {ref}: {err.strerror}") from None
    raise SecretError(f"{ref!r} is not a secret reference this mechanism can resolve (env:NAME or file:PATH)")


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)
