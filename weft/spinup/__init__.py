"""Spin-up mechanisms, one module each behind one interface (weft.spinup.base.Mechanism).

`REGISTRY` is the one place a mechanism is registered: its config schema (defined beside its code,
used by weft.core.targets to validate targets) and its class. Importing this package imports no
mechanism's third-party library (asyncssh, the Kubernetes client, aiohttp): the mechanisms import
them where they use them, and `build_mechanisms` imports them up front (each class's `requires`),
leaving out, with an error in the log, a mechanism whose library cannot be imported.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from weft.core.targets import ConfigSchema
from weft.spinup import github, kubernetes, local, ssh, webhook
from weft.spinup.base import Launched, Mechanism, ProbeResult, SpinUpError, SpinUpRequest

log = logging.getLogger("weft.spinup")


@dataclass(frozen=True)
class Registered:
    schema: ConfigSchema
    cls: type[Mechanism]


REGISTRY: tuple[Registered, ...] = (
    Registered(local.SCHEMA, local.LocalMechanism),
    Registered(ssh.SCHEMA, ssh.SshMechanism),
    Registered(kubernetes.SCHEMA, kubernetes.KubernetesMechanism),
    Registered(github.SCHEMA, github.GithubActionsMechanism),
    Registered(webhook.SCHEMA, webhook.WebhookMechanism),
)

# Every mechanism's config schema by its name in a target's `mechanism` field: what
# weft.core.targets.validate_new_target / validate_update take.
SCHEMAS: Mapping[str, ConfigSchema] = MappingProxyType({r.schema.mechanism: r.schema for r in REGISTRY})


def build_mechanisms() -> dict[str, Mechanism]:
    """Every mechanism by its name in a target's `mechanism` field. One whose libraries cannot be
    imported is left out with an error in the log; its targets then fail to spin up with a clear
    reason (and still validate: their schema needs none of those libraries)."""
    out: dict[str, Mechanism] = {}
    for entry in REGISTRY:
        name = entry.schema.mechanism
        try:
            for module in getattr(entry.cls, "requires", ()):
                importlib.import_module(module)
        except Exception as err:  # ImportError, or a library that fails while importing
            log.error("spin-up mechanism %s unavailable: %s", name, err)
            continue
        out[name] = entry.cls()
    return out


__all__ = [
    "REGISTRY",
    "SCHEMAS",
    "ConfigSchema",
    "Launched",
    "Mechanism",
    "ProbeResult",
    "Registered",
    "SpinUpError",
    "SpinUpRequest",
    "build_mechanisms",
]
