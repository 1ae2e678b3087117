"""Target health: run the mechanism's own probe, bounded by the target's health-check timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from weft.core.spinup_policy import ALLOW_ALL, SpinUpPolicy
from weft.spinup.base import Mechanism, ProbeResult


async def probe_target(
    target: dict[str, Any], mechanisms: dict[str, Mechanism], project: str, policy: SpinUpPolicy = ALLOW_ALL
) -> ProbeResult:
    """The target's mechanism's probe, as a ProbeResult whatever happens: `unknown` if this weft has
    no such mechanism, `unhealthy` if the probe outlasts the target's `healthCheck.timeoutMs` or the
    spin-up policy no longer allows what it would connect to (it is never contacted then)."""
    mechanism = mechanisms.get(target["mechanism"])
    if mechanism is None:
        return ProbeResult("unknown", None, f"mechanism {target['mechanism']} is not available in this weft")
    denied = policy.problem(project, target)
    if denied is not None:
        return ProbeResult("unhealthy", None, f"denied: {denied[1]}")
    timeout_ms = target["healthCheck"]["timeoutMs"]
    try:
        return await asyncio.wait_for(mechanism.probe(target), timeout_ms / 1000)
    except TimeoutError:
        return ProbeResult("unhealthy", None, f"health check timed out after {timeout_ms} ms")
