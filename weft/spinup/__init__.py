"""Spin-up mechanisms, one module each behind one interface (weft.spinup.base.Mechanism)."""

from __future__ import annotations

import importlib
import logging

from weft.spinup.base import Launched, Mechanism, ProbeResult, SpinUpError, SpinUpRequest

log = logging.getLogger("weft.spinup")

# mechanism name -> "module:Class"
REGISTRY = {
    "local": "weft.spinup.local:LocalMechanism",
    "ssh": "weft.spinup.ssh:SshMechanism",
    "kubernetes": "weft.spinup.kubernetes:KubernetesMechanism",
    "github-actions": "weft.spinup.github:GithubActionsMechanism",
    "webhook": "weft.spinup.webhook:WebhookMechanism",
}


def build_mechanisms() -> dict[str, Mechanism]:
    """Every mechanism by its name in a target's `mechanism` field. One that cannot be imported is
    left out with an error in the log; its targets then fail to spin up with a clear reason."""
    out: dict[str, Mechanism] = {}
    for name, path in REGISTRY.items():
        module_name, cls_name = path.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as err:
            log.error("spin-up mechanism %s unavailable: %s", name, err)
            continue
        out[name] = cls()
    return out


__all__ = ["Launched", "Mechanism", "ProbeResult", "SpinUpError", "SpinUpRequest", "build_mechanisms"]
