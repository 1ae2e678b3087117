"""Target health probes: each mechanism checks that it could really launch an agent right now."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from weft.events import utc_now


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: str  # healthy | unhealthy | unknown
    latency_ms: float | None
    error: str | None
    checked_at: str


def agent_path() -> str:
    """PATH for local agents: weft's own bin directory first, so `weft agent` resolves in a venv."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def _local(target: dict[str, Any]) -> str | None:
    cfg = target["config"]["local"]
    try:
        argv = shlex.split(cfg["command"])
    except ValueError as err:
        return f"command does not parse: {err}"
    if not argv:
        return "command is empty"
    cwd = cfg.get("workingDirectory")
    if cwd and not os.path.isdir(cwd):
        return f"workingDirectory {cwd} does not exist"
    exe = argv[0]
    path = exe if os.sep in exe else shutil.which(exe, path=agent_path())
    if path is None or not os.path.isfile(path):
        return f"command {exe} not found"
    if not os.access(path, os.X_OK):
        return f"command {path} is not executable"
    return None


PROBES = {"local": _local}


async def probe_target(target: dict[str, Any]) -> ProbeResult:
    probe = PROBES.get(target["mechanism"])
    if probe is None:
        return ProbeResult("unknown", None, f"no health probe for mechanism {target['mechanism']} yet", utc_now())
    started = time.perf_counter()
    error = probe(target)
    latency = round((time.perf_counter() - started) * 1000, 3)
    return ProbeResult("unhealthy" if error else "healthy", latency, error, utc_now())
