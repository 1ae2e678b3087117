"""Spin-up mechanisms, one module each behind one interface (weft.spinup.base.Mechanism)."""

from __future__ import annotations

from weft.spinup.base import Launched, Mechanism, ProbeResult, SpinUpError, SpinUpRequest


def build_mechanisms() -> dict[str, Mechanism]:
    """Every mechanism by its name in a target's `mechanism` field."""
    from weft.spinup.github import GithubActionsMechanism
    from weft.spinup.kubernetes import KubernetesMechanism
    from weft.spinup.local import LocalMechanism
    from weft.spinup.ssh import SshMechanism
    from weft.spinup.webhook import WebhookMechanism

    mechanisms: list[Mechanism] = [
        LocalMechanism(),
        SshMechanism(),
        KubernetesMechanism(),
        GithubActionsMechanism(),
        WebhookMechanism(),
    ]
    return {m.name: m for m in mechanisms}


__all__ = ["Launched", "Mechanism", "ProbeResult", "SpinUpError", "SpinUpRequest", "build_mechanisms"]
