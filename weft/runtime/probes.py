"""Target health: run the mechanism's own probe, bounded by the target's health-check timeout."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from weft.spinup.base import Mechanism, ProbeResult


async def probe_target(target: dict[str, Any], mechanisms: dict[str, Mechanism]) -> ProbeResult:
    mechanism = mechanisms.get(target["mechanism"])
    if mechanism is None:
        return ProbeResult("unknown", None, f"mechanism {target['mechanism']} is not available in this weft")
    timeout_ms = target["healthCheck"]["timeoutMs"]
    try:
        return await asyncio.wait_for(mechanism.probe(target), timeout_ms / 1000)
    except TimeoutError:
        return ProbeResult("unhealthy", None, f"health check timed out after {timeout_ms} ms")


def agent_path() -> str:
    """PATH for local agents: weft's own bin directory first, so `weft agent` resolves in a venv."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
